"""DINOv2 multi-crop for pathology: two global and N local views of a tile, each with the per-view
recipe of DINOv2 built from the shared augmentations in `engine.augment`."""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from pathapp.engine.augment import (
    ColorJitter, HEDJitter, flip_rotate, gaussian_blur, grayscale, random_resized_crop, solarize, to_float_tensor,
)


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
