"""`pathapp infer` against WSInfer 0.6.1, whole processes, alternated A B A B on the same slide.

Both run the same random-init ViT-S/14 (timm vit_small_patch14_dinov2, 224 px, 2-class head, seed 0),
written by ../shared/bench/wsinfer/make_models.py in both tools' formats; set WSInfer up first
(../shared/bench/wsinfer/README.md). Each pair runs pathapp at every precision asked for and then
WSInfer; wall time and peak RSS come from /usr/bin/time around the whole process (imports, model load,
tissue detection, reading, model, writing). The tools keep different numbers of tiles (their tissue
detectors differ), so the figure of merit is the per-tile rate: the median over pairs of
(pathapp tiles/s) / (WSInfer tiles/s). The 1-minute load average is recorded before every run: this
machine is shared, and a figure measured under load says so.

    flock /work/heavy.lock nice -n 5 python benchmarks/bench_vs_wsinfer.py --pairs 3 \\
        --wsinfer-dir /work/artifacts/wsinfer --precisions auto fp32 --out benchmarks/results/vs_wsinfer
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"
SLIDE = SHARED / "data/wsi/aperio/CMU-1-Small-Region.svs"
RUN_SH = SHARED / "bench/wsinfer/run.sh"
PATHAPP = Path(sys.executable).with_name("pathapp")


def cpu_flags() -> dict[str, object]:
    """The CPU model and the flags that decide the fast path (lscpu), recorded with every result."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = info.get("Flags", "").split()
    keep = [f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")]
    return {"model": info.get("Model name", "").strip(), "cpus": os.cpu_count(), "flags": keep}


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a whole process, from /usr/bin/time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        res = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", t.name, *cmd], capture_output=True,
                             text=True, env=env, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{cmd[:3]} failed ({res.returncode}): {res.stderr[-2000:]}")
        wall, rss_kib = t.read().split()[-2:]
    return float(wall), float(rss_kib) / 1024


def run_pathapp(bundle: Path, precision: str, batch_size: int, tmp: Path) -> dict[str, object]:
    out = Path(tempfile.mkdtemp(dir=tmp))
    load = os.getloadavg()[0]
    wall, rss = timed([str(PATHAPP), "infer", str(SLIDE), "--model", str(bundle), "--out", str(out),
                       "--batch-size", str(batch_size), "--precision", precision])
    run = json.loads((out / SLIDE.stem / "run.json").read_text())
    tiles = run["counts"]["tiles"]
    model_s = run["timings"]["model"] - run["timings"].get("model_wait", 0.0)  # waiting for the build is start-up
    return {"tool": f"pathapp {precision}", "precision": run["parameters"]["precision"], "tiles": tiles,
            "wall_s": wall, "tiles_per_s": tiles / wall, "peak_rss_mib": rss, "load1_before": load,
            "model_stage_s": model_s, "outside_model_s": wall - model_s, "timings": run["timings"]}


def run_wsinfer(wsinfer_dir: Path, batch_size: int) -> dict[str, object]:
    load = os.getloadavg()[0]
    res = subprocess.run(["bash", str(RUN_SH), str(SLIDE)], capture_output=True, text=True, check=True,
                         env={**os.environ, "WSINFER_DIR": str(wsinfer_dir)})
    row = json.loads(res.stdout.strip().splitlines()[-1])
    if row["rc"] != 0 or row["tiles"] <= 0:
        raise RuntimeError(f"wsinfer failed: {row}")
    return {"tool": "wsinfer 0.6.1", "tiles": row["tiles"], "wall_s": row["wall_s"],
            "tiles_per_s": row["tiles"] / row["wall_s"], "peak_rss_mib": row["max_rss_mib"], "load1_before": load}


def make_bundle(wsinfer_dir: Path, tmp: Path) -> Path:
    """The WSInfer model's network as a pathapp bundle, made the way README.md of the peer says."""
    models = wsinfer_dir / "models"
    out = tmp / "vits14_2cls.pathapp"
    subprocess.run([str(PATHAPP), "model", "create", "--backbone", "dinov2_vits14", "--weights",
                    str(models / "vits14_backbone.pth"), "--head", str(models / "head_2cls.pt"), "--classes",
                    "benign,tumor", "--mpp", "0.5", "--tile-size", "224", "--out", str(out)],
                   check=True, capture_output=True, text=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precisions", nargs="+", default=["auto"], help="pathapp precisions run in each pair")
    ap.add_argument("--wsinfer-dir", type=Path,
                    default=Path(os.environ.get("WSINFER_DIR", Path(os.environ.get("TMPDIR", "/tmp")) / "wsinfer")))
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.txt")
    a = ap.parse_args()
    if a.batch_size != 32:
        sys.exit("run.sh runs WSInfer at batch 32: keep --batch-size 32 for a like-for-like comparison")
    if not (a.wsinfer_dir / "models" / "config.json").exists():
        sys.exit(f"{a.wsinfer_dir}: WSInfer is not set up; run `bash {RUN_SH.parent}/setup.sh` (WSINFER_DIR=...)")

    runs: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = make_bundle(a.wsinfer_dir, tmp)
        run_pathapp(bundle, a.precisions[0], a.batch_size, tmp)  # warm the page cache for both tools
        for pair in range(a.pairs):
            for p in a.precisions:
                runs.append({"pair": pair, **run_pathapp(bundle, p, a.batch_size, tmp)})
                print(json.dumps(runs[-1]), flush=True)
            runs.append({"pair": pair, **run_wsinfer(a.wsinfer_dir, a.batch_size)})
            print(json.dumps(runs[-1]), flush=True)

    def of(tool: str) -> list[dict[str, object]]:
        return [r for r in runs if r["tool"] == tool]

    ws = of("wsinfer 0.6.1")
    summary: dict[str, object] = {}
    lines = [f"CMU-1-Small-Region.svs, batch {a.batch_size}, {a.pairs} pairs (medians); "
             f"1-min load average before the runs: {min(r['load1_before'] for r in runs):.2f}-"
             f"{max(r['load1_before'] for r in runs):.2f} on {os.cpu_count()} CPUs"]
    for tool in [f"pathapp {p}" for p in a.precisions] + ["wsinfer 0.6.1"]:
        rs = of(tool)
        s = {k: statistics.median(float(r[k]) for r in rs) for k in ("wall_s", "tiles_per_s", "peak_rss_mib")}
        s["tiles"] = rs[0]["tiles"]
        if tool != "wsinfer 0.6.1":
            s["precision"] = rs[0]["precision"]
            s["outside_model_s"] = statistics.median(float(r["outside_model_s"]) for r in rs)
            s["model_stage_s"] = statistics.median(float(r["model_stage_s"]) for r in rs)
            s["per_tile_ratio_vs_wsinfer"] = statistics.median(
                float(r["tiles_per_s"]) / float(w["tiles_per_s"]) for r, w in zip(rs, ws))
        summary[tool] = s
        extra = (f", model stage {s['model_stage_s']:.2f} s, outside it {s['outside_model_s']:.2f} s, "
                 f"per-tile ratio to WSInfer {s['per_tile_ratio_vs_wsinfer']:.2f}x" if "precision" in s else "")
        lines.append(f"{tool}{' (' + str(s['precision']) + ')' if 'precision' in s else ''}: {s['tiles']} tiles, "
                     f"{s['wall_s']:.2f} s, {s['tiles_per_s']:.2f} tiles/s, peak RSS {s['peak_rss_mib']:.0f} MiB"
                     + extra)
    cpu = cpu_flags()
    lines.append(f"CPU: {cpu['model']}, {cpu['cpus']} CPUs; flags: {' '.join(cpu['flags'])}")
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"slide": SLIDE.name, "batch_size": a.batch_size, "pairs": a.pairs, "summary": summary, "runs": runs,
               "cpu": cpu, "python": platform.python_version(), "command": " ".join(sys.argv),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        a.out.with_suffix(".json").write_text(json.dumps(doc, indent=2))
        a.out.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
