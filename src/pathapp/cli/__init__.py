"""The `pathapp` command line: a thin click group. Subcommands load lazily so that `--help` and
`info` start without importing torch; each command parses, calls one API function, and reports."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from pathapp import __version__
from pathapp.errors import PathappError

# name -> "module:attribute" of a click command; imported only when that command runs or is listed.
COMMANDS: dict[str, str] = {
    "info": "pathapp.cli.slides:info",
    "tile": "pathapp.cli.tile:tile",
    "infer": "pathapp.cli.infer:infer",
    "model": "pathapp.cli.model:model",
    "train": "pathapp.cli.train:train",
    "evaluate": "pathapp.cli.train:evaluate",
    "pretrain": "pathapp.cli.pretrain:pretrain",
    "export": "pathapp.cli.export:export",
    "cytomine": "pathapp.cli.cytomine:cytomine",
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
def cli() -> None:
    """DINOv2 vision transformers on whole-slide pathology images.

    \b
    Typical use:
      pathapp info slide.svs                      what is in a slide (size, µm/px, levels)
      pathapp tile slide.svs --mpp 0.5 --out t/   tissue tiles as QuPath GeoJSON + picture
      pathapp infer slide.svs --model m.pathapp   run a model; results in pathapp/<slide>/ beside it
      pathapp infer project.qpproj --model m.pathapp   every image of a QuPath project

    Run `pathapp COMMAND --help` for each command's options.
    """


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        code = cli.main(standalone_mode=False)
    except PathappError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
