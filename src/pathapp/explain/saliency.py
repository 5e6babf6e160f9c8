"""Saliency of a bundle's prediction inside a tile, on the ViT's patch-token grid.

Three methods, each giving one value per patch token (16 × 16 for a 224 px ViT/14):

- `vitcx`: ViT-CX (Xie et al. 2023, "ViT-CX: Causal Explanation of Vision Transformers", IJCAI,
  arXiv:2211.03064; reference code github.com/vaynexie/CausalX-ViT). Each channel of the patch
  embeddings that enter the last block (its `norm1` output) is a map over the patch grid; the maps are
  upsampled to the input size and min-max scaled, grouped by agglomerative clustering (complete linkage,
  cosine distance threshold 0.1), and each cluster's summed, rescaled map is a mask M_i. The causal
  impact of M_i is p(x·M_i + n·(1−M_i)) − p(x + n·(1−M_i)) + p(x), with n Gaussian noise (σ 0.1 in the
  normalised input); the saliency of a pixel is Σ_i impact_i · M_i / Σ_j M_j (the correction for pixel
  coverage: pixels that many masks cover are not favoured), divided by the number of masks. It is
  computed per pixel as in the paper, then averaged over each patch.
- `rollout`: attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"):
  per block the head-averaged attention plus identity, rows renormalised, multiplied through the
  blocks; the CLS row over the patch tokens.
- `attention`: the last block's head-averaged attention from CLS to the patch tokens.

Register tokens (timm's `num_prefix_tokens` > 1) take part in the attention products but get no value
of their own: maps cover patch tokens only, renormalised to sum 1 for the two attention methods.

A `Scorer` turns normalised images into the class probabilities being explained: the bundle's tile
head, or for an attention-MIL slide head the slide's probabilities with this tile's embedding
replaced (the tile's causal effect on the slide call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pathapp.errors import PathappError
from pathapp.models.bundle import PathModel
from pathapp.models.registry import embed

METHODS: tuple[str, ...] = ("vitcx", "rollout", "attention")
VITCX_DISTANCE = 0.1  # the paper's clustering threshold (cosine distance)
VITCX_NOISE = 0.1  # σ of the Gaussian noise added where a mask is off (normalised input units)


class ExplainError(PathappError):
    """A model or option that explanations cannot use."""


@dataclass
class Scorer:
    """Class probabilities (B, C) of normalised tiles (B, 3, H, W), as the bundle computes them.

    With a slide head, `bag` holds the slide's tile embeddings and `index` the tile being explained:
    the probabilities are the slide's, with that tile's embedding replaced by the perturbed tile's."""

    model: PathModel
    bag: Tensor | None = None
    index: int | None = None

    def __call__(self, x: Tensor) -> Tensor:
        e = embed(self.model.backbone, x, self.model.recipe).float()
        if self.model.tile_head is not None:
            return self.model.tile_head(e)
        head = self.model.slide_head
        if head is None or self.bag is None or self.index is None:
            raise ExplainError("explanations explain a class probability: give a bundle with a head "
                               "(`pathapp train` makes one)")
        return head.replace_one(self.bag, self.index, e)

    def at(self, index: int) -> Scorer:
        return Scorer(self.model, self.bag, index)


def patch_grid(model: PathModel, x: Tensor) -> tuple[int, int]:
    """(rows, columns) of patch tokens the backbone makes of input `x`."""
    ph, pw = model.backbone.patch_embed.patch_size
    return x.shape[-2] // ph, x.shape[-1] // pw


@contextmanager
def _capture(model: PathModel, attention: bool) -> Iterator[dict[str, list[Tensor]]]:
    """Record, during forward passes, each block's attention probabilities (B, heads, T, T) when
    `attention`, and the last block's normalised input tokens (B, T, D). timm's fused attention never
    forms the matrix, so the explicit path is switched on for the duration (same numbers)."""
    seen: dict[str, list[Tensor]] = {"attention": [], "tokens": []}
    blocks = list(model.backbone.blocks)
    hooks, fused = [], []
    try:
        hooks.append(blocks[-1].norm1.register_forward_hook(lambda m, i, o: seen["tokens"].append(o.detach())))
        if attention:
            for blk in blocks:
                fused.append((blk.attn, blk.attn.fused_attn))
                blk.attn.fused_attn = False
                hooks.append(blk.attn.attn_drop.register_forward_hook(
                    lambda m, i, o: seen["attention"].append(i[0].detach())))
        yield seen
    finally:
        for h in hooks:
            h.remove()
        for attn, flag in fused:
            attn.fused_attn = flag


