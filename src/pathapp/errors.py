"""User-facing errors: the CLI prints these as one line and exits non-zero, never a traceback."""

from __future__ import annotations


class PathappError(Exception):
    """An error a user can act on; its message names the file and what to do."""


class SlideOpenError(PathappError):
    """The file is missing, unreadable, or not a slide any backend understands."""


class MissingMppError(PathappError):
    """The slide has no µm/px and the command needs one; the user must pass --slide-mpp."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"{path}: the slide has no µm/px in its metadata; pass its resolution with "
            f"--slide-mpp (e.g. --slide-mpp 0.5)"
        )
