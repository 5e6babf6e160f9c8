"""CPU int8 fast path: dynamic quantisation of the Linear layers (weights int8, activations
quantised per batch on the fly). The ViT's time is almost all in its Linear layers (qkv, proj, MLP),
so this is where int8 pays; attention, norms and the patch conv stay fp32."""

from __future__ import annotations

import warnings

import torch
from torch import nn


def quantize_int8(model: nn.Module) -> nn.Module:
    """A quantised copy of `model` for CPU inference (the original is left untouched)."""
    with warnings.catch_warnings():
        # torch marks eager-mode quantisation deprecated in favour of torchao; it is still the
        # maintained CPU path for dynamic int8 Linear in this torch version.
        warnings.filterwarnings("ignore", message=".*quantiz.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model.cpu().eval(), {nn.Linear}, dtype=torch.qint8, inplace=False)
