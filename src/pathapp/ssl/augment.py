"""DINOv2 multi-crop for pathology. Each transform draws its parameters from an explicit numpy
Generator, so a sample's views depend only on (seed, sample index): reproducible across resume,
worker counts and ranks. Images are float tensors (3, H, W) in [0, 1] until the final normalisation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from skimage.color import hed_from_rgb, rgb_from_hed
from torchvision.transforms import InterpolationMode

# Optical density of a pixel is -ln(rgb); skimage divides by -ln(1e-6) so its stains are in [0, 1]-ish units.
_LOG_ADJUST = -math.log(1e-6)
_HED_FROM_RGB = torch.tensor(hed_from_rgb, dtype=torch.float32)
_RGB_FROM_HED = torch.tensor(rgb_from_hed, dtype=torch.float32)


def to_float_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) → float (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.require(img, np.uint8, ['C', 'W'])).permute(2, 0, 1).float().div_(255.0)


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] → (3, H, W) H, E, D in skimage's `rgb2hed` units, without its clip at 0
    (so that the inverse is exact)."""
    od = -torch.log(x.clamp(min=1e-6)) / _LOG_ADJUST
    return torch.einsum("chw,cd->dhw", od, _HED_FROM_RGB.to(x.device))


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hed` (skimage's `hed2rgb`), clipped to [0, 1]."""
    od = torch.einsum("dhw,dc->chw", hed, _RGB_FROM_HED.to(hed.device))
    return torch.exp(-od * _LOG_ADJUST).clamp(0.0, 1.0)


@dataclass
class HEDJitter:
    """Stain augmentation (Tellez et al. 2018): in optical-density H-E-D space each stain is scaled by
    U(1−σ, 1+σ) and shifted by U(−σ, σ) OD units, then mapped back to RGB. σ=0 is the identity."""

    sigma: float = 0.05

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        alpha = torch.tensor(rng.uniform(1 - self.sigma, 1 + self.sigma, 3), dtype=torch.float32).view(3, 1, 1)
        beta = torch.tensor(rng.uniform(-self.sigma, self.sigma, 3), dtype=torch.float32).view(3, 1, 1)
        hed = rgb_to_hed(x)
        return hed_to_rgb(hed * alpha + beta / _LOG_ADJUST)


def random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float], rng: np.random.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop (bicubic, antialiased) with parameters drawn from `rng`."""
    _, height, width = x.shape
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:  # centre crop, as torchvision falls back
        h = w = min(height, width)
        top, left = (height - h) // 2, (width - w) // 2
    out = TF.resized_crop(x, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return out.clamp_(0.0, 1.0)


def flip_rotate(x: torch.Tensor, rng: np.random.Generator, vflip: bool = True, rot90: bool = True) -> torch.Tensor:
    """Horizontal flip (p=0.5), and for tissue, which has no up or down: vertical flip and k·90°."""
    if rng.random() < 0.5:
        x = x.flip(-1)
    if vflip and rng.random() < 0.5:
        x = x.flip(-2)
    if rot90:
        k = int(rng.integers(0, 4))
        if k:
            x = torch.rot90(x, k, dims=(-2, -1))
    return x


@dataclass
class ColorJitter:
    """torchvision ColorJitter with `p`, factors and order drawn from the generator."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    p: float = 0.8

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if rng.random() >= self.p:
            return x
        ops = [(TF.adjust_brightness, self.brightness), (TF.adjust_contrast, self.contrast),
               (TF.adjust_saturation, self.saturation)]
        for i in rng.permutation(4):
            if i < 3:
                fn, amount = ops[int(i)]
                if amount > 0:
                    x = fn(x, float(rng.uniform(max(0.0, 1 - amount), 1 + amount)))
            elif self.hue > 0:
                x = TF.adjust_hue(x, float(rng.uniform(-self.hue, self.hue)))
        return x.clamp_(0.0, 1.0)


def gaussian_blur(x: torch.Tensor, p: float, rng: np.random.Generator, sigma: tuple[float, float] = (0.1, 2.0)) -> torch.Tensor:
    """DINOv2's blur: kernel 9, σ ~ U(0.1, 2), with probability p."""
    if rng.random() >= p:
        return x
    s = float(rng.uniform(*sigma))
    k = min(9, (min(x.shape[-2:]) // 2) * 2 - 1)
    return TF.gaussian_blur(x, [k, k], [s, s])


def grayscale(x: torch.Tensor, p: float, rng: np.random.Generator) -> torch.Tensor:
    return TF.rgb_to_grayscale(x, num_output_channels=3) if rng.random() < p else x


def solarize(x: torch.Tensor, p: float, rng: np.random.Generator) -> torch.Tensor:
    return TF.solarize(x, threshold=0.5) if rng.random() < p else x


class MultiCrop:
    """Two global views and `n_local` local views of one tile, with DINOv2's per-view recipe (blur
    p=1 on the first global view, p=0.1 + optional solarize p=0.2 on the second, p=0.5 on locals) plus
    flips/90° rotations and HED stain jitter."""

    def __init__(self, cfg) -> None:
        from pathapp.models.registry import IMAGENET_MEAN, IMAGENET_STD

        self.cfg = cfg
        self.mean, self.std = list(cfg.mean or IMAGENET_MEAN), list(cfg.std or IMAGENET_STD)
        self.hed = HEDJitter(cfg.hed_sigma)
        b, c, s, h = cfg.color_jitter
        self.jitter = ColorJitter(b, c, s, h, cfg.color_jitter_p)

    def _view(self, x: torch.Tensor, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float,
              rng: np.random.Generator) -> torch.Tensor:
        cfg = self.cfg
        v = random_resized_crop(x, size, scale, rng)
        v = flip_rotate(v, rng, cfg.vflip, cfg.rot90)
        if rng.random() < cfg.hed_p:
            v = self.hed(v, rng)
        v = self.jitter(v, rng)
        v = grayscale(v, cfg.grayscale_p, rng)
        v = gaussian_blur(v, blur_p, rng)
        if cfg.solarize:
            v = solarize(v, solarize_p, rng)
        return TF.normalize(v, self.mean, self.std)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """uint8 (H, W, 3) tile → ([2 global (3, G, G)], [n_local (3, L, L)]) normalised views."""
        cfg = self.cfg
        x = to_float_tensor(img)
        glob = [
            self._view(x, cfg.global_crop_size, cfg.global_crop_scale, 1.0, 0.0, rng),
            self._view(x, cfg.global_crop_size, cfg.global_crop_scale, 0.1, 0.2, rng),
        ]
        loc = [self._view(x, cfg.local_crop_size, cfg.local_crop_scale, 0.5, 0.0, rng) for _ in range(cfg.n_local_crops)]
        return glob, loc
