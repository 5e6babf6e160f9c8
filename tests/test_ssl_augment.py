"""Multi-crop views, stain augmentation and iBOT masks, on real tissue pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import hed2rgb, rgb2hed

from pathapp.engine.augment import (
    ColorJitter, HEDJitter, flip_rotate, grayscale, hed_to_rgb, rgb_to_hed, solarize, to_float_tensor,
)
from pathapp.ssl.augment import MultiCrop
from pathapp.ssl.masking import BlockMasking
from conftest import data_file
from ssl_tiny import tiny_config


@pytest.fixture(scope="module")
def tile() -> np.ndarray:
    path = data_file("tiles/nct-crc-he-100k-nonorm-samples/TUM/TUM-AACHEHDV.tif")
    return np.asarray(Image.open(path).convert("RGB"))


def test_hed_round_trip_at_zero_perturbation(tile):
    # H, E, D of real tissue (skimage) → RGB (skimage) → our jitter at σ=0 → H, E, D again (skimage)
    hed = rgb2hed(tile)
    rgb = hed2rgb(hed)
    out = HEDJitter(0.0)(torch.from_numpy(rgb).permute(2, 0, 1).float(), np.random.default_rng(0))
    hed_back = rgb2hed(out.permute(1, 2, 0).double().numpy())
    assert np.abs(hed_back - hed).max() < 1e-5
    # our unclipped transforms agree with skimage's and invert each other
    x = to_float_tensor(tile)
    ours = rgb_to_hed(x).permute(1, 2, 0).numpy()
    assert np.abs(np.maximum(ours, 0) - rgb2hed(tile)).max() < 1e-5
    assert torch.allclose(hed_to_rgb(rgb_to_hed(x)), x, atol=1e-5)


def test_hed_jitter_moves_stains_within_sigma(tile):
    x = to_float_tensor(tile)
    out = HEDJitter(0.05)(x, np.random.default_rng(3))
    assert not torch.allclose(out, x, atol=1e-3)
    h0, h1 = rgb_to_hed(x)[0], rgb_to_hed(out)[0]
    ratio = float((h1 * h0).sum() / (h0 * h0).sum())  # least-squares scale of the H channel
    assert 0.9 < ratio < 1.1


def test_flips_and_rotations_are_dihedral():
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 3, 3)
    dihedral = [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]
    seen = set()
    for seed in range(40):
        y = flip_rotate(x, np.random.default_rng(seed))
        idx = [i for i, d in enumerate(dihedral) if torch.equal(y, d)]
        assert len(idx) == 1
        seen.add(idx[0])
    assert len(seen) == 8  # all eight symmetries of the square occur
    for seed in range(10):  # without the pathology extras: identity or horizontal flip only
        y = flip_rotate(x, np.random.default_rng(seed), vflip=False, rot90=False)
        assert torch.equal(y, x) or torch.equal(y, x.flip(-1))


def test_colour_transforms(tile):
    x = to_float_tensor(tile)
    rng = np.random.default_rng(0)
    assert torch.equal(ColorJitter(p=0.0)(x.clone(), rng), x)
    j = ColorJitter(p=1.0)(x.clone(), rng)
    assert j.shape == x.shape and not torch.allclose(j, x) and j.min() >= 0 and j.max() <= 1
    g = grayscale(x, 1.0, rng)
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    s = solarize(x, 1.0, rng)
    assert torch.allclose(s[x >= 0.5], 1 - x[x >= 0.5]) and torch.equal(s[x < 0.5], x[x < 0.5])


def test_multicrop_shapes_and_determinism(tile):
    cfg = tiny_config(n_local_crops=3)
    mc = MultiCrop(cfg)
    g, l = mc(tile, np.random.default_rng([0, 5]))
    assert [v.shape for v in g] == [(3, 42, 42)] * 2 and [v.shape for v in l] == [(3, 28, 28)] * 3
    g2, l2 = mc(tile, np.random.default_rng([0, 5]))
    assert all(torch.equal(a, b) for a, b in zip(g + l, g2 + l2))  # same seed, same views
    g3, _ = mc(tile, np.random.default_rng([0, 6]))
    assert not torch.equal(g[0], g3[0])
    assert not torch.equal(g[0], g[1])  # two different global views


@pytest.mark.parametrize("n", [0, 1, 10, 37, 64, 100])
def test_block_masks_have_requested_count(n):
    m = BlockMasking((16, 16), max_num_patches=128)
    for seed in range(5):
        mask = m(n, np.random.default_rng(seed))
        assert mask.shape == (16, 16) and mask.dtype == bool and int(mask.sum()) == n


def test_mask_sampling_ratio_and_probability():
    m = BlockMasking((12, 12))
    rng = np.random.default_rng(0)
    masks = [m.sample(0.5, (0.1, 0.5), rng) for _ in range(200)]
    counts = np.array([k.sum() for k in masks])
    masked = counts[counts > 0] / 144
    assert 0.3 < (counts > 0).mean() < 0.7  # about half of the images are masked
    assert masked.min() >= 0.1 - 1 / 144 and masked.max() <= 0.5 + 1 / 144
    assert not m.sample(0.0, (0.1, 0.5), rng).any()
    # block masking: masked patches mostly touch another masked patch (not salt-and-pepper)
    big = m(40, np.random.default_rng(1))
    pad = np.pad(big, 1)
    neighbours = pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:]
    assert (neighbours & big).sum() / big.sum() > 0.8
