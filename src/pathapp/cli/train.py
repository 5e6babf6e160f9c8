"""`pathapp train` and `pathapp evaluate`: learn from a few labels, and measure it honestly."""

from __future__ import annotations

from pathlib import Path

import click

from pathapp.cli.options import (BATCH_SIZE, COUNT, MAX_TILE_SIZE, MPP, FiniteRange, device_option,
                                  image_mpp_option, positive, slide_mpp_option, stain_options)

_data_option = click.option(
    "--data", "data", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
    help="Labelled data: a labels.csv (columns image,label[,case_prefix|patient|slide][,mpp]), a folder holding "
    "one, an ImageFolder tree <class>/*.png; or a QuPath GeoJSON export of classified annotations "
    "(repeat, one per --slides); or a QuPath project.qpproj (its entries' classified annotations, read "
    "from the project's data files; no QuPath needed); or slides.csv for --method abmil: columns slide,label (classes), "
    "slide,time,event (--task survival) or slide,value (--task regression), and optionally patient; slide "
    "paths relative to the CSV.")
_slides_option = click.option(
    "--slides", multiple=True, type=click.Path(exists=True, path_type=Path),
    help="The slide each GeoJSON --data annotates (repeat, same order).")
_group_option = click.option(
    "--group-by", default=None, metavar="COLUMN|REGEX",
    help="What ties tiles together so splits never separate them: a CSV column (default: the first of "
    "case_prefix, patient, case, slide, tma_batch present) or, for an ImageFolder, a regex on file names "
    "whose first group is the case. Annotated slides are grouped by slide.")
_cache_option = click.option(
    "--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Embedding cache folder (default ~/.cache/pathapp/embeddings); embeddings are computed once "
    "per model and image set and reused by every head and fold.")
_embeddings_option = click.option(
    "--embeddings", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
    help="A `pathapp infer --out` folder run with the same model: slides' embeddings are read from its "
    "<slide>/embeddings.h5 instead of being recomputed.")
_task_option = click.option(
    "--task", type=click.Choice(["classification", "survival", "regression"]), default=None,
    help="What slides.csv gives per slide: a class (default), a survival outcome (follow-up time >= 0 and "
    "event 1 = observed / 0 = censored: a Cox model, risk score per slide) or a number (regression). "
    "evaluate: default the bundle head's task.")
_target_option = click.option(
    "--target", default=None, metavar="COLUMN[,COLUMN]",
    help="slides.csv column(s) holding the target: default label, time,event (survival) or value (regression).")
_loss_option = click.option(
    "--loss", type=click.Choice(["huber", "mse"]), default="huber", show_default=True,
    help="--task regression: Huber (robust to outlying values) or squared error, on the standardised target.")
_batch_option = click.option("--batch-size", type=BATCH_SIZE, default=32, show_default=True,
                             help="Tiles per batch when embedding. With --method lora, tiles per training step: "
                                  "by default the largest power of two up to 32 that fits in memory (measured); "
                                  "one given here that cannot fit is refused with the largest that does.")


def _is_default(name: str) -> bool:
    """The option `name` was not given (its default is in effect)."""
    return click.get_current_context().get_parameter_source(name) == click.core.ParameterSource.DEFAULT


class HoldoutType(click.ParamType):
    """A fraction in (0, 1), or an existing labelled set to score on."""

    name = "FRACTION|FILE"
    _fraction = FiniteRange(0, 1, min_open=True, max_open=True)

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if isinstance(value, (float, Path)):
            return value
        if Path(value).exists():
            return Path(value)
        try:
            float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a fraction in (0, 1) nor an existing labels.csv or folder.", param, ctx)
        return self._fraction.convert(value, param, ctx)


