"""iBOT block masking (BEiT style): rectangles of random area and aspect ratio are masked until the
requested number of patches is reached; any shortfall is topped up with single random patches so the
ratio is exact. Randomness comes from an explicit numpy Generator (reproducible, worker-safe)."""

from __future__ import annotations

import math

import numpy as np


class BlockMasking:
    """Masks for a (height, width) grid of patches."""

    def __init__(self, grid: tuple[int, int], min_num_patches: int = 4, max_num_patches: int | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None) -> None:
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches or self.num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def _place_block(self, mask: np.ndarray, max_mask: int, rng: np.random.Generator) -> int:
        for _ in range(10):
            area = rng.uniform(self.min_num_patches, max_mask)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < w < self.width and 0 < h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask:
                    block[:] = True
                    return new
        return 0

    def __call__(self, n_masked: int, rng: np.random.Generator) -> np.ndarray:
        """Bool (height, width) mask with exactly `n_masked` True patches."""
        n_masked = min(max(int(n_masked), 0), self.num_patches)
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < n_masked:
            max_mask = min(n_masked - count, self.max_num_patches)
            if max_mask < self.min_num_patches:
                break
            added = self._place_block(mask, max_mask, rng)
            if added == 0:
                break
            count += added
        if count < n_masked:
            free = np.flatnonzero(~mask.ravel())
            mask.ravel()[rng.choice(free, n_masked - count, replace=False)] = True
        return mask

    def sample(self, probability: float, ratio: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
        """With `probability`, a mask of a ratio drawn uniformly in `ratio`; otherwise no mask."""
        if rng.random() >= probability:
            return np.zeros((self.height, self.width), dtype=bool)
        return self(int(round(rng.uniform(*ratio) * self.num_patches)), rng)
