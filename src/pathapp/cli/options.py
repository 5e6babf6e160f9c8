"""Options shared by several commands, defined once."""

from __future__ import annotations

import click

backend_option = click.option(
    "--backend",
    type=click.Choice(["openslide", "wsidicom", "tifffile", "pil"]),
    default=None,
    help="Force a reader instead of choosing one from the file's content.",
)
slide_mpp_option = click.option(
    "--slide-mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="UM_PER_PX",
    help="The slide's own level-0 resolution in µm/px, for files that lack it or state it wrongly "
    "(distinct from --mpp, the resolution tiles are analysed at).",
)


def stain_options(f):
    """--stain-norm METHOD --stain-ref REF, shared by infer, train, evaluate and pretrain."""
    f = click.option("--stain-ref", type=click.Path(exists=True), default=None, metavar="REF",
                     help="The stain appearance to normalise to: a tile or image, a slide, or a saved target "
                     "(the run.json of an earlier run, or a target .json).")(f)
    return click.option("--stain-norm", type=click.Choice(["macenko", "reinhard", "vahadane"]), default=None,
                        help="Normalise stains onto --stain-ref, fitted once per slide (per image for image data) "
                        "on its tissue. H&E or IHC, as the reference; not fluorescence.")(f)
qc_option = click.option(
    "--qc", type=click.Choice(["flag", "exclude", "off"]), default="flag", show_default=True,
    help="Quality control of every tile (background, pen, fold, blur, out of focus, JPEG): flag marks artefacts "
    "in the results; exclude also keeps flagged tiles from the model and the results (and says how many).")
