"""What a pretraining run writes to resume bit-exactly at any world size: model, teacher, optimiser,
centres, data position and every RNG in `checkpoint.pt`, and the teacher as `teacher.pathapp`.
Under FSDP the state dicts are gathered to full CPU tensors (a collective; rank 0 writes)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pathapp.atomic import atomic_torch_save
from pathapp.engine.distributed import DistInfo, gather, is_distributed
from pathapp.ssl.config import SSLConfig
from pathapp.ssl.criterion import Criterion
from pathapp.ssl.meta_arch import Student, Teacher

CHECKPOINT = "checkpoint.pt"
BUNDLE = "teacher.pathapp"


def _state_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, strict=strict)


def model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded, CPU) state dict under DDP, FSDP or none; a collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_state_options())


def weights_checksum(*modules: nn.Module) -> str:
    """sha256 of every weight's bytes (this rank's full copy): equal on two ranks iff their weights are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(get_model_state_dict(m, options=StateDictOptions(full_state_dict=True)).items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]



def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def export_bundle(teacher_state: dict[str, torch.Tensor], spec, cfg: SSLConfig, step: int, out: Path) -> Path:
    """The teacher backbone as `teacher.pathapp`, usable by `pathapp infer` / `pathapp train`."""
    from pathapp.models.bundle import Bundle, save_bundle

    state = {k[len("backbone."):]: v for k, v in teacher_state.items() if k.startswith("backbone.")}
    bundle = Bundle(spec=spec, backbone_state=state, mpp=cfg.inference_mpp, tile_size=cfg.global_crop_size,
                    mean=tuple(cfg.mean), std=tuple(cfg.std),
                    provenance={"source": "pathapp pretrain (DINOv2 teacher)", "step": step,
                                "trained_mpp": [float(m) for m in cfg.mpp],
                                "recorded_mpp": ("set by bundle_mpp (--bundle-mpp)" if cfg.bundle_mpp is not None
                                                 else "the median of the µm/px trained at"),
                                "init": cfg.init, "data": cfg.slides or cfg.tiles,
                                "stain_norm": None if cfg.stain_norm is None else
                                {"method": cfg.stain_norm, "reference": cfg.stain_ref}})
    return save_bundle(bundle, out / BUNDLE)


def save_checkpoint(out: Path, cfg: SSLConfig, spec, step: int, samples_seen: int, student: Student, teacher: Teacher,
                    optimizer: torch.optim.Optimizer, crit: Criterion, info: DistInfo) -> None:
    """Everything needed to continue bit-exactly (rank 0 writes; every rank takes part in the gathers),
    then the teacher bundle."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    s_state, t_state = model_state(student), model_state(teacher)
    o_state = get_optimizer_state_dict(student, optimizer, options=_state_options())
    rng = gather(_rng_state())
    if info.is_main:
        atomic_torch_save({
            "step": step, "samples_seen": samples_seen, "world_size": info.world_size, "config": cfg.to_dict(),
            "student": s_state, "teacher": t_state, "optimizer": o_state,
            "dino_center": crit.dino_center.center.cpu(), "ibot_center": crit.ibot_center.center.cpu(), "rng": rng,
        }, out / CHECKPOINT)
        export_bundle(t_state, spec, cfg, step, out)
    if is_distributed():
        dist.barrier()


def load_checkpoint(path: Path, student: Student, teacher: Teacher, optimizer: torch.optim.Optimizer,
                     crit: Criterion, info: DistInfo) -> tuple[int, int]:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    ck = torch.load(path, map_location="cpu", weights_only=False)
    set_model_state_dict(student, ck["student"], options=_state_options())
    set_model_state_dict(teacher, ck["teacher"], options=_state_options())
    # not strict: parameters never stepped yet (the frozen last layer) have no optimizer state
    set_optimizer_state_dict(student, optimizer, ck["optimizer"], options=_state_options(strict=False))
    for name, prm in student.named_parameters():  # undo the zero-grad step torch takes to create state
        if name not in ck["optimizer"]["state"]:
            optimizer.state.pop(prm, None)
    crit.dino_center.center.copy_(ck["dino_center"])
    crit.ibot_center.center.copy_(ck["ibot_center"])
    if ck["world_size"] == info.world_size:
        _set_rng_state(ck["rng"][info.rank])
    else:  # another world size: fresh, still deterministic, per-rank streams
        torch.manual_seed(int(ck["config"]["seed"]) + 1000 * info.rank + 7919 * ck["step"] + 1)
    return int(ck["step"]), int(ck["samples_seen"])