def _patch_values(model: PathModel, rows: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, T) values over all tokens -> (B, rows, cols) over the patch tokens, renormalised to sum 1."""
    v = rows[:, model.backbone.num_prefix_tokens:]
    v = v / v.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return v.reshape(-1, *grid)


def attention_maps(model: PathModel, x: Tensor) -> dict[str, Tensor]:
    """Last-block CLS attention and attention rollout for normalised tiles x: {method: (B, rows, cols)}."""
    grid = patch_grid(model, x)
    with torch.inference_mode(), _capture(model, attention=True) as seen:
        model.backbone.forward_features(x)
    layers = [a.float().mean(dim=1) for a in seen["attention"]]  # (B, T, T), heads averaged
    eye = torch.eye(layers[0].shape[-1], dtype=layers[0].dtype)
    rollout = eye.expand_as(layers[0])
    for a in layers:
        a = 0.5 * a + 0.5 * eye
        rollout = (a / a.sum(dim=-1, keepdim=True)) @ rollout
    return {"attention": _patch_values(model, layers[-1][:, 0], grid),
            "rollout": _patch_values(model, rollout[:, 0], grid)}


def _minmax_rows(m: Tensor) -> Tensor:
    lo, hi = m.min(dim=1, keepdim=True).values, m.max(dim=1, keepdim=True).values
    return (m - lo) / (hi - lo).clamp_min(1e-12)


def vitcx_masks(tokens: Tensor, size: tuple[int, int], distance: float = VITCX_DISTANCE) -> Tensor:
    """ViT-CX masks (K, H, W) from one tile's patch embeddings (rows, cols, D): every embedding
    channel as a map, upsampled and min-max scaled, clustered by cosine distance (complete linkage),
    each cluster's sum rescaled to 0..1."""
    from sklearn.cluster import AgglomerativeClustering

    maps = F.interpolate(tokens.permute(2, 0, 1)[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    flat = _minmax_rows(maps.reshape(maps.shape[0], -1))
    unit = F.normalize(flat, dim=1)
    dist = (1 - unit @ unit.T).clamp_min(0).double().numpy()
    np.fill_diagonal(dist, 0.0)
    if len(dist) == 1:
        labels = np.zeros(1, np.int64)
    else:
        labels = AgglomerativeClustering(n_clusters=None, distance_threshold=distance, metric="precomputed",
                                         linkage="complete").fit(dist).labels_
    sums = torch.zeros(int(labels.max()) + 1, flat.shape[1])
    sums.index_add_(0, torch.from_numpy(labels), flat)
    return _minmax_rows(sums).reshape(-1, *size)


def vitcx(scorer: Scorer, x: Tensor, target: int, *, batch_size: int = 32, distance: float = VITCX_DISTANCE,
          noise: float = VITCX_NOISE, generator: torch.Generator | None = None) -> Tensor:
    """ViT-CX saliency (rows, cols) of class `target` for ONE normalised tile x (1, 3, H, W)."""
    model = scorer.model
    size = (x.shape[-2], x.shape[-1])
    grid = patch_grid(model, x)
    with torch.inference_mode():
        with _capture(model, attention=False) as seen:
            p_x = scorer(x)[0, target]
        tokens = seen["tokens"][-1][0, model.backbone.num_prefix_tokens:].reshape(*grid, -1)
        masks = vitcx_masks(tokens, size, distance)  # (K, H, W)
        k = len(masks)
        impact = torch.empty(k)
        for s in range(0, k, batch_size):
            m = masks[s:s + batch_size, None]
            n = torch.randn((len(m), *x.shape[1:]), generator=generator) * noise * (1 - m)
            p = scorer(torch.cat([x * m + n, x + n]))[:, target]
            impact[s:s + len(m)] = p[:len(m)] - p[len(m):] + p_x
        coverage = masks.sum(dim=0).clamp_min(1e-12)
        sal = (impact[:, None, None] * masks / coverage).sum(dim=0) / k
    return F.adaptive_avg_pool2d(sal[None, None], grid)[0, 0]


def explain_tiles(model: PathModel, tiles: Tensor, targets: list[int], methods: list[str], *,
                  scorer: Scorer | None = None, indices: list[int] | None = None, batch_size: int = 32,
                  seed: int = 0, on_tile: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """{method: (N, rows, cols) float32} for uint8 tiles (N, 3, H, W) and each tile's target class.
    `indices` are the tiles' positions in a slide head's bag (needed for ViT-CX with a slide head)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ExplainError(f"unknown method {unknown[0]!r}; use one of {', '.join(METHODS)}")
    scorer = scorer or Scorer(model)
    x = model.normalize(tiles)
    out: dict[str, list[Tensor]] = {m: [] for m in methods}
    if {"attention", "rollout"} & set(methods):
        for s in range(0, len(x), batch_size):
            maps = attention_maps(model, x[s:s + batch_size])
            for m in ("attention", "rollout"):
                if m in out:
                    out[m].append(maps[m])
    if "vitcx" in methods:
        g = torch.Generator().manual_seed(seed)
        for i in range(len(x)):
            sc = scorer.at(indices[i]) if scorer.bag is not None and indices is not None else scorer
            out["vitcx"].append(vitcx(sc, x[i:i + 1], targets[i], batch_size=batch_size, generator=g)[None])
            if on_tile is not None:
                on_tile(i)
    return {m: torch.cat(v).numpy().astype(np.float32) for m, v in out.items()}

