"""Options and numeric types shared by several commands, defined once.

Every number a command takes goes through one of the ranges below: finite (no nan, no inf) and within
what the machine and the model can use, so a typo fails at the command line in one line, before any
slide is opened or any file written."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click

from pathapp.slide.base import MAX_MPP, MIN_MPP

MAX_TILE_SIZE = 8192  # px; the largest tile a model or a tiling is read at
MAX_BATCH_SIZE = 65536
MAX_WORKERS = 256
MAX_COUNT = 10**9  # steps, epochs, resamples: anything more is a typo


class FiniteRange(click.FloatRange):
    """A float range that also refuses nan and ±inf (click's FloatRange lets both through)."""

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        rv = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(rv, param, ctx)


MPP = FiniteRange(MIN_MPP, MAX_MPP)
FRACTION = FiniteRange(0.0, 1.0)
TILE_SIZE = click.IntRange(8, MAX_TILE_SIZE)
BATCH_SIZE = click.IntRange(1, MAX_BATCH_SIZE)
WORKERS = click.IntRange(0, MAX_WORKERS)
COUNT = click.IntRange(1, MAX_COUNT)


def positive(max_value: float = float(MAX_COUNT)) -> FiniteRange:
    """A finite float > 0 and ≤ `max_value` (learning rates, minutes, epochs)."""
    return FiniteRange(0.0, max_value, min_open=True)


backend_option = click.option(
    "--backend",
    type=click.Choice(["openslide", "wsidicom", "tifffile", "pil"]),
    default=None,
    help="Force a reader instead of choosing one from the file's content.",
)


def _unset_option(name: str, kind: click.ParamType, metavar: str, text: str) -> Callable[[Any], Any]:
    """An option whose absence (None) means "what the slide or the bundle says"."""
    return click.option(name, type=kind, default=None, metavar=metavar, help=text)


slide_mpp_option = _unset_option(
    "--slide-mpp", MPP, "UM_PER_PX",
    "The slide's own level-0 resolution in µm/px, for files that lack it or state it wrongly "
    "(distinct from --mpp, the resolution tiles are analysed at). A slide more than 1.5× coarser than "
    "the tiles is upsampled with a warning; more than 4× coarser, it is refused unless its µm/px is "
    "stated here (the file's own value, e.g. --slide-mpp 16.783 for a 16.783 µm/px overview, goes ahead).",
)
image_mpp_option = _unset_option(
    "--image-mpp", MPP, "UM_PER_PX",
    "The µm/px of labelled images (a PNG or JPEG does not record its scale): they are tiled at the "
    "model's µm/px and tile size as `pathapp infer` tiles a slide. An mpp column in labels.csv wins per image; "
    "without either, an image must record its own (e.g. a TIFF), else it is refused.",
)

_out_option = click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder; results go to OUT/<slide name>/. Default: beside each slide, in "
    "<slide folder>/pathapp/<slide name>/; for a QuPath project <project dir>/pathapp/<entryID>/.",
)
_mpp_option = _unset_option("--mpp", MPP, "UM_PER_PX",
                            "Resolution tiles are analysed at, µm/px (default: the bundle's, usually 0.5).")
_tile_size_option = _unset_option("--tile-size", TILE_SIZE, "PX", "Tile side in pixels (default: the bundle's).")
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")


def slide_run_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--out, --mpp, --tile-size and --slide-mpp, as every command that runs a model over slides takes them."""
    for option in (slide_mpp_option, _tile_size_option, _mpp_option, _out_option):  # last applied is listed first
        command = option(command)
    return command


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