def _seg_options(f):
    """--seg-head, --seg-layers, --mask-classes: how `--method segment` builds its head and reads masks."""
    f = click.option("--mask-classes", default=None, metavar="NAMES|label",
                     help="segment: class names for mask values, comma-separated: two names take a binary mask "
                     "(>= 128 is the second; default Background,Foreground), more take pixel value v as class v; "
                     "'label' makes each image's label (CSV label column or class folder) its foreground class.")(f)
    f = click.option("--seg-layers", type=click.Choice(["1", "4"]), default=None,
                     help="segment: patch tokens of the last 1 or 4 ViT blocks, concatenated (default 1).")(f)
    return click.option("--seg-head", type=click.Choice(["linear", "decoder"]), default=None,
                        help="segment: linear (1x1 conv on patch tokens, as DINOv2's probe) or decoder (light "
                        "progressive upsampling to 4x the patch resolution). Default linear, or the bundle's.")(f)


def _seg_config(seg_head, seg_layers, epochs, lr, batch_size, lora=None):
    """The SegConfig of the CLI options (None when none is given, so a bundle's own head is the default)."""
    from pathapp.train.segment import SegConfig

    if all(v is None for v in (seg_head, seg_layers, epochs, lr, lora)):
        return None
    given = {"epochs": epochs, "lr": lr, "lora": lora}
    return SegConfig(head=seg_head, layers=int(seg_layers) if seg_layers else None, batch_size=min(batch_size, 32),
                     **{k: v for k, v in given.items() if v is not None})


def _cache(cache: Path | None) -> Path:
    from pathapp.train.cache import DEFAULT_CACHE

    return cache or DEFAULT_CACHE


@click.command(context_settings={"max_content_width": 100})
@_data_option
@_slides_option
@click.option("--backbone", default=None, metavar="NAME",
              help="Backbone to start from (see `pathapp model list`), e.g. dinov2_vits14.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Weights file for --backbone (official DINOv2 .pth, timm .pth/.safetensors); default: the hub.")
@click.option("--model", "model", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Start from this .pathapp bundle's backbone and preprocessing instead of --backbone.")
@click.option("--method", type=click.Choice(["linear", "knn", "prototype", "mlp", "lora", "abmil", "segment"]),
              default="linear", show_default=True,
              help="linear: logistic regression, C by inner CV. knn: cosine kNN, k by CV. prototype: class "
              "means. mlp: small MLP. lora: fine-tune the ViT with LoRA + linear head. abmil: attention-MIL "
              "on slide labels. segment: a segmentation head on patch tokens from image + mask pairs "
              "(cross-entropy + Dice; frozen backbone, or LoRA with --seg-lora).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The bundle to write (e.g. model.pathapp); `pathapp infer --model` runs it.")
@_group_option
@click.option("--mpp", type=MPP, default=None, metavar="UM_PER_PX",
              help="Resolution tiles are read at on slides (default: the base bundle's, else 0.5).")
@click.option("--tile-size", type=click.IntRange(14, MAX_TILE_SIZE), default=None, metavar="PX",
              help="Model input size in px (default: the backbone's, 224).")
@slide_mpp_option
@image_mpp_option
@_cache_option
@_embeddings_option
@device_option
@_batch_option
@click.option("--lora-rank", type=click.IntRange(1, 1024), default=8, show_default=True)
@click.option("--lora-alpha", type=positive(1e6), default=16.0, show_default=True)
@click.option("--lora-targets", default="qkv,proj,fc1,fc2", show_default=True,
              help="Comma-separated names of the ViT linear layers that get adapters.")
@click.option("--epochs", type=COUNT, default=None,
              help="LoRA epochs (default 10) / ABMIL epochs (default 40, with early stopping on a grouped "
              "validation split; `pathapp evaluate --folds` uses the same defaults).")
@click.option("--max-steps", type=COUNT, default=None, help="LoRA: stop after this many steps.")
@click.option("--lr", type=positive(10.0), default=None,
              help="Learning rate (LoRA default 1e-3; ABMIL 2e-4 for classes, 1e-3 survival, 3e-3 regression).")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="LoRA: save a checkpoint here after each epoch.")
