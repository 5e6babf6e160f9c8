"""The picture a search leaves: the query beside its hits, each hit captioned with its rank,
similarity, slide and label, read from the hit slides themselves."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pathapp.atomic import atomic_path

CELL = 192  # px per hit picture
COLUMNS = 5
CAPTION_LINES = 3
BACKGROUND = (255, 255, 255)
MISSING = (210, 210, 210)


def read_box(slide: Any, box: tuple[float, float, float, float], max_px: int) -> np.ndarray:
    """A level-0 box of `slide` as RGB, at most `max_px` on its long side, read from the pyramid
    level just finer than needed (a picture to look at, not a model input)."""
    from PIL import Image

    x0, y0, x1, y1 = (float(v) for v in box)
    x0, y0 = max(0.0, x0), max(0.0, y0)
    x1, y1 = min(float(slide.size[0]), x1), min(float(slide.size[1]), y1)
    w, h = max(1.0, x1 - x0), max(1.0, y1 - y0)
    scale = max(w, h) / max_px
    level = slide.best_level_for_downsample(max(1.0, scale))
    ds = slide.levels[level].downsample
    rgb = slide.read(int(x0), int(y0), max(1, round(w / ds)), max(1, round(h / ds)), level)
    img = Image.fromarray(rgb)
    size = (max(1, round(w / max(scale, 1e-9))), max(1, round(h / max(scale, 1e-9))))
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(img.convert("RGB"))


@dataclass
class Panel:
    """One picture of the mosaic with its caption lines."""

    rgb: np.ndarray | None  # None: the slide could not be read
    lines: Sequence[str]


def write_mosaic(path: str | os.PathLike, query: Panel, hits: Sequence[Panel], title: str) -> Path:
    """The query (left, twice a cell) beside a grid of hits (COLUMNS per row), captioned, as a PNG."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    line_h = 16
    cell_h = CELL + CAPTION_LINES * line_h + 10
    rows = max(1, -(-len(hits) // COLUMNS))
    qsize = 2 * CELL
    left = qsize + 30
    width = left + COLUMNS * (CELL + 10) + 10
    height = max(40 + qsize + 4 * line_h, 40 + rows * cell_h) + 10
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((10, 10), title, fill=(0, 0, 0), font=font)
    _paste(canvas, draw, query, (10, 40), qsize, font, line_h)
    for i, hit in enumerate(hits):
        r, c = divmod(i, COLUMNS)
        _paste(canvas, draw, hit, (left + c * (CELL + 10), 40 + r * cell_h), CELL, font, line_h)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


def _paste(canvas: Any, draw: Any, panel: Panel, at: tuple[int, int], size: int, font: Any, line_h: int) -> None:
    from PIL import Image

    x, y = at
    if panel.rgb is None:
        draw.rectangle([x, y, x + size - 1, y + size - 1], fill=MISSING)
        draw.text((x + 8, y + size // 2 - 8), "slide not readable here", fill=(80, 80, 80), font=font)
    else:
        img = Image.fromarray(panel.rgb)
        scale = size / max(img.size)  # small queries (a 224 px image) are enlarged too
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR)
        canvas.paste(img, (x + (size - img.width) // 2, y + (size - img.height) // 2))
        draw.rectangle([x - 1, y - 1, x + size, y + size], outline=(120, 120, 120))
    for j, line in enumerate(panel.lines):
        draw.text((x, y + size + 4 + j * line_h), _fit(draw, line, size, font), fill=(0, 0, 0), font=font)


def _fit(draw: Any, text: str, width: int, font: Any) -> str:
    """`text` shortened with an ellipsis until it fits `width` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
