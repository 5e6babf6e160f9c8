"""`pathapp pretrain`: DINOv2 self-supervised pretraining on your own slides or tiles."""

from __future__ import annotations

from pathlib import Path

import click

from pathapp.cli.options import COUNT, MAX_BATCH_SIZE, MPP, WORKERS, positive, slide_mpp_option, stain_options


@click.command()
@click.option("--slides", type=click.Path(exists=True, path_type=str), default=None,
              help="A folder of slides, one slide, a slides.csv (columns slide[,mpp]: paths relative to the "
                   "CSV, mpp for files that lack it) or a QuPath project.qpproj: tiles are sampled from the "
                   "tissue on the fly (nothing is written to disk).")
@click.option("--tiles", type=click.Path(exists=True, file_okay=False, path_type=str), default=None,
              help="Or a folder of image tiles (PNG/JPEG/TIFF, searched recursively; labels are not used).")
@click.option("--backbone", default=None, metavar="NAME",
              help="Registry backbone to pretrain (see `pathapp model list`).  [default: dinov2_vits14]")
@click.option("--init", "init", default=None, metavar="none|dinov2|FILE",
              help="Start from random weights (none), the DINOv2 hub weights (dinov2; needs the Hugging Face "
                   "cache or internet), or a checkpoint FILE (.pth/.safetensors/.pathapp) — continued "
                   "pretraining, the usual pathology route.  [default: none]")
@click.option("--mpp", "mpps", multiple=True, type=MPP, metavar="UM_PER_PX",
              help="Resolution tiles are sampled at, in µm/px; repeat for several (one is drawn per tile). "
                   "[default: 0.5]")
@click.option("--bundle-mpp", type=MPP, default=None, metavar="UM_PER_PX",
              help="µm/px teacher.pathapp records, i.e. what `infer` and `train` use by default. [default: the "
                   "median of the --mpp values (the upper middle one for an even count): all are drawn equally "
                   "often, and the middle one keeps inference inside the range trained at]")
@slide_mpp_option
@click.option("--roi-class", "roi_classes", multiple=True, metavar="NAME",
              help="With --slides project.qpproj: sample tiles only inside each image's own annotations of "
                   "this class (repeat for several; Unclassified for annotations without a class).")
@click.option("--out", type=click.Path(file_okay=False, path_type=str), required=True,
              help="Run folder: config.yaml, metrics.jsonl, checkpoint.pt, teacher.pathapp.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
              help="YAML of hyper-parameters (any field of a run's config.yaml); options given here win.")
@click.option("--batch-size", type=click.IntRange(2, MAX_BATCH_SIZE), default=None,
              help="Images per process per step; one that does not fit in memory is refused with the largest "
                   "that does.  [default: the largest power of two up to 64 that fits, measured by two probe steps]")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=None,
              help="Recompute each block's activations in the backward pass (timm's set_grad_checkpointing): "
                   "about a third more compute for several times less memory.  [default: on]")
@click.option("--grad-accum", type=COUNT, default=None, help="Micro-batches per optimiser step.")
@click.option("--steps", type=COUNT, default=None, help="Total optimiser steps.")
@click.option("--epochs", type=positive(), default=None,
              help="Or total length in epochs of `epoch_length` steps (1250 by default).  [default: 100]")
@click.option("--max-minutes", type=positive(), default=None,
              help="Stop (with a checkpoint and a bundle) after this many minutes; --resume continues.")
@click.option("--workers", type=WORKERS, default=None, help="Data-loading processes per GPU/process.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default=None,
              help="auto: bf16 autocast on GPU, fp32 on CPU; bf16 is also 1.5-2x faster on CPUs with AVX-512-BF16 "
                   "or AMX (AMD Zen 4, Intel Sapphire Rapids and later; benchmarks/bench_pretrain_speed.py).  [default: auto]")
@click.option("--fsdp", is_flag=True, default=False, help="Shard the model with FSDP under torchrun (ViT-L/g).")
@click.option("--resume", is_flag=True, default=False,
              help="Continue the run in --out from its checkpoint, with its saved config.yaml.")
