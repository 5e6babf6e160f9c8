"""pathapp: DINOv2 vision transformers on whole-slide pathology images."""

__version__ = "0.1.0"
