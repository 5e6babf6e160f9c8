"""The paquo bridge: the guard and the write decisions everywhere, the real round trip where a
QuPath installation exists (PAQUO_QUPATH_DIR).

What the write must get right, from paquo 0.9.0's source (projects.py, images.py): `entry.save()`
skips an entry whose image is not at its URI with a log warning only; the project's context
manager saves on exit even after an error; `save()` reads every entry's data; `hierarchy.add_*`
adds under the root; paquo refuses ':' in class names, which QuPath splits into derived classes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import box

from conftest import IN_CI, data_file
from pathapp.qupath.geojson import QuPathObject, tile_objects, write_objects
from pathapp.qupath.project import read_project
from pathapp.qupath.qpdata import read_entry_objects, read_qpdata

HAVE_QUPATH = bool(os.environ.get("PAQUO_QUPATH_DIR"))
needs_qupath = pytest.mark.skipif(
    not HAVE_QUPATH, reason="needs a QuPath installation: set PAQUO_QUPATH_DIR (python -m paquo get_qupath)"
)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "PAQUO_QUPATH_DIR"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def _require_paquo() -> None:
    """paquo itself is pip-installable (the `qupath` extra): CI must have it, elsewhere skip."""
    try:
        import paquo  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("CI must install the qupath extra: pip install -e '.[dev,qupath]'")
        pytest.skip("paquo not installed: pip install -e '.[qupath]'")


GUARDED_CALL = """
import sys
from pathapp.errors import PathappError
import pathapp.qupath.paquo_bridge as bridge
assert "paquo.projects" not in sys.modules, "imported eagerly"
try:
    bridge.read_entry_objects("/nowhere/project.qpproj", 1)
except PathappError as e:
    print("ERR", e)