@click.option("--resume", is_flag=True, help="LoRA: continue from --checkpoint-dir/last.pt.")
@_task_option
@_target_option
@_loss_option
@stain_options
@_seg_options
@click.option("--seg-lora", is_flag=True, help="segment: also train LoRA adapters (--lora-rank/alpha/targets) on "
              "the backbone, merged into it on export.")
def train(data, slides, backbone, weights, model, method, out, group_by, mpp, tile_size, slide_mpp, image_mpp, cache, embeddings,
          device, batch_size, lora_rank, lora_alpha, lora_targets, epochs, max_steps, lr, checkpoint_dir, resume, task,
          target, loss, stain_norm, stain_ref, seg_head, seg_layers, mask_classes, seg_lora) -> None:
    """Train a classifier from labelled tiles or slides and write a bundle for `pathapp infer`.

    \b
    Examples:
      pathapp train --data labeled/ebhi-seg/labels.csv --image-mpp 1.0 --backbone dinov2_vits14 \\
          --weights dinov2_vits14_pretrain.pth --method linear --group-by case_prefix --out crc.pathapp
      pathapp train --data regions.geojson --slides slide.svs --model base.pathapp --method knn --out m.pathapp
      pathapp train --data tiles/ --image-mpp 0.5 --backbone dinov2_vits14 --method lora --epochs 5 --out lora.pathapp
      pathapp train --data slides.csv --model base.pathapp --method abmil --out mil.pathapp
      pathapp train --data cohort.csv --model base.pathapp --method abmil --task survival --out cox.pathapp
      pathapp train --data cohort.csv --model base.pathapp --method abmil --task regression --target tils --out tils.pathapp
      pathapp train --data tiles/ --image-mpp 0.5 --model base.pathapp --method linear --stain-norm macenko \\
          --stain-ref ref.png --out normed.pathapp
      pathapp train --data labeled/ebhi-seg/labels.csv --image-mpp 1.0 --model base.pathapp --method segment \\
          --seg-head decoder --mask-classes Background,Lesion --out seg.pathapp

    Image labels: each image is tiled at the model's µm/px and tile size exactly as `pathapp infer`
    tiles a slide (so give its scale: --image-mpp or an mpp column), and stands for the mean of its
    tiles' embeddings; `pathapp infer image.png --slide-mpp X` then reports the same prediction.
    GeoJSON labels: a tile takes class C when ≥ 50% of it lies in C's annotations and < 10% in any
    other class's; other tiles are left out. Then check it with `pathapp evaluate`.
    """
    from pathapp.train.api import train_model
    from pathapp.train.finetune import LoraConfig

    options: dict = {}
    lora = None
    if method == "lora" or (method == "segment" and seg_lora):
        lora = LoraConfig(rank=lora_rank, alpha=lora_alpha, targets=tuple(t for t in lora_targets.split(",") if t),
                          epochs=epochs or 10, max_steps=max_steps, lr=lr or 1e-3,
                          batch_size=None if _is_default("batch_size") else batch_size)  # None: what fits
    seg = _seg_config(seg_head or "linear", seg_layers, epochs, lr, batch_size, lora) if method == "segment" else None
    if method == "abmil":
        options = {**({"epochs": epochs} if epochs else {}), **({"lr": lr} if lr else {}),
                   **({"loss": loss} if task == "regression" else {})}
    path, info = train_model(list(data), out, method, backbone=backbone, weights=weights, model=model,
                             slides=list(slides), group_by=group_by, mpp=mpp, tile_size=tile_size,
                             slide_mpp=slide_mpp, cache=_cache(cache), device=device, batch_size=batch_size,
                             lora=lora, checkpoint_dir=checkpoint_dir, resume=resume, options=options,
                             embeddings=embeddings, task=task or "classification", target=target,
                             stain_norm=stain_norm, stain_ref=stain_ref, image_mpp=image_mpp,
                             seg=seg, mask_classes=mask_classes)
    if method == "segment":
        click.echo(f"train: segment ({seg.head} head) on {info['n_images']} labelled images "
                   f"({', '.join(info['classes'])}; final loss {info['final_loss']:.3f}) -> {path}", err=True)
        return
    n = info.get("n_tiles", info.get("n_slides"))
    what = {"survival": f"survival, {info.get('n_events')} events", "regression": f"regression of {info.get('target')}"}
    click.echo(f"train: {method} on {n} labelled {info.get('unit', 'slide')}s "
               f"({what.get(info.get('task'), ', '.join(info['classes']))}) -> {path}", err=True)


