"""How much detected tissue no tile covers (issue #17 item 7), through the command a user runs.

For each slide, `pathapp tile` (default --mpp 0.5, --tile-size 224, --min-tissue 0.1) writes
tiles.geojson and tissue.geojson; the left-out fraction is the area of the tissue outline outside
the union of the tile footprints, over the tissue area. Also counts tiles padded at the edges and
checks that neighbouring tile footprints neither overlap nor leave gaps. Cheap (seconds); the CPU
(lscpu flags) is recorded with the table all the same.

    python benchmarks/bench_edge_tissue.py [--out benchmarks/results/edge_tissue.txt]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import shapely

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SLIDES = [  # (file, extra options): the three slides issue #17 measured
    ("wsi/aperio/CMU-1-Small-Region.svs", []),
    ("wsi/aperio/tcga-cr-7395-01a-01-ts1.svs", ["--slide-mpp", "0.25"]),
    ("wsi/ome-tiff/OS-1-detail.ome.tif", []),
]


def left_out(folder: Path) -> dict:
    from pathapp.qupath.geojson import read_objects

    tiles = read_objects(folder / "tiles.geojson")
    tissue = shapely.union_all([o.geometry for o in read_objects(folder / "tissue.geojson")])
    union = shapely.union_all([t.geometry for t in tiles])
    overlap = sum(t.geometry.area for t in tiles) - union.area  # > 0 when neighbours overlap
    padded = sum(1 for t in tiles if t.measurements.get("padding fraction", 0) > 0)
    return {"tiles": len(tiles), "padded": padded, "left_out": tissue.difference(union).area / tissue.area,
            "overlap_px2": overlap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    exe = Path(sys.executable).with_name("pathapp")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rel, extra in SLIDES:
            cmd = [str(exe), "tile", str(DATA / rel), *extra, "--out", tmp]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            folder = next(p for p in Path(tmp).iterdir() if rel.split("/")[-1].startswith(p.name))
            rows.append((rel, " ".join(extra), left_out(folder)))
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()
    lines = ["pathapp tile SLIDE [options] --out OUT (defaults: --mpp 0.5 --tile-size 224 --min-tissue 0.1)",
             f"{'slide':42} {'options':18} {'tiles':>5} {'padded':>6} {'tissue left out':>15} {'overlap px²':>11}"]
    for rel, extra, r in rows:
        lines.append(f"{rel:42} {extra:18} {r['tiles']:5d} {r['padded']:6d} {100 * r['left_out']:14.2f}% "
                     f"{r['overlap_px2']:11.2f}")
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    lines += ["", "lscpu:", *[ln for ln in flags.splitlines() if ln.startswith(("Model name", "Flags"))]]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
