"""`pathapp tile`: tissue tiles of slides at a chosen µm/px, as QuPath GeoJSON and a picture."""

from __future__ import annotations

import click

from pathapp.cli.options import FRACTION, MAX_TILE_SIZE, MPP, TILE_SIZE, backend_option, slide_mpp_option
from pathapp.cli.slides import for_each_slide


@click.command()
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--mpp", type=MPP, default=0.5, show_default=True,
              metavar="UM_PER_PX", help="Resolution the tiles are made at, in µm per pixel (0.5 ≈ 20×).")
@click.option("--tile-size", type=TILE_SIZE, default=224, show_default=True, metavar="PX",
              help="Tile side in pixels at --mpp.")
@click.option("--overlap", type=click.IntRange(0, MAX_TILE_SIZE), default=0, show_default=True, metavar="PX",
              help="Pixels (at --mpp) shared by neighbouring tiles; must be smaller than --tile-size.")
@click.option("--min-tissue", type=FRACTION, default=0.1, show_default=True, metavar="FRACTION",
              help="Keep a tile when at least this fraction of it is tissue (0 keeps every tile).")
@click.option("--roi", "roi_path", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="QuPath GeoJSON export of annotations: keep only tiles whose centre is inside them.")
@click.option("--roi-class", "roi_classes", multiple=True, metavar="NAME",
              help="Use only --roi annotations of this class (repeat for several).")
@slide_mpp_option
@backend_option
@click.option("--out", type=click.Path(file_okay=False, path_type=str), required=True,
              help="Output folder; each slide gets OUT/<slide name>/.")
def tile(
    slides: tuple[str, ...],
    mpp: float,
    tile_size: int,
    overlap: int,
    min_tissue: float,
    roi_path: str | None,
    roi_classes: tuple[str, ...],
    slide_mpp: float | None,
    backend: str | None,
    out: str,
) -> None:
    """Find the tissue in each SLIDE and cut it into square tiles at --mpp µm/px.

    Writes OUT/<slide name>/tiles.geojson (one QuPath tile object per tile, with its tissue
    fraction; drag it onto the image in QuPath), tissue.geojson (the tissue outline) and
    thumbnail.png (tissue outline in green, tiles in blue), and prints one line per slide.
    SLIDE is a slide file (SVS, NDPI, MRXS, OME-TIFF, DICOM, ...), a DICOM-WSI series folder, or a
    DICOMweb address (a study means each of its slides; the folder is named by the series UID).
    A slide whose file has no µm/px needs --slide-mpp. Exit code 1 when a slide failed.

    \b
    Examples:
      pathapp tile slide.svs --mpp 0.5 --tile-size 224 --out tiles/
      pathapp tile slide.svs --roi annotations.geojson --roi-class Tumor --out tiles/
      pathapp tile scan.tif --slide-mpp 0.25 --mpp 1.0 --out tiles/
      pathapp tile dicomweb+https://pacs.example.org/dicom-web/studies/1.2.3 --out tiles/
    """
    from pathapp.tiles.export import tile_slide

    if overlap >= tile_size:
        raise click.BadParameter(f"must be smaller than --tile-size ({tile_size})", param_hint="--overlap")
    rois = None
    if roi_path is not None:
        from pathapp.qupath.geojson import read_rois

        rois = read_rois(roi_path, roi_classes or None)
    elif roi_classes:
        raise click.BadParameter("needs --roi", param_hint="--roi-class")

    def tile_one(path: str) -> None:
        result = tile_slide(path, out, mpp=mpp, tile_size=tile_size, overlap=overlap, min_tissue=min_tissue,
                            rois=rois, backend=backend, slide_mpp=slide_mpp)
        click.echo(result.summary())
        if result.empty:
            click.echo(f"warning: {path}: no tiles: {result.empty}", err=True)

    for_each_slide(slides, tile_one)