@click.command(context_settings={"max_content_width": 100})
@_data_option
@_slides_option
@click.option("--model", "model", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The .pathapp bundle to evaluate (its backbone gives the embeddings).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Report folder: report.json, confusion.png, roc.png (and fewshot.png with --fewshot).")
@click.option("--folds", type=click.IntRange(2, 1000), default=None,
              help="Cross-validate: re-fit the head on K grouped folds of --data (no slide or patient on "
              "both sides). Without it the bundle's head is scored as is on --data (use held-out data).")
@click.option("--holdout", type=HoldoutType(), default=None, metavar="FRACTION|FILE",
              help="Instead of --folds: re-fit the head on one grouped part and score the held-out FRACTION of "
              "cases/slides (e.g. 0.2); or a second labelled set (labels.csv, ImageFolder): fit on --data, score "
              "on FILE, with a warning and a count when the two share groups (cases).")
@click.option("--method", type=click.Choice(["linear", "knn", "prototype", "mlp", "abmil", "segment"]), default=None,
              help="Head to cross-validate (default: the bundle's head kind, else linear); segment: a "
              "segmentation head (--seg-head) on image + mask pairs, scored by Dice and mIoU.")
@click.option("--fewshot", is_flag=True,
              help="With --folds: also the few-shot curve, balanced accuracy vs 1, 5, 10, 25, 100 and all "
              "labelled tiles per class.")
@_group_option
@slide_mpp_option
@image_mpp_option
@_cache_option
@_embeddings_option
@device_option
@_batch_option
@click.option("--bootstrap", type=click.IntRange(10, 10**6), default=1000, show_default=True,
              help="Bootstrap resamples (of whole groups) for the 95% confidence intervals.")
@_task_option
@_target_option
@_loss_option
@click.option("--horizons", default=None, metavar="T1,T2,...",
              help="Survival: times (in the CSV's units) for the time-dependent AUC; the last one truncates "
              "Uno's C. Default: the quartiles of the observed event times.")
@stain_options
@_seg_options
@click.option("--epochs", type=COUNT, default=None, help="segment: epochs of each fold's head (default 30).")
def evaluate(data, slides, model, out, folds, holdout, method, fewshot, group_by, slide_mpp, image_mpp, cache, embeddings, device,
             batch_size, bootstrap, task, target, loss, horizons, stain_norm, stain_ref, seg_head, seg_layers,
             mask_classes, epochs) -> None:
    """Measure a model on labelled data: accuracy, balanced accuracy, macro-F1, per-class
    sensitivity/specificity and AUROC with 95% CIs, plus confusion-matrix and ROC pictures and
    predictions.csv. Beside the model, every tile/image report scores two floors the same way (same
    folds or split, same tiles, same head method): a standardised colour histogram and the same
    architecture at random init, with paired model − floor differences and their 95% CIs.
    Slide outcomes (--task survival): Harrell's and Uno's C-index, time-dependent AUC, Kaplan-Meier
    curves of the predicted high/low-risk groups with the log-rank p (km.png); (--task regression):
    R², Pearson and Spearman (scatter.png). Every score has a 95% CI over patients and floors from
    the same folds.

    \b
    Examples:
      pathapp evaluate --data test/labels.csv --image-mpp 1.0 --model crc.pathapp --out report/
      pathapp evaluate --data labeled/ebhi-seg --image-mpp 1.0 --model base.pathapp --method linear --folds 5 \\
          --fewshot --out cv/
      pathapp evaluate --data site_a.csv --holdout site_b.csv --image-mpp 0.5 --model base.pathapp --out transfer/
      pathapp evaluate --data cohort.csv --model base.pathapp --task survival --folds 5 --horizons 12,36,60 --out cv/
      pathapp evaluate --data test_cohort.csv --model cox.pathapp --out heldout/
      pathapp evaluate --data labels.csv --image-mpp 0.5 --model base.pathapp --folds 5 --stain-norm reinhard \\
          --stain-ref ref.png --out cv/
      pathapp evaluate --data labeled/ebhi-seg/labels.csv --image-mpp 1.0 --model base.pathapp --method segment \\
          --seg-head decoder --folds 5 --fewshot --out seg-cv/
    """
    import json

    from pathapp.train.api import evaluate_model

    if method is None and (seg_head or seg_layers or mask_classes):
        method = "segment"  # the segmentation options say what is meant
    if fewshot and not folds:
        raise click.UsageError("--fewshot needs --folds K")
    try:
        times = [float(h) for h in horizons.split(",")] if horizons else None
    except ValueError:
        raise click.UsageError(f"--horizons takes numbers separated by commas, not {horizons!r}") from None
    path = evaluate_model(list(data), model, out, folds=folds, holdout=holdout, method=method, fewshot=fewshot, slides=list(slides),
                          group_by=group_by, slide_mpp=slide_mpp, cache=_cache(cache), device=device,
                          batch_size=batch_size, n_boot=bootstrap, embeddings=embeddings, task=task, target=target,
                          horizons=times, loss=loss, stain_norm=stain_norm, stain_ref=stain_ref, image_mpp=image_mpp,
                          seg=_seg_config(seg_head, seg_layers, epochs, None, batch_size), mask_classes=mask_classes)
    report = json.loads(path.read_text())
    click.echo(f"evaluate: {summary_line(report)} -> {path}", err=True)


def _with_ci(m: dict, key: str) -> str:
    def f(v) -> str:
        return "nan" if v is None else f"{v:.3f}"

    lo, hi = m["ci95"][key]
    return f"{f(m[key])} (95% CI {f(lo)}-{f(hi)})"


def summary_line(report: dict) -> str:
    """The one line `pathapp evaluate` prints: the split rule, the headline scores with their CIs and
    the floors."""
    m = report["metrics"]
    task = report.get("task", "classification")
    if task == "segmentation":
        floor = report.get("floors", {}).get("majority_class")
        line = f"{report['mode']}: mean Dice {_with_ci(m, 'mean_dice')}, mIoU {_with_ci(m, 'miou')}"
        return line + (f"; floor (majority class) mean Dice {_with_ci(floor, 'mean_dice')}" if floor else "")
    if task == "classification":
        line = (f"{report['mode']}: balanced accuracy {_with_ci(m, 'balanced_accuracy')}, "
                f"accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")
        floors = {k: v for k, v in (report.get("floors") or {}).items() if isinstance(v, dict)}
        for name, f in floors.items():
            d = f["model_minus_floor"]
            lo, hi = d["ci95"]["balanced_accuracy"]
            line += (f"; floor {name} {f['metrics']['balanced_accuracy']:.3f} (model − floor "
                     f"{d['balanced_accuracy']:+.3f}, 95% CI {lo:+.3f} to {hi:+.3f})")
        return line
    floor = report["floors"].get("tile_count")
    if task == "survival":
        line = f"{report['mode']}: Harrell's C {_with_ci(m, 'c_index')}, Uno's C {_with_ci(m, 'c_index_uno')}"
        p = m["risk_groups"]["logrank_p"]
        line += f", log-rank p {'nan' if p is None else f'{p:.2g}'} (high vs low risk)"
        return line + (f"; floor (tile count) C {_with_ci(floor, 'c_index')}" if floor else "; floor: C = 0.5")
    line = (f"{report['mode']}: R² {_with_ci(m, 'r2')}, Spearman {_with_ci(m, 'spearman')}, "
            f"Pearson {_with_ci(m, 'pearson')}")
    return line + (f"; floor (tile count) R² {_with_ci(floor, 'r2')}" if floor else "; floor: R² = 0")
