"""Embedding cache: each tile set is embedded once per model and reused by every head and fold.

One HDF5 file per model fingerprint (a hash of the backbone weights and the preprocessing), one
dataset per item key (a slide's or image's path, size and mtime, its µm/px, the target µm/px, tile
size and tile coordinates), so changing the model, the pixels or the tiling never returns stale vectors.
Inference's embeddings.h5 is reused when it was written for the same model and tiling.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pathapp.errors import PathappError

if TYPE_CHECKING:
    from pathapp.models.bundle import Bundle, PathModel
    from pathapp.tiles.stain import StainFit

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pathapp" / "embeddings"


class CacheError(PathappError):
    """An embedding file that does not fit the model or tiling asked for."""


def _file_key(path: Path) -> str:
    st = Path(path).stat()
    return hashlib.sha1(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()


class EmbeddingCache:
    """Embeddings of one model keyed by item; `root=None` keeps nothing on disk."""

    def __init__(self, root: Path | None, fingerprint: str) -> None:
        # the whole fingerprint decides the file: one bundle's plain and stain-normalised embeddings differ
        name = hashlib.sha1(fingerprint.encode()).hexdigest()[:24]
        self.path = None if root is None else Path(root) / f"{name}.h5"
        self.fingerprint = fingerprint

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        import h5py

        if self.path is None or not self.path.exists():
            return {}
        with h5py.File(self.path, "r") as f:
            return {k: f[k][()] for k in keys if k in f}

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        import h5py

        if self.path is None or not items:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(self.path, "a") as f:
            f.attrs["model_fingerprint"] = self.fingerprint
            for k, v in items.items():
                if k in f:
                    del f[k]
                f.create_dataset(k, data=np.asarray(v, np.float32))


def load_tile_image(path: Path, size: int, mode: str = "RGB", nearest: bool = False) -> np.ndarray:
    """An image file as one model-input tile: centre square crop, resized to size x size (0: kept at
    its own size), RGB uint8 (`mode` "L": one channel, e.g. a mask; `nearest`: nearest-neighbour
    resizing, so a mask's values stay class values).

    Segmentation reads its image + mask pairs through it; classification tiles labelled images at
    their µm/px as slides are tiled (api.load_labelled)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            if size and s != size:
                resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
                im = im.resize((size, size), resample, reducing_gap=None)
            return np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise PathappError(f"{path}: cannot read this image ({e}); remove it or convert it to PNG") from None


class SlideTiles:
    """The tiles of a grid on a slide (item i -> uint8 (tile_size, tile_size, 3))."""

    def __init__(self, slide, grid) -> None:
        self.slide = slide
        self.grid = grid

    def __len__(self) -> int:
        return len(self.grid)

    def __getitem__(self, i: int) -> np.ndarray:
        from pathapp.tiles import read_tile

        return read_tile(self.slide, self.grid, i)


def embed_arrays(model: PathModel, tiles: np.ndarray, device: str = "cpu", normalize=None) -> np.ndarray:
    """Embeddings of uint8 tiles (B, H, W, 3) through the bundle model; `normalize(x)` maps the
    uint8 batch on the device (stain normalisation) first."""
    import torch

    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).to(device)
        return model.embed(x if normalize is None else normalize(x)).float().cpu().numpy()


def embed_tiles(
    model: PathModel, tiles, indices: Sequence[int], batch_size: int = 32, device: str = "cpu", progress: bool = True,
    normalize=None,
):
    """Yield (indices, embeddings) batch by batch over `tiles[i] for i in indices`, with a tiles/s bar;
    `normalize(x, idx)` maps each uint8 device batch of items `idx` before the model."""
    from tqdm import tqdm

    with tqdm(total=len(indices), unit="tile", desc="embedding", disable=not progress, leave=False) as bar:
        for s in range(0, len(indices), batch_size):
            idx = list(indices[s : s + batch_size])
            step = None if normalize is None else (lambda x, idx=idx: normalize(x, idx))
            yield idx, embed_arrays(model, np.stack([tiles[i] for i in idx]), device, step)
            bar.update(len(idx))


def embedding_fingerprint(bundle: Bundle, stain: StainFit | None = None) -> str:
    """The cache's name for a model's embeddings: the bundle's, marked with the stain target."""
    return bundle.fingerprint() + ("" if stain is None else ":" + stain.fingerprint())


