"""A tiny DINOv2 pretraining configuration shared by the SSL tests (seconds per step on one CPU)."""

from __future__ import annotations

from typing import Any

from pathapp.ssl.config import SSLConfig

TINY_SSL: dict[str, Any] = dict(
    backbone="dinov2_vits14",
    backbone_overrides={"depth": 2, "embed_dim": 48, "num_heads": 2, "img_size": 42},
    layerscale_init=1.0, drop_path=0.1, tile_size=64, global_crop_size=42, local_crop_size=28,
    n_local_crops=2, n_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16, batch_size=4,
    epoch_length=2, num_workers=0, checkpoint_every=2,
)


def tiny_config(**changes: Any) -> SSLConfig:
    return SSLConfig(**{**TINY_SSL, **changes})