"""


@pytest.mark.parametrize("qupath_dir", ["/nonexistent/QuPath-0.6.0", ""])
def test_guard_without_qupath(qupath_dir: str) -> None:
    """A missing or wrong QuPath is one PathappError that says what to install, not a JVM traceback."""
    _require_paquo()
    env = {"PAQUO_QUPATH_DIR": qupath_dir} if qupath_dir else {}
    out = _run(GUARDED_CALL, **env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ERR no usable QuPath installation"), out.stdout
    assert "PAQUO_QUPATH_DIR" in out.stdout and "get_qupath" in out.stdout
    if qupath_dir:
        assert qupath_dir in out.stdout


def test_guard_without_paquo() -> None:
    out = _run("import sys; sys.modules['paquo'] = None\n" + GUARDED_CALL)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ERR paquo is not installed") and "pathapp[qupath]" in out.stdout


def test_import_instructions_name_the_files() -> None:
    from pathapp.qupath.paquo_bridge import import_instructions

    text = import_instructions(["/p/pathapp/3/tiles.geojson"])
    assert "/p/pathapp/3/tiles.geojson" in text and "pathapp_import.groovy" in text


@needs_qupath
def test_write_and_read_back_through_qupath(tmp_path: Path) -> None:
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject

    from pathapp.qupath import paquo_bridge as bridge

    svs = data_file("wsi/aperio/CMU-1-Small-Region.svs")
    with QuPathProject(tmp_path / "proj", mode="x") as qp:
        entry = qp.add_image(svs, image_type=QuPathImageType.BRIGHTFIELD_H_E)
        entry.hierarchy.add_annotation(box(0, 0, 1000, 1000))  # the user's ROI
        entry_id = entry.entry_id

    ours = read_project(tmp_path / "proj")  # our Java-free reader agrees with QuPath's project
    assert str(ours.entries[0].entry_id) == entry_id and ours.entries[0].image_path == svs.resolve()

    tiles = tile_objects(np.array([[0, 0, 224, 224], [224, 0, 448, 224]]),
                         measurements={"prob: Tumor": np.float32([0.9, np.nan])}, class_names=["Tumor", "Stroma"],
                         colors={"Tumor": (200, 0, 0)})
    region = QuPathObject(box(0, 0, 448, 224), "annotation", "Tumor", (200, 0, 0), {"area px": 448.0 * 224})
    geojson_file = write_objects(tmp_path / "tiles.geojson", [*tiles, region])
    for _ in range(2):  # the rerun replaces pathapp's objects and keeps the user's annotation
        message = bridge.write_geojson_to_project(tmp_path / "proj", entry_id, [geojson_file, tmp_path / "run.json"])
        assert message.startswith("added 3 objects")
    objs = bridge.read_entry_objects(tmp_path / "proj", entry_id, include_pathapp=True)
    kinds = sorted((o.object_type, o.class_name) for o in objs)
    assert kinds == [("annotation", None), ("annotation", "Tumor"), ("tile", "Stroma"), ("tile", "Tumor")]
    tumor_tile = next(o for o in objs if o.object_type == "tile" and o.class_name == "Tumor")
    assert tumor_tile.measurements["prob: Tumor"] == pytest.approx(0.9, rel=1e-6)
    stroma_tile = next(o for o in objs if o.class_name == "Stroma")
    assert "prob: Tumor" not in stroma_tile.measurements  # NaN left out
    assert [o.name for o in bridge.read_entry_objects(tmp_path / "proj", entry_id)] == [None]  # only the user's
    assert read_project(tmp_path / "proj").classes.keys() >= {"Tumor", "Stroma"}
    # QuPath's data file, read without Java, says the same: pathapp's objects apart from the user's
    project = read_project(tmp_path / "proj")
    assert [o.name for o in read_entry_objects(project, project.entries[0])] == [None]
    ours = sorted((o.object_type, o.class_name) for o in read_entry_objects(project, project.entries[0], include_pathapp=True))
    assert ours == kinds


@needs_qupath
@pytest.mark.parametrize("project_dir", ["qupath/btc-lab-he-project", "qupath/coscia-demo-project"])
def test_bridge_and_java_free_reader_agree(project_dir: str) -> None:
    """QuPath (through paquo) and pathapp.qupath.qpdata read the same objects from the real projects."""
    from pathapp.qupath import paquo_bridge as bridge

    qpproj = data_file(f"{project_dir}/project.qpproj")
    project = read_project(qpproj)
    for entry in project.entries:
        java = bridge.read_entry_objects(qpproj, entry.entry_id, include_pathapp=True)
        ours = read_entry_objects(project, entry, include_pathapp=True)
        assert len(java) == len(ours) > 0
        key = lambda o: (o.object_type, o.class_name or "", round(o.geometry.centroid.x, 1), round(o.geometry.centroid.y, 1))  # noqa: E731
        for a, b in zip(sorted(java, key=key), sorted(ours, key=key)):
            assert (a.object_type, a.class_name, a.name, a.locked) == (b.object_type, b.class_name, b.name, b.locked)
            assert a.geometry.hausdorff_distance(b.geometry) < 0.02
            assert a.measurements.keys() == b.measurements.keys()
            assert np.allclose(list(a.measurements.values()), list(b.measurements.values()), rtol=1e-6, equal_nan=True)
    assert read_qpdata(project.dir / "data" / str(project.entries[0].entry_id) / "data.qpdata").objects


def test_write_project_without_qupath_explains_the_import(tmp_path: Path) -> None:
    """`infer project.qpproj --write-project` without QuPath: one error saying which part is missing
    (the run then names the GeoJSON to import once, see test_infer), and the GeoJSON among the files."""
    _require_paquo()
    code = (
        "from pathapp.qupath.paquo_bridge import QuPathNotAvailableError, geojson_files, write_geojson_to_project\n"
        f"files = [{str(tmp_path / 'tiles.geojson')!r}, {str(tmp_path / 'run.json')!r}]\n"
        "print([str(f) for f in geojson_files(files)])\n"
        "try:\n    write_geojson_to_project('/nowhere', 1, files)\n"
        "except QuPathNotAvailableError as e:\n    print('ERR', e.reason)\n"
    )
    out = _run(code, PAQUO_QUPATH_DIR="/nonexistent")
    assert out.returncode == 0, out.stderr
    assert "ERR no usable QuPath installation" in out.stdout
    assert out.stdout.splitlines()[0] == str([str(tmp_path / "tiles.geojson")])


# ------------------------------------------------------------ write decisions (no QuPath needed)


def test_class_names_split_as_qupath_reads_them() -> None:
    """QuPath's PathClass.fromString splits at ':' and strips each part (0.4.4-0.6.0)."""
    from pathapp.errors import PathappError
    from pathapp.qupath.paquo_bridge import class_parts, qupath_class_id

    assert class_parts("Tumor") == ["Tumor"]
    assert class_parts("Tumor:Grade 3") == class_parts("Tumor: Grade 3") == ["Tumor", "Grade 3"]
    assert qupath_class_id("Tumor:Grade 3: a") == "Tumor: Grade 3: a"
    with pytest.raises(PathappError, match="empty part"):
        class_parts("Tumor::x")


def test_entry_uri_is_pointed_at_where_pathapp_found_the_image(tmp_path: Path) -> None:
    from pathapp.errors import PathappError
    from pathapp.qupath.paquo_bridge import entry_uri_update

    here = tmp_path / "images" / "slide.svs"
    here.parent.mkdir()
    here.write_bytes(b"x")
    assert entry_uri_update(here.as_uri(), here, "p: entry 1") is None  # in place: nothing to change
    gone = (tmp_path / "old" / "slide.svs").as_uri()
    assert entry_uri_update(gone, here, "p: entry 1") == here.resolve().as_uri()
    with pytest.raises(PathappError, match=r"^p: entry 1: its image is not at .*old/slide.svs and was not found"):
        entry_uri_update(gone, None, "p: entry 1")
    # DICOM-WSI: pathapp opens the series folder; the entry names one file of it
    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"x")
    assert entry_uri_update((tmp_path / "moved" / "1.dcm").as_uri(), series, "w") == (series / "1.dcm").as_uri()
    with pytest.raises(PathappError, match="nor at"):
        entry_uri_update((tmp_path / "moved" / "2.dcm").as_uri(), series, "w")


