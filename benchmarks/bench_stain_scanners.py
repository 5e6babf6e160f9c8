"""The same tissue on two scanners, with and without stain normalisation: how far apart are the
embeddings of corresponding tiles?

OS-2-ndpi.ome.tif (Hamamatsu, 0.227 µm/px) and OS-2-vsi.ome.tif (Olympus, 0.346 µm/px) are crops of
one Ki67 (haematoxylin + DAB) section scanned twice. The two crops are registered (optical density at
0.5 µm/px, phase correlation: a translation; scales ±2 % were tried and 1.00 fits best), then both
slides run through `pathapp infer` as a user runs it: the Hamamatsu scan as it is, the Olympus scan
as it is and normalised onto the Hamamatsu scan with each method (`--stain-norm M --stain-ref
OS-2-ndpi.ome.tif`). Each Hamamatsu tile is paired with the Olympus tile whose registered footprint
overlaps it most (pairs overlapping < 80 % are dropped). Reported: the cosine distance between
paired embeddings (mean, bootstrap 95 % CI over pairs), and as its scale the mean distance between
different tiles of the Hamamatsu scan.

    python benchmarks/bench_stain_scanners.py                    # random ViT-S/14 (LayerScale 1)
    python benchmarks/bench_stain_scanners.py --model m.pathapp  # any bundle
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi" / "ome-tiff"
REF, OTHER = DATA / "OS-2-ndpi.ome.tif", DATA / "OS-2-vsi.ome.tif"
REG_MPP = 0.5  # µm/px at which the two scans are registered
METHODS = ("none", "macenko", "reinhard", "vahadane")


def register(ref: Path, other: Path) -> tuple[np.ndarray, float]:
    """Offset (x, y) in µm to add to a position in `ref` to find it in `other`, and the normalised
    cross-correlation of the registered optical densities (1 = identical)."""
    from scipy import ndimage as ndi
    from skimage.registration import phase_cross_correlation
    from skimage.transform import rescale

    from pathapp.slide import open_slide

    ods = []
    for p in (ref, other):
        with open_slide(p) as s:
            rgb = s.read(0, 0, *s.size).astype(np.float32)
            ods.append(rescale(-np.log((rgb + 1) / 256).sum(axis=2), s.mpp / REG_MPP, anti_aliasing=True))
    h, w = min(a.shape[0] for a in ods), min(a.shape[1] for a in ods)
    a, b = ods[0][:h, :w], ods[1][:h, :w]
    shift, _, _ = phase_cross_correlation(a, b, upsample_factor=10)  # b shifted by `shift` matches a
    moved = ndi.shift(b, shift, order=1)
    m = (slice(20, -20), slice(20, -20))
    x, y = a[m] - a[m].mean(), moved[m] - moved[m].mean()
    ncc = float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))
    return -np.array([shift[1], shift[0]]) * REG_MPP, ncc


def random_bundle(path: Path) -> Path:
    """bench_fewshot's random dinov2_vits14 (LayerScale 1), saved as a bundle file."""
    from bench_fewshot import backbone_bundle

    return backbone_bundle(None, 224, path)[0]


def infer(slide: Path, model: Path, out: Path, mpp: float, method: str) -> Path:
    cmd = [sys.executable, "-m", "pathapp", "infer", str(slide), "--model", str(model), "--mpp", str(mpp),
           "--out", str(out), "--overwrite"]
    if method != "none":
        cmd += ["--stain-norm", method, "--stain-ref", str(REF)]
    subprocess.run(cmd, check=True)
    return out / slide.name.split(".")[0] / "embeddings.h5"


def read_h5(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """features, level-0 coords and the tile side in level-0 px of an embeddings.h5."""
    import h5py

    with h5py.File(path) as f:
        return f["features"][:], f["coords"][:], float(f["coords"].attrs["patch_size"])


def pairs(ref_coords, ref_side_um, ref_mpp, oth_coords, oth_side_um, oth_mpp, offset_um, min_overlap=0.8):
    """(i, j, overlap) of each reference tile and the other scan's tile overlapping it most."""
    out = []
    r0 = ref_coords * ref_mpp + offset_um  # reference tiles' corners in the other scan's µm
    o0 = oth_coords * oth_mpp
    for i, (x, y) in enumerate(r0):
        ox = np.clip(np.minimum(x + ref_side_um, o0[:, 0] + oth_side_um) - np.maximum(x, o0[:, 0]), 0, None)
        oy = np.clip(np.minimum(y + ref_side_um, o0[:, 1] + oth_side_um) - np.maximum(y, o0[:, 1]), 0, None)
        share = ox * oy / ref_side_um**2
        j = int(np.argmax(share)) if len(share) else -1
        if j >= 0 and share[j] >= min_overlap:
            out.append((i, j, float(share[j])))
    return out


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 1.0 - (a * b).sum(-1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a bundle (default: random ViT-S/14, LayerScale 1)")
    ap.add_argument("--mpp", type=float, default=0.35, help="µm/px of the tiles (default 0.35: the Olympus scan's own)")
    ap.add_argument("--work", type=Path, default=Path("bench-stain-scanners"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stain_scanners.txt")
    args = ap.parse_args(argv)
    from report import finish

    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    offset, ncc = register(REF, OTHER)
    model = args.model or random_bundle(args.work / "vits14-random.pathapp")
    ref_f, ref_c, ref_fp = read_h5(infer(REF, model, args.work / "ref", args.mpp, "none"))
    from pathapp.slide import open_slide

    with open_slide(REF) as s:
        ref_mpp = s.mpp
    with open_slide(OTHER) as s:
        oth_mpp = s.mpp
    rng = np.random.default_rng(0)
    lines = [f"# python benchmarks/bench_stain_scanners.py --mpp {args.mpp}" + (f" --model {args.model}" if args.model else ""),
             f"# registration: offset {offset.round(2).tolist()} µm (Olympus = Hamamatsu + offset), NCC {ncc:.3f}",
             f"# model: {model.name}", "",
             "| Olympus scan | pairs | mean overlap | cosine distance of paired tiles [95 % CI] | ÷ distance between different tiles |",
             "|---|---|---|---|---|"]
    n = len(ref_f)
    different = cosine_distance(ref_f[:, None, :], ref_f[None, :, :])[~np.eye(n, dtype=bool)].mean()
    for method in METHODS:
        f, c, fp = read_h5(infer(OTHER, model, args.work / method, args.mpp, method))
        pr = pairs(ref_c, ref_fp * ref_mpp, ref_mpp, c, fp * oth_mpp, oth_mpp, offset)
        i, j, share = (np.array(v) for v in zip(*pr))
        d = cosine_distance(ref_f[i], f[j])
        boots = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(2000)]
        lo, hi = np.percentile(boots, [2.5, 97.5])
        lines.append(f"| {method} | {len(d)} | {share.mean():.3f} | {d.mean():.4f} [{lo:.4f}, {hi:.4f}] | "
                     f"{d.mean() / different:.3f} |")
    lines += ["", f"distance between different Hamamatsu tiles: {different:.4f} ({n} tiles)",
              f"{time.perf_counter() - t0:.0f} s"]
    finish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
