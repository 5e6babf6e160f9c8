"""Supervised learning from a few labels, and its honest evaluation.

`labels` (QuPath class regions -> tile labels, image folders, CSVs), `cache` (embeddings computed
once per model and tile set), `fit` (linear / kNN / prototype / MLP heads on frozen embeddings),
`finetune` (LoRA), `mil` (attention-MIL on slide bags), `evaluate` (grouped splits, metrics with
bootstrap CIs, plots, few-shot curves) and `api` (what `pathapp train` / `pathapp evaluate` run).

Submodules import torch or scikit-learn only inside functions where they can; this file imports nothing.
"""
