"""Slide handles for DataLoader workers: a file handle inherited through fork is shared state (two
processes seeking one descriptor), so each process must open its own. `SlideHandle` does it once per
process, lazily, whether workers are forked (the handle notices the new pid) or spawned (the slide
pickles as path + backend + µm/px and reopens on arrival)."""

from __future__ import annotations

import os
import pickle
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathapp.slide import Slide


class SlideHandle:
    """Holds a slide and gives each process its own open copy of it."""

    def __init__(self, slide: Slide) -> None:
        self._slide = slide
        self._pid = os.getpid()

    @property
    def slide(self) -> Slide:
        if self._pid != os.getpid():  # a forked worker: reopen once in this process
            self._slide, self._pid = pickle.loads(pickle.dumps(self._slide)), os.getpid()
        return self._slide

    def __getstate__(self) -> dict[str, Any]:
        return {"slide": self._slide}

    def __setstate__(self, state: dict[str, Any]) -> None:  # unpickling reopened the slide already
        self._slide, self._pid = state["slide"], os.getpid()