@click.option("--quiet", is_flag=True, default=False, help="No progress bar.")
@stain_options
def pretrain(slides: str | None, tiles: str | None, backbone: str | None, init: str | None, mpps: tuple[float, ...],
             bundle_mpp: float | None, slide_mpp: float | None, roi_classes: tuple[str, ...], out: str, config_path: str | None, batch_size: int | None,
             grad_checkpointing: bool | None, grad_accum: int | None, steps: int | None, epochs: float | None, max_minutes: float | None,
             workers: int | None, precision: str | None, fsdp: bool, resume: bool, quiet: bool,
             stain_norm: str | None, stain_ref: str | None) -> None:
    """Pretrain a DINOv2 ViT on unlabelled tissue (DINO + iBOT + KoLeo, EMA teacher) and export the
    teacher backbone as OUT/teacher.pathapp for `pathapp infer` and `pathapp train`.

    Every hyper-parameter (crops, HED stain jitter, losses, schedules, ...) is in OUT/config.yaml;
    copy and edit it, then pass it with --config. Metrics (loss parts, lr, momentum, tiles/s) go to
    OUT/metrics.jsonl; a checkpoint is written every `checkpoint_every` steps and at the end.
    With --stain-norm, each slide is fitted once on its tissue and every sampled tile normalised
    before the augmentations; the fits go to OUT/stain.json.

    \b
    Examples:
      pathapp pretrain --slides slides/ --backbone dinov2_vits14 --init dinov2 --mpp 0.5 --out run/
      pathapp pretrain --slides project.qpproj --mpp 0.5 --mpp 1.0 --max-minutes 60 --out run/   # records 1.0
      pathapp pretrain --slides slides/ --mpp 0.75 --mpp 1.0 --mpp 1.25 --bundle-mpp 0.8 --out run/
      pathapp pretrain --slides project.qpproj --roi-class Tumor --roi-class Stroma --out run/
      pathapp pretrain --slides slides.csv --mpp 1.0 --precision bf16 --out run/
      pathapp pretrain --tiles tiles/ --config cfg.yaml --out run/
      pathapp pretrain --slides slides/ --stain-norm macenko --stain-ref ref.png --out run/
      pathapp pretrain --out run/ --resume
      torchrun --nproc-per-node 4 -m pathapp pretrain --slides slides/ --out run/   (one process per GPU)
    """
    from pathapp.errors import PathappError
    from pathapp.ssl.config import SSLConfig
    from pathapp.ssl.train import CONFIG, pretrain as run_pretrain

    run = Path(out)
    slides = str(Path(slides).resolve()) if slides else None  # the saved config must work from any folder
    tiles = str(Path(tiles).resolve()) if tiles else None
    if init not in (None, "none", "dinov2") and Path(init).is_file():
        init = str(Path(init).resolve())
    if resume:
        if not (run / CONFIG).exists():
            raise PathappError(f"{run / CONFIG}: no run to resume here; drop --resume to start one")
        cfg = SSLConfig.load(run / CONFIG)
        changes = {"max_minutes": max_minutes, "num_workers": workers, "bundle_mpp": bundle_mpp}
    else:
        cfg = SSLConfig.load(config_path) if config_path else SSLConfig()
        changes = {"slides": slides, "tiles": tiles, "backbone": backbone, "init": init,
                   "mpp": list(mpps) if mpps else None, "bundle_mpp": bundle_mpp, "slide_mpp": slide_mpp,
                   "roi_class": list(roi_classes) if roi_classes else None, "batch_size": batch_size,
                   "grad_checkpointing": grad_checkpointing, "grad_accum": grad_accum, "steps": steps, "max_minutes": max_minutes, "num_workers": workers,
                   "precision": precision, "distributed": "fsdp" if fsdp else None, "stain_norm": stain_norm,
                   "stain_ref": str(Path(stain_ref).resolve()) if stain_ref else None}
        if epochs is not None:
            changes.update(epochs=epochs)
        if slides and tiles:
            raise click.UsageError("give only one of --slides and --tiles")
        if not (slides or tiles or cfg.slides or cfg.tiles):
            raise click.UsageError("give --slides (folder, slide or project.qpproj) or --tiles (folder)")
    d = cfg.to_dict()
    d.update({k: v for k, v in changes.items() if v is not None})
    if not resume and (slides or tiles):  # the command line's data source replaces the config's
        d["slides"], d["tiles"] = slides, tiles
    if not resume and epochs is not None:
        d["steps"] = steps
    where = str(run / CONFIG) if resume else (f"{config_path} with the command-line options" if config_path else "pretrain options")
    cfg = SSLConfig.from_dict(d, where)
    import torch.distributed as dist

    try:
        bundle = run_pretrain(cfg, run, resume=resume, progress=not quiet)
        if not dist.is_initialized() or dist.get_rank() == 0:
            click.echo(f"teacher backbone: {bundle}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
