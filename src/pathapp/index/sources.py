"""What goes into an index: pathapp result folders (embeddings.h5 + run.json), or slides, folders and
QuPath projects embedded on the way by `pathapp.infer.run_inference` (whose `.done` markers make
finished slides free), each slide's tiles carrying their payload and the slide's row of an optional
metadata CSV."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pathapp.index.base import (
    IndexModel,
    IndexStoreError,
    SlideEntry,
    SlideRecord,
    open_index,
)

SLIDE_COLUMNS = ("slide", "image", "path", "file")  # the --meta column naming each slide, first found
if TYPE_CHECKING:
    from pathapp.infer.options import InferOptions

FLUSH_TILES = 200_000  # tile vectors held before they are written to the index


def is_result_folder(path: Path) -> bool:
    """A folder `pathapp infer` wrote for one slide (it has the embeddings)."""
    return (path / "embeddings.h5").is_file() and (path / "run.json").is_file()


def result_folders(path: Path) -> list[Path]:
    """The result folders at `path`: itself, or its sub-folders (`pathapp infer --out OUT`'s layout)."""
    if is_result_folder(path):
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_dir() and is_result_folder(p))
    return []


@dataclass
class MetaTable:
    """Per-slide metadata from a CSV: a slide column (path relative to the CSV, file name, or
    slide name) and any others (case, label, site, ...), kept as strings."""

    path: Path
    column: str
    rows: dict[str, dict[str, str]] = field(default_factory=dict)  # by resolved path, file name and stem

    def lookup(self, slide_path: str, name: str, entry_id: str | None = None) -> dict[str, str]:
        p = Path(slide_path)
        for key in (str(_resolved(p)), p.name, name, entry_id):
            if key and key in self.rows:
                return dict(self.rows[key])
        return {}


