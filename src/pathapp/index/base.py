"""The one small interface every index backend implements, and the types that travel through it.

An index holds the tile and slide embeddings of ONE model: vectors from another backbone, µm/px or
tile size mean something else and are refused. Every vector is L2-normalised on the way in, so the
inner product the backends compute is the cosine similarity. Slides are addressed by a key (their
resolved file path), tiles by (slide key, tile number within the slide)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathapp.errors import PathappError

CASE_COLUMNS = ("case", "case_prefix", "patient", "patient_id")  # meta columns that name a case
LABEL_COLUMN = "label"


class IndexStoreError(PathappError):
    """An index that cannot be opened, written or searched as asked."""


@dataclass(frozen=True)
class IndexModel:
    """What the vectors of an index mean: the model that made them and how tiles were cut.

    `source` is the --model the index was built with (a bundle path or backbone name), so that a
    search can embed its query with the same model without being told again."""

    name: str
    fingerprint: str
    dim: int
    mpp: float
    tile_size: int
    source: str = ""

    def check(self, other: IndexModel, where: str) -> None:
        """Raise one line when `other` (vectors about to be added, or a query model) does not fit."""
        why = []
        if other.fingerprint != self.fingerprint:
            why.append(f"model {other.name or '?'} (fingerprint {other.fingerprint[:12]}) is not the index's "
                       f"{self.name or '?'} ({self.fingerprint[:12]})")
        if other.dim != self.dim:
            why.append(f"{other.dim}-d vectors, the index holds {self.dim}-d")
        if abs(other.mpp - self.mpp) > 1e-6 or other.tile_size != self.tile_size:
            why.append(f"tiles of {other.tile_size} px at {other.mpp:g} µm/px, the index holds "
                       f"{self.tile_size} px at {self.mpp:g} µm/px")
        if why:
            raise IndexStoreError(f"{where}: {'; '.join(why)}; use a separate index for each model and scale")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IndexModel:
        return cls(**{k: d[k] for k in ("name", "fingerprint", "dim", "mpp", "tile_size")}, source=d.get("source", ""))


@dataclass
class SlideRecord:
    """The payload of one indexed slide (everything but its vectors), as stored and as returned."""

    key: str
    slide_path: str
    name: str
    n_tiles: int
    footprint: float  # level-0 px per tile side
    slide_mpp: float | None
    entry_id: str | None = None
    class_names: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)  # from --meta: case, label, site, ...
    slide_vector: str = "mean"  # how the slide vector was made: "mean" or "attention" (ABMIL pooling)
    source: str = ""  # the result folder the vectors came from

    @property
    def case(self) -> str:
        """The slide's case (patient) from its metadata; the slide itself when none is given."""
        return next((self.meta[c] for c in CASE_COLUMNS if self.meta.get(c)), self.key)

    @property
    def label(self) -> str | None:
        return self.meta.get(LABEL_COLUMN) or None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SlideRecord:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class SlideEntry:
    """What one slide contributes to an index: its record and its tiles' vectors and payload."""

    record: SlideRecord
    vectors: np.ndarray  # (N, D) tile embeddings as the model gave them
    coords: np.ndarray  # (N, 2) level-0 top-left x, y
    probs: np.ndarray | None = None  # (N, C) class probabilities when the bundle has a tile head
    attention: np.ndarray | None = None  # (N,) ABMIL attention when the bundle is attention-MIL

    def slide_vector(self) -> np.ndarray:
        """Mean of the normalised tile embeddings, or their ABMIL-attention-weighted mean (the
        attention-MIL pooling, kept in the tile space so slide and tile vectors stay comparable)."""
        v = normalize(self.vectors)
        if self.attention is not None and len(self.attention) == len(v) and float(np.sum(self.attention)) > 0:
            w = np.asarray(self.attention, np.float64)
            return normalize((w / w.sum()) @ v)
        return normalize(v.mean(0)) if len(v) else np.zeros(self.vectors.shape[1], np.float32)


@dataclass
class SlideTiles:
    """One indexed slide's tiles: payload, and (when asked for) their normalised vectors."""

    coords: np.ndarray  # (N, 2) int64
    probs: np.ndarray | None
    vectors: np.ndarray | None = None  # (N, D) float32


@dataclass(frozen=True)
class TileRef:
    """A tile found by a search: which slide, which of its tiles, and how similar (cosine)."""

    slide: str
    tile: int
    similarity: float


def normalize(v: np.ndarray) -> np.ndarray:
    """Rows (or one vector) scaled to unit length, float32; all-zero rows stay zero."""
    v = np.asarray(v, np.float32)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.where(n > 0, n, 1)).astype(np.float32)


class VectorIndex(ABC):
    """A tile + slide vector index of one model. Backends: `FaissIndex` (a folder, the default)
    and `QdrantIndex` (a Qdrant collection pair, for a shared or multi-node index)."""

    location: str

    @property
    @abstractmethod
    def model(self) -> IndexModel | None:
        """The model of the vectors held; None while the index is empty and new."""

    @abstractmethod
    def slides(self) -> dict[str, SlideRecord]:
        """Every indexed slide by key."""

    @abstractmethod
    def add(self, entries: Sequence[SlideEntry], model: IndexModel) -> list[str]:
        """Add (or replace, by key) slides; returns the keys that replaced earlier versions.
        Refuses vectors of another model with one line."""

    @abstractmethod
    def remove(self, keys: Sequence[str]) -> list[str]:
        """Delete slides by key; returns the keys that were there."""

    @abstractmethod
    def search_tiles(self, queries: np.ndarray, k: int, exclude: set[str] = frozenset()) -> list[list[TileRef]]:
        """The k most similar tiles to each normalised query row, best first, never from `exclude` slides."""

    @abstractmethod
    def search_slides(self, query: np.ndarray, k: int, exclude: set[str] = frozenset()) -> list[tuple[str, float]]:
        """The k slides whose slide vectors are most similar to the normalised `query`."""

    @abstractmethod
    def tiles(self, key: str, vectors: bool = False) -> SlideTiles:
        """One slide's tile payload, with its vectors when asked."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Backend, model, counts: what `pathapp index info` prints."""

    def close(self) -> None:
        """Release files or connections (the default holds none)."""

    def __enter__(self) -> VectorIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def require_model(self) -> IndexModel:
        """The index's model, or one line saying the index is empty."""
        model = self.model
        if model is None or not self.slides():
            raise IndexStoreError(f"{self.location}: the index is empty; add slides first with "
                                  f"`pathapp index add {self.location} SOURCES...`")
        return model


def open_index(location: str | Path, *, create: bool = False, kind: str = "auto") -> VectorIndex:
    """The index at `location`: a folder (FAISS, the default) or `qdrant://host:port/collection`
    (`qdrant:///dir/collection` for Qdrant's embedded local mode). `create` allows a new one."""
    text = str(location)
    if text.startswith(("qdrant://", "qdrants://")):
        from pathapp.index.qdrant_store import QdrantIndex

        return QdrantIndex.from_url(text, create=create)
    from pathapp.index.faiss_store import FaissIndex

    return FaissIndex(Path(text), create=create, kind=kind)
