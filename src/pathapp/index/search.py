"""`pathapp search`: rank tiles or slides by cosine similarity to a query, and write what a person and
QuPath need: hits.csv, hits.json, mosaic.png and one QuPath GeoJSON of hit tiles per hit slide.

Ranking rules:
- tile level: each indexed tile scores its best similarity to any query tile; the k best tiles.
- slide level, image or whole-slide query: the query's slide vector (mean of its normalised tile
  embeddings, as every indexed slide's) against the slide vectors.
- slide level, region or tile query: each slide scores the mean over the query tiles of their best
  similarity to that slide's tiles (candidates from a per-tile search, then scored exactly)."""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathapp.atomic import atomic_path, atomic_write_text
from pathapp.index.base import (
    IndexStoreError,
    SlideRecord,
    SlideTiles,
    VectorIndex,
    normalize,
    open_index,
)
from pathapp.index.query import QuerySpec, QueryTiles

LEVELS = ("tile", "slide")
TILES_PER_SLIDE = 5  # best-matching tiles shown and exported for a slide-level hit
CANDIDATES = 5  # region queries: per-tile search depth and exactly scored slides, as multiples of k
HIT_CLASS = ("Similar", (230, 120, 20))


@dataclass
class Hit:
    """One result: a tile (tile level) or a slide with its best-matching tiles (slide level)."""

    rank: int
    similarity: float
    record: SlideRecord
    tiles: list[int]  # tile numbers within the slide, best first
    tile_similarity: list[float]
    coords: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    probs: np.ndarray | None = None

    def boxes(self) -> np.ndarray:
        xy = np.asarray(self.coords, np.float64).reshape(-1, 2)
        return np.column_stack([xy, xy + self.record.footprint])


def exclusions(index: VectorIndex, key: str, exclude_case: bool) -> tuple[set[str], str | None]:
    """The slides of the query's own case (the query slide itself when it has no case), and the case."""
    if not exclude_case:
        return set(), None
    records = index.slides()
    own = records.get(key)
    if own is None:
        return set(), None
    return {k for k, r in records.items() if r.case == own.case}, own.case


def rank(index: VectorIndex, query: QueryTiles | np.ndarray, level: str, k: int, exclude: set[str] = frozenset(),
         slide_vector: np.ndarray | None = None) -> list[Hit]:
    """The k best hits for the query's tile vectors (rules in the module docstring). `slide_vector`
    (an image or whole-slide query) selects slide-vector ranking at slide level."""
    q = normalize(np.atleast_2d(query.vectors if isinstance(query, QueryTiles) else query))
    records = index.slides()
    if level == "tile":
        best: dict[tuple[str, int], float] = {}
        for refs in index.search_tiles(q, k, exclude):
            for t in refs:
                if t.similarity > best.get((t.slide, t.tile), -2.0):
                    best[(t.slide, t.tile)] = t.similarity
        top = sorted(best.items(), key=lambda kv: -kv[1])[:k]
        hits = [Hit(r + 1, s, records[key], [tile], [s]) for r, ((key, tile), s) in enumerate(top)]
    elif slide_vector is not None:
        sv = normalize(slide_vector).reshape(-1)
        hits = []
        for r, (key, s) in enumerate(index.search_slides(sv, k, exclude)):
            sims = index.tiles(key, vectors=True).vectors @ sv
            order = np.argsort(-sims, kind="stable")[:TILES_PER_SLIDE]
            hits.append(Hit(r + 1, s, records[key], order.tolist(), sims[order].tolist()))
    else:
        hits = _rank_slides_by_tiles(index, q, k, exclude, records)
    _attach_payload(index, hits)
    return hits


def _rank_slides_by_tiles(index: VectorIndex, q: np.ndarray, k: int, exclude: set[str],
                          records: dict[str, SlideRecord]) -> list[Hit]:
    """Slides scored by the mean over query tiles of their best similarity within the slide."""
    depth = max(50, CANDIDATES * k)
    prelim: dict[str, np.ndarray] = {}
    for qi, refs in enumerate(index.search_tiles(q, depth, exclude)):
        for t in refs:
            row = prelim.setdefault(t.slide, np.zeros(len(q)))
            row[qi] = max(row[qi], t.similarity)
    candidates = sorted(prelim, key=lambda key: -prelim[key].mean())[: max(20, CANDIDATES * k)]
    scored = []
    for key in candidates:
        sims = q @ index.tiles(key, vectors=True).vectors.T  # (Q, n)
        best_tile = sims.argmax(1)
        per_tile: dict[int, float] = {}
        for t, s in zip(best_tile.tolist(), sims.max(1).tolist()):
            per_tile[t] = max(per_tile.get(t, -2.0), s)
        ordered = sorted(per_tile.items(), key=lambda kv: -kv[1])[:TILES_PER_SLIDE]
        scored.append((float(sims.max(1).mean()), key, ordered))
    scored.sort(key=lambda x: -x[0])
    return [Hit(r + 1, s, records[key], [t for t, _ in tiles], [v for _, v in tiles])
            for r, (s, key, tiles) in enumerate(scored[:k])]


