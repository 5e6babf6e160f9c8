"""Does the pipeline keep the model busy? Model-only vs end-to-end tiles/s on one device and precision,
measured in one run (alternating, median of rounds), for the CPU or a GPU.

dinov2_vits14 at 224 px, random weights with LayerScale 1, batch 32. Model-only: the same Runtime on
random uint8 batches already on the device. End-to-end: `infer_slide` on the slide at 0.5 µm/px
(tissue, grid, DataLoader workers reading and decoding, copies to the device — pinned and
non-blocking on GPU, channels-last there — and the model); the streaming loop alone (the model
stage) is reported too.

    flock /work/heavy.lock nice -n 5 python benchmarks/bench_infer_device.py --device cpu \\
        --slide ../shared/data/wsi/aperio/luna-1065626.svs --rounds 3 --out benchmarks/results/device_cpu_luna
    python benchmarks/bench_infer_device.py --device cuda --precision bf16   (where a GPU is lent)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_infer import SMALL, make_bundle, model_only
from bench_vs_wsinfer import cpu_flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--slide", type=Path, default=SMALL)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=4, help="timed batches per model-only measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.txt")
    a = ap.parse_args()

    import torch

    from pathapp.infer import infer_slide, prepare_model
    from pathapp.models.bundle import load_bundle
    from pathapp.slide import open_slide

    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(make_bundle(Path(tmp)))
    rt = prepare_model(bundle, a.device, a.precision, "dinov2_vits14")
    mpp = 0.5
    rows = []
    for r in range(a.rounds + 1):  # round 0 warms caches and is not counted
        mo = model_only(rt, a.batch_size, a.batches)
        load = os.getloadavg()[0]
        t = time.perf_counter()
        with open_slide(a.slide) as slide:
            res = infer_slide(slide, bundle, mpp=mpp, batch_size=a.batch_size, workers=a.workers, runtime=rt,
                              progress=False)
        wall = time.perf_counter() - t
        n = len(res)
        if r:
            rows.append({"model_only": mo, "end_to_end": n / wall, "stream": n / res.timings["model"],
                         "tiles": n, "load1_before": load, "timings": res.timings})
            print(json.dumps(rows[-1], default=float), flush=True)
    med = {k: statistics.median(row[k] for row in rows) for k in ("model_only", "end_to_end", "stream")}
    ratio_e2e = statistics.median(row["end_to_end"] / row["model_only"] for row in rows)
    ratio_stream = statistics.median(row["stream"] / row["model_only"] for row in rows)
    cpu = cpu_flags()
    text = (f"{a.slide.name} at {mpp:g} µm/px ({rows[0]['tiles']} tiles), {rt.device} {rt.precision}, batch "
            f"{a.batch_size}, {torch.get_num_threads()} torch threads, {a.rounds} rounds (medians): model-only "
            f"{med['model_only']:.1f} tiles/s, model stage (reading overlapped) {med['stream']:.1f} tiles/s "
            f"(x{ratio_stream:.2f} of model-only), whole slide incl. tissue detection {med['end_to_end']:.1f} "
            f"tiles/s (x{ratio_e2e:.2f}); 1-min load average {min(r['load1_before'] for r in rows):.2f}-"
            f"{max(r['load1_before'] for r in rows):.2f} on {os.cpu_count()} CPUs\n"
            f"CPU: {cpu['model']}; flags: {' '.join(cpu['flags'])}")
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps(
            {"rows": rows, "medians": med, "ratio_stream": ratio_stream, "ratio_e2e": ratio_e2e, "cpu": cpu,
             "device": str(rt.device), "precision": rt.precision, "command": " ".join(sys.argv)},
            indent=2, default=float))
        a.out.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
