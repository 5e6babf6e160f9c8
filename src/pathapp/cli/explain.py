"""`pathapp explain`: saliency maps that show which parts of a tile made the model's call."""

from __future__ import annotations

import sys

import click

from pathapp.cli.options import device_option, slide_run_options


@click.command(context_settings={"max_content_width": 100})
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True), metavar="SLIDE|IMAGE...")
@click.option("--model", required=True, metavar="BUNDLE",
              help="A .pathapp bundle with a head (tile head, or attention-MIL slide head).")
@click.option("--class", "class_name", default=None, metavar="NAME",
              help="Class to explain. Default: each tile's own top class (a slide head: the slide's call).")
@click.option("--method", "methods", multiple=True, type=click.Choice(["vitcx", "rollout", "attention"]),
              help="vitcx: ViT-CX causal saliency (Xie et al. 2023). rollout: attention rollout (Abnar & "
              "Zuidema 2020). attention: last-layer CLS attention. Repeat for several.  [default: vitcx]")
@click.option("--top", type=click.IntRange(min=1), default=None, metavar="N",
              help="Explain the N tiles with the highest probability of the class (a slide head: the highest "
              "attention).  [default: 8, or every tile inside --roi]")
@click.option("--roi", type=click.Path(exists=True, dir_okay=False), default=None,
              help="QuPath GeoJSON export of annotations, or of pathapp tiles selected in QuPath: explain the "
              "tiles whose centre lies inside.")
@click.option("--roi-class", multiple=True, metavar="NAME", help="Use only --roi objects of this class (repeatable).")
@click.option("--faithfulness", is_flag=True,
              help="Also measure each map: deletion and insertion curves against random patch orders "
              "(explain.json).")
@slide_run_options
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per forward pass (tiles, and ViT-CX's perturbed copies).")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Tile-reading processes.")
@device_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of ViT-CX's noise and the random orders.")
def explain(inputs: tuple[str, ...], model: str, methods: tuple[str, ...], roi_class: tuple[str, ...],
            out: str | None, **options: object) -> None:
    """Show why MODEL called tiles what it did: a saliency map per tile on the ViT's patch grid
    (16 × 16 for a 224 px ViT/14), for the top tiles of a class or the tiles inside --roi.

    Writes into OUT/<slide name>/: explain-<method>.png (per tile: tile, map, overlay),
    saliency-<method>.png (the maps on the slide, with colour bar and scale bar),
    saliency-<method>.geojson (one QuPath detection per patch with a `saliency` measurement: drag it
    onto the image and colour it with Measure > Show measurement maps), explain.npz (raw maps) and
    explain.json. ViT-CX runs the model on tens of perturbed copies of each tile: a few seconds per
    tile for ViT-S on a CPU, more for large backbones (use a GPU, or fewer --top tiles).

    \b
    Examples:
      pathapp explain slide.svs --model crc.pathapp --class Tumor --top 8
      pathapp explain slide.svs --model crc.pathapp --method vitcx --method rollout --method attention
      pathapp explain slide.svs --model crc.pathapp --roi selected_tiles.geojson --out explained/
      pathapp explain tile.png --slide-mpp 0.5 --model crc.pathapp --faithfulness
      pathapp explain slide.svs --model mil.pathapp --top 4     (attention-MIL: top-attention tiles)
    """
    from pathapp.explain.api import ExplainOptions, run_explain

    opts = ExplainOptions(model=model, methods=list(methods) or ["vitcx"], roi_class=list(roi_class),
                          **options)  # type: ignore[arg-type]
    summary = run_explain(list(inputs), opts, out)
    parts = [f"{len(summary.done)} explained"] + ([f"{len(summary.failed)} failed"] if summary.failed else [])
    click.echo("explain: " + ", ".join(parts), err=True)
    if summary.failed:
        sys.exit(1)
