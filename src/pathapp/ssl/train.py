"""The DINOv2 pretraining loop: one process, or one per device under torchrun (DDP, or FSDP for big
backbones). Rank 0 writes the run folder: config.yaml, metrics.jsonl, checkpoint.pt (exact resume at
any world size) and teacher.pathapp (the teacher backbone as a bundle, refreshed at each checkpoint)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pathapp.atomic import atomic_write_text
from pathapp.engine.distributed import DistInfo, all_mean, gather, is_distributed, setup_distributed
from pathapp.errors import PathappError
from pathapp.ssl.checkpoint import BUNDLE, CHECKPOINT, load_checkpoint, save_checkpoint, weights_checksum
from pathapp.ssl.config import MAX_AUTO_BATCH, MIN_BATCH, SSLConfig
from pathapp.ssl.criterion import Criterion
from pathapp.ssl.data import SSLDataset, TileFolderSource, make_loader, open_sources
from pathapp.ssl.meta_arch import Student, Teacher
from pathapp.ssl.schedules import apply_schedules, build_schedules, param_groups

METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
STAIN = "stain.json"  # the stain target and each slide's fit (with its OD matrix), as run.json records them


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
    backbone.set_grad_checkpointing(cfg.grad_checkpointing)
    student = Student(backbone, cfg).to(info.device)
    teacher = Teacher(student).to(info.device)
    wrapped: nn.Module = student
    if is_distributed() and cfg.distributed == "fsdp":
        _fsdp_shard(student, student.backbone)
        _fsdp_shard(teacher, teacher.backbone)
    elif is_distributed():
        wrapped = nn.parallel.DistributedDataParallel(
            student, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(student, cfg.layer_decay, cfg.patch_embed_lr_mult), betas=cfg.adamw_betas)
    return cfg, spec, student, teacher, wrapped, optimizer


def fit_batch_size(cfg: SSLConfig, patch_size: int, student: Student, teacher: Teacher, info: DistInfo) -> int:
    """The batch size this run takes: `cfg.batch_size` when it fits in memory (else one line with the
    largest that does), or the largest power of two up to MAX_AUTO_BATCH that fits. Measured by two
    probe steps on random crops of the configured shapes (engine.memory); every rank takes the same."""
    from pathapp.engine.memory import BatchFit, choose_batch, probe

    g, loc, n_loc = cfg.global_crop_size, cfg.local_crop_size, cfg.n_local_crops
    tokens = (g // patch_size) ** 2
    criterion = Criterion.build(cfg, info.device)  # a fresh one: the probe leaves the run's centres alone
    autocast = _autocast(cfg, info.device)
    gen = torch.Generator().manual_seed(cfg.seed)

    def step(b: int) -> None:
        batch = {"global": torch.rand(2 * b, 3, g, g, generator=gen),
                 "local": torch.rand(n_loc * b, 3, loc, loc, generator=gen) if n_loc else torch.empty(0),
                 "masks": torch.rand(2 * b, tokens, generator=gen) < cfg.mask_ratio[1]}  # the most masked
        loss, _ = criterion(student, teacher, {k: v.to(info.device) for k, v in batch.items()},
                            cfg.teacher_temp, autocast)
        loss.backward()
        student.zero_grad(set_to_none=True)

    moments = 2 * sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad)  # AdamW
    views = 4 * 3 * (2 * g * g + n_loc * loc * loc)  # float32 crops of one image
    fit = probe(step, info.device, state_bytes=moments, image_bytes=views)
    if is_distributed():  # the smallest machine decides, so all ranks agree
        largest = torch.tensor(fit.largest, device=info.device)
        dist.all_reduce(largest, op=dist.ReduceOp.MIN)
        fit = BatchFit(fit.fixed, fit.per_image, fit.budget, int(largest.item()))
    fix = ("grad_checkpointing is on; lower --batch-size and raise --grad-accum to keep the total batch"
           if cfg.grad_checkpointing else "--grad-checkpointing lowers it several-fold; so does a smaller "
           "--batch-size with a larger --grad-accum")
    batch = choose_batch(fit, cfg.batch_size, MAX_AUTO_BATCH, smallest=MIN_BATCH, what="pretrain", fix=fix)
    if info.is_main:
        chosen = "asked for" if cfg.batch_size is not None else f"the largest power of two ≤ {MAX_AUTO_BATCH} that fits"
        print(f"pretrain: batch size {batch} ({chosen}; {fit.describe(batch)}, the largest that fits is "
              f"{fit.largest}; gradient checkpointing {'on' if cfg.grad_checkpointing else 'off'})", file=sys.stderr)
    return batch


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
                          min_tissue=cfg.min_tissue, slide_mpp=cfg.slide_mpp, balance=cfg.balance,
                          roi_class=cfg.roi_class)  # bad data fails before any write
    stain = None
    if cfg.stain_norm is not None:
        from pathapp.tiles.stain import stain_target

        target = stain_target(cfg.stain_norm, cfg.stain_ref, mpp=cfg.mpp[0], tile_size=cfg.tile_size)
        stain = {"stain": source.normalise_onto(target)}  # the fits, before any write; reusable as --stain-ref

    cfg, spec, student, teacher, wrapped, optimizer = _build_models(cfg, info)
    if _uses_bf16(cfg, info.device) and info.device.type == "cpu":
        _unfuse_attention(student, teacher)
    if not resume:  # a resumed run keeps the batch size its config.yaml records
        cfg = dataclasses.replace(cfg, batch_size=fit_batch_size(cfg, spec.patch_size, student, teacher, info))
    if isinstance(source, TileFolderSource):  # before any write, now that the batch size is known
        source.require_batch(cfg.batch_size)
    criterion = Criterion.build(cfg, info.device)
    sched = build_schedules(cfg, info.world_size)

    start_step, samples_seen = 0, 0
    if resume:
        start_step, samples_seen = load_checkpoint(ckpt_path, student, teacher, optimizer, criterion, info)
    else:
        torch.manual_seed(cfg.seed + 1000 * info.rank + 1)  # drop-path differs per rank, as DINOv2's does
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            cfg.save(out / CONFIG)
    if info.is_main and stain is not None:
        atomic_write_text(out / STAIN, json.dumps(stain, indent=1))
    if info.is_main:
        _truncate_metrics(out / METRICS, start_step)

    dataset = SSLDataset(source, cfg, spec.patch_size)
    per_micro = cfg.batch_size * info.world_size
    loader = make_loader(dataset, samples_seen // per_micro, cfg.batch_size, info.rank, info.world_size, cfg.num_workers)
    batches = iter(loader)

    autocast = _autocast(cfg, info.device)
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
            parts, grad_norm = _step(cfg, batches, values, wrapped, student, teacher, optimizer, criterion, autocast,
                                     info.device, freeze_last_layer=step < freeze_steps)
            step += 1
            samples_seen += per_micro * cfg.grad_accum
            dt = time.monotonic() - t0
            record = {"step": step, **all_mean(parts, info.device), **values, "grad_norm": grad_norm,
                      "tiles_per_s": per_micro * cfg.grad_accum / max(dt, 1e-9), "samples_seen": samples_seen}
            if cfg.record_checksum:
                mine = weights_checksum(student, teacher)
                record["checksums"] = gather(mine)
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
    if is_distributed():
        dist.barrier()
    return out / BUNDLE


def _step(cfg: SSLConfig, batches, values: dict[str, float], wrapped: nn.Module, student: Student, teacher: Teacher,
          optimizer: torch.optim.Optimizer, criterion: Criterion, autocast: contextlib.AbstractContextManager,
          device: torch.device, freeze_last_layer: bool) -> tuple[dict[str, float], float | None]:
    """One optimiser step over `grad_accum` micro-batches, then the teacher's EMA update; returns the
    loss parts (averaged over micro-batches) and the gradient norm before clipping."""
    parts: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        with _grad_sync(wrapped, micro == cfg.grad_accum - 1):
            loss, p = criterion(wrapped, teacher, batch, values["teacher_temp"], autocast)
            (loss / cfg.grad_accum).backward()
        for k, v in p.items():
            parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
    norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad) if cfg.clip_grad > 0 else None
    if freeze_last_layer:
        for name, prm in student.named_parameters():
            if "last_layer" in name:
                prm.grad = None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    teacher.ema_update(student, values["momentum"])
    if norm is None:
        return parts, None
    return parts, float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _should_stop(cfg: SSLConfig, t_start: float, device: torch.device) -> bool:
    """Past --max-minutes on any rank (all ranks agree, so they stop at the same step)."""
    if cfg.max_minutes is None:
        return False
    flag = torch.tensor(float(time.monotonic() - t_start > cfg.max_minutes * 60), device=device)
    if is_distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint being resumed (they will be logged again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


