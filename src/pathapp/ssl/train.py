"""The DINOv2 pretraining loop: one process, or one per device under torchrun (DDP, or FSDP for big
backbones). Rank 0 writes the run folder: config.yaml, metrics.jsonl, checkpoint.pt (exact resume at
any world size) and teacher.pathapp (the teacher backbone as a bundle, refreshed at each checkpoint)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pathapp.atomic import atomic_torch_save, atomic_write_text
from pathapp.errors import PathappError
from pathapp.ssl.centering import Centering
from pathapp.ssl.config import SSLConfig
from pathapp.ssl.data import SSLDataset, make_loader, open_sources
from pathapp.ssl.dino_loss import dino_loss
from pathapp.ssl.ibot_loss import ibot_loss
from pathapp.ssl.koleo_loss import kde_loss, koleo_loss
from pathapp.ssl.meta_arch import Student, Teacher
from pathapp.ssl.schedules import apply_schedules, build_schedules, param_groups

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
BUNDLE = "teacher.pathapp"


# ----------------------------------------------------------------------------------- distributed


@dataclasses.dataclass
class DistInfo:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank, dist.get_world_size() if dist.is_initialized() else 1, device)


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _all_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not _distributed():
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))


# ---------------------------------------------------------------------------------------- model


def build_backbone(cfg: SSLConfig):
    """(student backbone with drop-path, its BackboneSpec without drop-path, for the bundle), built once:
    random (`init: none`), the hub's DINOv2 weights (`dinov2`) or a checkpoint / bundle file."""
    from pathapp.models.loader import load_backbone
    from pathapp.models.registry import create_backbone, get_spec

    overrides = dict(cfg.backbone_overrides)
    if cfg.init == "none":
        spec = get_spec(cfg.backbone).replace(**overrides)
        backbone = create_backbone(spec, drop_path_rate=cfg.drop_path)
        if cfg.layerscale_init is not None:
            for m in backbone.modules():
                if hasattr(m, "gamma") and isinstance(m.gamma, nn.Parameter):
                    m.gamma.data.fill_(cfg.layerscale_init)
        return backbone.train(), spec
    try:
        backbone, spec = load_backbone(cfg.backbone, None if cfg.init == "dinov2" else cfg.init,
                                       drop_path_rate=cfg.drop_path, **overrides)
    except PathappError as e:
        if cfg.init == "dinov2":
            raise PathappError(f"--init dinov2: {e}. To pretrain from these weights offline, copy the "
                               f"weights file here and pass it with --init FILE (.pth/.safetensors/.pathapp)") from None
        raise
    return backbone.train(), spec


