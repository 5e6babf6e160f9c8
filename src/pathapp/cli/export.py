"""`pathapp export`: a QuPath project's objects as QuPath GeoJSON, read without QuPath or Java."""

from __future__ import annotations

import sys

import click

OBJECT_TYPES = ("annotation", "detection", "tile", "cell")


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=str))
@click.option("--out", type=click.Path(file_okay=False, path_type=str), required=True,
              help="Output folder; each project entry becomes OUT/<entry ID>_<image name>.geojson.")
@click.option("--type", "object_types", multiple=True, type=click.Choice(OBJECT_TYPES), metavar="TYPE",
              help=f"Export only objects of this type ({', '.join(OBJECT_TYPES)}; repeat for several). "
              "Default: all.")
def export(inputs: tuple[str, ...], out: str, object_types: tuple[str, ...]) -> None:
    """Write the objects QuPath saved for each image of a project as QuPath GeoJSON.

    INPUT is a project.qpproj (or its folder) or a single data.qpdata file. The objects (annotations,
    detections, tiles, cells with their nuclei; classes, colours, names, measurements) are read from
    each entry's data.qpdata (QuPath 0.2-0.7) without QuPath or Java, and written by the same writer
    as pathapp's results, so `File > Import objects` (or dragging the file onto the image) in QuPath
    reads them back. Nesting is not kept in the GeoJSON (as QuPath's own export). One line per
    entry; an entry that cannot be read is one line too, and the exit code is 1.

    \b
    Examples:
      pathapp export project.qpproj --out exported/
      pathapp export project.qpproj --type annotation --out annotations/
      pathapp export project/data/106/data.qpdata --out exported/
    """
    from pathapp.qupath.export import export_objects

    summary = export_objects(inputs, out, object_types=object_types or None,
                             echo=lambda m: click.echo(m, err=m.startswith("failed")))
    if summary.failed:
        sys.exit(1)