def _attach_payload(index: VectorIndex, hits: list[Hit]) -> None:
    cache: dict[str, SlideTiles] = {}
    for h in hits:
        tiles = cache.get(h.record.key) or cache.setdefault(h.record.key, index.tiles(h.record.key))
        h.coords = tiles.coords[h.tiles]
        h.probs = tiles.probs[h.tiles] if tiles.probs is not None else None


# ------------------------------------------------------------------------------------ the command


@dataclass
class SearchResult:
    """What `pathapp search` found and wrote."""

    hits: list[Hit]
    level: str
    files: list[Path]
    excluded_case: str | None = None


def search(
    location: str | Path,
    spec: QuerySpec,
    out: str | Path,
    *,
    model: str | Path | None = None,
    weights: str | Path | None = None,
    slide_mpp: float | None = None,
    k: int = 20,
    level: str = "tile",
    exclude_case: bool = False,
    min_tissue: float | None = None,
    device: str = "auto",
    echo: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> SearchResult:
    """Embed the query with the index's model, rank, and write the outputs into `out`."""
    from pathapp.index.query import embed_query
    from pathapp.index.sources import check_query_model
    from pathapp.infer import prepare_model

    if level not in LEVELS:
        raise IndexStoreError(f"--level must be one of {', '.join(LEVELS)}, not {level!r}")
    index = open_index(location)
    try:
        im = index.require_model()
        model = model or im.source
        if not model:
            raise IndexStoreError(f"{location}: built from result folders, so it does not know its model; give "
                                  f"--model (the bundle or backbone those results were computed with)")
        precision = im.fingerprint.split(":", 1)[1] if ":" in im.fingerprint else "fp32"
        bundle, name = check_query_model(index, model, weights, precision, im.mpp, im.tile_size)
        runtime = prepare_model(bundle, device, precision, name)
        query = embed_query(spec, runtime, im.mpp, im.tile_size, slide_mpp=slide_mpp, min_tissue=min_tissue)
        exclude, case = exclusions(index, query.key, exclude_case)
        if exclude_case and case is None:
            echo(f"search: {spec.path} is not in the index, so it has no case to exclude")
        whole = spec.kind == "image"
        hits = rank(index, query, level, k, exclude, query.entry.slide_vector() if whole else None)
        echo(f"search: {len(query.vectors)} query tile(s), {len(hits)} {level} hits"
             + (f", case {case} excluded" if case else ""))
        files = write_outputs(Path(out), spec, query, hits, level, case)
        return SearchResult(hits, level, files, case)
    finally:
        index.close()


def write_outputs(out: Path, spec: QuerySpec, query: QueryTiles, hits: list[Hit], level: str,
                  excluded_case: str | None) -> list[Path]:
    """hits.csv, hits.json, geojson/<slide>.geojson per hit slide, mosaic.png."""
    out.mkdir(parents=True, exist_ok=True)
    geojson = write_hit_geojson(out / "geojson", hits)
    files = [write_hits_csv(out / "hits.csv", hits, level, geojson)]
    doc = {"query": {"path": str(spec.path), "kind": spec.kind, "point": spec.point,
                     "roi": str(spec.roi) if spec.roi else None, "tiles": len(query.vectors)},
           "level": level, "excluded_case": excluded_case,
           "slides": [{"slide_path": r.slide_path, "name": r.name, "entry": r.entry_id,
                       "geojson": str(p.relative_to(out))} for r, p in geojson.values()]}
    files.append(atomic_write_text(out / "hits.json", json.dumps(doc, indent=1)))
    files += [p for _, p in geojson.values()]
    files.append(write_search_mosaic(out / "mosaic.png", spec, query, hits, level))
    return files


def _label(r: SlideRecord, probs: np.ndarray | None) -> str:
    """What a hit is: its slide's label, else the top class of its best tile."""
    if r.label:
        return r.label
    if probs is not None and len(probs) and r.class_names:
        return r.class_names[int(np.argmax(probs[0]))]
    return ""


def write_hits_csv(path: Path, hits: list[Hit], level: str, geojson: dict[str, tuple[SlideRecord, Path]]) -> Path:
    """One row per hit: rank, similarity, slide, entry, level-0 box of the (best) tile, label, case,
    the slide's metadata and the tile's class probabilities."""
    fixed = ["rank", "similarity", "level", "slide", "slide_path", "entry", "tile", "x0", "y0", "x1", "y1",
             "mpp_slide", "label", "case", "geojson"]
    meta_cols = sorted({c for h in hits for c in h.record.meta} - set(fixed))
    classes = list(dict.fromkeys(c for h in hits for c in h.record.class_names))
    header = [*fixed, *meta_cols, *[f"prob: {c}" for c in classes]]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for h in hits:
            r = h.record
            box = h.boxes()[0] if len(h.coords) else [""] * 4
            probs = dict(zip(r.class_names, h.probs[0].tolist())) if h.probs is not None and len(h.probs) else {}
            gj = geojson.get(r.key)
            w.writerow([h.rank, f"{h.similarity:.6f}", level, r.name, r.slide_path, r.entry_id or "",
                        h.tiles[0] if h.tiles else "", *[f"{v:.0f}" if v != "" else "" for v in box],
                        r.slide_mpp or "", _label(r, h.probs), r.case if r.case != r.key else "",
                        gj[1].relative_to(path.parent) if gj else "", *[r.meta.get(c, "") for c in meta_cols],
                        *[f"{probs[c]:.6f}" if c in probs else "" for c in classes]])
    return path


def write_hit_geojson(folder: Path, hits: list[Hit]) -> dict[str, tuple[SlideRecord, Path]]:
    """Per hit slide, its hit tiles as QuPath detections with `similarity` and `rank` measurements
    (through the QuPath writer, so they import as they are). Returns {slide key: (record, file)}."""
    from pathapp.qupath.geojson import tile_objects, write_objects

    by_slide: dict[str, list[tuple[Hit, int]]] = {}
    for h in hits:
        by_slide.setdefault(h.record.key, []).extend((h, j) for j in range(len(h.tiles)))
    files: dict[str, tuple[SlideRecord, Path]] = {}
    used: set[str] = set()
    for key, items in by_slide.items():
        record = items[0][0].record
        boxes = np.stack([h.boxes()[j] for h, j in items])
        objects = tile_objects(boxes, object_type="detection",
                               measurements={"similarity": np.array([h.tile_similarity[j] for h, j in items]),
                                             "rank": np.array([h.rank for h, _ in items], float)},
                               class_names=[HIT_CLASS[0]] * len(items), colors={HIT_CLASS[0]: HIT_CLASS[1]})
        for obj, (h, _) in zip(objects, items):
            obj.name = f"pathapp search #{h.rank}"  # pathapp_search.groovy replaces objects named so
        stem = _unique(re.sub(r"[^\w.-]+", "_", record.name) or "slide", used)
        files[key] = (record, write_objects(folder / f"{stem}.geojson", objects))
    return files


def _unique(stem: str, used: set[str]) -> str:
    name, n = stem, 1
    while name.lower() in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name.lower())
    return name


