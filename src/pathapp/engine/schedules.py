"""Per-step schedules shared by every training loop (pretraining, LoRA fine-tuning)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CosineSchedule:
    """`base` → `final` by a half cosine over `total` steps, after `warmup` linear steps from
    `start_warmup` and `freeze` steps at 0. Indexing past the end returns `final`."""

    base: float
    final: float
    total: int
    warmup: int = 0
    start_warmup: float = 0.0
    freeze: int = 0

    def __post_init__(self) -> None:
        freeze = min(self.freeze, self.total)
        warmup = min(self.warmup, self.total - freeze)
        n = self.total - freeze - warmup
        cos = self.final + 0.5 * (self.base - self.final) * (1 + np.cos(np.pi * np.arange(n) / max(n, 1)))
        self._values = np.concatenate([
            np.zeros(freeze), np.linspace(self.start_warmup, self.base, warmup, endpoint=False), cos,
        ])

    def __getitem__(self, step: int) -> float:
        return float(self._values[step]) if step < len(self._values) else self.final
