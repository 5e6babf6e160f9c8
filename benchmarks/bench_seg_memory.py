"""Memory of segmentation inference vs analysed area: `infer.segment.segment_slide` over growing
regions of one slide and over the whole of a larger one, with a tiny random segmentation bundle (the
model's own memory does not depend on the slide). Peak numpy/Python heap (tracemalloc) during the
call, beside the analysed area, the tiles, and the uint8 class + probability map (2 bytes per map
pixel, the one part that is as large as the slide).

    python benchmarks/bench_seg_memory.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
SLIDE = ROOT / "wsi" / "aperio" / "luna-1065626.svs"


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import shapely
    import torch
    from report import finish
    from vit_factory import tiny_spec, tiny_vit

    from pathapp.infer.pipeline import prepare_model
    from pathapp.infer.segment import segment_slide
    from pathapp.models.bundle import Bundle
    from pathapp.models.seg import new_seg_head
    from pathapp.slide import open_slide

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mpp", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "seg_memory.txt")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    spec = tiny_spec()
    bundle = Bundle.from_model(tiny_vit(spec), spec, head=new_seg_head("linear", spec.embed_dim, 2).eval(),
                               class_names=["Background", "Tissue"], mpp=args.mpp, tile_size=56)
    rt = prepare_model(bundle, "cpu")
    slide = open_slide(SLIDE)
    w, h = slide.size
    lines = [f"# python benchmarks/bench_seg_memory.py --mpp {args.mpp}",
             f"# {SLIDE.name} ({w}×{h} px at {slide.mpp} µm/px), tiny random ViT + linear seg head, 56 px tiles, "
             f"14 px overlap, every tile (min tissue 0)", "",
             "| analysed region | tiles | map px (whole slide) | peak heap MiB | map MiB | peak − map MiB | seconds |",
             "|---|---|---|---|---|---|---|"]
    segment_slide(slide, rt, rois=shapely.box(0, 0, w / 16, h / 16), min_tissue=0.0, workers=0, progress=False)  # warm-up
    for frac in (0.25, 0.5, 1.0):
        roi = shapely.box(0, 0, w * frac, h * frac)
        tracemalloc.start()
        t = time.perf_counter()
        with tempfile.TemporaryDirectory():
            r = segment_slide(slide, rt, rois=roi, min_tissue=0.0, workers=0, progress=False)
        secs = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        seg = r.segmentation
        map_mib = (seg.labels.nbytes + seg.prob.nbytes) / 2**20
        lines.append(f"| {frac:g} × {frac:g} of the slide ({frac * frac * 100:.1f} % of its area) | {len(r)} | "
                     f"{seg.labels.size} | {peak:.1f} | {map_mib:.2f} | {peak - map_mib:.1f} | {secs:.0f} |")
        print(lines[-1], flush=True)
    finish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
