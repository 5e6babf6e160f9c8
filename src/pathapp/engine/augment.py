"""Image augmentations shared by pretraining (DINOv2 multi-crop, `ssl.augment`) and supervised
fine-tuning (`train.finetune`): flips and 90° rotations, HED stain jitter, colour jitter, blur,
grayscale, solarize, random resized crops. Each draws its parameters from an explicit numpy Generator,
so a sample's views depend only on (seed, sample index): reproducible across resume, worker counts
and ranks. Images are float tensors (3, H, W) in [0, 1]."""

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


def augment_tiles(x: torch.Tensor, rng: np.random.Generator, hed_sigma: float) -> torch.Tensor:
    """Supervised fine-tuning's per-tile augmentation of a float batch (B, 3, H, W) in 0..1: flips,
    90° rotations, HED stain jitter and mild colour jitter."""
    hed = HEDJitter(hed_sigma)
    colour = ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02, p=0.5)
    return torch.stack([colour(hed(flip_rotate(t, rng), rng), rng) for t in x])
