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


def one_line(error: BaseException) -> str:
    """An error's message as one line (its type when it has none). An error raised in a DataLoader
    worker comes back from torch with the worker's traceback appended: keep only its own last line."""
    text = str(error).strip()
    if "Original Traceback" in text:
        return text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0] if text else type(error).__name__


DEBUG_ENV = "PATHAPP_DEBUG"  # set to 1 (or pass `pathapp --debug`) for tracebacks of unexpected errors


def debug_enabled() -> bool:
    """Tracebacks are for developers: shown only when asked for."""
    import os

    return os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes"}


def describe(e: BaseException) -> str:
    """One line for any exception: a PathappError's own message, otherwise its type and first line
    (an OSError with its file name, as Python prints it)."""
    if isinstance(e, PathappError):
        text = str(e)
    else:
        first = one_line(e) if str(e).strip() else ""
        text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return " ".join(text.split())


def failure_line(what: str, e: BaseException) -> str:
    """`failed: WHAT: what happened`, the last-resort report of a slide or a command; the traceback
    goes to stderr first when debugging (`--debug`, PATHAPP_DEBUG=1)."""
    if debug_enabled():
        import traceback

        traceback.print_exception(e)
    message = describe(e)
    return f"failed: {message}" if message.startswith(what) else f"failed: {what}: {message}"