def write_search_mosaic(path: Path, spec: QuerySpec, query: QueryTiles, hits: list[Hit], level: str) -> Path:
    """mosaic.png: the query beside its hits, read from the hit slides (a grey square where a
    slide is not readable from here)."""
    from pathapp.index.mosaic import CELL, Panel, read_box, write_mosaic
    from pathapp.slide import open_slide

    slides: dict[str, Any] = {}
    panels = []
    try:
        for h in hits:
            r = h.record
            rgb = None
            if r.key not in slides:
                try:
                    slides[r.key] = open_slide(r.slide_path, slide_mpp=r.slide_mpp)
                except Exception:  # noqa: BLE001 - a moved or unreadable slide is a grey square, not a failure
                    slides[r.key] = None
            if slides[r.key] is not None and len(h.coords):
                rgb = read_box(slides[r.key], tuple(h.boxes()[0]), CELL)
            what = "slide" if level == "slide" else "tile"
            panels.append(Panel(rgb, [f"#{h.rank}  {what} similarity {h.similarity:.3f}", r.name,
                                      _label(r, h.probs) or (f"case {r.case}" if r.case != r.key else "")]))
    finally:
        for s in slides.values():
            if s is not None:
                s.close()
    title = f"query: {spec.describe()}  ({len(query.vectors)} tile(s)); {len(hits)} most similar {level}s"
    return write_mosaic(path, Panel(query.picture, [f"query: {spec.describe()}", spec.kind]), panels, title)


def rank_report(hits: Sequence[Hit]) -> list[str]:
    """One printable line per hit."""
    return [f"{h.rank:3d}  {h.similarity:.3f}  {h.record.name}  {_label(h.record, h.probs)}" for h in hits]
