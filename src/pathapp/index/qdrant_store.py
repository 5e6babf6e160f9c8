"""The shared backend: a Qdrant collection pair, for an index that outgrows one machine or is
searched by many people. `qdrant://host:6333/name` (`qdrants://` for TLS) holds the tile vectors in
collection `name` and the slide vectors in `name-slides`; the model the vectors belong to is the
collection's metadata (Qdrant ≥ 1.16). The API key comes from the QDRANT_API_KEY environment
variable and is never printed. `qdrant:///dir/name` (no host) opens qdrant-client's embedded local
mode in folder `dir`: the same API in process, for trying things out and for the tests.

Qdrant does the nearest-neighbour search itself (HNSW, cosine), payload filters exclude slides, and
concurrent writers are the server's business."""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from pathapp.index.base import (IndexModel, IndexStoreError, SlideEntry, SlideRecord, SlideTiles, TileRef, VectorIndex,
                                normalize)

API_KEY_ENV = "QDRANT_API_KEY"
BATCH = 512  # points per upsert request
SLIDES_SUFFIX = "-slides"
_NAMESPACE = uuid.UUID("8f2b3c1e-55a4-4b1f-9a53-2f0c6c1d7e10")  # point ids: uuid5(namespace, slide key # tile)


def _point_id(key: str, tile: int | None = None) -> str:
    return str(uuid.uuid5(_NAMESPACE, key if tile is None else f"{key}#{tile}"))


