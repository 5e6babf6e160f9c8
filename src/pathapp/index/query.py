"""A search query as tile embeddings, made by the inference pipeline itself (`infer_slide`: the same
tissue detection, tile geometry, preprocessing and model as the indexed slides, so a query tile
and the same indexed tile get the same vector).

Three kinds of query: an image or whole slide (`image.png`, `slide.svs`; an image without µm/px
needs --slide-mpp), a region (`slide.svs` with --roi, the tiles whose centre lies inside the
annotations) and a tile (`slide.svs@x,y`, the tile of the slide's grid that holds level-0 pixel x, y)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathapp.index.base import IndexStoreError, SlideEntry, SlideRecord
from pathapp.index.sources import slide_key

_POINT = re.compile(r"^(?P<path>.+)@(?P<x>\d+(?:\.\d+)?),(?P<y>\d+(?:\.\d+)?)$")
PICTURE_PX = 384  # the query's picture in the mosaic


@dataclass
class QuerySpec:
    """What the user asked for: an image or slide, optionally a point or annotations on it."""

    path: Path
    point: tuple[float, float] | None = None
    roi: Path | None = None
    roi_class: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "tile" if self.point else "region" if self.roi else "image"

    def describe(self) -> str:
        if self.point:
            return f"{self.path.name} @ {self.point[0]:g},{self.point[1]:g}"
        if self.roi:
            which = f" ({', '.join(self.roi_class)})" if self.roi_class else ""
            return f"{self.path.name}, annotations{which}"
        return self.path.name


def parse_query(text: str | Path, roi: str | Path | None = None, roi_class: list[str] | tuple[str, ...] = ()) -> QuerySpec:
    """`image.png`, `slide.svs` (with `roi`) or `slide.svs@x,y`; one line when it names no file."""
    p = Path(text)
    point = None
    if not p.exists():
        m = _POINT.match(str(text))
        if m is None or not Path(m["path"]).exists():
            raise IndexStoreError(f"{text}: no such file; give an image, a slide, or SLIDE@X,Y (level-0 pixels)")
        p, point = Path(m["path"]), (float(m["x"]), float(m["y"]))
    if point and roi:
        raise IndexStoreError(f"{text}: give either a point (SLIDE@X,Y) or --roi, not both")
    if roi_class and not roi:
        raise IndexStoreError("--roi-class filters the annotations of --roi FILE; give --roi too")
    return QuerySpec(p, point, Path(roi) if roi else None, list(roi_class))


@dataclass
class QueryTiles:
    """The query's tile embeddings, where they are, and a picture of it for the mosaic."""

    spec: QuerySpec
    entry: SlideEntry  # the query as an index entry would hold it (vectors, coords, slide vector)
    picture: np.ndarray  # RGB uint8
    slide_size: tuple[int, int]

    @property
    def vectors(self) -> np.ndarray:
        return self.entry.vectors

    @property
    def key(self) -> str:
        return self.entry.record.key


def embed_query(spec: QuerySpec, runtime: Any, mpp: float, tile_size: int, *, slide_mpp: float | None = None,
                min_tissue: float | None = None) -> QueryTiles:
    """Tile the query at `mpp` µm/px in `tile_size` px tiles (the index's) and embed it with the
    runtime's model through `infer_slide`."""
    import shapely

    from pathapp.infer import infer_slide
    from pathapp.slide import open_slide
    from pathapp.tiles import tile_geometry

    with open_slide(spec.path, slide_mpp=slide_mpp) as slide:
        footprint = tile_geometry(slide, mpp, tile_size).footprint  # no µm/px: one line asking for --slide-mpp
        rois = None
        if spec.point is not None:
            x, y = spec.point
            rois = shapely.box(x - footprint / 2, y - footprint / 2, x + footprint / 2, y + footprint / 2)
            min_tissue = 0.0  # the tile the user pointed at, tissue or not
        elif spec.roi is not None:
            from pathapp.qupath.geojson import read_rois

            rois = read_rois(spec.roi, classes=spec.roi_class or None)
        result = infer_slide(slide, runtime.bundle, mpp=mpp, tile_size=tile_size, rois=rois, min_tissue=min_tissue,
                             runtime=runtime, workers=0, progress=False)
        if not len(result):
            raise IndexStoreError(_no_tiles(spec, f"{tile_size} px tiles at {mpp:g} µm/px", slide.size))
        picture = _picture(slide, spec, rois, result)
        size = tuple(slide.size)
    record = SlideRecord(key=slide_key(spec.path), slide_path=str(spec.path), name=result.slide_name,
                         n_tiles=len(result), footprint=result.footprint, slide_mpp=result.slide_mpp)
    entry = SlideEntry(record, result.embeddings, result.coords, result.probs, result.extra.get("attention"))
    return QueryTiles(spec, entry, picture, size)


def _no_tiles(spec: QuerySpec, at: str, size: tuple[int, int]) -> str:
    if spec.point is not None:
        return (f"{spec.path}: no whole {at} holds pixel {spec.point[0]:g},{spec.point[1]:g} of this "
                f"{size[0]}×{size[1]} slide; pick a point inside it, away from the right and bottom edges")
    if spec.roi is not None:
        return f"{spec.roi}: no tissue tile ({at}) has its centre inside these annotations; draw a larger region"
    return (f"{spec.path}: no tissue tile ({at}) found; check its --slide-mpp, or lower --min-tissue for an image "
            f"that is all tissue")


def _picture(slide: Any, spec: QuerySpec, rois: Any, result: Any) -> np.ndarray:
    from pathapp.index.mosaic import read_box

    if rois is None:
        return slide.thumbnail(PICTURE_PX)
    x0, y0, x1, y1 = rois.bounds
    if spec.point is not None:  # the tile itself
        (x0, y0), side = result.coords[0], result.footprint
        x1, y1 = x0 + side, y0 + side
    return read_box(slide, (x0, y0, x1, y1), PICTURE_PX)
