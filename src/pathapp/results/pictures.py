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

import numpy as np

from pathapp.atomic import atomic_path

PANEL_PX = 260  # width of the side panel holding the colour bar or legend
TITLE_PX = 44
DPI = 100
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
    """float values -> uint8 RGB through the bar's (perceptually uniform) matplotlib colour map."""
    from matplotlib import colormaps

    span = bar.vmax - bar.vmin
    t = np.clip((np.asarray(values, np.float64) - bar.vmin) / (span if span > 0 else 1.0), 0, 1)
    return np.round(colormaps[bar.cmap](t)[..., :3] * 255).astype(np.uint8)


def muted(rgb: np.ndarray) -> np.ndarray:
    """The slide in light grey, so colours drawn over it read as data, not stain."""
    grey = np.asarray(rgb, np.float32)[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat((140 + 0.45 * grey)[..., None], 3, axis=2)


def blend(base: np.ndarray, colour: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    """base + (colour − base) · alpha, as uint8 (alpha per pixel (H, W) or one number)."""
    a = np.asarray(alpha, np.float32)
    a = a[..., None] if a.ndim == 2 else a
    out = np.asarray(base, np.float32) + (np.asarray(colour, np.float32) - base) * a
    return np.round(np.clip(out, 0, 255)).astype(np.uint8)


def scale_bar_um(image_width_um: float) -> float:
    """A round length (1, 2 or 5 × 10^k µm) near a fifth of the image width."""
    target = max(image_width_um / 5, 1e-6)
    exp = np.floor(np.log10(target))
    steps = [m * 10**exp for m in NICE] + [10 ** (exp + 1)]
    return float(min(steps, key=lambda v: abs(np.log(v / target))))


def _um_label(um: float) -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"


def _draw_scale_bar(img, um_per_px: float) -> None:
    """A black bar of a round length with its label, in a white box at the image's lower left (PIL)."""
    from PIL import ImageDraw, ImageFont

    w, h = img.size
    um = scale_bar_um(w * um_per_px)
    length = max(1, round(um / um_per_px))
    from matplotlib import font_manager

    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 14)  # ships with matplotlib, has µ
    label = _um_label(um)
    tw = ImageDraw.Draw(img).textlength(label, font=font)
    bar_h = max(3, round(h / 150))
    box = (4, h - 34 - bar_h, 4 + max(length, tw) + 16, h - 4)
    draw = ImageDraw.Draw(img)
    draw.rectangle(box, fill="white", outline="black")
    draw.rectangle((box[0] + 8, box[1] + 6, box[0] + 8 + length - 1, box[1] + 6 + bar_h - 1), fill="black")
    draw.text((box[0] + 8 + (max(length, tw) - tw) / 2, box[1] + 10 + bar_h), label, fill="black", font=font)


def save_figure(path: str | Path, image: np.ndarray, *, um_per_px: float | None, scale: float, title: str,
                bar: ColourBar | None = None, legend: list[tuple[str, tuple[int, int, int]]] | None = None,
                note: str = "") -> Path:
    """Write `image` (uint8 RGB, placed 1:1) with `title`, a scale bar (when µm/px is known), and a
    colour bar or a legend in a side panel, as PNG (atomically). matplotlib draws the title and the
    panel; the image is pasted as it is (no resampling) and the scale bar drawn on it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    h, w = image.shape[:2]
    panel = PANEL_PX if (bar or legend) else 0
    fig_w, fig_h = w + panel, max(h, 320 if panel else 0) + TITLE_PX
    fig = plt.figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI, facecolor="white")
    try:
        fig.text(8 / fig_w, 1 - 10 / fig_h, title, ha="left", va="top", fontsize=13, weight="bold")
        if note:
            fig.text(8 / fig_w, 1 - 30 / fig_h, note, ha="left", va="top", fontsize=8.5, color="#444")
        top = (fig_h - TITLE_PX) / fig_h
        if bar is not None:
            cax = fig.add_axes(((w + 40) / fig_w, top - 0.75 * (fig_h - TITLE_PX) / fig_h, 22 / fig_w,
                                0.7 * (fig_h - TITLE_PX) / fig_h))
            sm = ScalarMappable(Normalize(bar.vmin, bar.vmax if bar.vmax > bar.vmin else bar.vmin + 1), bar.cmap)
            fig.colorbar(sm, cax=cax).set_label(bar.label, fontsize=11)
        if legend:
            handles = [Patch(facecolor=np.asarray(c) / 255, edgecolor="black", label=n) for n, c in legend]
            fig.legend(handles=handles, loc="upper left", bbox_to_anchor=((w + 12) / fig_w, top),
                       frameon=False, fontsize=11, title="class", title_fontsize=11, alignment="left")
        fig.canvas.draw()
        canvas = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    finally:
        plt.close(fig)
    slide_img = Image.fromarray(np.ascontiguousarray(np.asarray(image)[..., :3]))
    if um_per_px:
        _draw_scale_bar(slide_img, um_per_px)
    canvas[TITLE_PX:TITLE_PX + h, :w] = np.asarray(slide_img)
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
