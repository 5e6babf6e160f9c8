"""`pathapp index add|remove|info`: build and maintain a similarity-search index."""

from __future__ import annotations

import json
import sys

import click

from pathapp.cli.options import slide_mpp_option


@click.group(context_settings={"max_content_width": 100})
def index() -> None:
    """Build a similarity-search index of tile and slide embeddings, for `pathapp search`.

    \b
    Examples:
      pathapp infer slides/ --model m.pathapp --out results/
      pathapp index add idx/ results/ --meta cases.csv          (result folders as they are)
      pathapp index add idx/ more_slides/ --model m.pathapp     (embedded on the way, finished ones reused)
      pathapp index add qdrant://db:6333/crc project.qpproj --model m.pathapp
      pathapp index remove idx/ old_slide.svs
      pathapp index info idx/
    """


@index.command(context_settings={"max_content_width": 100})
@click.argument("location", metavar="INDEX")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True), metavar="SOURCE...")
@click.option("--model", default=None, metavar="BUNDLE|NAME",
              help="Embed slides, folders of slides and QuPath projects with this model first (as `pathapp "
              "infer` does, reusing finished results). Not needed for result folders.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Weights file for a backbone NAME given to --model.")
@click.option("--meta", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CSV of per-slide metadata: a slide column (path, file name or slide name) plus any others "
              "(case, label, site, ...); `case` (or case_prefix, patient) is what --exclude-case uses.")
@click.option("--kind", type=click.Choice(["auto", "flat", "ivfpq"]), default="auto", show_default=True,
              help="FAISS search structure: exact up to 50,000 tiles, then IVF-PQ with exact re-ranking (auto), or forced.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where `pathapp infer` writes results for --model sources (default: beside each slide).")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None, metavar="UM_PER_PX",
              help="Resolution for --model sources (default: the bundle's).")
@click.option("--tile-size", type=click.IntRange(min=1), default=None, metavar="PX")
@slide_mpp_option
@click.option("--min-tissue", type=click.FloatRange(0, 1), default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None)
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "int8"]), default="fp32", show_default=True)
def add(location: str, sources: tuple[str, ...], model: str | None, meta: str | None, kind: str, out: str | None,
        **infer_options: object) -> None:
    """Add SOURCE... to INDEX (made when new); a slide added again is replaced.

    SOURCE is a `pathapp infer` result folder (or a folder of them), or, with --model, a slide, a
    folder of slides or a QuPath project. Every tile vector carries its slide, QuPath entry ID,
    level-0 box, µm/px and class probabilities, and each slide gets a slide vector (the mean of its
    tile embeddings; attention-weighted for an attention-MIL bundle). Vectors of another model,
    µm/px or tile size than the index's are refused.

    INDEX is a folder (a FAISS index, made on first use) or qdrant://HOST:PORT/COLLECTION for a Qdrant
    server (API key from $QDRANT_API_KEY); qdrant:///DIR/COLLECTION is Qdrant's embedded local mode.
    Two processes adding to one folder take turns (a lock); a killed add leaves the index as it was.
    """
    from pathapp.index.sources import add_sources
    from pathapp.infer.options import InferOptions

    infer = InferOptions(model=model, out=out, **infer_options) if model else None  # type: ignore[arg-type]
    summary = add_sources(location, list(sources), infer=infer, meta=meta, kind=kind)
    parts = [f"{len(summary.added)} slides indexed", f"{len(summary.replaced)} replaced"]
    if summary.failed:
        parts.append(f"{len(summary.failed)} failed")
    click.echo("index: " + ", ".join(parts), err=True)
    if not summary.ok:
        sys.exit(1)


@index.command(context_settings={"max_content_width": 100})
@click.argument("location", metavar="INDEX")
@click.argument("slides", nargs=-1, required=True, metavar="SLIDE...")
def remove(location: str, slides: tuple[str, ...]) -> None:
    """Delete SLIDE... (a path or slide name) and all its tiles from INDEX."""
    from pathapp.index.sources import remove_slides

    gone = remove_slides(location, list(slides))
    click.echo(f"index: removed {len(gone)} slide(s)", err=True)


@index.command(context_settings={"max_content_width": 100})
@click.argument("location", metavar="INDEX")
@click.option("--slides", "list_slides", is_flag=True, help="Also list every slide with its tile count and metadata.")
def info(location: str, list_slides: bool) -> None:
    """Print INDEX's model, backend, structure and counts as JSON."""
    from pathapp.index import open_index

    with open_index(location) as idx:
        doc = idx.describe()
        if list_slides:
            doc["slide_list"] = [{"slide": r.slide_path, "tiles": r.n_tiles, "entry": r.entry_id, **r.meta}
                                 for r in idx.slides().values()]
    click.echo(json.dumps(doc, indent=1))