def read_csv(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """Rows and header of a CSV (a spreadsheet's BOM tolerated); one line when it cannot be read."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise IndexStoreError(f"{path}: cannot read this CSV ({e})") from None
    return rows, list(rows[0]) if rows else []


def read_meta(path: str | Path) -> MetaTable:
    """Read a --meta CSV; one line naming the file when it has no slide column or no rows."""
    path = Path(path)
    rows, header = read_csv(path)
    column = next((c for c in SLIDE_COLUMNS if c in header), None)
    if column is None:
        raise IndexStoreError(f"{path}: needs a column naming each slide ({' or '.join(SLIDE_COLUMNS)}) beside "
                              f"case, label, ...; found {', '.join(header) or 'no rows'}")
    table = MetaTable(path, column)
    for r in rows:
        value = (r.get(column) or "").strip()
        if not value:
            continue
        meta = {k: (v or "").strip() for k, v in r.items() if k and k != column}
        p = Path(value)
        table.rows[str(_resolved(p if p.is_absolute() else path.parent / p))] = meta
        table.rows.setdefault(p.name, meta)
        table.rows.setdefault(p.stem, meta)
    return table


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except OSError:
        return p.absolute()


def slide_key(slide_path: str | Path) -> str:
    """How an index names a slide: its resolved path."""
    return str(_resolved(Path(slide_path)))


def read_result(folder: Path, meta: MetaTable | None = None, entry_id: str | None = None) -> tuple[SlideEntry, IndexModel]:
    """One result folder as an index entry, and the model its vectors belong to."""
    from pathapp.results.embeddings import read_embeddings, read_tile_extras

    h5 = folder / "embeddings.h5"
    try:
        feats, coords, attrs = read_embeddings(h5)
        extras = read_tile_extras(h5)
        run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError) as e:
        raise IndexStoreError(f"{folder}: unreadable result folder ({e}); rerun `pathapp infer` on its slide") from None
    if not attrs.get("model_fingerprint"):
        raise IndexStoreError(f"{h5}: no model fingerprint (written by another tool or an older pathapp); rerun "
                              f"`pathapp infer` so the index can tell which model made these vectors")
    slide_path = str(attrs.get("slide_path") or run.get("slide_path") or folder.name)
    name = str(attrs.get("slide") or run.get("slide") or folder.name)
    entry_id = entry_id or _project_entry(folder) or run.get("parameters", {}).get("entry_id")
    model = IndexModel(name=str(attrs.get("model", "")), fingerprint=str(attrs["model_fingerprint"]),
                       dim=int(feats.shape[1]), mpp=float(attrs["mpp"]), tile_size=int(attrs["tile_size"]))
    probs = extras.get("probs")
    attention = extras.get("attention")
    record = SlideRecord(
        key=slide_key(slide_path), slide_path=slide_path, name=name, n_tiles=len(feats),
        footprint=float(attrs.get("footprint", attrs.get("patch_size_level0", 0))),
        slide_mpp=float(attrs["slide_mpp"]) if "slide_mpp" in attrs else None,
        entry_id=str(entry_id) if entry_id is not None else None,
        class_names=[str(c) for c in attrs.get("class_names", [])] if probs is not None else [],
        meta=meta.lookup(slide_path, name, entry_id) if meta else {},
        slide_vector="attention" if attention is not None else "mean", source=str(folder))
    return SlideEntry(record, feats, np.asarray(coords, np.int64), probs, attention), model


def _project_entry(folder: Path) -> str | None:
    """The QuPath entry ID of <project>/pathapp/<entry ID>/, where `pathapp infer project.qpproj` writes."""
    if folder.parent.name == "pathapp" and (folder.parent.parent / "project.qpproj").is_file():
        return folder.name
    return None


@dataclass
class AddSummary:
    """What `index add` did: slides added, replacing earlier versions, and inputs that failed."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def add_sources(
    location: str | Path,
    sources: Sequence[str | Path],
    *,
    infer: InferOptions | None = None,
    meta: str | Path | None = None,
    kind: str = "auto",
    echo: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> AddSummary:
    """Add every source to the index at `location` (created when new). Result folders are read as
    they are; anything else is a slide, folder of slides or QuPath project, run through
    `pathapp infer` with `infer` first (its model; results to its `out`, or beside the slides as
    `infer` does)."""
    from pathapp.errors import PathappError

    model = infer.model if infer is not None else None

    table = read_meta(meta) if meta else None
    summary = AddSummary()
    index = open_index(location, create=True, kind=kind)
    try:
        results: list[tuple[Path, str | None]] = []
        slides: list[str] = []
        for s in sources:
            found = result_folders(Path(s))
            results += [(f, None) for f in found]
            if not found:
                slides.append(str(s))
        if slides:
            if infer is None:
                raise IndexStoreError(f"{slides[0]}: not a pathapp result folder; to embed slides on the way "
                                      f"give --model (a .pathapp bundle or backbone name)")
            results += _infer(index, slides, infer, summary, echo)
        pending: list[SlideEntry] = []
        index_model = index.model
        for folder, entry_id in results:
            try:
                entry, m = read_result(folder, table, entry_id)
                if index_model is None:
                    index_model = IndexModel(**{**m.to_json(), "source": str(model or "")})
                index_model.check(m, str(folder))
            except PathappError as e:
                summary.failed.append((str(folder), str(e)))
                echo(f"failed: {e}")
                continue
            pending.append(entry)
            if sum(len(e.vectors) for e in pending) >= FLUSH_TILES:
                _flush(index, pending, index_model, summary, echo)
        _flush(index, pending, index_model, summary, echo)
    finally:
        index.close()
    return summary


def _flush(index, pending: list[SlideEntry], model: IndexModel | None, summary: AddSummary,
           echo: Callable[[str], None]) -> None:
    if not pending:
        return
    summary.replaced += index.add(pending, model)
    for e in pending:
        summary.added.append(e.record.key)
        echo(f"indexed: {e.record.name}: {len(e.vectors)} tiles ({e.record.source})")
    pending.clear()


def _infer(index, slides: list[str], options: InferOptions, summary: AddSummary,
           echo: Callable[[str], None]) -> list[tuple[Path, str | None]]:
    """Run inference where results are missing (finished slides are skipped by their `.done`
    marker); the result folders with their QuPath entry IDs."""
    from pathapp.infer import expand_inputs, run_inference

    out_path = Path(options.out) if options.out is not None else None
    check_query_model(index, options.model, options.weights, options.precision, options.mpp, options.tile_size,
                      options.device)
    entry_of = {job.out_dir: str(job.entry.entry_id) if job.entry is not None else None
                for job in expand_inputs(slides, out_path) if job.out_dir is not None}
    run = run_inference(slides, options, echo=echo)
    summary.failed += run.failed
    return [(d, entry_of.get(d)) for d in run.done + run.skipped]


def check_query_model(index, model: str | Path, weights: str | Path | None = None, precision: str = "fp32",
                      mpp: float | None = None, tile_size: int | None = None, device: str = "auto"):
    """Load `model` and refuse it, before any slide is embedded, when it is not the index's model
    (backbone, precision, µm/px and tile size; "auto" precision resolved as inference resolves it on
    `device`). Returns the bundle and its name."""
    from pathapp.infer.pipeline import resolve_precision
    from pathapp.models.device import resolve_device
    from pathapp.models.loader import load_model, model_label

    precision = resolve_precision(precision, resolve_device(device))

    bundle, name = load_model(model, weights=weights, mpp=mpp, tile_size=tile_size), model_label(model)
    if index.model is not None:
        fingerprint = bundle.fingerprint() + ("" if precision == "fp32" else f":{precision}")
        index.model.check(IndexModel(name, fingerprint, bundle.embedding_dim, float(mpp or bundle.mpp),
                                     int(tile_size or bundle.tile_size)), f"{model}")
    return bundle, name


def remove_slides(location: str | Path, slides: Sequence[str]) -> list[str]:
    """Delete slides given by path, key or name; one line for a slide the index does not hold."""
    index = open_index(location)
    try:
        records = index.slides()
        keys = []
        for s in slides:
            found = [k for k, r in records.items() if s in (k, r.name, r.slide_path) or slide_key(s) == k]
            if not found:
                raise IndexStoreError(f"{s}: not in the index {location} ({len(records)} slides; see "
                                      f"`pathapp index info {location}`)")
            keys += found
        return index.remove(keys)
    finally:
        index.close()

