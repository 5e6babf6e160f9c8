"""Pictures for people: a slide-sized image (at the thumbnail's full resolution, never resampled)
with a title, a scale bar in µm, and a colour bar or a class legend beside it.

The slide image is placed pixel for pixel; the PNG's text chunks say where it lies in the figure
(`pathapp:image_box` = x, y, width, height in PNG px) and its scale (`pathapp:scale`, level-0 px per
image px), so a program can still map every pixel back to the slide."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pathapp.atomic import atomic_path

PANEL_PX = 260  # width of the side panel holding the colour bar or legend
TITLE_PX = 44
NICE = (1, 2, 5)
_ENCODER: ContextVar[tuple[ThreadPoolExecutor, list[Future]] | None] = ContextVar("pathapp_png_encoder", default=None)


@dataclass
class ColourBar:
    """A colour map and the values its ends stand for."""

    label: str
    vmin: float
    vmax: float
    cmap: str = "viridis"


def colourise(values: np.ndarray, bar: ColourBar) -> np.ndarray:
    """float values -> uint8 RGB through the bar's (perceptually uniform) colour map: matplotlib's maps,
    the same colours, from `cmap`, which imports in half matplotlib's time (0.05 s vs 0.10 s, quiet 2-core CPU)."""
    from cmap import Colormap

    span = bar.vmax - bar.vmin
    t = np.clip((np.asarray(values, np.float64) - bar.vmin) / (span if span > 0 else 1.0), 0, 1)
    return np.round(np.asarray(Colormap(bar.cmap)(t))[..., :3] * 255).astype(np.uint8)


