"""`pathapp model`: make, inspect and list model bundles (thin wrappers over pathapp.models)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pathapp.cli.options import MPP, TILE_SIZE


@click.group("model")
def model() -> None:
    """Model bundles: one .pathapp file = backbone weights + optional head + classes + preprocessing.

    \b
    Examples:
      pathapp model list
      pathapp model create --backbone dinov2_vits14 --weights dinov2_vits14_pretrain.pth --out vits.pathapp
      pathapp model create --backbone dinov2_vits14 --weights w.pth --head head.safetensors \\
          --classes "Tumor,Stroma" --mpp 0.5 --out tumor.pathapp
      pathapp model info tumor.pathapp
    """


def _parse_colors(text: str | None) -> list[tuple[int, int, int]] | None:
    if text is None:
        return None
    try:
        colors = []
        for item in text.split(";"):
            r, g, b = (int(v) for v in item.split(","))
            colors.append((r, g, b))
    except ValueError:
        raise click.BadParameter("give r,g,b triples separated by ';', e.g. '200,0,0;150,200,150'") from None
    return colors


@model.command("create")
@click.option("--backbone", metavar="NAME", help="Registry name (see `pathapp model list`). Not needed "
              "when --weights is a bundle.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="FILE",
              help="Backbone checkpoint: official DINOv2 .pth, timm .pth/.bin/.safetensors, a transformers "
              "model.safetensors, or a .pathapp bundle. Omit to use the Hugging Face hub (cache honoured, "
              "HF_HUB_OFFLINE=1 respected).")
@click.option("--head", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="FILE",
              help="Optional head: a .safetensors/.json/.pt head file ({kind, config, tensors}) or a bundle "
              "whose head is taken. Without a head the bundle yields embeddings only.")
@click.option("--classes", metavar="A,B,...", help="Class names in the head's output order, comma separated.")
@click.option("--colors", metavar="R,G,B;...", help="Class colours, e.g. '200,0,0;150,200,150' (default: a palette).")
@click.option("--mpp", type=MPP, metavar="UM_PER_PX",
              help="Resolution tiles are analysed at, µm/px [default: 0.5, or the source bundle's].")
@click.option("--tile-size", type=TILE_SIZE, metavar="PX",
              help="Tile size in pixels fed to the model [default: the backbone's input size, 224].")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.pathapp",
              help="Bundle to write (atomically).")
def create(backbone: str | None, weights: Path | None, head: Path | None, classes: str | None,
           colors: str | None, mpp: float | None, tile_size: int | None, out: Path) -> None:
    """Write a model bundle from a backbone, its weights and an optional head."""
    from pathapp.models.header import read_metadata
    from pathapp.models.loader import create_bundle

    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    path = create_bundle(out, backbone=backbone, weights=weights, head=head, class_names=names,
                         class_colors=_parse_colors(colors), mpp=mpp, tile_size=tile_size)
    meta = read_metadata(path)
    head_kind = (meta["head"] or {}).get("kind", "none (embeddings only)")
    click.echo(f"wrote {path}: {meta['backbone']['name']}, head {head_kind}, "
               f"{len(meta['classes'])} classes, {meta['preprocessing']['mpp']} µm/px, "
               f"{meta['preprocessing']['tile_size']} px tiles")


@model.command("info")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def info(file: Path) -> None:
    """Print a bundle's metadata (backbone, head, classes, preprocessing, provenance) as JSON."""
    from pathapp.models.header import read_metadata

    click.echo(json.dumps(read_metadata(file), indent=2))


@model.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the full specs as JSON.")
def list_(as_json: bool) -> None:
    """Backbone names usable with --backbone / --model."""
    from pathapp.models.registry import REGISTRY

    if as_json:
        click.echo(json.dumps({n: s.to_dict() for n, s in REGISTRY.items()}, indent=2))
        return
    width = max(map(len, REGISTRY))
    for name, spec in REGISTRY.items():
        click.echo(f"{name:<{width}}  {spec.embedding_dim:>5}-d  {spec.description}")
