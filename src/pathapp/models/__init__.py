"""What sees the tiles: backbone registry (`registry`), weight loading in every layout (`weights`),
heads (`heads`), the one-file model bundle (`bundle`), int8 CPU quantisation (`quantize`), LoRA (`lora`).

Submodules import torch/timm; this package file does not, so `import pathapp.models` stays light.
"""
