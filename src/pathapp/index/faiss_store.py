"""The embedded default backend: a FAISS index in a folder on disk.

The folder holds the normalised tile vectors once, as float16 rows appended slide after slide
(`vectors-<gen>.f16`; a slide owns a contiguous run of rows), the slide vectors (`slides-<gen>.f32`),
each slide's tile payload (`tiles/<uid>.npz`: coordinates, class probabilities), the FAISS structure
over the live rows (`faiss-<version>.index`, ids = row numbers) and the manifest
(`pathapp-index.json`), written last and atomically: it is the commit, so a killed `index add`
leaves the previous index intact. Writers take a lock file, so two processes adding at once run
one after the other and neither loses slides; readers take no lock.

The search structure is chosen from the number of live vectors (`kind="auto"`): exact inner product
(`IndexFlatIP`) up to FLAT_MAX, then IVF with 4-bit product-quantised codes (FAISS fast-scan) whose
shortlist is re-ranked exactly against the stored vectors, so the similarities reported are always
exact. IVF-PQ is built streaming from the stored rows, never holding all raw vectors in memory
(see benchmarks/bench_index.py for recall, latency and memory at 1M and 10M)."""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pathapp.atomic import atomic_path, atomic_write_text
from pathapp.index.base import (IndexModel, IndexStoreError, SlideEntry, SlideRecord, SlideTiles, TileRef, VectorIndex,
                                normalize)

MANIFEST = "pathapp-index.json"
FORMAT = "pathapp-faiss-index"
FORMAT_VERSION = 1
LOCK = ".lock"
KINDS = ("auto", "flat", "ivfpq")
FLAT_MAX = 50_000  # live vectors up to which exact search is used: it scans them all (bench_index.py)
CHUNK = 65_536  # rows read, converted and added at a time when (re)building
_INDEX_FILE = re.compile(r"^(\.lock|tiles|vectors-\d+\.f16|slides-\d+\.f32|faiss-\d+\.index|\..+\.tmp\d+.*)$")
COMPACT_DEAD = 0.5  # rewrite the vector store once this fraction of its rows belongs to removed slides


