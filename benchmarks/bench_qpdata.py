"""Reading QuPath data files without Java: time and peak memory per file (not a timed test).

Each file is read in its own process, twice (every object, then annotations only), so that peak RSS
belongs to that read alone; memory is the peak RSS above what the process held after imports.
Besides the two real projects in ../shared/data, give larger files to see how time and memory
grow with the number of objects (tests/qpdata_fixtures/java/pathapp/WriteCells.java writes a data
file of N cells through QuPath's own code). The CPU (lscpu) is printed with the table.

    python benchmarks/bench_qpdata.py [DATA_QPDATA ...] [--out benchmarks/results/qpdata_read.txt]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL = [
    DATA / "qupath/btc-lab-he-project/data/106/data.qpdata",
    DATA / "qupath/coscia-demo-project/data/1/data.qpdata",
]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(path: str, annotations_only: bool) -> dict:
    from pathapp.qupath.qpdata import read_qpdata

    base = _rss_mb()
    t0 = time.perf_counter()
    data = read_qpdata(path, {"annotation"} if annotations_only else None)
    seconds = time.perf_counter() - t0
    return {"file": path, "mb": Path(path).stat().st_size / 1e6, "objects": len(data.objects),
            "annotations_only": annotations_only, "seconds": seconds, "peak_mb": _rss_mb() - base,
            "qupath": data.qupath_version}


def cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    keep = ("Model name", "CPU(s):", "Flags")
    return "\n".join(line for line in out.splitlines() if line.strip().startswith(keep))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="more data.qpdata files (the real projects' are always read)")
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # child mode: FILE 0|1, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1] == "1")))
        return
    rows = []
    for path in [*REAL, *map(Path, args.files)]:
        for only in ("0", "1"):
            r = subprocess.run([sys.executable, __file__, "--one", str(path), only], capture_output=True, text=True)
            if r.returncode:
                print(f"{path}: failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
                continue
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    lines = [f"{'file':58} {'QuPath':6} {'MB':>7} {'read':11} {'objects':>8} {'s':>7} {'s/file MB':>9} {'peak MB':>8} {'MB/file MB':>10}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        name = "/".join(Path(r["file"]).parts[-3:])
        lines.append(f"{name[:58]:58} {r['qupath'] or '?':6} {r['mb']:7.2f} {'annotations' if r['annotations_only'] else 'all':11} "
                     f"{r['objects']:8d} {r['seconds']:7.2f} {r['seconds'] / r['mb']:9.2f} {r['peak_mb']:8.0f} {r['peak_mb'] / r['mb']:10.1f}")
    text = "\n".join(lines) + "\n\n" + cpu() + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(f"$ python benchmarks/bench_qpdata.py {' '.join(args.files)}\n\n{text}", encoding="utf-8")


if __name__ == "__main__":
    main()
