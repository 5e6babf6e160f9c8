"""`pathapp search` and `pathapp evaluate-search`: find similar tissue, and measure how well it works."""

from __future__ import annotations

from pathlib import Path

import click

from pathapp.cli.options import slide_mpp_option

_model_option = click.option(
    "--model", default=None, metavar="BUNDLE|NAME",
    help="The model the index was built with (default: the one `index add --model` recorded).")
_weights_option = click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
                               help="Weights file for a backbone NAME given to --model.")
_device_option = click.option("--device", default="auto", show_default=True)


@click.command(context_settings={"max_content_width": 100})
@click.argument("location", metavar="INDEX")
@click.option("--query", "query", required=True, metavar="IMAGE|SLIDE|SLIDE@X,Y",
              help="An image or whole slide, a slide with --roi, or the tile of SLIDE holding level-0 pixel X,Y.")
@click.option("--roi", type=click.Path(exists=True, dir_okay=False), default=None,
              help="QuPath GeoJSON export of annotations on the query slide: search with the tiles inside.")
@click.option("--roi-class", multiple=True, metavar="NAME", help="Use only --roi annotations of this class (repeatable).")
@click.option("--k", type=click.IntRange(min=1), default=20, show_default=True, help="Number of hits.")
@click.option("--level", type=click.Choice(["tile", "slide"]), default="tile", show_default=True,
              help="Rank tiles, or slides (by slide vector for an image or whole slide; by the mean of the "
              "query tiles' best similarities for a region or tile).")
@click.option("--exclude-case", is_flag=True,
              help="Leave out hits from the query slide's own case (its `case` in the index's --meta).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for hits.csv, hits.json, mosaic.png and geojson/<slide>.geojson.")
@_model_option
@_weights_option
@slide_mpp_option
@click.option("--min-tissue", type=click.FloatRange(0, 1), default=None,
              help="Tissue fraction a query tile needs (default as `pathapp infer`).")
@_device_option
def search(location: str, query: str, roi: str | None, roi_class: tuple[str, ...], out: Path, **options: object) -> None:
    """Find the tiles or slides in INDEX that look most like the query.

    The query is tiled and embedded exactly as the indexed slides were (same model, µm/px, tile size;
    an image without µm/px needs --slide-mpp). Writes into OUT: hits.csv (rank, similarity, slide,
    QuPath entry, level-0 box, label, case, metadata, class probabilities), mosaic.png (the query
    beside its hits), and per hit slide a QuPath GeoJSON of its hit tiles (detections with a
    `similarity` measurement) to drag onto that image in QuPath.

    \b
    Examples:
      pathapp search idx/ --query patch.png --slide-mpp 0.5 --out hits/
      pathapp search idx/ --query slide.svs --roi rois.geojson --roi-class Tumor --level slide --out hits/
      pathapp search idx/ --query slide.svs@12000,8400 --k 50 --exclude-case --out hits/
    """
    from pathapp.index.query import parse_query
    from pathapp.index.search import rank_report
    from pathapp.index.search import search as run_search

    result = run_search(location, parse_query(query, roi, list(roi_class)), out, **options)  # type: ignore[arg-type]
    for line in rank_report(result.hits):
        click.echo(line)
    click.echo(f"search: {len(result.hits)} hits -> {out / 'hits.csv'}, {out / 'mosaic.png'}", err=True)


@click.command("evaluate-search", context_settings={"max_content_width": 100})
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="labels.csv with columns image,label and a case column (case_prefix, patient, case).")
@click.option("--model", required=True, metavar="BUNDLE|NAME", help="The model to evaluate (bundle or backbone name).")
@_weights_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the index, the inference results (reused by a rerun), report.json, report.md "
              "and evaluation.png.")
@click.option("--group-by", default=None, metavar="COLUMN",
              help="The case column (default: the first of case, case_prefix, patient, patient_id).")
@slide_mpp_option
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None, metavar="UM_PER_PX",
              help="Resolution the images are tiled at (default: the bundle's).")
@click.option("--tile-size", type=click.IntRange(min=1), default=None, metavar="PX")
@click.option("--min-tissue", type=click.FloatRange(0, 1), default=None)
@click.option("--n-boot", type=click.IntRange(min=100), default=1000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None)
@_device_option
def evaluate_search(data: Path, model: str, weights: str | None, out: Path, group_by: str | None,
                    slide_mpp: float | None, n_boot: int, seed: int, **infer_options: object) -> None:
    """Leave-one-case-out retrieval on labelled images: does search find tissue of the same class?

    Every image is indexed as `pathapp index add` does (through `pathapp infer`), then each image
    (slide level) and each of its tiles (tile level) searches the index with its own case left out.
    Prints top-1 accuracy, majority vote at 5 (mMV@5) and AP@10 (mAP@10), each with a 95 % CI from a
    bootstrap over cases, for the model and, in the same run, for a 512-bin colour histogram of the
    same tiles, with the paired difference and the top-1 of a random ranking.

    \b
    Example:
      pathapp evaluate-search --data ../shared/data/labeled/ebhi-seg/labels.csv --model m.pathapp \\
          --slide-mpp 1.0 --out eval/
    """
    from pathapp.index.evaluate import evaluate_search as run
    from pathapp.index.evaluate import report_table

    from pathapp.infer.options import InferOptions

    infer = InferOptions(model=model, weights=weights, slide_mpp=slide_mpp, **infer_options)  # type: ignore[arg-type]
    report = run(data, infer, out, group_by=group_by, n_boot=n_boot, seed=seed)
    for line in report_table(report):
        click.echo(line)
    click.echo(f"evaluate-search: report in {out / 'report.json'}, picture {out / 'evaluation.png'}", err=True)