@dataclass(frozen=True)
class IvfParams:
    """IVF-PQ settings: lists, 4-bit PQ sub-quantisers, lists probed, shortlist re-ranked exactly."""

    nlist: int
    m: int
    nprobe: int
    shortlist: int

    @classmethod
    def for_size(cls, n: int, dim: int) -> IvfParams:
        """≈ √n lists (a power of two, 64-8192) and one 4-bit code per 4 dimensions; nprobe and the
        shortlist were chosen on benchmarks/bench_index.py: recall@10 0.976 at 1M. At 10M (4096 lists)
        recall is bound by the shortlist, not nprobe: 0.743 with 200, 0.893 with 400."""
        nlist = int(min(8192, max(64, 2 ** round(math.log2(max(1.0, math.sqrt(n)))))))
        m = next(d for d in range(max(1, dim // 4), 0, -1) if dim % d == 0)
        return cls(nlist=nlist, m=m, nprobe=max(16, nlist // 32), shortlist=200 if nlist < 4096 else 400)


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a dependency
        raise IndexStoreError("the FAISS index needs faiss-cpu: pip install faiss-cpu") from e
    return faiss


class FaissIndex(VectorIndex):
    """An index folder (see the module docstring). `kind` ("auto", "flat", "ivfpq") is used when
    this process writes; an existing index keeps the kind it was built with until then."""

    def __init__(self, folder: Path, *, create: bool = False, kind: str = "auto") -> None:
        if kind not in KINDS:
            raise IndexStoreError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
        self.folder = Path(folder)
        self.location = str(folder)
        self.kind_setting = kind
        self.nprobe: int | None = None  # search-time overrides of the manifest's IVF settings (benchmarks)
        self.shortlist: int | None = None
        self._manifest: dict[str, Any] | None = None
        self._index: Any = None
        self._store_file: BinaryIO | None = None
        self._slide_vectors: tuple[list[str], np.ndarray] | None = None
        if (self.folder / MANIFEST).is_file():
            self._manifest = self._read_manifest()
        elif self.folder.exists() and (not self.folder.is_dir() or
                                       not all(_INDEX_FILE.match(p.name) for p in self.folder.iterdir())):
            raise IndexStoreError(f"{self.folder}: not a pathapp index (no {MANIFEST}); give a new or empty "
                                  f"folder, or the folder `pathapp index add` made")
        elif not create:
            raise IndexStoreError(f"{self.folder}: no index here; build one with `pathapp index add {self.folder} "
                                  f"SOURCES...`")

    # -------------------------------------------------------------------------------- reading

    def _read_manifest(self) -> dict[str, Any]:
        path = self.folder / MANIFEST
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise IndexStoreError(f"{path}: unreadable index manifest ({e}); rebuild the index") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise IndexStoreError(f"{self.folder}: {MANIFEST} is not a pathapp FAISS index manifest; rebuild the index")
        if m.get("format_version", 0) > FORMAT_VERSION:
            raise IndexStoreError(f"{self.folder}: written by a newer pathapp (format {m['format_version']}); upgrade")
        return m

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest or _empty_manifest()

    @property
    def model(self) -> IndexModel | None:
        m = self.manifest.get("model")
        return IndexModel.from_json(m) if m else None

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "flat")

    def slides(self) -> dict[str, SlideRecord]:
        return {s["record"]["key"]: SlideRecord.from_json(s["record"]) for s in self.manifest["slides"]}

    def __len__(self) -> int:
        return sum(s["n"] for s in self.manifest["slides"])

    def _search_structure(self) -> Any:
        """The FAISS index of the manifest read at open; re-read once if a writer replaced it meanwhile."""
        if self._index is None:
            faiss = _faiss()
            for attempt in (0, 1):
                path = self.folder / self.manifest["faiss_file"]
                try:
                    self._index = faiss.read_index(str(path))
                    break
                except RuntimeError:
                    if attempt:
                        raise IndexStoreError(f"{path}: missing or damaged; rebuild the index") from None
                    self._manifest = self._read_manifest()
        return self._index

    def _stored_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` (sorted) of the store as float32 (`_read_store`). The file stays open until close(),
        so a writer compacting the store meanwhile does not pull it away."""
        m = self.manifest
        if self._store_file is None:
            self._store_file = open(self.folder / m["vector_file"], "rb")
        return _read_store(self._store_file.fileno(), m["model"]["dim"], ids)

    def _row_starts(self) -> tuple[list[int], list[dict[str, Any]]]:
        slides = self.manifest["slides"]  # kept sorted by row_start
        return [s["row_start"] for s in slides], slides

    def _refs(self, ids: np.ndarray, sims: np.ndarray) -> list[TileRef]:
        starts, slides = self._row_starts()
        out = []
        for i, s in zip(ids.tolist(), sims.tolist()):
            if i < 0:
                continue
            j = bisect.bisect_right(starts, i) - 1
            out.append(TileRef(slides[j]["record"]["key"], i - slides[j]["row_start"], float(s)))
        return out

    def _selector(self, exclude: set[str]) -> tuple[Any, np.ndarray] | None:
        """A FAISS selector allowing every row but those of `exclude` slides (and the bitmap it reads)."""
        if not exclude:
            return None
        faiss = _faiss()
        allowed = np.ones(self.manifest["rows"], bool)
        for s in self.manifest["slides"]:
            if s["record"]["key"] in exclude:
                allowed[s["row_start"] : s["row_start"] + s["n"]] = False
        bitmap = np.packbits(allowed, bitorder="little")
        return faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap)), bitmap

    def search_tiles(self, queries: np.ndarray, k: int, exclude: set[str] = frozenset()) -> list[list[TileRef]]:
        faiss = _faiss()
        q = normalize(np.atleast_2d(queries))
        if not len(self):
            return [[] for _ in q]
        index = self._search_structure()
        sel = self._selector(set(exclude))
        ivf = self.manifest.get("ivf")
        if ivf is None:
            params = faiss.SearchParameters(sel=sel[0]) if sel else None
            sims, ids = index.search(q, k, params=params)
            return [self._refs(i, s) for i, s in zip(ids, sims)]
        nprobe, shortlist = self.nprobe or int(ivf["nprobe"]), self.shortlist or int(ivf["shortlist"])
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if sel:
            params.sel = sel[0]
        _, cand = index.search(q, max(k, shortlist), params=params)
        out = []
        for qi, ids in zip(q, cand):
            ids = np.unique(ids[ids >= 0])  # sorted: the reads from the store go forward
            sims = self._stored_rows(ids) @ qi
            top = np.argsort(-sims, kind="stable")[:k]
            out.append(self._refs(ids[top], sims[top]))
        return out

    def search_slides(self, query: np.ndarray, k: int, exclude: set[str] = frozenset()) -> list[tuple[str, float]]:
        if self._slide_vectors is None:
            m = self.manifest
            keys = [s["record"]["key"] for s in m["slides"]]
            rows = [s["vector_row"] for s in m["slides"]]
            vecs = np.zeros((0, m["model"]["dim"] if m["model"] else 0), np.float32)
            if keys:
                table = np.memmap(self.folder / m["slide_vector_file"], dtype=np.float32, mode="r",
                                  shape=(m["slide_vector_rows"], m["model"]["dim"]))
                vecs = np.asarray(table[rows])
            self._slide_vectors = (keys, vecs)
        keys, vecs = self._slide_vectors
        sims = vecs @ normalize(query).reshape(-1)
        order = [i for i in np.argsort(-sims, kind="stable").tolist() if keys[i] not in exclude]
        return [(keys[i], float(sims[i])) for i in order[:k]]

    def tiles(self, key: str, vectors: bool = False) -> SlideTiles:
        s = next((s for s in self.manifest["slides"] if s["record"]["key"] == key), None)
        if s is None:
            raise IndexStoreError(f"{self.location}: no slide {key} in the index")
        with np.load(self.folder / "tiles" / s["tiles_file"]) as z:
            coords = z["coords"]
            probs = z["probs"] if "probs" in z.files else None
        vecs = None
        if vectors:
            vecs = self._stored_rows(np.arange(s["row_start"], s["row_start"] + s["n"]))
        return SlideTiles(coords, probs, vecs)

    def close(self) -> None:
        if self._store_file is not None:
            self._store_file.close()
        self._index = self._store_file = self._slide_vectors = None

    # -------------------------------------------------------------------------------- writing

    def _lock(self):
        """The writers' lock; says so when it has to wait for another process."""
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.folder / LOCK))
        try:
            lock.acquire(timeout=1)
        except Timeout:
            print(f"index: waiting for another process writing to {self.folder}", file=sys.stderr, flush=True)
            lock.acquire()
        return lock

    def add(self, entries: Sequence[SlideEntry], model: IndexModel) -> list[str]:
        return self._write(entries, (), model)

    def remove(self, keys: Sequence[str]) -> list[str]:
        return self._write((), keys, None)

    def _write(self, entries: Sequence[SlideEntry], remove: Sequence[str], model: IndexModel | None) -> list[str]:
        """One transaction under the lock: append new slides, drop replaced or removed ones, update
        (or rebuild) the search structure, then commit the manifest."""
        if not entries and not (self._manifest and set(remove) & set(self.slides())):
            return []  # nothing to add, and none of `remove` is here (as of opening): no new version
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = self._lock()
        try:
            self.close()
            self._manifest = self._read_manifest() if (self.folder / MANIFEST).is_file() else _empty_manifest()
            m = json.loads(json.dumps(self._manifest))  # a working copy; committed only at the end
            if model is not None:
                if m["model"] is None:
                    m["model"] = model.to_json()
                else:
                    IndexModel.from_json(m["model"]).check(model, f"{self.folder}")
            replacing = {e.record.key for e in entries} | set(remove)
            gone = [s for s in m["slides"] if s["record"]["key"] in replacing]
            m["slides"] = [s for s in m["slides"] if s["record"]["key"] not in replacing]
            m["dead_rows"] += sum(s["n"] for s in gone)
            dim = m["model"]["dim"] if m["model"] else 0
            new_rows = self._append(m, entries, dim) if entries else []
            self._update_structure(m, gone, new_rows, dim)
            m["version"] += 1
            atomic_write_text(self.folder / MANIFEST, json.dumps(m, indent=1))
            self._cleanup(m, gone)
            self._manifest = m
            return [s["record"]["key"] for s in gone]
        finally:
            self.close()
            lock.release()

    def _append(self, m: dict[str, Any], entries: Sequence[SlideEntry], dim: int) -> list[tuple[int, int]]:
        """Write the entries' vectors, slide vectors and payload files; returns their row ranges."""
        ranges = []
        (self.folder / "tiles").mkdir(exist_ok=True)
        with open(self.folder / m["vector_file"], "ab+") as fv, open(self.folder / m["slide_vector_file"], "ab+") as fs:
            fv.truncate(m["rows"] * dim * 2)  # drop what a killed writer appended after the last commit
            fs.truncate(m["slide_vector_rows"] * dim * 4)
            for e in entries:
                vecs = normalize(e.vectors)
                if vecs.ndim != 2 or vecs.shape[1] != dim:
                    raise IndexStoreError(f"{e.record.source or e.record.key}: {vecs.shape[-1]}-d vectors, the "
                                          f"index holds {dim}-d")
                uid = uuid.uuid4().hex
                payload = {"coords": np.asarray(e.coords, np.int64).reshape(-1, 2)}
                if e.probs is not None:
                    payload["probs"] = np.asarray(e.probs, np.float32)
                with atomic_path(self.folder / "tiles" / f"{uid}.npz") as tmp:
                    np.savez(tmp, **payload)
                fv.write(vecs.astype(np.float16).tobytes())
                fs.write(e.slide_vector().astype(np.float32).tobytes())
                record = {**e.record.to_json(), "n_tiles": len(vecs)}
                m["slides"].append({"record": record, "row_start": m["rows"], "n": len(vecs),
                                    "vector_row": m["slide_vector_rows"], "tiles_file": f"{uid}.npz"})
                ranges.append((m["rows"], len(vecs)))
                m["rows"] += len(vecs)
                m["slide_vector_rows"] += 1
            fv.flush()
            os.fsync(fv.fileno())
            fs.flush()
            os.fsync(fs.fileno())
        return ranges

    def _update_structure(self, m: dict[str, Any], gone: list[dict], new_rows: list[tuple[int, int]], dim: int) -> None:
        """Add the new rows to the current structure, or rebuild it when its kind should change or
        the store is mostly dead rows; writes faiss-<version+1>.index."""
        faiss = _faiss()
        live = sum(s["n"] for s in m["slides"])
        want = self.kind_setting if self.kind_setting != "auto" else ("flat" if live <= FLAT_MAX else "ivfpq")
        if self.kind_setting == "auto" and m["kind"] == "ivfpq" and live > FLAT_MAX // 2:
            want = "ivfpq"  # hysteresis: do not flip back to exact search for a few removals
        if m["rows"] and m["dead_rows"] > COMPACT_DEAD * m["rows"]:
            self._compact(m, dim)
            index = None
        elif m.get("faiss_file") and want == m["kind"] and not _outgrown(m, live, dim):
            index = faiss.read_index(str(self.folder / m["faiss_file"]))
            for s in gone:
                index.remove_ids(faiss.IDSelectorRange(s["row_start"], s["row_start"] + s["n"]))
            for start, n in new_rows:
                for a in range(start, start + n, CHUNK):
                    b = min(start + n, a + CHUNK)
                    index.add_with_ids(self._read_rows(m, dim, a, b), np.arange(a, b, dtype=np.int64))
        else:
            index = None
        if index is None:
            index = self._build(m, want, dim)
        m["kind"] = want
        m["faiss_file"] = f"faiss-{m['version'] + 1}.index"
        with atomic_path(self.folder / m["faiss_file"]) as tmp:
            faiss.write_index(index, str(tmp))

    def _live_chunks(self, m: dict[str, Any], dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row ids, float32 vectors) of the live rows, CHUNK rows at a time, read from the store."""
        for s in m["slides"]:
            for a in range(s["row_start"], s["row_start"] + s["n"], CHUNK):
                b = min(s["row_start"] + s["n"], a + CHUNK)
                yield np.arange(a, b, dtype=np.int64), self._read_rows(m, dim, a, b)

    def _read_rows(self, m: dict[str, Any], dim: int, a: int, b: int) -> np.ndarray:
        """Rows a..b of the store that manifest `m` names, as float32 (`_read_store`)."""
        with open(self.folder / m["vector_file"], "rb") as f:
            return _read_store(f.fileno(), dim, np.arange(a, b))

    def _build(self, m: dict[str, Any], kind: str, dim: int) -> Any:
        """A new search structure over the live rows, streamed from the store."""
        faiss = _faiss()
        m["ivf"] = None
        if kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        else:
            live = sum(s["n"] for s in m["slides"])
            p = IvfParams.for_size(live, dim)
            index = faiss.index_factory(dim, f"IVF{p.nlist},PQ{p.m}x4fs", faiss.METRIC_INNER_PRODUCT)
            ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
            ivf.cp.min_points_per_centroid = ivf.pq.cp.min_points_per_centroid = 1  # small indexes train quietly
            index.train(self._training_sample(m, dim, min(live, 64 * p.nlist)))
            m["ivf"] = {"nlist": p.nlist, "m": p.m, "nprobe": p.nprobe, "shortlist": p.shortlist}
        for ids, vecs in self._live_chunks(m, dim):
            index.add_with_ids(vecs, ids)
        return index

    def _training_sample(self, m: dict[str, Any], dim: int, n: int) -> np.ndarray:
        """n live rows drawn uniformly at random (seeded), read in row order."""
        live = np.concatenate([np.arange(s["row_start"], s["row_start"] + s["n"]) for s in m["slides"]])
        pick = np.sort(np.random.default_rng(0).choice(live, size=min(n, len(live)), replace=False))
        out = np.empty((len(pick), dim), np.float32)
        for a in range(0, m["rows"], CHUNK):  # chunk by chunk, as _read_store says why
            lo, hi = np.searchsorted(pick, [a, min(m["rows"], a + CHUNK)])
            if hi > lo:
                out[lo:hi] = self._read_rows(m, dim, a, min(m["rows"], a + CHUNK))[pick[lo:hi] - a]
        return out

    def _compact(self, m: dict[str, Any], dim: int) -> None:
        """Rewrite the store with the live rows only, under new file names (committed with the manifest)."""
        gen = m["generation"] + 1
        vec_file, slide_file = f"vectors-{gen}.f16", f"slides-{gen}.f32"
        old_sv = np.memmap(self.folder / m["slide_vector_file"], dtype=np.float32, mode="r",
                           shape=(m["slide_vector_rows"], dim))
        row = 0
        with (open(self.folder / m["vector_file"], "rb") as old, open(self.folder / vec_file, "wb") as fv,
              open(self.folder / slide_file, "wb") as fs):
            for i, s in enumerate(m["slides"]):
                old.seek(s["row_start"] * dim * 2)  # read, not memory-mapped: see _read_store
                for a in range(0, s["n"], CHUNK):
                    fv.write(old.read(min(CHUNK, s["n"] - a) * dim * 2))
                fs.write(np.asarray(old_sv[s["vector_row"]]).tobytes())
                s["row_start"], s["vector_row"] = row, i
                row += s["n"]
        del old_sv
        m["stale_files"] = [m["vector_file"], m["slide_vector_file"]]
        m.update(generation=gen, vector_file=vec_file, slide_vector_file=slide_file, rows=row,
                 slide_vector_rows=len(m["slides"]), dead_rows=0)

    def _cleanup(self, m: dict[str, Any], gone: list[dict]) -> None:
        """After the commit: files no version of the manifest needs any more."""
        for name in [s["tiles_file"] for s in gone]:
            (self.folder / "tiles" / name).unlink(missing_ok=True)
        for name in m.pop("stale_files", []):
            (self.folder / name).unlink(missing_ok=True)
        for p in self.folder.glob("faiss-*.index"):
            if p.name != m["faiss_file"]:
                p.unlink(missing_ok=True)

    def describe(self) -> dict[str, Any]:
        """What `pathapp index info` prints."""
        m = self.manifest
        size = sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())
        return {"location": self.location, "backend": "faiss", "kind": m["kind"], "ivf": m.get("ivf"),
                "model": m["model"], "slides": len(m["slides"]), "tiles": len(self), "dead_rows": m["dead_rows"],
                "bytes_on_disk": size, "version": m["version"]}


def _read_store(fd: int, dim: int, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` (sorted) of a float16 vector store as float32, each run of consecutive rows read with
    one pread: a memory map would count every page a search or a rebuild ever touched as resident memory
    of the process (up to 7 GiB at 10M vectors); read, only the rows asked for are, and the page cache
    holds the rest."""
    row = dim * 2
    runs = np.split(ids, np.flatnonzero(np.diff(ids) != 1) + 1) if len(ids) else []
    buf = b"".join([os.pread(fd, len(r) * row, int(r[0]) * row) for r in runs])
    return np.frombuffer(buf, np.float16).reshape(len(ids), dim).astype(np.float32)


def _outgrown(m: dict[str, Any], live: int, dim: int) -> bool:
    """An IVF index trained for far fewer vectors (half the lists it would get now): retrain it."""
    return bool(m.get("ivf")) and IvfParams.for_size(live, dim).nlist >= 2 * m["ivf"]["nlist"]


def _empty_manifest() -> dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "version": 0, "model": None, "kind": "flat",
            "ivf": None, "generation": 0, "vector_file": "vectors-0.f16", "slide_vector_file": "slides-0.f32",
            "rows": 0, "slide_vector_rows": 0, "dead_rows": 0, "faiss_file": None, "slides": [],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