def muted(rgb: np.ndarray) -> np.ndarray:
    """The slide in light grey, so colours drawn over it read as data, not stain."""
    grey = np.asarray(rgb, np.float32)[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat((140 + 0.45 * grey)[..., None], 3, axis=2)


def blend(base: np.ndarray, colour: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    """base + (colour − base) · alpha in float32, as uint8 (alpha per pixel (H, W) or one number).
    In place in one buffer: this runs over every thumbnail pixel of every picture (half the time)."""
    base = np.asarray(base, np.float32)
    a = np.asarray(alpha, np.float32)
    out = np.subtract(colour, base, dtype=np.float32)
    out *= a[..., None] if a.ndim == 2 else a
    out += base
    np.clip(out, 0, 255, out=out)
    return np.round(out, out=out).astype(np.uint8)


def scale_bar_um(image_width_um: float) -> float:
    """A round length (1, 2 or 5 × 10^k µm) near a fifth of the image width."""
    target = max(image_width_um / 5, 1e-6)
    exp = np.floor(np.log10(target))
    steps = [m * 10**exp for m in NICE] + [10 ** (exp + 1)]
    return float(min(steps, key=lambda v: abs(np.log(v / target))))


def _um_label(um: float) -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"


def _font(size: int, bold: bool = False) -> Any:
    """DejaVu Sans (it has µ and →), from the copy matplotlib ships, found without importing
    matplotlib (0.5 s and 20 MB that a run's pictures do not need)."""
    from importlib.util import find_spec

    from PIL import ImageFont

    spec = find_spec("matplotlib")
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / name if spec and spec.origin else None
    return ImageFont.truetype(str(path), size) if path and path.is_file() else ImageFont.load_default(size)


def _draw_scale_bar(img, um_per_px: float) -> None:
    """A black bar of a round length with its label, in a white box at the image's lower left."""
    from PIL import ImageDraw

    w, h = img.size
    um = scale_bar_um(w * um_per_px)
    length = max(1, round(um / um_per_px))
    font = _font(14)
    label = _um_label(um)
    draw = ImageDraw.Draw(img)
    tw = draw.textlength(label, font=font)
    bar_h = max(3, round(h / 150))
    box = (4, h - 34 - bar_h, 4 + max(length, tw) + 16, h - 4)
    draw.rectangle(box, fill="white", outline="black")
    draw.rectangle((box[0] + 8, box[1] + 6, box[0] + 8 + length - 1, box[1] + 6 + bar_h - 1), fill="black")
    draw.text((box[0] + 8 + (max(length, tw) - tw) / 2, box[1] + 10 + bar_h), label, fill="black", font=font)


def _ticks(vmin: float, vmax: float) -> list[float]:
    """Round values (1, 2 or 5 × 10^k apart) from vmin to vmax, about five of them."""
    step = scale_bar_um(vmax - vmin) if vmax > vmin else 1.0
    first = np.ceil(vmin / step - 1e-9) * step
    return [float(v) for v in np.arange(first, vmax + step * 1e-6, step)]


def _draw_colour_bar(figure: Any, left: int, top: int, height: int, bar: ColourBar) -> None:
    """A vertical colour bar, vmax at the top, with tick labels and the bar's label beside it."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(figure)
    span = bar.vmax - bar.vmin if bar.vmax > bar.vmin else 1.0
    ramp = colourise(bar.vmax - (np.arange(height) + 0.5) / height * span, bar)
    figure.paste(Image.fromarray(np.ascontiguousarray(np.repeat(ramp[:, None], 22, axis=1))), (left, top))
    draw.rectangle((left, top, left + 21, top + height - 1), outline="black")
    font, widest = _font(13), 0.0
    for v in _ticks(bar.vmin, bar.vmax):
        y = top + round((bar.vmax - v) / span * (height - 1))
        draw.line((left + 22, y, left + 26, y), fill="black")
        label = f"{round(v, 12) + 0.0:g}"  # + 0.0: no "-0"
        widest = max(widest, draw.textlength(label, font=font))
        draw.text((left + 30, y), label, fill="black", font=font, anchor="lm")
    label_font = _font(15)
    text = Image.new("L", (round(draw.textlength(bar.label, font=label_font)) + 4, 20), 0)
    ImageDraw.Draw(text).text((2, 0), bar.label, fill=255, font=label_font)
    text = text.rotate(90, expand=True)
    x, y = left + 34 + round(widest), top + max(0, (height - text.size[1]) // 2)
    figure.paste((0, 0, 0), (x, y), text)


def _draw_legend(figure: Any, left: int, top: int, legend: list[tuple[str, tuple[int, int, int]]]) -> None:
    """A 'class' heading and one swatch + name per class."""
    from PIL import ImageDraw

    draw, font = ImageDraw.Draw(figure), _font(15)
    draw.text((left, top + 4), "class", fill="black", font=font)
    for i, (name, colour) in enumerate(legend):
        y = top + 30 + 24 * i
        draw.rectangle((left, y, left + 26, y + 14), fill=tuple(int(c) for c in colour), outline="black")
        draw.text((left + 36, y + 7), name, fill="black", font=font, anchor="lm")


def save_figure(path: str | Path, image: np.ndarray, *, um_per_px: float | None, scale: float, title: str,
                bar: ColourBar | None = None, legend: list[tuple[str, tuple[int, int, int]]] | None = None,
                note: str = "") -> Path:
    """Write `image` (uint8 RGB, placed 1:1) with `title`, a scale bar (when µm/px is known), and a
    colour bar or a legend in a side panel, as PNG (atomically). Drawn with PIL: the image is pasted
    as it is (no resampling)."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    h, w = image.shape[:2]
    panel = PANEL_PX if (bar or legend) else 0
    figure = Image.new("RGB", (w + panel, max(h, 320 if panel else 0) + TITLE_PX), "white")
    draw = ImageDraw.Draw(figure)
    draw.text((8, 6), title, fill="black", font=_font(18, bold=True))
    if note:
        draw.text((8, 28), note, fill="#444444", font=_font(12))
    if bar is not None:
        panel_h = figure.size[1] - TITLE_PX
        _draw_colour_bar(figure, w + 40, TITLE_PX + round(0.05 * panel_h), round(0.7 * panel_h), bar)
    if legend:
        _draw_legend(figure, w + 12, TITLE_PX, legend)
    slide_img = Image.fromarray(np.ascontiguousarray(np.asarray(image)[..., :3]))
    if um_per_px:
        _draw_scale_bar(slide_img, um_per_px)
    figure.paste(slide_img, (0, TITLE_PX))
    canvas = np.asarray(figure)
    info = PngInfo()
    info.add_text("pathapp:image_box", f"0,{TITLE_PX},{w},{h}")
    info.add_text("pathapp:scale", f"{scale:.6f}")
    encoder = _ENCODER.get()
    if encoder is None:
        _write_png(path, canvas, info)
    else:
        encoder[1].append(encoder[0].submit(_write_png, path, canvas, info))
    return Path(path)


def _write_png(path: str | Path, canvas: np.ndarray, info) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG", pnginfo=info, compress_level=1)


@contextmanager
def pictures_in_threads(workers: int = 2) -> Iterator[None]:
    """Inside, `save_figure` hands each PNG's encoding (zlib, which releases the GIL) to `workers`
    threads and goes on to draw the next picture; on leaving, every picture is on disk, or the first
    error is raised."""
    if _ENCODER.get() is not None:
        yield
        return
    futures: list[Future] = []
    with ThreadPoolExecutor(workers, thread_name_prefix="png") as pool:
        token = _ENCODER.set((pool, futures))
        try:
            yield
        finally:
            _ENCODER.reset(token)
    for f in futures:
        f.result()


def image_box(path: str | Path) -> tuple[int, int, int, int]:
    """(x, y, width, height) of the slide image inside a picture written by save_figure."""
    from PIL import Image

    with Image.open(path) as im:
        return tuple(int(v) for v in im.text["pathapp:image_box"].split(","))  # type: ignore[return-value]
