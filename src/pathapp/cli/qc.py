"""`pathapp qc`: quality control only (no model): which tiles show which artefact."""

from __future__ import annotations

import sys

import click

from pathapp.cli.options import FRACTION, MAX_TILE_SIZE, MPP, WORKERS, slide_mpp_option


@click.command(context_settings={"max_content_width": 100})
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True), metavar="INPUT...")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder; results go to OUT/<slide name>/ (default: <slide folder>/pathapp/<slide name>/).")
@click.option("--mpp", type=MPP, default=None, metavar="UM_PER_PX",
              help="Resolution tiles are checked at, µm/px (default 0.5: as a model would read them).")
@click.option("--tile-size", type=click.IntRange(16, MAX_TILE_SIZE), default=None, metavar="PX", help="Tile side (default 224).")
@slide_mpp_option
@click.option("--min-tissue", type=FRACTION, default=None,
              help="Tissue fraction a tile needs to be checked (default 0.1).")
@click.option("--workers", type=WORKERS, default=None, help="Tile-reading processes (default: up to 4).")
@click.option("--overwrite", is_flag=True, help="Recheck slides whose results are already complete.")
def qc(inputs: tuple[str, ...], out: str | None, mpp: float | None, tile_size: int | None, slide_mpp: float | None,
       min_tissue: float | None, workers: int | None, overwrite: bool) -> None:
    """Check every tissue tile of INPUT... for artefacts, without a model: background, pen ink (per
    colour), folds, blur (in µm), out-of-focus regions (air bubbles) and JPEG compression.

    Each slide gets tiles.geojson (every tile with its `qc: …` measurements, classified `QC: <artefact>`
    or `QC: ok`), annotations.geojson (one region per artefact), overlay-qc.png and run.json (tiles and
    area per artefact). The same checks run in `pathapp infer` (`--qc exclude` also drops flagged tiles).

    \b
    Examples:
      pathapp qc slide.svs
      pathapp qc slides/ --out qc/
      pathapp qc project.qpproj --mpp 1.0
    """
    from pathapp.infer import InferOptions, run_qc

    summary = run_qc(list(inputs), InferOptions(out=out, mpp=mpp, tile_size=tile_size, slide_mpp=slide_mpp,
                                                min_tissue=min_tissue, workers=workers, overwrite=overwrite))
    click.echo("qc: " + summary.line(), err=True)
    if not summary.ok:
        sys.exit(1)
