"""`pathapp train` and `pathapp evaluate`: learn from a few labels, and measure it honestly."""

from __future__ import annotations

from pathlib import Path

import click

from pathapp.cli.options import slide_mpp_option

_data_option = click.option(
    "--data", "data", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
    help="Labelled data: a labels.csv (columns image,label[,case_prefix|patient|slide]), a folder holding "
    "one, an ImageFolder tree <class>/*.png; or a QuPath GeoJSON export of classified annotations "
    "(repeat, one per --slides); or a QuPath project.qpproj (its entries' classified annotations, read "
    "from the project's data files; no QuPath needed); or slides.csv (columns slide,label[,patient]) for "
    "--method abmil.")
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
_device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
_batch_option = click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)


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
@click.option("--method", type=click.Choice(["linear", "knn", "prototype", "mlp", "lora", "abmil"]),
              default="linear", show_default=True,
              help="linear: logistic regression, C by inner CV. knn: cosine kNN, k by CV. prototype: class "
              "means. mlp: small MLP. lora: fine-tune the ViT with LoRA + linear head. abmil: attention-MIL "
              "on slide labels.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The bundle to write (e.g. model.pathapp); `pathapp infer --model` runs it.")
@_group_option
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None, metavar="UM_PER_PX",
              help="Resolution tiles are read at on slides (default: the base bundle's, else 0.5).")
@click.option("--tile-size", type=click.IntRange(min=14), default=None, metavar="PX",
              help="Model input size in px (default: the backbone's, 224).")
@slide_mpp_option
@_cache_option
@_embeddings_option
@_device_option
@_batch_option
@click.option("--lora-rank", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--lora-alpha", type=float, default=16.0, show_default=True)
@click.option("--lora-targets", default="qkv,proj,fc1,fc2", show_default=True,
              help="Comma-separated names of the ViT linear layers that get adapters.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="LoRA / ABMIL epochs.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="LoRA: stop after this many steps.")
@click.option("--lr", type=float, default=None, help="Learning rate (LoRA default 1e-3, ABMIL 2e-4).")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="LoRA: save a checkpoint here after each epoch.")
@click.option("--resume", is_flag=True, help="LoRA: continue from --checkpoint-dir/last.pt.")
def train(data, slides, backbone, weights, model, method, out, group_by, mpp, tile_size, slide_mpp, cache, embeddings,
          device, batch_size, lora_rank, lora_alpha, lora_targets, epochs, max_steps, lr, checkpoint_dir, resume) -> None:
    """Train a classifier from labelled tiles or slides and write a bundle for `pathapp infer`.

    \b
    Examples:
      pathapp train --data labeled/ebhi-seg/labels.csv --backbone dinov2_vits14 \\
          --weights dinov2_vits14_pretrain.pth --method linear --group-by case_prefix --out crc.pathapp
      pathapp train --data regions.geojson --slides slide.svs --model base.pathapp --method knn --out m.pathapp
      pathapp train --data tiles/ --backbone dinov2_vits14 --method lora --epochs 5 --out lora.pathapp
      pathapp train --data slides.csv --model base.pathapp --method abmil --out mil.pathapp

    GeoJSON labels: a tile takes class C when ≥ 50% of it lies in C's annotations and < 10% in any
    other class's; other tiles are left out. Then check it with `pathapp evaluate`.
    """
    from pathapp.train.api import train_model
    from pathapp.train.finetune import LoraConfig

    options: dict = {}
    lora = None
    if method == "lora":
        lora = LoraConfig(rank=lora_rank, alpha=lora_alpha, targets=tuple(t for t in lora_targets.split(",") if t),
                          epochs=epochs, max_steps=max_steps, batch_size=min(batch_size, 32), lr=lr or 1e-3)
    elif method == "abmil":
        options = {"epochs": epochs, **({"lr": lr} if lr else {})}
    path, info = train_model(list(data), out, method, backbone=backbone, weights=weights, model=model,
                             slides=list(slides), group_by=group_by, mpp=mpp, tile_size=tile_size,
                             slide_mpp=slide_mpp, cache=_cache(cache), device=device, batch_size=batch_size,
                             lora=lora, checkpoint_dir=checkpoint_dir, resume=resume, options=options,
                             embeddings=embeddings)
    n = info.get("n_tiles", info.get("n_slides"))
    click.echo(f"train: {method} on {n} labelled {'tiles' if 'n_tiles' in info else 'slides'} "
               f"({', '.join(info['classes'])}) -> {path}", err=True)


@click.command(context_settings={"max_content_width": 100})
@_data_option
@_slides_option
@click.option("--model", "model", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The .pathapp bundle to evaluate (its backbone gives the embeddings).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Report folder: report.json, confusion.png, roc.png (and fewshot.png with --fewshot).")
@click.option("--folds", type=click.IntRange(min=2), default=None,
              help="Cross-validate: re-fit the head on K grouped folds of --data (no slide or patient on "
              "both sides). Without it the bundle's head is scored as is on --data (use held-out data).")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              metavar="FRACTION", help="Instead of --folds: re-fit the head on one grouped part and score "
              "the held-out FRACTION of slides/patients (e.g. 0.2).")
@click.option("--method", type=click.Choice(["linear", "knn", "prototype", "mlp", "abmil"]), default=None,
              help="Head to cross-validate (default: the bundle's head kind, else linear).")
@click.option("--fewshot", is_flag=True,
              help="With --folds: also the few-shot curve, balanced accuracy vs 1, 5, 10, 25, 100 and all "
              "labelled tiles per class.")
@_group_option
@slide_mpp_option
@_cache_option
@_embeddings_option
@_device_option
@_batch_option
@click.option("--bootstrap", type=click.IntRange(min=10), default=1000, show_default=True,
              help="Bootstrap resamples (of whole groups) for the 95% confidence intervals.")
def evaluate(data, slides, model, out, folds, holdout, method, fewshot, group_by, slide_mpp, cache, embeddings, device,
             batch_size, bootstrap) -> None:
    """Measure a model on labelled data: accuracy, balanced accuracy, macro-F1, per-class
    sensitivity/specificity and AUROC with 95% CIs, plus confusion-matrix and ROC pictures.

    \b
    Examples:
      pathapp evaluate --data test/labels.csv --model crc.pathapp --out report/
      pathapp evaluate --data labeled/ebhi-seg --model base.pathapp --method linear --folds 5 --fewshot --out cv/
    """
    import json

    from pathapp.train.api import evaluate_model

    if fewshot and not folds:
        raise click.UsageError("--fewshot needs --folds K")
    path = evaluate_model(list(data), model, out, folds=folds, holdout=holdout, method=method, fewshot=fewshot, slides=list(slides),
                          group_by=group_by, slide_mpp=slide_mpp, cache=_cache(cache), device=device,
                          batch_size=batch_size, n_boot=bootstrap, embeddings=embeddings)
    m = json.loads(path.read_text())["metrics"]
    lo, hi = (v if v is not None else float("nan") for v in m["ci95"]["balanced_accuracy"])
    click.echo(f"evaluate: balanced accuracy {m['balanced_accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}), "
               f"accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} -> {path}", err=True)
