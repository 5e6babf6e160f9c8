"""Few-shot benchmark on EBHI-Seg through `pathapp evaluate`, exactly as a user runs it.

Writes dinov2_vits14 as a headless bundle (pretrained from --weights, else random init with LayerScale
1), then runs `pathapp evaluate --folds 5 --fewshot` on the 694 EBHI-Seg images at 1.0 µm/px (their
scale, estimated from nucleus size; see the README): each image tiled at the bundle's µm/px and tile
size as `pathapp infer` tiles it, 5 folds grouped by case_prefix, the head --method, the few-shot curve
(1, 5, 10, 25, 100, all labelled images per class), and the floors evaluate measures in the same run on
the same folds (standardised colour histogram, random init) with paired differences.

    python benchmarks/bench_fewshot.py                          # random weights
    python benchmarks/bench_fewshot.py --weights dinov2_vits14_pretrain.pth
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "labeled" / "ebhi-seg" / "labels.csv"


def backbone_bundle(weights: Path | None, tile_size: int, out: Path, seed: int = 0) -> tuple[Path, str]:
    """dinov2_vits14 as a headless bundle file: pretrained from `weights`, else random with LayerScale 1."""
    import torch

    from pathapp.models.bundle import Bundle, save_bundle
    from pathapp.models.registry import create_backbone, get_spec

    if weights is not None:
        from pathapp.models.loader import load_backbone

        net, spec = load_backbone("dinov2_vits14", weights)
        source = str(weights)
    else:
        spec = get_spec("dinov2_vits14")
        torch.manual_seed(seed)
        net = create_backbone(spec)
        with torch.no_grad():  # timm's 1e-5 LayerScale makes random blocks near-identity
            for m in net.modules():
                if hasattr(m, "gamma") and isinstance(m.gamma, torch.Tensor):
                    m.gamma.fill_(1.0)
        source = f"random init (seed {seed}, LayerScale 1)"
    bundle = Bundle.from_model(net, spec, mpp=0.5, tile_size=tile_size, provenance={"weights": source})
    return save_bundle(bundle, out), source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="EBHI-Seg labels.csv")
    ap.add_argument("--image-mpp", type=float, default=1.0, help="µm/px of the images (EBHI-Seg: 1.0, estimated)")
    ap.add_argument("--weights", type=Path, default=None, help="dinov2_vits14 weights file (else random)")
    ap.add_argument("--method", default="linear", choices=["linear", "knn", "prototype", "mlp"])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--tile-size", type=int, default=224)
    ap.add_argument("--out", type=Path, default=Path("bench-fewshot"), help="report folder")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, source = backbone_bundle(args.weights, args.tile_size, args.out / "vits14.pathapp")
    cmd = [sys.executable, "-m", "pathapp", "evaluate", "--data", str(args.data), "--image-mpp", str(args.image_mpp),
           "--model", str(model), "--folds", str(args.folds), "--method", args.method, "--fewshot",
           "--bootstrap", str(args.bootstrap), "--out", str(args.out / "report")]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    report = json.loads((args.out / "report" / "report.json").read_text())
    print(f"dinov2_vits14 [{source}]: {report['mode']}")
    print("few-shot: " + ", ".join(f"{c['shots']}: {c['balanced_accuracy']:.3f}" for c in report["fewshot"]))


if __name__ == "__main__":
    main()
