"""DINOv2 self-supervised pretraining on slides or tiles (`pathapp pretrain`): online tissue patching,
pathology multi-crop with HED stain jitter, DINO + iBOT + KoLeo/KDE with EMA or Sinkhorn-Knopp
centering, an EMA teacher, torchrun DDP/FSDP, exact resume, and the teacher exported as a bundle."""

from pathapp.ssl.config import SSLConfig

__all__ = ["SSLConfig", "pretrain"]


def pretrain(*args, **kwargs):
    """See `pathapp.ssl.train.pretrain` (imported on use: it pulls in torch and timm)."""
    from pathapp.ssl.train import pretrain as run

    return run(*args, **kwargs)
