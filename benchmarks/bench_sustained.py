"""Sustained inference rate against the model alone, measured in one run (issue #27, item 3).

The streaming stage of `pathapp infer` (DataLoader workers reading, decoding and measuring QC of every
tile while the model runs: `pipeline.run_model`, what `infer_slide` calls) on all the tissue of
luna-1065626.svs at 0.5 µm/px, and again with neighbouring tiles overlapping by 95 of 224 px, which
makes about 3× as many tiles from the same area (more reading per tissue area, the same model work per
tile). Each is set beside the model-only rate of the same runtime (precision `auto` unless told),
measured right before and right after on random uint8 batches; the figure of merit is
stage tiles/s ÷ mean model-only tiles/s. Rounds are interleaved and the 1-minute load average is kept
with each, because this machine is shared.

    flock /work/heavy.lock python benchmarks/bench_sustained.py --rounds 2 --out benchmarks/results/sustained_luna
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench_infer import LARGE, make_bundle, model_only
from bench_vs_wsinfer import cpu_flags

OVERLAPS = {"tissue at 0.5 µm/px": 0, "overlap 95/224 px (≈3× tiles)": 95}


def stage_rate(runtime, slide, overlap: int, batch_size: int, qc: bool) -> tuple[int, float, dict[str, float]]:
    """(tiles, tiles/s of the streaming stage, its timings) for one pass over the slide."""
    from pathapp.infer.pipeline import default_workers, plan_tiles, run_model
    from pathapp.tiles.qc import TileMeasurer

    timings: dict[str, float] = {}
    grid, _, _ = plan_tiles(slide, 0.5, 224, None, None, timings, overlap=overlap)
    measure = TileMeasurer.for_geometry(grid.geometry) if qc else None
    run_model(runtime, slide, grid, batch_size, default_workers(runtime.device), timings, progress=False,
              measure=measure)
    return len(grid), len(grid) / timings["model"], timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-qc", action="store_true", help="stream without the per-tile QC measures (--qc off)")
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.txt")
    a = ap.parse_args()

    import tempfile

    from pathapp.infer import prepare_model
    from pathapp.models.bundle import load_bundle
    from pathapp.slide import open_slide

    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp, open_slide(LARGE) as slide:
        runtime = prepare_model(load_bundle(make_bundle(Path(tmp))), "cpu", a.precision, "dinov2_vits14")
        stage_rate(runtime, slide, 0, a.batch_size, not a.no_qc)  # warm-up: page cache, first batches
        for r in range(a.rounds):
            for label, overlap in OVERLAPS.items():
                load = os.getloadavg()[0]
                before = model_only(runtime, a.batch_size, 4)
                n, rate, timings = stage_rate(runtime, slide, overlap, a.batch_size, not a.no_qc)
                after = model_only(runtime, a.batch_size, 4)
                alone = (before + after) / 2
                rows.append({"round": r, "run": label, "tiles": n, "stage_tiles_per_s": rate,
                             "model_only_tiles_per_s": alone, "ratio": rate / alone, "load1_before": load,
                             "data_wait_s": timings["data_wait"], "compute_s": timings["compute"]})
                print(json.dumps(rows[-1]), flush=True)
    lines = [f"{LARGE.name}, {runtime.precision}, batch {a.batch_size}, QC {'off' if a.no_qc else 'on'}, "
             f"{a.rounds} rounds (medians); load before the runs "
             f"{min(r['load1_before'] for r in rows):.2f}-{max(r['load1_before'] for r in rows):.2f} on "
             f"{os.cpu_count()} CPUs"]
    for label in OVERLAPS:
        mine = [r for r in rows if r["run"] == label]
        med = {k: statistics.median(r[k] for r in mine) for k in ("stage_tiles_per_s", "model_only_tiles_per_s", "ratio")}
        lines.append(f"{label}: {mine[0]['tiles']} tiles, stage {med['stage_tiles_per_s']:.1f} tiles/s, model only "
                     f"{med['model_only_tiles_per_s']:.1f} tiles/s, ratio {med['ratio']:.2f}")
    flags = cpu_flags()
    lines.append(f"CPU: {flags['model']}, {flags['cpus']} CPUs; flags: {' '.join(flags['flags'])}")
    print("\n".join(lines))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "cpu": flags}, indent=2))
        a.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
