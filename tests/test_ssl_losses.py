"""DINOv2 objective pieces against small cases worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pathapp.ssl.centering import Centering, sinkhorn_knopp
from pathapp.ssl.dino_loss import dino_cross_entropy, dino_loss
from pathapp.ssl.head import DINOHead
from pathapp.ssl.ibot_loss import ibot_loss
from pathapp.ssl.koleo_loss import kde_loss, koleo_loss

LN2, LN3 = math.log(2), math.log(3)


def test_dino_cross_entropy_hand_cases():
    # uniform student, one-hot teacher: −log(1/2)
    assert dino_cross_entropy(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), 0.1).item() == pytest.approx(LN2)
    # student logits (ln3, 0)·τ → softmax (3/4, 1/4); teacher (1/2, 1/2): −(ln¾ + ln¼)/2
    s = torch.tensor([[0.1 * LN3, 0.0]])
    expected = -(math.log(0.75) + math.log(0.25)) / 2
    assert dino_cross_entropy(s, torch.tensor([[0.5, 0.5]]), 0.1).item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_pairs_other_views_only():
    tau = 0.1
    s_glob = torch.tensor([[0.0, 0.0], [0.1 * LN3, 0.0]])  # view 0 → (½, ½), view 1 → (¾, ¼)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # teacher view 0, view 1
    # pairs: (s0, t1) = −ln½, (s1, t0) = −ln¾
    two = (LN2 - math.log(0.75)) / 2
    assert dino_loss(s_glob, None, t, 2, tau).item() == pytest.approx(two, rel=1e-6)
    # a local view (¼, ¾) against both teacher views: −ln¼ and −ln¾; 4 pairs in all
    s_loc = torch.tensor([[0.0, 0.1 * LN3]])
    four = (LN2 - math.log(0.75) - math.log(0.25) - math.log(0.75)) / 4
    assert dino_loss(s_glob, s_loc, t, 2, tau).item() == pytest.approx(four, rel=1e-6)


def test_ibot_loss_weighs_images_equally():
    tau = 0.1
    masks = torch.tensor([[True, True, False], [False, True, False]])  # image 0: 2 patches, image 1: 1
    s = torch.tensor([[0.0, 0.0], [0.1 * LN3, 0.0], [0.0, 0.1 * LN3]])  # (½,½), (¾,¼), (¼,¾)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # image 0: mean(−ln½, −ln¾); image 1: −ln¾; averaged over the 2 images
    expected = ((LN2 - math.log(0.75)) / 2 - math.log(0.75)) / 2
    assert ibot_loss(s, t, masks, tau).item() == pytest.approx(expected, rel=1e-6)
    empty = ibot_loss(torch.zeros(0, 2, requires_grad=True), torch.zeros(0, 2), torch.zeros(2, 3, dtype=torch.bool), tau)
    assert empty.item() == 0.0


def test_koleo_hand_case():
    # points at 0°, 60°, 180° (rescaled: KoLeo normalises): nearest-neighbour distances 1, 1, √3
    x = torch.tensor([[2.0, 0.0], [0.5, math.sqrt(3) / 2], [-3.0, 0.0]])
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(3)) / 3, abs=1e-6)


def test_kde_hand_cases():
    # two orthogonal points: each sees exp(κ(0 − 1)) → log density −κ
    assert kde_loss(torch.tensor([[1.0, 0.0], [0.0, 3.0]]), kappa=5.0).item() == pytest.approx(-5.0, abs=1e-6)
    # 0°, 60°, 180°: dots 0 → ½, 0 → −1, 60 → 180: −½
    k = 2.0
    x = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [-1.0, 0.0]])
    e = lambda d: math.exp(k * (d - 1))  # noqa: E731
    dens = [(e(0.5) + e(-1)) / 2, (e(0.5) + e(-0.5)) / 2, (e(-1) + e(-0.5)) / 2]
    assert kde_loss(x, kappa=k).item() == pytest.approx(sum(map(math.log, dens)) / 3, rel=1e-6)
    # spreading lowers it: a collapsed batch scores higher than a spread one
    assert kde_loss(torch.tensor([[1.0, 0.0], [1.0, 0.01], [1.0, -0.01]])) > kde_loss(x)


def test_sinkhorn_knopp_doubly_normalised():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    q = sinkhorn_knopp(logits, 0.5, n_iterations=200)
    assert torch.allclose(q.sum(dim=1), torch.ones(6), atol=1e-6)  # every sample a distribution
    assert torch.allclose(q.sum(dim=0), torch.full((4,), 6 / 4), atol=1e-4)  # prototypes equally used
    q3 = sinkhorn_knopp(logits, 0.5, n_iterations=3)
    assert torch.allclose(q3.sum(dim=1), torch.ones(6), atol=1e-6)
    assert (q3.sum(dim=0) - 1.5).abs().max() < (torch.softmax(logits / 0.5, 1).sum(0) - 1.5).abs().max()


def test_ema_centering_hand_case():
    c = Centering(2, "ema", momentum=0.9)
    c.center.fill_(0.5)
    logits = torch.tensor([[1.5, 0.5], [0.5, 2.5]])
    targets = c(logits, temp=1.0)
    # targets use the old centre: softmax(logits − 0.5)
    assert torch.allclose(targets, torch.softmax(logits - 0.5, dim=-1))
    # centre ← 0.9·0.5 + 0.1·mean = 0.45 + 0.1·(1.0, 1.5)
    assert torch.allclose(c.center, torch.tensor([[0.55, 0.60]]))


def test_dino_head_weight_normed_prototypes():
    head = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, n_layers=3)
    y = head(torch.randn(5, 16))
    assert y.shape == (5, 32)
    # the last layer's rows have norm g = 1 and its input is L2-normalised: |logit| ≤ 1
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(32), atol=1e-5)
    assert y.abs().max() <= 1 + 1e-5
