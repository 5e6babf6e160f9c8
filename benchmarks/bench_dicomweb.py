"""Tiles/s read over DICOMweb (a real Orthanc on loopback) vs the same DICOM files on disk, in one run.

The CMU-1 SVS is converted to a DICOM-WSI pyramid by OrthancWSIDicomizer (240 px JPEG frames), stored
in a fresh Orthanc through STOW-RS, and tiled as `pathapp infer` tiles it (--mpp, --tile-size, inside
tissue). Every tile is then read as inference reads it: in batches (`read_tiles`, what a DataLoader
worker does for one batch; on DICOMweb the batch's frames come in one request) by K concurrent
readers sharing one slide handle, from the files and from the server, alternately; each round opens
fresh handles so no frame cache carries over. `--batch 1` reads tile by tile. Reported per K: tiles/s
of both, their ratio, and the frames and WADO-RS frame requests per tile read. CPU model and flags
go with the result.

    flock /work/heavy.lock nice -n 5 python benchmarks/bench_dicomweb.py [--rounds 5] [--batch 32] [--concurrency 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tests"))  # the tests' Orthanc launcher: one way to start the server

from orthanc_server import dicomize_svs, start_orthanc  # noqa: E402

SVS = DATA / "wsi/aperio/CMU-1-Small-Region.svs"


def cpu() -> dict[str, str]:
    """CPU model and feature flags, as lscpu reports them."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {k: fields.get(k, "").strip() for k in ("Model name", "CPU(s)", "Flags")}


def read_all(source: str, mpp: float, tile_size: int, threads: int, batch: int) -> dict:
    """Open `source`, tile it, read every tile in batches with `threads` concurrent readers; tiles/s
    and fetch counts."""
    from pathapp.slide import open_slide
    from pathapp.tiles import detect_tissue, make_grid
    from pathapp.tiles.dataset import read_tiles

    with open_slide(source) as slide:
        grid = make_grid(slide, mpp, tile_size, tissue=detect_tissue(slide))
        stats = getattr(slide, "stats", None)
        frames0 = (stats.frames, stats.frame_requests) if stats else (0, 0)
        t0 = time.perf_counter()
        batches = [range(i, min(i + batch, len(grid))) for i in range(0, len(grid), batch)]
        with ThreadPoolExecutor(threads) as pool:
            checksum = sum(int(t[::37, ::37].sum()) for tiles in pool.map(lambda b: read_tiles(slide, grid, b), batches)
                           for t in tiles)
        seconds = time.perf_counter() - t0
        frames = (stats.frames - frames0[0], stats.frame_requests - frames0[1]) if stats else (None, None)
    return {"tiles": len(grid), "seconds": seconds, "frames": frames[0], "requests": frames[1], "checksum": checksum}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--tile-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5, help="fresh handles per mode and concurrency (median kept)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch", type=int, default=32, help="tiles per read_tiles call (pathapp infer's --batch-size)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dicomweb_read.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = dicomize_svs(SVS, work / "svs-dicom")
        server = start_orthanc(work / "orthanc")
        try:
            server.store("svs", files)
            for key, value in server.env.items():
                os.environ[key] = value
            web = server.url("svs")
            rows = []
            for k in args.concurrency:
                runs = {"disk": [], "web": []}
                for _ in range(args.rounds):  # interleaved, so drift in machine load hits both alike
                    runs["disk"].append(read_all(str(work / "svs-dicom"), args.mpp, args.tile_size, k, args.batch))
                    runs["web"].append(read_all(web, args.mpp, args.tile_size, k, args.batch))
                med = {m: sorted(r, key=lambda r: r["seconds"])[len(r) // 2] for m, r in runs.items()}
                assert med["disk"]["checksum"] == med["web"]["checksum"], "web and disk pixels differ"
                n = med["web"]["tiles"]
                row = {
                    "concurrency": k, "batch": args.batch, "tiles": n,
                    "disk_tiles_per_s": n / med["disk"]["seconds"], "web_tiles_per_s": n / med["web"]["seconds"],
                    "frames_per_tile": med["web"]["frames"] / n, "requests_per_tile": med["web"]["requests"] / n,
                }
                row["ratio"] = row["web_tiles_per_s"] / row["disk_tiles_per_s"]
                rows.append(row)
                print(f"K={k} batch {args.batch}: disk {row['disk_tiles_per_s']:7.1f} tiles/s  web {row['web_tiles_per_s']:7.1f} tiles/s  "
                      f"ratio {row['ratio']:.2f}  frames/tile {row['frames_per_tile']:.2f}  "
                      f"requests/tile {row['requests_per_tile']:.2f}", flush=True)
        finally:
            server.stop()

    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "slide": f"{SVS.name} dicomized by OrthancWSIDicomizer (240 px JPEG frames), {rows[0]['tiles']} tissue tiles "
                 f"of {args.tile_size} px at {args.mpp} µm/px, {args.rounds} rounds per cell (median)",
        "server": "Orthanc 1.10 + DICOMweb plugin 1.7 (Debian) on 127.0.0.1, basic auth",
        "rows": rows, "cpu": cpu(), "python": platform.python_version(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
