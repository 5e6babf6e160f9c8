"""`pathapp info`: what is in a slide, one JSON object per slide."""

from __future__ import annotations

import json
import sys

import click

from pathapp.cli.options import backend_option, slide_mpp_option


@click.command()
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=str))
@backend_option
@slide_mpp_option
def info(slides: tuple[str, ...], backend: str | None, slide_mpp: float | None) -> None:
    """Print backend, vendor, size, µm/px, levels and associated images of each SLIDE as one JSON
    object per line. SLIDE is a file (SVS, NDPI, MRXS, OME-TIFF, DICOM, ...) or a DICOM-WSI series
    folder. A file that cannot be read is reported on stderr; the exit code is then 1.

    \b
    Example:
      pathapp info slide.svs dicom_series_folder/
    """
    from pathapp.slide import describe_slide
    from pathapp.errors import PathappError, describe, failure_line

    failed = 0
    for path in slides:
        try:
            click.echo(json.dumps(describe_slide(path, backend=backend, slide_mpp=slide_mpp)))
        except PathappError as e:
            failed += 1
            click.echo(f"error: {describe(e)}", err=True)
        except Exception as e:  # noqa: BLE001 - one unreadable slide must not stop the others
            failed += 1
            click.echo(failure_line(path, e), err=True)
    if failed:
        sys.exit(1)
