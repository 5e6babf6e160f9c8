"""QuPath projects read without Java: the two real projects, and built ones that must relocate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import data_file
from pathapp.errors import PathappError
from pathapp.qupath.project import is_project, read_project, results_dir

SVS = "wsi/aperio/CMU-1-Small-Region.svs"
DICOM_SERIES = "dicom/cmu-1-small-region-wsi2dcm"


def test_btc_lab_project_qupath051() -> None:
    project = read_project(data_file("qupath/btc-lab-he-project/project.qpproj"))
    assert project.version == "0.5.1"
    (entry,) = project.entries
    assert entry.entry_id == 106
    assert entry.name == "AS21057515 - 2024-05-07 19.34.42.ndpi"
    assert entry.uri.endswith("raws/AS21057515%20-%202024-05-07%2019.34.42.ndpi")
    assert (entry.width, entry.height) == (107520, 105984)
    assert entry.mpp == pytest.approx(0.22974245870379303)
    assert entry.provider.endswith("OpenslideServerBuilder")
    # the image is not shipped: a clear per-entry error naming the entry and the re-based path
    assert entry.image_path is None
    assert "entry 106" in entry.error and "image not found" in entry.error
    assert "qupath/images/DDC_UC_1/raws/AS21057515 - 2024-05-07 19.34.42.ndpi" in entry.error
    assert len(project.classes) == 14
    assert project.classes["Tumor"] == (200, 0, 0)  # -3670016 = 0xFFC80000
    assert project.classes["well differentiated tumor"] == (153, 204, 153)  # -6697831
    assert results_dir(project, entry) == project.dir / "pathapp" / "106"


def test_coscia_project_qupath060() -> None:
    project = read_project(data_file("qupath/coscia-demo-project"))  # the folder works too
    assert project.version == "0.6.0"
    (entry,) = project.entries
    assert (entry.entry_id, entry.name) == (1, "TD_01_verysmall_mIF.ome.tif")
    assert entry.uri == "file:/Volumes/RD_Coscia/Jose/__TestDatasets/TD_01_verysmall_mIF.ome.tif"
    assert (entry.width, entry.height, entry.args) == (1000, 1000, ["--series", "0"])
    assert entry.mpp == pytest.approx(0.34571008852182383)
    assert entry.image_path is None and "TD_01_verysmall_mIF.ome.tif" in entry.error
    assert list(project.classes)[:4] == ["single_cells_demo", "circles", "two_circles", "class_1"]
    assert project.classes["class_1"] == (3, 128, 17)  # the colour the GeoJSON export shows


def _server(uri: str, mpp: float | None = 0.499) -> dict:
    meta = {"width": 2220, "height": 2967}
    if mpp is not None:
        meta["pixelCalibration"] = {"pixelWidth": {"value": mpp, "unit": "µm"}}
    return {"builderType": "uri", "providerClassName": "qupath.lib.images.servers.openslide.OpenslideServerBuilder",
            "uri": uri, "args": [], "metadata": meta}


def _write_project(folder: Path, old_uri: str, servers: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    images = [{"serverBuilder": s, "entryID": i + 1, "randomizedName": f"r{i}", "imageName": f"image {i + 1}",
               "metadata": {}} for i, s in enumerate(servers)]
    path = folder / "project.qpproj"
    path.write_text(json.dumps({"version": "0.6.0", "uri": old_uri, "lastID": len(images), "images": images}))
    return path


def test_relocation_rebase_search_nested_and_dicom(tmp_path: Path) -> None:
    svs = data_file(SVS)
    series = data_file(DICOM_SERIES)
    # the lab moved /old/lab/{proj,slides} to tmp_path/{proj,slides}: re-basing finds the slide
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "a b.svs").symlink_to(svs)
    # another slide was copied into the project folder: found by name search
    (tmp_path / "proj" / "images").mkdir(parents=True)
    (tmp_path / "proj" / "images" / svs.name).symlink_to(svs)
    (tmp_path / "proj" / "images" / "series").symlink_to(series, target_is_directory=True)
    # QuPath's own wrappers (ImageServers builder types): one that keeps x and y, and one that moves them
    pyramid = {"builderType": "pyramidize", "builder": _server("file:/old/lab/slides/a%20b.svs")}
    qpproj = _write_project(tmp_path / "proj", "file:/old/lab/proj/project.qpproj", [
        _server("file:/old/lab/slides/a%20b.svs"),
        _server(f"file:/elsewhere/{svs.name}", mpp=None),
        pyramid,
        _server("file:/scanner/out/level-0-frames-0-30.dcm"),
        _server("file:/old/lab/slides/gone.svs"),
        _server("https://omero.example.org/webclient/img_detail/5"),
        {"builderType": "sparse", "regions": []},
        {"builderType": "pyramidize", "builder": {"builderType": "rotated", "rotation": "ROTATE_90",
                                                  "builder": _server("file:/old/lab/slides/a%20b.svs")}},
        {"builderType": "cropped", "region": {"x": 10, "y": 20, "width": 100, "height": 100},
         "builder": _server("file:/old/lab/slides/a%20b.svs")},
        {"builderType": "rotated", "rotation": "ROTATE_NONE", "builder": _server("file:/old/lab/slides/a%20b.svs")},
    ])
    assert is_project(qpproj) and is_project(qpproj.parent) and not is_project(svs)
    entries = read_project(qpproj).entries
    assert entries[0].image_path == tmp_path / "slides" / "a b.svs" and entries[0].error is None
    assert entries[1].image_path == tmp_path / "proj" / "images" / svs.name and entries[1].mpp is None
    assert entries[2].image_path == entries[0].image_path and entries[2].mpp == pytest.approx(0.499)
    assert entries[3].image_path == tmp_path / "proj" / "images" / "series"  # DICOM: the series folder
    assert entries[4].image_path is None and "gone.svs" in entries[4].error and "entry 5" in entries[4].error
    assert "not a local file" in entries[5].error
    assert "sparse" in entries[6].error
    # rotated under a pyramid, or cropped: results would land elsewhere than QuPath shows the image
    assert entries[7].image_path is None and "shows this image rotated (ROTATE_90)" in entries[7].error
    assert entries[8].image_path is None and "shows this image cropped" in entries[8].error
    assert all("\n" not in e.error and "entry" in e.error for e in entries[7:9])
    assert entries[9].error is None and entries[9].image_path == entries[0].image_path  # a 0° rotation

    from pathapp.slide import open_slide

    with open_slide(entries[0].image_path) as s:
        assert s.size == (2220, 2967)
    with open_slide(entries[3].image_path) as s:
        assert s.backend == "wsidicom"


def test_windows_project_rebases(tmp_path: Path) -> None:
    svs = data_file(SVS)
    (tmp_path / "images" / "DDC").mkdir(parents=True)
    (tmp_path / "images" / "DDC" / "x y.svs").symlink_to(svs)
    qpproj = _write_project(tmp_path / "qupath", "file:/C:/Users/me/lab/qupath/project.qpproj",
                            [_server("file:/C:/Users/me/lab/images/DDC/x%20y.svs")])
    (entry,) = read_project(qpproj).entries
    assert entry.image_path == tmp_path / "images" / "DDC" / "x y.svs"


def test_bad_project_files(tmp_path: Path) -> None:
    with pytest.raises(PathappError, match="no QuPath project"):
        read_project(tmp_path)
    (tmp_path / "project.qpproj").write_text("{oops")
    with pytest.raises(PathappError, match="project.qpproj"):
        read_project(tmp_path)


def _infer(*args: str) -> tuple[int, str]:
    """`pathapp infer ...` in-process, as the console script runs it (errors are one line)."""
    from click.testing import CliRunner

    from pathapp.cli import cli

    res = CliRunner().invoke(cli, ["infer", *args, "--workers", "0"])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from vit_factory import tiny_bundle

    return tiny_bundle(tmp_path_factory.mktemp("bundle"), num_classes=2)


def test_infer_on_real_projects_reports_each_missing_image(bundle: Path, tmp_path: Path) -> None:
    btc = data_file("qupath/btc-lab-he-project/project.qpproj")
    coscia = data_file("qupath/coscia-demo-project/project.qpproj")
    code, out = _infer(str(btc), str(coscia), "--model", str(bundle), "--out", str(tmp_path))
    assert code == 1 and "Traceback" not in out
    failed = [line for line in out.splitlines() if line.startswith("failed:")]
    assert len(failed) == 2
    assert "entry 106" in failed[0] and "AS21057515 - 2024-05-07 19.34.42.ndpi" in failed[0]
    assert "entry 1" in failed[1] and "TD_01_verysmall_mIF.ome.tif" in failed[1]
    assert all("image not found" in line for line in failed)


def test_infer_on_a_moved_project_writes_every_entry(bundle: Path, tmp_path: Path) -> None:
    svs = data_file(SVS)
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "moved.svs").symlink_to(svs)
    (tmp_path / "proj" / "images").mkdir(parents=True)
    (tmp_path / "proj" / "images" / "series").symlink_to(data_file(DICOM_SERIES), target_is_directory=True)
    qpproj = _write_project(tmp_path / "proj", "file:/gone/lab/proj/project.qpproj", [
        _server("file:/gone/lab/slides/moved.svs"),
        _server("file:/scanner/level-0-frames-0-30.dcm"),
    ])
    code, out = _infer(str(qpproj), "--model", str(bundle), "--mpp", "4.0")
    assert code == 0, out
    for entry_id in (1, 2):
        done = tmp_path / "proj" / "pathapp" / str(entry_id)
        assert (done / ".done").exists() and (done / "tiles.geojson").exists(), out


def test_infer_inside_each_entrys_own_annotations(bundle: Path, tmp_path: Path) -> None:
    """`infer project.qpproj --roi-class Upper`: each image is analysed inside its own Upper annotation
    (read from the entry's data.qpdata, no Java); an entry never saved in QuPath, and a class the
    entries do not have, are one line each while the other entries go on."""
    from qupath_projects import annotated_project

    from pathapp.infer import InferOptions, run_inference

    qpproj = annotated_project(tmp_path / "proj", entries=2, saved=1)
    code, out = _infer(str(qpproj), "--model", str(bundle), "--mpp", "4.0", "--roi-class", "Upper")
    assert code == 1 and "Traceback" not in out
    failed = [line for line in out.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "entry 2 (slide 2.svs) has no data file" in failed[0]
    tiles = json.loads((tmp_path / "proj" / "pathapp" / "1" / "tiles.geojson").read_text())["features"]
    centres = [sum(p[1] for p in f["geometry"]["coordinates"][0][:4]) / 4 for f in tiles]
    assert len(tiles) >= 3 and max(centres) < 1300  # the Upper annotation covers y 0-1300
    code, out = _infer(str(qpproj), "--model", str(bundle), "--mpp", "4.0", "--out", str(tmp_path / "all"))
    everywhere = json.loads((tmp_path / "all" / "1" / "tiles.geojson").read_text())["features"]
    assert code == 0 and len(everywhere) > len(tiles)  # without --roi-class: the whole tissue, both entries
    code, out = _infer(str(qpproj), "--model", str(bundle), "--mpp", "4.0", "--roi-class", "Tumour",
                       "--out", str(tmp_path / "none"))
    failed = [line for line in out.splitlines() if line.startswith("failed:")]
    assert code == 1 and len(failed) == 2 and "of class Tumour (annotation classes present: Lower, Upper)" in failed[0]
    with pytest.raises(PathappError, match="--roi-class selects annotations"):  # a slide has no annotations of its own
        run_inference([data_file(SVS)], InferOptions(model=bundle, roi_class=["Upper"]))