def _fsdp_shard(module: nn.Module, backbone: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for blk in backbone.blocks:
        fully_shard(blk)
    fully_shard(module)


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


# ------------------------------------------------------------------------------------- one step


@dataclasses.dataclass
class Criterion:
    """The weighted DINOv2 objective; owns the teacher-target centres of the CLS and patch heads."""

    cfg: SSLConfig
    dino_center: Centering
    ibot_center: Centering

    @classmethod
    def build(cls, cfg: SSLConfig, device: torch.device) -> "Criterion":
        def centre() -> Centering:
            return Centering(cfg.n_prototypes, cfg.centering, cfg.center_momentum, cfg.sinkhorn_iterations).to(device)

        return cls(cfg, centre(), centre())

    def __call__(self, student: nn.Module, teacher: Teacher, batch: dict[str, torch.Tensor],
                 teacher_temp: float, autocast: contextlib.AbstractContextManager) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        g, masks = batch["global"], batch["masks"]
        local = batch["local"] if batch["local"].numel() else None
        with autocast:
            t_out = teacher(g, masks)
            s_out = student(g, local, masks)
        t_cls = self.dino_center(t_out["global_logits"], teacher_temp)
        t_patch = self.ibot_center(t_out["masked_logits"], teacher_temp)
        l_dino = dino_loss(s_out["global_logits"], s_out.get("local_logits"), t_cls, 2, cfg.student_temp)
        l_ibot = ibot_loss(s_out["masked_logits"], t_patch, masks, cfg.student_temp)
        reg_fn = koleo_loss if cfg.regularizer == "koleo" else (lambda x: kde_loss(x, cfg.kde_kappa))
        l_reg = sum(reg_fn(c) for c in s_out["cls"].float().chunk(2))
        w_reg = cfg.koleo_weight if cfg.regularizer == "koleo" else cfg.kde_weight
        loss = cfg.dino_weight * l_dino + cfg.ibot_weight * l_ibot + w_reg * l_reg
        # near ln K while the teacher cannot yet tell images apart; falls as the prototypes specialise
        target_entropy = -(t_cls * torch.log(t_cls.clamp_min(1e-12))).sum(dim=-1).mean()
        parts = {"loss": loss, "dino": l_dino, "ibot": l_ibot, cfg.regularizer: l_reg,
                 "dino_target_entropy": target_entropy}
        return loss, {k: float(v.detach()) for k, v in parts.items()}


# ---------------------------------------------------------------------------------- checkpoints


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
    bundle = Bundle(spec=spec, backbone_state=state, mpp=float(cfg.mpp[0]), tile_size=cfg.global_crop_size,
                    mean=tuple(cfg.mean), std=tuple(cfg.std),
                    provenance={"source": "pathapp pretrain (DINOv2 teacher)", "step": step,
                                "init": cfg.init, "data": cfg.slides or cfg.tiles})
    return save_bundle(bundle, out / BUNDLE)


# ------------------------------------------------------------------------------------------ loop


def _uses_bf16(cfg: SSLConfig, device: torch.device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def _autocast(cfg: SSLConfig, device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if _uses_bf16(cfg, device) else contextlib.nullcontext()


def _unfuse_attention(*modules: nn.Module) -> None:
    """Explicit q·kᵀ attention for bf16 on CPU: there PyTorch's fused attention backward is ~9× slower
    than in fp32, while the explicit matmuls run on AVX-512-BF16/AMX units (1.45-2× a whole fp32
    step with a small ViT on an AMD EPYC core, benchmarks/results/pretrain_speed_cpu.txt)."""
    for module in modules:
        for m in module.modules():
            if hasattr(m, "fused_attn"):  # timm's Attention
                m.fused_attn = False


def _grad_sync(wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on accumulation micro-batches that are not the last."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _build_models(cfg: SSLConfig, info: DistInfo):
    """(cfg with mean/std resolved, spec, student, teacher, the module to call for the student's
    forward (DDP-wrapped or the FSDP-sharded student), AdamW). Same initial weights on every rank."""
    torch.manual_seed(cfg.seed)
    backbone, spec = build_backbone(cfg)
    cfg = dataclasses.replace(cfg, mean=tuple(cfg.mean or spec.mean), std=tuple(cfg.std or spec.std))
    student = Student(backbone, cfg).to(info.device)
    teacher = Teacher(student).to(info.device)
    wrapped: nn.Module = student
    if _distributed() and cfg.distributed == "fsdp":
        _fsdp_shard(student, student.backbone)
        _fsdp_shard(teacher, teacher.backbone)
    elif _distributed():
        wrapped = nn.parallel.DistributedDataParallel(
            student, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(student, cfg.layer_decay, cfg.patch_embed_lr_mult), betas=cfg.adamw_betas)
    return cfg, spec, student, teacher, wrapped, optimizer


def pretrain(cfg: SSLConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
             stop_at: int | None = None) -> Path:
    """Run (or resume) DINOv2 pretraining into run folder `out`; returns the teacher bundle's path.
    Launch with `torchrun --nproc-per-node N` for data-parallel training. `stop_at` ends this session
    (with a checkpoint) after that step, e.g. to split a long run into scheduler jobs."""
    out = Path(out)
    info = setup_distributed()
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise PathappError(f"{out}: this run folder already has a checkpoint; pass --resume to continue it "
                           f"or choose a new --out")
    if resume and not ckpt_path.exists():
        raise PathappError(f"{ckpt_path}: no checkpoint to resume from; drop --resume to start a new run")
    cfg.validate()
    source = open_sources(cfg.slides, cfg.tiles, mpps=cfg.mpp, tile_size=cfg.tile_size,
                          min_tissue=cfg.min_tissue, slide_mpp=cfg.slide_mpp, balance=cfg.balance)  # bad data fails before any write

    cfg, spec, student, teacher, wrapped, optimizer = _build_models(cfg, info)
    criterion = Criterion.build(cfg, info.device)
    sched = build_schedules(cfg, info.world_size)

    start_step, samples_seen = 0, 0
    if resume:
        start_step, samples_seen = _load_checkpoint(ckpt_path, student, teacher, optimizer, criterion, info)
    else:
        torch.manual_seed(cfg.seed + 1000 * info.rank + 1)  # drop-path differs per rank, as DINOv2's does
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            cfg.save(out / CONFIG)
    if info.is_main:
        _truncate_metrics(out / METRICS, start_step)

    dataset = SSLDataset(source, cfg, spec.patch_size)
    per_micro = cfg.batch_size * info.world_size
    loader = make_loader(dataset, samples_seen // per_micro, cfg.batch_size, info.rank, info.world_size, cfg.num_workers)
    batches = iter(loader)

    autocast = _autocast(cfg, info.device)
    if _uses_bf16(cfg, info.device) and info.device.type == "cpu":
        _unfuse_attention(student, teacher)
    total = cfg.total_steps
    freeze_steps = cfg.epochs_to_steps(cfg.freeze_last_layer_epochs)
    t_start = time.monotonic()
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start_step, desc="pretrain", unit="step")
    metrics_f = (out / METRICS).open("a") if info.is_main else None
    step = start_step
    try:
        while step < total:
            t0 = time.monotonic()
            values = apply_schedules(optimizer, sched, step)
            parts: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(info.device, non_blocking=True) for k, v in next(batches).items()}
                with _grad_sync(wrapped, micro == cfg.grad_accum - 1):
                    loss, p = criterion(wrapped, teacher, batch, values["teacher_temp"], autocast)
                    (loss / cfg.grad_accum).backward()
                for k, v in p.items():
                    parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad) if cfg.clip_grad > 0 else None
            if step < freeze_steps:
                for name, prm in student.named_parameters():
                    if "last_layer" in name:
                        prm.grad = None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            teacher.ema_update(student, values["momentum"])
            step += 1
            samples_seen += per_micro * cfg.grad_accum
            dt = time.monotonic() - t0
            record = {"step": step, **_all_mean(parts, info.device), **values,
                      "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm) if grad_norm is not None else None,
                      "tiles_per_s": per_micro * cfg.grad_accum / max(dt, 1e-9), "samples_seen": samples_seen}
            if cfg.record_checksum:
                mine = weights_checksum(student, teacher)
                record["checksums"] = _gather(mine)
            stop = step == stop_at or _should_stop(cfg, t_start, info.device)
            if info.is_main and (step % cfg.log_every == 0 or step == total or stop):
                metrics_f.write(json.dumps(record) + "\n")
                metrics_f.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tiles_s=f"{record['tiles_per_s']:.1f}")
            if step % cfg.checkpoint_every == 0 or step == total or stop:
                save_checkpoint(out, cfg, spec, step, samples_seen, student, teacher, optimizer, criterion, info)
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()
        if metrics_f is not None:
            metrics_f.close()
    if _distributed():
        dist.barrier()
    return out / BUNDLE


def _gather(obj: Any) -> list[Any]:
    if not _distributed():
        return [obj]
    objs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def _should_stop(cfg: SSLConfig, t_start: float, device: torch.device) -> bool:
    """Past --max-minutes on any rank (all ranks agree, so they stop at the same step)."""
    if cfg.max_minutes is None:
        return False
    flag = torch.tensor(float(time.monotonic() - t_start > cfg.max_minutes * 60), device=device)
    if _distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint being resumed (they will be logged again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def save_checkpoint(out: Path, cfg: SSLConfig, spec, step: int, samples_seen: int, student: Student, teacher: Teacher,
                    optimizer: torch.optim.Optimizer, crit: Criterion, info: DistInfo) -> None:
    """Everything needed to continue bit-exactly (rank 0 writes; every rank takes part in the gathers),
    then the teacher bundle."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    s_state, t_state = model_state(student), model_state(teacher)
    o_state = get_optimizer_state_dict(student, optimizer, options=_state_options())
    rng = _gather(_rng_state())
    if info.is_main:
        atomic_torch_save({
            "step": step, "samples_seen": samples_seen, "world_size": info.world_size, "config": cfg.to_dict(),
            "student": s_state, "teacher": t_state, "optimizer": o_state,
            "dino_center": crit.dino_center.center.cpu(), "ibot_center": crit.ibot_center.center.cpu(), "rng": rng,
        }, out / CHECKPOINT)
        export_bundle(t_state, spec, cfg, step, out)
    if _distributed():
        dist.barrier()


def _load_checkpoint(path: Path, student: Student, teacher: Teacher, optimizer: torch.optim.Optimizer,
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
