"""embeddings.h5 in the CLAM/TRIDENT layout (`features` N×D, `coords` N×2 level-0 px), so that
their MIL tools and ours read the same file; our extra facts go into attributes."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from pathapp.atomic import atomic_path
from pathapp.results.result import SlideResult


def write_embeddings(result: SlideResult, path: Path, heatmaps: dict[str, np.ndarray] | None = None) -> Path | None:
    """Write features, coords and their attributes atomically; None when there are no embeddings.
    `heatmaps` (name -> float32 grid, NaN where no tile; `heatmap.raw_heatmaps`) go to the group
    /heatmaps with the grid's scale, for programs that want the maps rather than the pictures."""
    if result.embeddings is None:
        return None
    features = np.asarray(result.embeddings, dtype=np.float32)  # (N, D), also when N = 0
    coords = np.asarray(result.coords, dtype=np.int64).reshape(-1, 2)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features)
        ds = f.create_dataset("coords", data=coords)
        # CLAM reads patch_size and patch_level from the coords dataset; TRIDENT from the file.
        ds.attrs["patch_size"] = int(round(result.footprint))
        ds.attrs["patch_level"] = 0
        attrs = {
            "mpp": float(result.mpp),
            "slide_mpp": float(result.slide_mpp),
            "tile_size": int(result.tile_size),
            "footprint": float(result.footprint),
            "patch_size_level0": int(round(result.footprint)),
            "model": result.model_name,
            "slide": result.slide_name,
            "slide_path": result.slide_path,
            "slide_width": int(result.slide_size[0]),
            "slide_height": int(result.slide_size[1]),
        }
        f.attrs.update(attrs)
        if result.model_fingerprint:
            f.attrs["model_fingerprint"] = result.model_fingerprint
        if result.probs is not None:
            f.create_dataset("probs", data=np.asarray(result.probs, dtype=np.float32))
            f.attrs["class_names"] = list(result.class_names)
        if "attention" in result.extra:  # attention-MIL bundles: the pooling weights of the slide embedding
            f.create_dataset("attention", data=np.asarray(result.extra["attention"], dtype=np.float32))
        if heatmaps:
            group = f.create_group("heatmaps")
            group.attrs["scale"] = float(result.footprint)  # level-0 px per grid cell
            group.attrs["encoding"] = "cell (i, j) covers level-0 [j*scale, (j+1)*scale) x [i*scale, (i+1)*scale); NaN: no tile"
            for name, grid in heatmaps.items():
                group.create_dataset(name, data=grid, compression="gzip")
    return Path(path)


def read_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """features, coords and attributes of an embeddings.h5 (ours, CLAM's or TRIDENT's)."""
    with h5py.File(path, "r") as f:
        return f["features"][()], f["coords"][()], dict(f.attrs)


def read_tile_extras(path: str | Path) -> dict[str, np.ndarray]:
    """The optional per-tile datasets of an embeddings.h5: `probs` (with the `class_names`
    attribute) and `attention`, where the writing model had them."""
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("probs", "attention") if k in f}
