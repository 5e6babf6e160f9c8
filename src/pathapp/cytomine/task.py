"""The Cytomine App Engine task (descriptor.yml, task.v0 schema): each input is a file
`<inputs>/<name>`, each output a file `<outputs>/<name>`; an array is a folder holding `array.yml`
(`size: N`) and items `0` .. `N-1`; a geometry is a GeoJSON geometry.

Geometry outputs are in Cytomine's bottom-left frame (y = height - y), as Cytomine's own tasks write
them, because the App Engine draws them on the image as annotations. The GeoJSON files keep the
QuPath convention (top-left), the same files `pathapp infer` writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import shapely
import yaml

from pathapp.cytomine.analyse import analyse_slide, load_runtime
from pathapp.cytomine.wkt import flip_y
from pathapp.errors import PathappError
from pathapp.atomic import atomic_path

T = TypeVar("T")
OUTPUT_FILES = {"annotations": "annotations.geojson", "tiles": "tiles.geojson", "run": "run.json"}


def read_input(inputs: Path, name: str, cast: Callable[[str], T], default: T | None = None) -> T | None:
    """An input value from its file, cast to its type; a missing optional input gives `default`."""
    path = inputs / name
    if not path.is_file():
        return default
    text = path.read_text(encoding="utf-8").strip()
    try:
        return cast(text)
    except ValueError:
        kind = getattr(cast, "__name__", str(cast))
        raise PathappError(f"{path}: cannot read {text[:40]!r} as {kind}; fix the input value") from None


def write_array(folder: Path, items: Sequence[T], write_item: Callable[[Path, T], None]) -> None:
    """An array output: `array.yml` with its size and one entry per item, built under a temporary
    name and renamed into place, so a reader never sees half an array."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (tmp / "array.yml").write_text(yaml.safe_dump({"size": len(items)}), encoding="utf-8")
        for i, item in enumerate(items):
            write_item(tmp / str(i), item)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def geometry_json(geom: Any, height: int) -> str:
    """A GeoJSON geometry in Cytomine's bottom-left frame, 2 decimals."""
    return shapely.to_geojson(shapely.set_precision(flip_y(geom, height), 0.01))


def run_task(inputs: Path, outputs: Path, models_dir: Path, device: str = "auto") -> str:
    """Read the inputs, analyse the image, write every output; returns a one-line summary."""
    from pathapp.qupath.geojson import read_objects
    from pathapp.slide import open_slide

    image = inputs / "image"
    if not image.exists():
        raise PathappError(f"{image}: the task's image input is missing")
    model = read_input(inputs, "model", str)
    mpp = read_input(inputs, "mpp", float)
    tile_size = read_input(inputs, "tile_size", int)
    min_prob = read_input(inputs, "min_prob", float, default=0.0)
    runtime = load_runtime(model, models_dir, device)
    outputs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pathapp-", dir=outputs) as tmp:
        slide = open_slide(image)
        try:
            result, _ = analyse_slide(slide, runtime, Path(tmp), mpp=mpp or None, tile_size=tile_size or None,
                                      min_prob=min_prob or 0.0)
        finally:
            slide.close()
        height = int(result.slide_size[1])
        regions = {o.class_name: o.geometry for o in read_objects(Path(tmp) / "annotations.geojson")}
        names = list(result.class_names)
        per_class = [list(shapely.get_parts(regions[n])) if n in regions else [] for n in names]
        write_array(outputs / "class_names", names, write_text)
        def write_polygons(folder: Path, polys: list) -> None:
            write_array(folder, polys, lambda p, g: write_text(p, geometry_json(g, height)))

        write_array(outputs / "class_regions", per_class, write_polygons)
        for out_name, file_name in OUTPUT_FILES.items():
            with atomic_path(outputs / out_name) as dst:
                shutil.copyfile(Path(tmp) / file_name, dst)
    run = json.loads((outputs / "run").read_text(encoding="utf-8"))
    n_regions = sum(len(p) for p in per_class)
    return f"{run['counts']['tiles']} tiles, {n_regions} region polygon(s) over {len(names)} class(es) -> {outputs}"
