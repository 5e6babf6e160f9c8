"""`python -m pathapp` (used under torchrun) is the same as the `pathapp` console script."""

from pathapp.cli import run

run()