def test_restore_on_failure_puts_every_file_back(tmp_path: Path) -> None:
    from pathapp.qupath.paquo_bridge import restore_on_failure

    data, summary, fresh = tmp_path / "data.qpdata", tmp_path / "summary.json", tmp_path / "server.json"
    data.write_bytes(b"old objects")
    summary.write_text("old")
    with pytest.raises(RuntimeError, match="half-way"):
        with restore_on_failure([data, summary, fresh]):
            data.write_bytes(b"new objects")
            fresh.write_text("new")
            raise RuntimeError("failed half-way")
    assert data.read_bytes() == b"old objects" and summary.read_text() == "old" and not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.qpdata", "summary.json"]
    with restore_on_failure([data, summary, fresh]):  # success keeps the new files
        data.write_bytes(b"new objects")
    assert data.read_bytes() == b"new objects"


# ------------------------------------------------------------ writes through QuPath


def _project_with(tmp_path: Path, images: list[Path]) -> tuple[Path, list[str]]:
    """A QuPath project holding `images`, each with one user annotation (the ROI)."""
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject

    with QuPathProject(tmp_path / "proj", mode="x") as qp:
        ids = []
        for image in images:
            entry = qp.add_image(image, image_type=QuPathImageType.BRIGHTFIELD_H_E)
            entry.hierarchy.add_annotation(box(0, 0, 1000, 1000))
            ids.append(entry.entry_id)
    return tmp_path / "proj", ids


def _results(tmp_path: Path) -> Path:
    tiles = tile_objects(np.array([[0, 0, 224, 224], [224, 0, 448, 224]]),
                         measurements={"prob: Tumor": np.float32([0.9, 0.2])}, class_names=["Tumor:Grade 3", "Stroma"],
                         colors={"Tumor:Grade 3": (200, 0, 0)})
    return write_objects(tmp_path / "tiles.geojson", tiles)


@needs_qupath
def test_write_follows_a_moved_image_and_nests_under_the_user_annotation(tmp_path: Path) -> None:
    """The image moved since the project was saved: the entry's URI follows it (else paquo would
    skip the save and the objects would be reported written but lost); tiles nest under the
    user's annotation; the class name with ':' becomes QuPath's derived class."""
    import shutil

    from paquo.projects import QuPathProject

    from pathapp.qupath import paquo_bridge as bridge

    first = tmp_path / "first" / "slide.svs"
    first.parent.mkdir()
    shutil.copyfile(data_file("wsi/aperio/CMU-1-Small-Region.svs"), first)
    proj, (entry_id,) = _project_with(tmp_path, [first])
    moved = tmp_path / "moved" / "slide.svs"
    moved.parent.mkdir()
    first.rename(moved)
    message = bridge.write_geojson_to_project(proj, entry_id, [_results(tmp_path)], image_path=moved)
    assert message.startswith("added 2 objects")
    with QuPathProject(proj, mode="r") as qp:
        entry = qp.images[0]
        assert Path(bridge.uri_to_path(entry.uri)) == moved.resolve()
        (user,) = [a for a in entry.hierarchy.annotations if a.name is None]
        children = [c for c in user.java_object.getChildObjects()]
        assert len(children) == 2 and all(str(c.getName()).startswith("pathapp") for c in children)
        assert {str(c.getPathClass()) for c in children} == {"Tumor: Grade 3", "Stroma"}


@needs_qupath
def test_write_is_all_or_nothing_and_touches_only_its_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after QuPath wrote the entry's data puts the old data back; an unrelated entry
    whose data is broken does not stop the write; an image found nowhere is refused before work."""
    import shutil

    from paquo.projects import QuPathProject

    from pathapp.errors import PathappError
    from pathapp.qupath import paquo_bridge as bridge

    slides = []
    for name in ("a.svs", "b.svs"):
        slides.append(tmp_path / "img" / name)
        slides[-1].parent.mkdir(exist_ok=True)
        shutil.copyfile(data_file("wsi/aperio/CMU-1-Small-Region.svs"), slides[-1])
    proj, (a, b) = _project_with(tmp_path, slides)
    with QuPathProject(proj, mode="r") as qp:
        entry_a, entry_b = (Path(e.entry_path) for e in qp.images)
    (entry_b / "data.qpdata").write_bytes(b"broken")  # the other entry: unreadable
    results = _results(tmp_path)
    old = (entry_a / "data.qpdata").read_bytes()

    def failing_save(self, images=True):
        raise OSError("disk full")

    monkeypatch.setattr(QuPathProject, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        bridge.write_geojson_to_project(proj, a, [results], image_path=slides[0])
    assert (entry_a / "data.qpdata").read_bytes() == old
    monkeypatch.undo()
    assert bridge.write_geojson_to_project(proj, a, [results], image_path=slides[0]).startswith("added 2")
    assert len(bridge.read_entry_objects(proj, a, include_pathapp=True)) == 3
    slides[1].unlink()
    before = (entry_b / "data.qpdata").read_bytes()
    with pytest.raises(PathappError, match="its image is not at .* and was not found elsewhere; relink"):
        bridge.write_geojson_to_project(proj, b, [results], image_path=None)
    assert (entry_b / "data.qpdata").read_bytes() == before
