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
    object per line. SLIDE is a file (SVS, NDPI, MRXS, OME-TIFF, DICOM, ...), a DICOM-WSI series
    folder, or a DICOMweb address (a study means each of its slides; credentials come from
    PATHAPP_DICOMWEB_TOKEN or PATHAPP_DICOMWEB_USER/PASSWORD). A slide that cannot be read is
    reported on stderr in one line; the exit code is then 1.

    \b
    Examples:
      pathapp info slide.svs dicom_series_folder/
      pathapp info dicomweb+https://pacs.example.org/dicom-web/studies/1.2.3/series/1.2.3.4
    """
    from pathapp.errors import PathappError, describe, failure_line
    from pathapp.slide import describe_slide, expand_slide_inputs

    paths, errors = expand_slide_inputs(slides)
    for message in errors:
        click.echo(f"error: {message}", err=True)
    failed = len(errors)
    for path in paths:
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
