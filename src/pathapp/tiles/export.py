"""Tile one slide and write what QuPath and a person need to check it: tiles GeoJSON + picture."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shapely.geometry.base import BaseGeometry

from pathapp.atomic import mark_output_folder
from pathapp.slide import open_slide
from pathapp.slide.base import BRIGHTFIELD
from pathapp.tiles.grid import TileGrid, make_grid, tile_boxes, why_empty
from pathapp.tiles.render import render_overview
from pathapp.tiles.tissue import DEFAULT_MIN_TISSUE, detect_tissue

TISSUE_CLASS = ("Tissue", (0, 170, 0))


@dataclass
class TilingResult:
    """Where one slide's tiling went, and the grid itself for callers that go on to read tiles."""

    slide_name: str
    out_dir: Path
    grid: TileGrid
    files: list[Path]
    empty: str | None = None  # why there is no tile, when there is none
    modality: str = BRIGHTFIELD  # which tissue detector ran (`TissueMask.modality`)

    def summary(self) -> str:
        g = self.grid
        line = (
            f"{self.slide_name}: {len(g)} tiles of {g.tile_size} px at {g.mpp:g} µm/px "
            f"(slide {g.slide_mpp:g} µm/px, {g.footprint:.2f} level-0 px per tile, read {g.read_size} px "
            f"at level {g.level}) -> {self.out_dir}"
        )
        if self.modality != BRIGHTFIELD:
            line += f"; {self.modality}: tissue found by Otsu on the summed channels"
        return line


def tile_slide(
    path: str | Path,
    out: str | Path,
    *,
    mpp: float,
    tile_size: int,
    overlap: int = 0,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    rois: BaseGeometry | None = None,
    backend: str | None = None,
    slide_mpp: float | None = None,
) -> TilingResult:
    """Tile a slide at `mpp` µm/px and write OUT/<slide name>/tiles.geojson (QuPath tile objects
    with a "tissue fraction" measurement), tissue.geojson (the tissue outline as a "Tissue"
    annotation) and thumbnail.png (tissue outline, ROIs and tiles drawn on the slide)."""
    from pathapp.qupath.geojson import QuPathObject, tile_objects, write_objects

    with open_slide(path, backend=backend, slide_mpp=slide_mpp) as slide:
        slide.require_mpp()  # fail on a missing µm/px before spending time on tissue detection
        tissue = detect_tissue(slide)
        grid = make_grid(slide, mpp, tile_size, overlap=overlap, tissue=tissue, rois=rois, min_tissue=min_tissue,
                         brightfield_only=False)
        out_dir = mark_output_folder(Path(out) / slide.name)
        tiles = tile_objects(tile_boxes(grid), measurements={"tissue fraction": grid.tissue_fraction,
                                                             **grid.edge_measurements(slide.background)})
        outline = [] if tissue.geometry.is_empty else [
            QuPathObject(geometry=tissue.geometry, class_name=TISSUE_CLASS[0], color=TISSUE_CLASS[1])
        ]
        files = [
            write_objects(out_dir / "tiles.geojson", tiles),
            write_objects(out_dir / "tissue.geojson", outline),
        ]
        render_overview(out_dir / "thumbnail.png", slide, tissue, grid, rois=rois)
        files.append(out_dir / "thumbnail.png")
        empty = None if len(grid) else why_empty(grid, tissue, rois, min_tissue)
        return TilingResult(slide.name, out_dir, grid, files, empty, tissue.modality)