class QdrantIndex(VectorIndex):
    """Tiles in collection `collection`, slides in `collection-slides`, on `client`."""

    def __init__(self, client: Any, collection: str, location: str, *, create: bool = False) -> None:
        self.client = client
        self.collection = collection
        self.slide_collection = collection + SLIDES_SUFFIX
        self.location = location
        self._slides: dict[str, SlideRecord] | None = None
        self._model: IndexModel | None = None
        exists = self._call(client.collection_exists, collection)
        if exists:
            meta = self._call(client.get_collection, collection).config.metadata or {}
            if "pathapp" not in meta:
                raise IndexStoreError(f"{location}: this Qdrant collection was not made by pathapp; name another one")
            self._model = IndexModel.from_json(meta["pathapp"])
        elif not create:
            raise IndexStoreError(f"{location}: no such collection; build the index with `pathapp index add "
                                  f"{location} SOURCES...`")

    @classmethod
    def from_url(cls, url: str, *, create: bool = False) -> QdrantIndex:
        """Open `qdrant://host[:port]/collection`, `qdrants://...` (TLS) or `qdrant:///dir/collection` (local mode)."""
        try:
            from qdrant_client import QdrantClient
        except ImportError as e:  # pragma: no cover - qdrant-client is a dependency
            raise IndexStoreError("a qdrant:// index needs qdrant-client: pip install qdrant-client") from e
        parts = urlsplit(url)
        path = parts.path.rstrip("/")
        collection = path.rsplit("/", 1)[-1]
        if not collection:
            raise IndexStoreError(f"{url}: name the collection, e.g. qdrant://localhost:6333/slides")
        if not parts.netloc:  # qdrant:///dir/collection: embedded local mode
            folder = path.rsplit("/", 1)[0] or "/"
            try:
                client = QdrantClient(path=folder)
            except (RuntimeError, OSError, ValueError) as e:
                raise IndexStoreError(f"{url}: cannot open the local Qdrant folder {folder} ({_first_line(e)}); "
                                      f"another process may be using it") from None
        else:
            scheme = "https" if parts.scheme == "qdrants" else "http"
            import warnings

            with warnings.catch_warnings():  # the version check warns when the server is unreachable
                warnings.simplefilter("ignore")
                client = QdrantClient(url=f"{scheme}://{parts.hostname}:{parts.port or 6333}",
                                      api_key=os.environ.get(API_KEY_ENV) or None, timeout=30,
                                      check_compatibility=False)
        return cls(client, collection, url, create=create)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A client call whose failure (unreachable server, refused request) becomes one line."""
        try:
            return fn(*args, **kwargs)
        except IndexStoreError:
            raise
        except Exception as e:  # noqa: BLE001 - httpx, grpc and qdrant raise their own types
            raise IndexStoreError(f"{self.location}: Qdrant request failed ({type(e).__name__}: {_first_line(e)}); "
                                  f"check that the server is running and reachable, and {API_KEY_ENV} if it "
                                  f"needs a key") from None

    @property
    def model(self) -> IndexModel | None:
        return self._model

    def slides(self) -> dict[str, SlideRecord]:
        if self._slides is None:
            self._slides = {}
            if self._call(self.client.collection_exists, self.slide_collection):
                offset = None
                while True:
                    points, offset = self._call(self.client.scroll, self.slide_collection, limit=1024, offset=offset,
                                                with_payload=True, with_vectors=False)
                    for p in points:
                        rec = SlideRecord.from_json(p.payload["record"])
                        self._slides[rec.key] = rec
                    if offset is None:
                        break
        return self._slides

    def _ensure_collections(self, model: IndexModel) -> None:
        from qdrant_client import models

        if self._model is not None:
            self._model.check(model, self.location)
            return
        for name, meta in ((self.collection, {"pathapp": model.to_json()}), (self.slide_collection, None)):
            if not self._call(self.client.collection_exists, name):
                self._call(self.client.create_collection, name, metadata=meta,
                           vectors_config=models.VectorParams(size=model.dim, distance=models.Distance.COSINE))
        import warnings

        with warnings.catch_warnings():  # local mode says payload indexes do nothing there
            warnings.simplefilter("ignore")
            for name, field in ((self.collection, "slide"), (self.slide_collection, "key")):
                self._call(self.client.create_payload_index, name, field, models.PayloadSchemaType.KEYWORD)
        self._model = model

    def _slide_filter(self, field: str, keys: Sequence[str], negate: bool = False) -> Any:
        from qdrant_client import models

        cond = [models.FieldCondition(key=field, match=models.MatchAny(any=list(keys)))]
        return models.Filter(must_not=cond) if negate else models.Filter(must=cond)

    def add(self, entries: Sequence[SlideEntry], model: IndexModel) -> list[str]:
        from qdrant_client import models

        self._ensure_collections(model)
        before = set(self.slides())
        replaced = [e.record.key for e in entries if e.record.key in before]
        for e in entries:
            key = e.record.key
            vecs = normalize(e.vectors)
            if vecs.shape[1] != model.dim:
                raise IndexStoreError(f"{e.record.source or key}: {vecs.shape[1]}-d vectors, the index holds {model.dim}-d")
            self._call(self.client.delete, self.collection, points_selector=models.FilterSelector(
                filter=self._slide_filter("slide", [key])))
            coords = np.asarray(e.coords, np.int64).reshape(-1, 2)
            for a in range(0, len(vecs), BATCH):
                points = []
                for i in range(a, min(len(vecs), a + BATCH)):
                    payload: dict[str, Any] = {"slide": key, "tile": i, "x": int(coords[i, 0]), "y": int(coords[i, 1])}
                    if e.probs is not None:
                        payload["probs"] = [float(v) for v in e.probs[i]]
                    points.append(models.PointStruct(id=_point_id(key, i), vector=vecs[i].tolist(), payload=payload))
                self._call(self.client.upsert, self.collection, points=points, wait=True)
            record = {**e.record.to_json(), "n_tiles": len(vecs)}
            self._call(self.client.upsert, self.slide_collection, wait=True, points=[models.PointStruct(
                id=_point_id(key), vector=e.slide_vector().tolist(), payload={"key": key, "record": record})])
        self._slides = None
        return replaced

    def remove(self, keys: Sequence[str]) -> list[str]:
        from qdrant_client import models

        present = [k for k in keys if k in self.slides()]
        if present:
            for name, field in ((self.collection, "slide"), (self.slide_collection, "key")):
                self._call(self.client.delete, name, wait=True, points_selector=models.FilterSelector(
                    filter=self._slide_filter(field, present)))
        self._slides = None
        return present

    def search_tiles(self, queries: np.ndarray, k: int, exclude: set[str] = frozenset()) -> list[list[TileRef]]:
        from qdrant_client import models

        q = normalize(np.atleast_2d(queries))
        flt = self._slide_filter("slide", sorted(exclude), negate=True) if exclude else None
        requests = [models.QueryRequest(query=v.tolist(), limit=k, filter=flt, with_payload=["slide", "tile"])
                    for v in q]
        out = []
        for a in range(0, len(requests), 64):
            for res in self._call(self.client.query_batch_points, self.collection, requests=requests[a : a + 64]):
                out.append([TileRef(p.payload["slide"], int(p.payload["tile"]), float(p.score)) for p in res.points])
        return out

    def search_slides(self, query: np.ndarray, k: int, exclude: set[str] = frozenset()) -> list[tuple[str, float]]:
        flt = self._slide_filter("key", sorted(exclude), negate=True) if exclude else None
        res = self._call(self.client.query_points, self.slide_collection, query=normalize(query).reshape(-1).tolist(),
                         limit=k, query_filter=flt, with_payload=["key"])
        return [(p.payload["key"], float(p.score)) for p in res.points]

    def tiles(self, key: str, vectors: bool = False) -> SlideTiles:
        rec = self.slides().get(key)
        if rec is None:
            raise IndexStoreError(f"{self.location}: no slide {key} in the index")
        n = rec.n_tiles
        coords = np.zeros((n, 2), np.int64)
        probs = np.zeros((n, len(rec.class_names)), np.float32) if rec.class_names else None
        vecs = np.zeros((n, self._model.dim), np.float32) if vectors else None
        offset = None
        while True:
            points, offset = self._call(self.client.scroll, self.collection, scroll_filter=self._slide_filter("slide", [key]),
                                        limit=1024, offset=offset, with_payload=True, with_vectors=vectors)
            for p in points:
                i = int(p.payload["tile"])
                coords[i] = (p.payload["x"], p.payload["y"])
                if probs is not None and "probs" in p.payload:
                    probs[i] = p.payload["probs"]
                if vecs is not None:
                    vecs[i] = p.vector
            if offset is None:
                break
        return SlideTiles(coords, probs, vecs)

    def close(self) -> None:
        self.client.close()

    def describe(self) -> dict[str, Any]:
        """What `pathapp index info` prints."""
        tiles = self._call(self.client.count, self.collection).count if self._model else 0
        return {"location": self.location, "backend": "qdrant", "model": self._model.to_json() if self._model else None,
                "slides": len(self.slides()), "tiles": tiles}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
