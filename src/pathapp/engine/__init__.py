"""What the loops share: augmentations (`augment`), schedules (`schedules`), the torchrun environment
and collectives (`distributed`), and slide handles that reopen in DataLoader workers (`workers`).

Pretraining (`ssl`), supervised training (`train`) and inference (`infer`) meet here instead of
importing each other. Submodules that need torch import it themselves; this file imports nothing.
"""
