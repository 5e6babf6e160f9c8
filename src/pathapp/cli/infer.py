"""`pathapp infer`: run a model over slides, folders of slides, or a QuPath project."""

from __future__ import annotations

import sys

import click

from pathapp.cli.options import slide_mpp_option
from pathapp.models.loader import DEFAULT_MODEL


@click.command(context_settings={"max_content_width": 100})
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True), metavar="INPUT...")
@click.option("--model", "model", default=DEFAULT_MODEL, show_default=True, metavar="BUNDLE|NAME",
              help="A .pathapp bundle (classes, head, preprocessing), or a backbone name (see `pathapp "
              "model list`) for embeddings only, with weights from --weights or the hub.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Weights file for a backbone NAME: official DINOv2 .pth, timm .pth/.safetensors.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder; results go to OUT/<slide name>/. Default: beside each slide, in "
              "<slide folder>/pathapp/<slide name>/; for a QuPath project <project dir>/pathapp/<entryID>/.")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None, metavar="UM_PER_PX",
              help="Resolution tiles are analysed at, µm/px (default: the bundle's, usually 0.5).")
@click.option("--tile-size", type=click.IntRange(min=1), default=None, metavar="PX",
              help="Tile side in pixels (default: the bundle's).")
@click.option("--roi", type=click.Path(exists=True, dir_okay=False), default=None,
              help="QuPath GeoJSON export of annotations; only tiles whose centre lies inside are run.")
@click.option("--roi-class", multiple=True, metavar="NAME",
              help="Use only --roi annotations of this class (repeatable).")
@slide_mpp_option
@click.option("--min-tissue", type=click.FloatRange(0, 1), default=None,
              help="Tissue fraction a tile needs to be analysed (default 0.1).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Tile-reading processes (default: chosen from the CPU count; 0 = read in the main process).")
@click.option("--device", default="auto", show_default=True,
              help="auto (this rank's GPU if any, else CPU), cpu, cuda, cuda:1, ...")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "int8"]), default="auto", show_default=True,
              help="auto: bf16 on GPUs and on CPUs with AVX-512-BF16/AMX (2-3x faster, embedding cosine > 0.999 "
              "to fp32), else fp32. int8: dynamic int8 Linear layers on CPU (cosine ≥ 0.99; faster than fp32 "
              "only on CPUs without bf16).")
@click.option("--object-type", type=click.Choice(["tile", "detection"]), default="tile", show_default=True,
              help="QuPath object type of the per-tile objects in tiles.geojson.")
@click.option("--overwrite", is_flag=True, help="Recompute slides whose results are already complete.")
@click.option("--lease-seconds", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Processes sharing an --out claim slides one at a time; a slide whose process shows no "
              "sign of life this long is taken over by another (on one host: as soon as it is gone).")
@click.option("--write-project", is_flag=True,
              help="For a .qpproj input, also add the objects to the QuPath project (needs paquo and "
              "QuPath; otherwise prints how to import the GeoJSON).")
def infer(inputs: tuple[str, ...], model: str, weights: str | None, out: str | None, mpp: float | None,
          tile_size: int | None, roi: str | None, roi_class: tuple[str, ...], slide_mpp: float | None,
          min_tissue: float | None, batch_size: int, workers: int | None, device: str, precision: str,
          object_type: str, overwrite: bool, lease_seconds: float, write_project: bool) -> None:
    """Run MODEL over every slide in INPUT... and write QuPath-ready results.

    INPUT is a slide file, a folder of slides (a DICOM-WSI series folder counts as one slide), or a
    QuPath project (project.qpproj or its folder). Each slide gets a folder with tiles.geojson and annotations.geojson
    (drag them onto the image in QuPath), heatmap-<class>.png, overlay.png, embeddings.h5 (CLAM/TRIDENT
    layout) and run.json. A rerun skips slides that are complete; a slide that fails is reported and
    the others still run (exit code 1 if any failed).

    \b
    Examples:
      pathapp infer slide.svs                                   (DINOv2 ViT-S/14 embeddings, PCA map)
      pathapp infer slide.svs --model tumor.pathapp
      pathapp infer slides/ --model dinov2_vits14 --weights dinov2_vits14_pretrain.pth --mpp 0.5
      pathapp infer project.qpproj --model tumor.pathapp --roi rois.geojson --roi-class Tumor
      torchrun --nproc-per-node 4 -m pathapp infer slides/ --model tumor.pathapp   (one GPU per rank)
      sbatch --array=0-15 --wrap "pathapp infer slides/ --model tumor.pathapp --out results/"
                                    (16 tasks share the slides: each claims the next unfinished one)
    """
    from pathapp.infer import InferOptions, run_inference

    options = InferOptions(
        model=model, weights=weights, out=out, mpp=mpp, tile_size=tile_size, roi=roi, roi_class=roi_class,
        slide_mpp=slide_mpp, min_tissue=min_tissue, batch_size=batch_size, workers=workers, device=device,
        precision=precision, object_type=object_type, overwrite=overwrite, write_project=write_project,
        lease_seconds=lease_seconds)
    summary = run_inference(list(inputs), options)
    parts = [f"{len(summary.done)} written", f"{len(summary.skipped)} already complete"]
    if summary.elsewhere:
        parts.append(f"{len(summary.elsewhere)} written by other processes")
    if summary.failed:
        parts.append(f"{len(summary.failed)} failed")
    click.echo("infer: " + ", ".join(parts), err=True)
    if not summary.ok:
        sys.exit(1)
