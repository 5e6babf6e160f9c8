"""The `pathapp` command line: a thin click group. Subcommands load lazily so that `--help` and
`info` start without importing torch; each command parses, calls one API function, and reports."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback

import click

from pathapp import __version__
from pathapp.errors import DEBUG_ENV, PathappError, debug_enabled, describe, failure_line

# name -> "module:attribute" of a click command; imported only when that command runs or is listed.
COMMANDS: dict[str, str] = {
    "info": "pathapp.cli.slides:info",
    "tile": "pathapp.cli.tile:tile",
    "infer": "pathapp.cli.infer:infer",
    "explain": "pathapp.cli.explain:explain",
    "qc": "pathapp.cli.qc:qc",
    "model": "pathapp.cli.model:model",
    "train": "pathapp.cli.train:train",
    "evaluate": "pathapp.cli.train:evaluate",
    "pretrain": "pathapp.cli.pretrain:pretrain",
    "export": "pathapp.cli.export:export",
    "cytomine": "pathapp.cli.cytomine:cytomine",
    "index": "pathapp.cli.index:index",
    "search": "pathapp.cli.search:search",
    "evaluate-search": "pathapp.cli.search:evaluate_search",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [n for n, t in COMMANDS.items() if importlib.util.find_spec(t.split(":")[0]) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pathapp")
@click.option("--debug", is_flag=True, help=f"Print the traceback of unexpected errors (or set {DEBUG_ENV}=1).")
def cli(debug: bool) -> None:
    """DINOv2 vision transformers on whole-slide pathology images.

    \b
    Typical use:
      pathapp info slide.svs                      what is in a slide (size, µm/px, levels)
      pathapp tile slide.svs --mpp 0.5 --out t/   tissue tiles as QuPath GeoJSON + picture
      pathapp infer slide.svs --model m.pathapp   run a model; results in pathapp/<slide>/ beside it
      pathapp infer project.qpproj --model m.pathapp   every image of a QuPath project
      pathapp explain slide.svs --model m.pathapp --class Tumor   why: saliency maps of the top tiles

    Run `pathapp COMMAND --help` for each command's options.
    """
    if debug:
        os.environ[DEBUG_ENV] = "1"  # read where slides fail, deep below the CLI


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2; anything else
    (a bug, a full disk) one `failed: pathapp COMMAND: ...` line and exit code 1."""
    try:
        code = cli.main(standalone_mode=False)
    except PathappError as e:
        if debug_enabled():
            traceback.print_exception(e)
        click.echo(f"error: {describe(e)}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - the last resort: one line, the traceback only on request
        command = next((a for a in sys.argv[1:] if a in COMMANDS), None)
        click.echo(failure_line(f"pathapp {command}" if command else "pathapp", e), err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def run() -> None:
    """The console script (and `python -m pathapp`): `main`, then the process ends without the
    interpreter tearing its modules down. With torch, timm and torchvision loaded that teardown takes
    1-2 s on a 2-core CPU, more than the model takes on a small slide, and does nothing a command needs:
    every output is closed and renamed by then. A normal exit's work is kept: the atexit handlers run
    (child processes ended, temporary files removed, logs flushed), and if a thread other than a daemon
    is still running, the exit is the usual one, which waits for it."""
    import atexit
    import threading

    _with_huge_pages()
    try:
        main()
        code: object = 0
    except SystemExit as e:
        code = e.code
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread()):
        sys.exit(code)
    if code is not None and not isinstance(code, int):  # sys.exit("message"), as the interpreter shows it
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # what the interpreter runs at exit, before its teardown
    _flush()
    os._exit(code or 0)


def _flush() -> None:
    """Write out what stdout and stderr hold, before the process ends or is replaced by exec."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`pathapp … | head`) or stream
            pass


HUGE_PAGES = "glibc.malloc.hugetlb=1"


def _with_huge_pages() -> None:
    """Start this command again with glibc's malloc asking for transparent huge pages (glibc reads its
    tunables only when a process starts; exec costs ~30 ms). PyTorch's CPU tensors come from malloc, and
    the large ones, a batch's activations, are fresh mappings each time (`infer.planner.steady_malloc`):
    with 4 KiB pages a ViT-S/14 batch of 32 takes ~400,000 page faults, with 2 MiB pages ~100,000, and
    the model stage runs ~20 % faster at the same peak memory (benchmarks/results/infer_memory.txt). Not
    where the C library is not glibc, nor where GLIBC_TUNABLES already says what to do with huge pages."""
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):  # no such name outside glibc
        glibc = ""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if not glibc.startswith("glibc") or "glibc.malloc.hugetlb=" in tunables or not sys.executable:
        return
    env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, HUGE_PAGES]))}
    _flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:  # cannot start again: run as it is
        pass
