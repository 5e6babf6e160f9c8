"""Model-only tiles/s and embedding cosine to fp32 for every CPU precision path, alternated in one run:
fp32, bf16 weights + inputs (what `--precision auto` picks on AVX-512-BF16/AMX CPUs), the eager dynamic
int8 that `--precision int8` uses (torch.ao quantize_dynamic), and torchao's int8 dynamic-activation
int8-weight (the path torch now recommends), to decide which int8 pathapp keeps.

ViT-S/14 at 224 px, random weights with LayerScale 1, random uint8 images (cosine on real tiles is
tested in tests/test_infer_precision.py).

    flock /work/heavy.lock nice -n 5 python benchmarks/bench_precision.py --rounds 3 --out benchmarks/results/precision_cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from bench_infer import make_bundle
from bench_vs_wsinfer import cpu_flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    import torch

    from pathapp.infer import prepare_model
    from pathapp.models.bundle import load_bundle

    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(make_bundle(Path(tmp)))
    models = {p: prepare_model(bundle, "cpu", p).model for p in ("fp32", "bf16", "int8")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        ao = copy.deepcopy(models["fp32"])
        quantize_(ao.backbone, Int8DynamicActivationInt8WeightConfig())
    models["int8 torchao"] = ao
    x = torch.randint(0, 256, (a.batch_size, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rates: dict[str, list[float]] = {k: [] for k in models}
    emb: dict[str, torch.Tensor] = {}
    loads = []
    with torch.inference_mode():
        for k, m in models.items():
            emb[k] = m(x)[0].float()  # warm-up, and the embeddings compared below
        for _ in range(a.rounds):
            loads.append(os.getloadavg()[0])
            for k, m in models.items():
                t = time.perf_counter()
                m(x)
                rates[k].append(a.batch_size / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    cos = {k: float(torch.nn.functional.cosine_similarity(emb[k], emb["fp32"]).min()) for k in models}
    cpu = cpu_flags()
    lines = [f"ViT-S/14 224 px, batch {a.batch_size}, {torch.get_num_threads()} threads, {a.rounds} rounds (medians); "
             f"1-min load average {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} CPUs"]
    lines += [f"{k}: {med[k]:.1f} tiles/s (x{med[k] / med['fp32']:.2f} fp32), min cosine to fp32 {cos[k]:.5f}"
              for k in models]
    lines.append(f"CPU: {cpu['model']}; flags: {' '.join(cpu['flags'])}")
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps({"rates": rates, "medians": med, "cosine_min": cos,
                                                          "load1": loads, "cpu": cpu}, indent=2))
        a.out.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
