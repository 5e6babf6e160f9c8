"""`pathapp info`: what is in a slide, one JSON object per slide; and the loop over SLIDE arguments
that it shares with `pathapp tile`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence

import click

from pathapp.cli.options import backend_option, slide_mpp_option


@click.command()
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=str))
@backend_option
@slide_mpp_option
def info(slides: tuple[str, ...], backend: str | None, slide_mpp: float | None) -> None:
    """Print backend, vendor, size, µm/px, levels and associated images of each SLIDE as one JSON
    object per line. SLIDE is a file (SVS, NDPI, MRXS, OME-TIFF, DICOM, ...), a DICOM-WSI series
    folder, or a DICOMweb address (a study means each of its slides; credentials come from
    PATHAPP_DICOMWEB_TOKEN or PATHAPP_DICOMWEB_USER/PASSWORD). A slide that cannot be read is
    reported on stderr in one line; the exit code is then 1.

    \b
    Examples:
      pathapp info slide.svs dicom_series_folder/
      pathapp info dicomweb+https://pacs.example.org/dicom-web/studies/1.2.3/series/1.2.3.4
    """
    from pathapp.slide import describe_slide

    def describe_one(path: str) -> None:
        click.echo(json.dumps(describe_slide(path, backend=backend, slide_mpp=slide_mpp)))

    for_each_slide(slides, describe_one)


def for_each_slide(slides: Sequence[str], work: Callable[[str], None]) -> None:
    """Run `work` on every slide the arguments name (folders and DICOMweb studies expanded). A slide
    that fails is reported in one line on stderr and the others go on; exit code 1 if any failed."""
    from pathapp.errors import PathappError, describe, failure_line
    from pathapp.slide import expand_slide_inputs

    paths, errors = expand_slide_inputs(slides)
    for message in errors:
        click.echo(f"error: {message}", err=True)
    failed = len(errors)
    for path in paths:
        try:
            work(path)
        except PathappError as e:
            failed += 1
            click.echo(f"error: {describe(e)}", err=True)
        except Exception as e:  # noqa: BLE001 - one unreadable slide (or a full disk) must not stop the others
            failed += 1
            click.echo(failure_line(path, e), err=True)
    if failed:
        sys.exit(1)
