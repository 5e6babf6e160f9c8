"""Every pretraining hyper-parameter in one dataclass, saved as YAML into the run folder so a run can
be read back, resumed and reproduced. Defaults follow the official DINOv2 recipe with the pathology
changes of Midnight (HED jitter on, solarize off, online tiles with >60% tissue)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pathapp.atomic import atomic_write_text
from pathapp.errors import PathappError


_LIST_FIELDS = {"mpp", "roi_class"}  # list-valued settings; every other YAML list is a tuple
MAX_AUTO_BATCH = 64  # the batch size chosen when memory allows (DINOv2's per-GPU batch for ViT-S/B)
MIN_BATCH = 2  # KoLeo needs neighbours


@dataclass
class SSLConfig:
    """DINOv2 + iBOT + KoLeo/KDE pretraining settings. Durations are in steps or in "epochs" of
    `epoch_length` steps (online patching has no natural epoch; DINOv2 uses 1250)."""

    # --- backbone -----------------------------------------------------------------------------
    backbone: str = "dinov2_vits14"
    init: str = "none"  # "none" (random), "dinov2" (registry hub weights) or a checkpoint file
    backbone_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. depth, embed_dim (tests)
    layerscale_init: float | None = None  # refill LayerScale gammas after a random init
    drop_path: float = 0.3
    # --- data -------------------------------------------------------------------------------------
    slides: str | None = None  # folder of slides, one slide, a slides.csv (slide[,mpp]) or a QuPath project.qpproj
    tiles: str | None = None  # or a folder of image tiles
    mpp: list[float] = field(default_factory=lambda: [0.5])  # µm/px of sampled tiles (one picked per tile)
    bundle_mpp: float | None = None  # µm/px teacher.pathapp records for inference (None: inference_mpp's rule)
    tile_size: int = 256  # px of the tile read from a slide, before multi-crop
    min_tissue: float = 0.6  # HSV tissue fraction a sampled tile must exceed
    slide_mpp: float | None = None  # µm/px applied to every slide (for files that do not say)
    balance: str = "slides"  # draw each slide equally often ("slides") or in proportion to its tissue area ("tissue")
    roi_class: list[str] = field(default_factory=list)  # a QuPath project's images: sample only inside these annotation classes
    stain_norm: str | None = None  # "macenko" | "reinhard" | "vahadane": normalise every tile onto stain_ref
    stain_ref: str | None = None  # a tile, a slide, or a saved target (.json, a run's stain.json)
    num_workers: int = 2
    # --- multi-crop and augmentation ----------------------------------------------------------
    global_crop_size: int = 224
    local_crop_size: int = 98
    n_local_crops: int = 8
    global_crop_scale: tuple[float, float] = (0.32, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.32)
    rot90: bool = True
    vflip: bool = True
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    solarize: bool = False  # DINOv2 solarizes the 2nd global crop; pathology recipes drop it
    hed_sigma: float = 0.05
    hed_p: float = 0.5
    mean: tuple[float, float, float] | None = None  # None: the backbone's own (ImageNet for DINOv2)
    std: tuple[float, float, float] | None = None
    # --- head and objective -----------------------------------------------------------------
    n_prototypes: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_n_layers: int = 3
    ibot_separate_head: bool = False
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    regularizer: str = "koleo"  # "koleo" (DINOv2) or "kde" (Midnight, von Mises-Fisher kernel)
    koleo_weight: float = 0.1
    kde_weight: float = 0.05
    kde_kappa: float = 5.0
    centering: str = "sinkhorn"  # DINOv2's Sinkhorn-Knopp (paper §4), or "ema" (DINO / iBOT)
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    mask_sample_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    # --- optimisation -----------------------------------------------------------------------
    batch_size: int | None = None  # per process and micro-batch; None: the largest power of two up to
    # MAX_AUTO_BATCH that fits in memory (engine.memory), written here when the run starts
    grad_checkpointing: bool = True  # recompute block activations in the backward pass: ~1/3 more compute, far less memory
    grad_accum: int = 1
    base_lr: float = 0.004  # at a total batch of 1024; scaled by sqrt(total_batch / 1024)
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    clip_grad: float = 3.0
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_epochs: float = 1
    adamw_betas: tuple[float, float] = (0.9, 0.999)
    # --- run length and engineering -------------------------------------------------------
    epoch_length: int = 1250
    steps: int | None = None  # total optimiser steps; None = epochs * epoch_length
    epochs: float = 100
    max_minutes: float | None = None
    checkpoint_every: int = 500
    log_every: int = 1
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16" (also on CPUs with AVX-512-BF16/AMX) or "fp32"
    distributed: str = "ddp"  # "ddp" or "fsdp" (shards each block; for ViT-L/g)
    record_checksum: bool = False  # log a hash of the weights every step (distributed tests)

    @property
    def inference_mpp(self) -> float:
        """The µm/px the teacher bundle records, so `infer`/`train` use it by default: `bundle_mpp` when
        set, else the median of `mpp` (the upper middle value for an even count). Every listed value
        is drawn equally often, so none is *the* training scale; the middle one keeps inference inside
        the range the model saw, with the most margin on both sides (the first value, used before,
        sat at an edge of it)."""
        if self.bundle_mpp is not None:
            return float(self.bundle_mpp)
        ordered = sorted(float(m) for m in self.mpp)
        return ordered[len(ordered) // 2]

    @property
    def total_steps(self) -> int:
        return int(self.steps) if self.steps is not None else max(1, round(self.epochs * self.epoch_length))

    def epochs_to_steps(self, epochs: float) -> int:
        return int(round(epochs * self.epoch_length))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def save(self, path: str | Path) -> None:
        """Write as YAML (temp name, then rename)."""
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "SSLConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise PathappError(f"{source}: unknown setting(s) {', '.join(unknown)}; see `pathapp pretrain --help` "
                               f"or a run's config.yaml for the valid names")
        kwargs = {}
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if isinstance(v, str) and types[k].startswith(("float", "int")):  # YAML reads 1e-5 as a string
                try:
                    v = float(v) if types[k].startswith("float") else int(v)
                except ValueError:
                    raise PathappError(f"{source}: {k} must be a number, not {v!r}") from None
            kwargs[k] = tuple(v) if isinstance(v, list) and k not in _LIST_FIELDS else v
        cfg = cls(**kwargs)
        cfg.validate(source)
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "SSLConfig":
        path = Path(path)
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise PathappError(f"{path}: cannot read the YAML config ({e}); fix the file or drop --config") from e
        if not isinstance(d, dict):
            raise PathappError(f"{path}: the config must be a YAML mapping of setting: value")
        return cls.from_dict(d, str(path))

    def validate(self, source: str = "config") -> None:
        """Reject settings that would fail deep inside training, with the setting's name."""
        checks = [
            (self.regularizer in {"koleo", "kde"}, "regularizer must be 'koleo' or 'kde'"),
            (self.centering in {"ema", "sinkhorn"}, "centering must be 'ema' or 'sinkhorn'"),
            (self.balance in {"slides", "tissue"}, "balance must be 'slides' or 'tissue'"),
            (self.precision in {"auto", "bf16", "fp32"}, "precision must be auto, bf16 or fp32"),
            (self.distributed in {"ddp", "fsdp"}, "distributed must be ddp or fsdp"),
            (self.batch_size is None or self.batch_size >= MIN_BATCH,
             f"batch_size must be at least {MIN_BATCH} (KoLeo needs neighbours)"),
            (self.grad_accum >= 1, "grad_accum must be at least 1"),
            (len(self.mpp) >= 1 and all(m > 0 for m in self.mpp), "mpp must list positive µm/px values"),
            (self.bundle_mpp is None or self.bundle_mpp > 0, "bundle_mpp must be a positive µm/px (or unset)"),
            (0 <= self.min_tissue < 1, "min_tissue must be in [0, 1)"),
            (self.n_local_crops >= 0, "n_local_crops must be >= 0"),
            (0 <= self.mask_ratio[0] <= self.mask_ratio[1] < 1, "mask_ratio must be (low, high) in [0, 1)"),
            ((self.stain_norm is None) == (self.stain_ref is None),
             "stain_norm and stain_ref go together (a method and a reference tile, slide or .json)"),
            (self.stain_norm in {None, "macenko", "reinhard", "vahadane"},
             "stain_norm must be macenko, reinhard or vahadane"),
            (self.init in {"none", "dinov2"} or Path(self.init).is_file(),
             f"init {self.init!r} is neither none, dinov2 nor an existing weights file"),
        ]
        for ok, msg in checks:
            if not ok:
                raise PathappError(f"{source}: {msg}")