def embed_slide_grid(
    bundle: Bundle,
    slide,
    grid,
    cache_root: Path | None = DEFAULT_CACHE,
    batch_size: int = 32,
    device: str = "auto",
    model: PathModel | None = None,
    progress: bool = True,
    stain: StainFit | None = None,
) -> np.ndarray:
    """(N, D) embeddings of a slide's grid tiles, cached per (slide file, µm/px, tile size, coords);
    with `stain`, normalised onto that target by one fit on the slide's tissue."""
    from pathapp.models.device import resolve_device

    device = resolve_device(device)
    cache = EmbeddingCache(cache_root, embedding_fingerprint(bundle, stain))
    key = slide_key(Path(slide.path), grid.mpp, grid.tile_size, grid.coords, grid.slide_mpp)
    hit = cache.get_many([key])
    if key in hit:
        return hit[key]
    model = model or bundle.build(device)
    normalize = None
    if stain is not None and len(grid):
        from pathapp.tiles.stain import slide_normalizer

        norm, _ = slide_normalizer(slide, grid, stain)
        normalize = None if norm is None else (lambda x, idx: norm(x))
    feats = np.zeros((len(grid), bundle.embedding_dim), np.float32)
    for idx, f in embed_tiles(model, SlideTiles(slide, grid), range(len(grid)), batch_size, device, progress,
                              normalize):
        feats[idx] = f
    cache.put_many({key: feats})
    return feats


def slide_key(slide_path: Path, mpp: float, tile_size: int, coords: np.ndarray, slide_mpp: float) -> str:
    """Cache key of one slide's tiling: the file, its µm/px, the target µm/px, tile size and the exact
    tile coordinates (one image given another µm/px is tiled differently)."""
    h = hashlib.sha1(f"{_file_key(Path(slide_path))}|{slide_mpp:.6g}|{mpp:.6g}|{tile_size}".encode())
    h.update(np.ascontiguousarray(coords, dtype=np.int64).tobytes())
    return h.hexdigest()


def reuse_inference_embeddings(h5_path: Path, bundle: Bundle, coords: np.ndarray | None = None,
                               stain: StainFit | None = None) -> tuple[np.ndarray, np.ndarray]:
    """features, coords from an inference embeddings.h5 written with this bundle's model and tiling.

    The file must carry the same µm/px, tile size and width; when it records a model fingerprint it
    must be this bundle's (at fp32 or bf16); when `coords` are given the tiles are matched by coordinate."""
    from pathapp.results.embeddings import read_embeddings

    feats, file_coords, attrs = read_embeddings(h5_path)
    problems = []
    if "mpp" in attrs and abs(float(attrs["mpp"]) - bundle.mpp) > 1e-6:
        problems.append(f"µm/px {attrs['mpp']} != {bundle.mpp}")
    if "tile_size" in attrs and int(attrs["tile_size"]) != bundle.tile_size:
        problems.append(f"tile size {attrs['tile_size']} != {bundle.tile_size}")
    if feats.shape[1] != bundle.embedding_dim:
        problems.append(f"width {feats.shape[1]} != {bundle.embedding_dim}")
    fp = bundle.fingerprint()
    expected = embedding_fingerprint(bundle, stain)
    # bf16 inference (`--precision auto` on bf16 hardware) marks the model's fingerprint ":bf16": the same
    # model, embeddings within cosine 0.999 of fp32 (tests/test_infer_precision.py), so they train the same.
    marked = {p: fp + f":{p}" + expected[len(fp):] for p in ("bf16", "int8")}
    if "model_fingerprint" in attrs and attrs["model_fingerprint"] not in (expected, marked["bf16"]):
        problems.append("another model's (or stain normalisation's) embeddings"
                        + (" (int8: rerun inference with --precision fp32 or bf16)"
                           if attrs["model_fingerprint"] == marked["int8"] else ""))
    if problems:
        raise CacheError(f"{h5_path}: cannot reuse these embeddings ({'; '.join(problems)}); rerun inference "
                         f"with this model or drop --embeddings")
    if coords is None:
        return feats.astype(np.float32), file_coords
    index = {tuple(c): i for i, c in enumerate(np.asarray(file_coords, np.int64).tolist())}
    missing = [tuple(c) for c in np.asarray(coords, np.int64).tolist() if tuple(c) not in index]
    if missing:
        raise CacheError(f"{h5_path}: {len(missing)} labelled tiles (e.g. at {missing[0]}) are not in this file; "
                         f"rerun inference over the annotated regions")
    rows = [index[tuple(c)] for c in np.asarray(coords, np.int64).tolist()]
    return feats[rows].astype(np.float32), np.asarray(coords)
