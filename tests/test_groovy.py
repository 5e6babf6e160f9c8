"""The QuPath launcher scripts in groovy/.

QuPath cannot be installed here, so the scripts are checked three ways: a real Groovy parser
(Debian's `groovy`, parse-only to the CONVERSION phase), a check that every QuPath call is one
named in INTEROP.md, and end-to-end runs outside QuPath: tests/groovy/run_in_stand_in.groovy
executes the script unchanged with a stand-in for the QuPath functions it calls, so the real
pathapp CLI runs (locally, or through the `docker run` command the script builds, checked by
tests/groovy/fake_docker.py) and the results are imported into the stand-in hierarchy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import shapely
from shapely.geometry import shape

from conftest import DATA, IN_CI, data_file
from qupath_rules import assert_qupath_conformant
from vit_factory import tiny_bundle

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "groovy" / "pathapp_run.groovy"
IMPORT = ROOT / "groovy" / "pathapp_import.groovy"
SEARCH = ROOT / "groovy" / "pathapp_search.groovy"
HERE = Path(__file__).resolve().parent / "groovy"
PATHAPP = Path(sys.executable).with_name("pathapp")
SVS = "wsi/aperio/CMU-1-Small-Region.svs"
ROI_EXPORT = "qupath/geojson/coscia_TD_01_verysmall_mIF.geojson"  # a real QuPath 0.6 export
SHIFT = 900  # moves that export's annotations (drawn on a 1000 px image) onto the slide's tissue

# QuPath API the scripts may call: what INTEROP.md names, plus these core calls (QP and PathObject,
# unchanged from 0.2 to 0.6) that selecting, replacing and naming objects cannot do without.
# QP.getCurrentHierarchy() and PathObjectHierarchy.removeObjects(Collection, boolean) exist in
# 0.4.4, 0.5.1 and 0.6.0, the latter not deprecated (QP.removeObjects(Collection, boolean) is, in 0.6).
EXTRA_QUPATH_API = {"getSelectedObjects", "getAnnotationObjects", "removeObjects", "isAnnotation",
                    "getName", "setName", "getPathClass", "getCurrentHierarchy",
                    # filing segmentation regions under an annotation, in 0.4.4, 0.5.1 and 0.6.0 alike:
                    # PathObjectHierarchy.getRootObject() and addObjectBelowParent(parent, object, fireUpdate)
                    # (since 0.4.0), PathObject.getChildObjects() and getROI(), ROI.getArea() and getGeometry()
                    "getRootObject", "addObjectBelowParent", "getChildObjects", "getROI", "getArea", "getGeometry"}
# Groovy/JDK calls and the scripts' own closures.
NOT_QUPATH = {
    "println", "collect", "findAll", "find", "each", "isEmpty", "iterator", "next", "toFile", "getParentFile",
    "getAbsolutePath", "getAbsoluteFile", "toLowerCase", "endsWith", "startsWith", "substring", "length",
    "lastIndexOf", "isDirectory", "isFile", "exists", "replace", "getProperty", "contains", "execute", "trim",
    "join", "put", "environment", "redirectErrorStream", "start", "getMessage", "getInputStream", "withReader",
    "readLine", "add", "size", "removeFirst", "waitFor", "addAll", "toString", "File", "RuntimeException",
    "LinkedList", "slideStem", "containerPath", "hostOrContainer", "isPathapp", "isSaliency", "get", "if", "while",
    "catch", "keySet", "movedBy", "sort", "collectMany", "findIndexOf",
    "covers",  # JTS Geometry.covers, on the geometry QuPath's ROI.getGeometry() returns
}
JTS = Path("/usr/share/java/jts-core.jar")  # Debian's libjts-java: the stand-in's ROIs, as QuPath's, are JTS


def _groovy_env() -> dict[str, str]:
    """Debian's groovy launcher wants JAVA_HOME (or /usr/lib/jvm/default-java); derive it from `java`."""
    env = dict(os.environ)
    if not Path(env.get("JAVA_HOME", "/usr/lib/jvm/default-java"), "bin", "java").exists() and shutil.which("java"):
        env["JAVA_HOME"] = str(Path(shutil.which("java")).resolve().parents[1])
    return env


@pytest.fixture(scope="module")
def groovy() -> str:
    exe = shutil.which("groovy")
    if exe is None:
        if IN_CI:
            pytest.fail("CI must install Debian's groovy: apt-get install -y groovy default-jre-headless")
        pytest.skip("Groovy not installed (apt-get install -y groovy default-jre-headless)")
    if not JTS.exists():
        (pytest.fail if IN_CI else pytest.skip)(f"{JTS} missing: apt-get install -y libjts-java")
    return exe


def _parse(groovy: str, *files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([groovy, str(HERE / "parse_only.groovy"), *map(str, files)], capture_output=True,
                          text=True, env=_groovy_env(), timeout=180)


def test_scripts_parse(groovy: str, tmp_path: Path) -> None:
    out = _parse(groovy, RUN, IMPORT, SEARCH)
    assert out.returncode == 0, out.stdout + out.stderr
    broken = tmp_path / "broken.groovy"
    broken.write_text(RUN.read_text().replace("if (exitCode != 0)", "if (exitCode != 0", 1))
    out = _parse(groovy, broken)
    assert out.returncode == 1 and "FAIL" in out.stdout  # the check can fail


def _calls(script: Path) -> set[str]:
    code = re.sub(r"/\*.*?\*/|//[^\n]*", "", script.read_text(), flags=re.S)
    code = re.sub(r'"(?:[^"\\]|\\.)*"', '""', code)
    return set(re.findall(r"\b([A-Za-z_]\w*)\s*\(", code))


def test_scripts_call_only_documented_qupath_api() -> None:
    interop = DATA.parent / "docs" / "INTEROP.md"
    if not interop.exists():
        (pytest.fail if IN_CI else pytest.skip)(f"{interop} missing")
    text = interop.read_text()
    named = set(re.findall(r"\b([A-Za-z_]\w*)\b", text))
    if "setDisplayMinValue/MaxValue" in text:  # INTEROP.md abbreviates the pair
        named.add("setDisplayMaxValue")
    for script in (RUN, IMPORT):
        unknown = _calls(script) - named - EXTRA_QUPATH_API - NOT_QUPATH
        assert not unknown, f"{script.name} calls QuPath API not in INTEROP.md: {sorted(unknown)}"
        for imp in re.findall(r"^import (qupath\.[\w.]+)", script.read_text(), flags=re.M):
            assert imp.rsplit(".", 1)[1] in text, f"{script.name} imports {imp}, not in INTEROP.md"
    assert "addPathObjects" not in RUN.read_text() + IMPORT.read_text()  # gone in 0.6


def test_scripts_work_without_default_imports_and_deprecated_calls() -> None:
    """QuPath's scripting helpers imported statically (the script editor's "Include default imports"
    may be off), and objects removed through the hierarchy: QP.removeObjects(objects, true) is
    deprecated in 0.6, and 0.6's removeObjects(objects) does not exist in 0.4."""
    for script in (RUN, IMPORT, SEARCH):
        text = script.read_text()
        assert re.search(r"^import static qupath\.lib\.gui\.scripting\.QPEx\.\*", text, flags=re.M), script.name
        calls = re.findall(r"([\w.()]*)removeObjects\(", re.sub(r"//[^\n]*", "", text))
        assert calls == ["getCurrentHierarchy()."], (script.name, calls)
    moved = re.search(r"(def movedBy = \{.*?\n\})", RUN.read_text(), flags=re.S).group(1)
    assert moved in IMPORT.read_text()  # one rule for transformed images, in both scripts


# ------------------------------------------------------------------------------- the CLI contract

@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle"), num_classes=3)


def _link_slide(folder: Path) -> Path:
    """A real slide under a name with spaces, as users have them."""
    (folder / "images").mkdir()
    link = folder / "images" / "my slide.svs"
    link.symlink_to(data_file(SVS))
    return link


@pytest.fixture()
def slide(tmp_path: Path) -> Path:
    return _link_slide(tmp_path)


def _roi_features() -> list[dict]:
    """The real QuPath export, every property kept, its coordinates moved onto tissue."""
    feats = json.loads(data_file(ROI_EXPORT).read_text())["features"]

    def move(c: list) -> list:
        return [v + SHIFT for v in c] if isinstance(c[0], (int, float)) else [move(x) for x in c]

    for f in feats:
        f["geometry"]["coordinates"] = move(f["geometry"]["coordinates"])
    return feats


@pytest.fixture(scope="module")
def computed(tmp_path_factory, bundle: Path) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One run of the real console script exactly as the launcher's ProcessBuilder starts it
    (stderr merged into stdout): (ROI file, OUT, the finished process)."""
    folder = tmp_path_factory.mktemp("computed")
    roi = folder / "exported.geojson"
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": _roi_features()}))
    out = folder / "out"
    proc = subprocess.run([str(PATHAPP), *_infer_args(_link_slide(folder), bundle, out, roi)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400)
    return roi, out, proc


def _infer_args(image: Path, bundle: Path, out: Path, roi: Path | None) -> list[str]:
    """The arguments pathapp_run.groovy passes (its settings MPP=1.0, TILE_SIZE=56, EXTRA_ARGS below)."""
    args = ["infer", str(image), "--model", str(bundle), "--out", str(out), "--object-type", "tile",
            "--overwrite", "--mpp", "1.0", "--tile-size", "56"]
    return args + (["--roi", str(roi)] if roi else []) + ["--workers", "0"]


def test_cli_contract_the_launcher_relies_on(computed, tmp_path: Path) -> None:
    """Arguments, output file names, exit codes and log lines, as the script's ProcessBuilder sees them."""
    script = RUN.read_text()
    helps = {c: subprocess.run([str(PATHAPP), c, "--help"], capture_output=True, text=True).stdout
             for c in ("infer", "explain")}
    pathapp_args = script.split("// ---- the command")[1].split("def command")[0]  # not docker's own flags
    explain_only, rest = pathapp_args.split("if (explaining) {")[1].split("} else {")
    infer_only, common = rest.split("}", 1)
    assert "--model" in pathapp_args and "--method" in explain_only and "--overwrite" in infer_only
    for part, commands in ((explain_only, ["explain"]), (infer_only, ["infer"]),
                           (pathapp_args.split("if (explaining) {")[0] + common, ["infer", "explain"])):
        for option in re.findall(r'"(--[a-z-]+)"', part):
            for c in commands:
                assert option in helps[c], f"the launcher passes {option}, which `pathapp {c}` lacks"
    assert '"tiles.geojson"' in script and '"annotations.geojson"' in script
    roi, out, proc = computed
    assert proc.returncode == 0, proc.stdout
    done = [line for line in proc.stdout.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and "tiles/s" in done[0] and str(out / "my slide") in done[0]
    tiles = assert_qupath_conformant(out / "my slide" / "tiles.geojson")  # OUT/<slide stem>/
    assert_qupath_conformant(out / "my slide" / "annotations.geojson")
    rois = shapely.union_all([shape(f["geometry"]) for f in json.loads(roi.read_text())["features"]
                              if f["geometry"]["type"] == "Polygon"])
    assert tiles and all(rois.intersects(shape(f["geometry"])) for f in tiles)
    # failure: exit code 2 and one "error:" line naming the problem, never a traceback
    slide = _link_slide(tmp_path)
    proc = subprocess.run([str(PATHAPP), *_infer_args(slide, tmp_path / "nope.pathapp", out, None)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout
    assert any(line.startswith("error:") and "nope.pathapp" in line for line in proc.stdout.splitlines()), proc.stdout


# ---------------------------------------------------------------- the scripts, run outside QuPath

def _hierarchy() -> list[dict]:
    """Two of the user's annotations from a real QuPath export (the first selected), plus the
    objects an earlier pathapp run left, which the script must replace."""
    feats = [f for f in _roi_features() if f["geometry"]["type"] == "Polygon"][:2]
    feats[0]["properties"]["selected"] = True
    square = {"type": "Polygon", "coordinates": [[[0, 0], [56, 0], [56, 56], [0, 56], [0, 0]]]}
    old = [{"type": "Feature", "geometry": square, "properties": {"objectType": t, "name": n}}
           for t, n in (("tile", "pathapp: Tumor"), ("annotation", "pathapp"))]
    return feats + old


def _run_stand_in(groovy: str, script: Path, tmp_path: Path, image: Path, settings: dict,
                  env: dict | None = None, hierarchy: list[dict] | None = None,
                  server_path: str | None = None) -> tuple[dict, str]:
    config = {"settings": settings, "image": str(image), "project_dir": str(tmp_path / "proj"), "entry_id": 7,
              "hierarchy": _hierarchy() if hierarchy is None else hierarchy, "state_out": str(tmp_path / "state.json"),
              "server_path": server_path}
    (tmp_path / "proj").mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([groovy, "-cp", str(JTS), str(HERE / "run_in_stand_in.groovy"), str(script),
                           str(tmp_path / "config.json")],
                          capture_output=True, text=True, env={**_groovy_env(), **(env or {})}, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((tmp_path / "state.json").read_text()), proc.stdout


def _settings(bundle: Path, **extra: object) -> dict:
    return {"PATHAPP": str(PATHAPP), "MODEL": str(bundle), "MPP": 1.0, "TILE_SIZE": 56,
            "EXTRA_ARGS": ["--workers", "0"], **extra}


def _check_imported(state: dict, result_dir: Path) -> None:
    assert state["error"] is None, state["error"]
    n_files = sum(len(assert_qupath_conformant(result_dir / n)) for n in ("tiles.geojson", "annotations.geojson"))
    mine = [o for o in state["objects"] if o["name"] is None]
    ours = [o for o in state["objects"] if o["name"] is not None]
    assert len(mine) == 2  # the user's annotations stay
    assert len(ours) == n_files  # the earlier pathapp objects were replaced, not added to
    assert all(o["name"] == f"pathapp: {o['className']}" for o in ours)
    assert state["calls"][-4:-2] == ["removeObjects 2", f"addObjects {n_files}"]
    assert state["calls"][-2:] == ["resolveHierarchy", "fireHierarchyUpdate"]


def test_run_script_local(groovy: str, slide: Path, bundle: Path, tmp_path: Path) -> None:
    state, log = _run_stand_in(groovy, RUN, tmp_path, slide, _settings(bundle, MODE="local"))
    result_dir = tmp_path / "proj" / "pathapp" / "7" / "my slide"
    _check_imported(state, result_dir)
    assert state["calls"][0] == "exportObjectsToGeoJson FEATURE_COLLECTION"
    rois = json.loads((tmp_path / "proj" / "pathapp" / "7" / "rois.geojson").read_text())["features"]
    assert len(rois) == 1  # only the selected annotation
    selected = shape(rois[0]["geometry"])
    tiles = assert_qupath_conformant(result_dir / "tiles.geojson")
    assert all(selected.intersects(shape(f["geometry"])) for f in tiles)
    assert re.search(r"^pathapp \| done: .* tiles/s", log, flags=re.M), log  # pathapp's log, streamed
    heat = state["heatmap"]
    assert heat["measurement"].startswith("prob: ") and heat["n"] == len(tiles)
    assert (heat["min"], heat["max"], heat["colorMap"]) == (0.0, 1.0, "Viridis colour map")
    assert heat["measurement"] in {m for f in tiles for m in f["properties"]["measurements"]}


def test_run_script_explains_selected_tiles(groovy: str, computed, slide: Path, bundle: Path, tmp_path: Path) -> None:
    """EXPLAIN set: the selected pathapp tiles go to `pathapp explain`, their patches come back as
    saliency detections (replacing an earlier explanation, keeping the tiles) with a measurement map."""
    tiles = json.loads((computed[1] / "my slide" / "tiles.geojson").read_text())["features"][:3]
    for i, f in enumerate(tiles):
        f["properties"]["name"] = "pathapp: " + f["properties"]["classification"]["name"]
        f["properties"]["selected"] = i < 2
    old = {"type": "Feature", "geometry": tiles[2]["geometry"],
           "properties": {"objectType": "detection", "name": "pathapp: saliency vitcx"}}
    state, log = _run_stand_in(groovy, RUN, tmp_path, slide, _settings(bundle, EXPLAIN="rollout"),
                               hierarchy=_hierarchy()[:2] + tiles + [old])
    assert state["error"] is None, state["error"] + log
    out = tmp_path / "proj" / "pathapp" / "7" / "my slide"
    patches = assert_qupath_conformant(out / "saliency-rollout.geojson")
    assert len(patches) == 2 * 16  # two tiles of 4 x 4 patch tokens (56 px, ViT/14)
    sel = shapely.union_all([shape(f["geometry"]) for f in tiles[:2]])
    assert all(sel.contains(shape(f["geometry"]).centroid) for f in patches)
    names = [o["name"] for o in state["objects"]]
    assert names.count("pathapp: saliency rollout") == 32 and "pathapp: saliency vitcx" not in names
    assert sum(n is not None and not n.startswith("pathapp: saliency") for n in names) == 3  # tiles kept
    assert state["calls"][0] == "exportObjectsToGeoJson FEATURE_COLLECTION"
    assert state["calls"][-4:] == ["removeObjects 1", "addObjects 32", "resolveHierarchy", "fireHierarchyUpdate"]
    heat = state["heatmap"]
    assert (heat["measurement"], heat["n"], heat["min"], heat["max"]) == ("saliency (0-1)", 32, 0.0, 1.0)
    assert "saliency (0-1)" in patches[0]["properties"]["measurements"]


@pytest.fixture(scope="module")
def seg_bundle(tmp_path_factory) -> Path:
    from test_segment import local_seg_bundle  # a tiny ViT + linear head that splits real tissue in two

    return local_seg_bundle(tmp_path_factory.mktemp("seg"))


def test_run_script_files_segmentation_regions_under_the_selected_annotation(groovy: str, slide: Path,
                                                                             seg_bundle: Path, tmp_path: Path) -> None:
    """A segmentation bundle on the selected annotation: its regions (clipped by pathapp) become
    children of that annotation, inside it, with their measurements, replacing an earlier run's
    regions there and leaving pathapp objects elsewhere alone."""
    hierarchy = _hierarchy()

    def earlier(parent: int) -> dict:  # a region an earlier run filed under hierarchy[parent]
        square = shape(hierarchy[parent]["geometry"]).representative_point().buffer(5).envelope
        return {"type": "Feature", "geometry": shapely.geometry.mapping(square),
                "properties": {"objectType": "annotation", "name": "pathapp: Tissue", "parent": parent}}

    state, log = _run_stand_in(groovy, RUN, tmp_path, slide, _settings(seg_bundle),
                               hierarchy=hierarchy + [earlier(0), earlier(1)])
    assert state["error"] is None, state["error"] + log
    out = tmp_path / "proj" / "pathapp" / "7" / "my slide"
    assert not (out / "tiles.geojson").exists()  # a segmentation writes its regions only
    regions = assert_qupath_conformant(out / "annotations.geojson")
    assert len(regions) >= 2 and {f["properties"]["classification"]["name"] for f in regions} == {"Tissue"}
    objects = {o["id"]: o for o in state["objects"]}
    (selected,) = [o for o in objects.values() if o["selected"]]
    outline = shape(selected["geometry"])
    children = [o for o in objects.values() if o["parent"] == selected["id"]]
    # the earlier region under the selected annotation was replaced, not added to
    assert {shape(o["geometry"]).wkt for o in children} == {shape(f["geometry"]).wkt for f in regions}
    assert len(children) == len(regions)
    for o in children:
        assert o["objectType"] == "annotation" and o["name"] == "pathapp: Tissue"
        assert outline.covers(shape(o["geometry"]))  # clipped: nothing sticks out of the annotation
        assert o["measurements"]["Area µm^2"] > 0 and 0.5 <= o["measurements"]["Mean prob"] <= 1.0
    # pathapp clipped them: the tiles it segmented reach beyond the annotation
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["tiles"] >= 4 and shapely.union_all([shape(f["geometry"]) for f in regions]).area < outline.area
    # objects not under that annotation stay: the user's two, the earlier region under the other, the root-level ones
    kept = [o for o in objects.values() if o["parent"] != selected["id"]]
    assert sorted(o["name"] or "" for o in kept) == ["", "", "pathapp", "pathapp: Tissue", "pathapp: Tumor"]
    assert [o["parent"] for o in kept if o["name"] == "pathapp: Tissue"] == [state["objects"][1]["id"]]
    n = len(regions)
    assert state["calls"][1:] == ["removeObjects 1"] + ["addObjectBelowParent"] * n + ["fireHierarchyUpdate"]
    assert re.search(r"^pathapp \| segment: my slide: \d+ tiles", log, flags=re.M), log  # pathapp says it segments
    assert f"pathapp: segmentation bundle: {n} regions under 1 annotation(s)\n" in log
    assert state["heatmap"] is None  # QuPath's measurement maps colour detections only


def test_run_script_container_mode(groovy: str, slide: Path, bundle: Path, tmp_path: Path) -> None:
    docker = tmp_path / "bin" / "docker"
    docker.parent.mkdir()
    docker.write_text(f"#!/bin/sh\nexec {sys.executable} {HERE / 'fake_docker.py'} \"$@\"\n")
    docker.chmod(0o755)
    env = {"FAKE_DOCKER_LOG": str(tmp_path / "docker.json"), "FAKE_DOCKER_PATHAPP": str(PATHAPP)}
    settings = _settings(bundle, MODE="container", DOCKER=str(docker), CONTAINER_IMAGE="pathapp:test",
                         PATHAPP="/not/used")
    state, _ = _run_stand_in(groovy, RUN, tmp_path, slide, settings, env)
    call = json.loads((tmp_path / "docker.json").read_text())
    assert call["problems"] == [] and call["image"] == "pathapp:test"
    assert call["mounts"] == {str(slide.parent): [str(slide.parent), "ro"],
                              str(tmp_path / "proj" / "pathapp" / "7"): [str(tmp_path / "proj" / "pathapp" / "7"), "rw"],
                              str(bundle.parent): [str(bundle.parent), "ro"]}
    assert ["--user", f"{os.getuid()}:{os.getgid()}"] in call["options"] and ["-e", "HOME=/tmp"] in call["options"]
    assert call["args"][:2] == ["infer", str(slide)]
    _check_imported(state, tmp_path / "proj" / "pathapp" / "7" / "my slide")


def test_run_script_fails_visibly(groovy: str, slide: Path, tmp_path: Path) -> None:
    state, log = _run_stand_in(groovy, RUN, tmp_path, slide, _settings(tmp_path / "m", OBJECT_TYPE="polygon"))
    assert state["error"].startswith("pathapp failed (exit code 2)") and "polygon" in state["error"]
    assert "pathapp | " in log  # pathapp's own message reached the log
    assert [o["name"] for o in state["objects"]].count("pathapp: Tumor") == 1  # nothing removed on failure
    state, _ = _run_stand_in(groovy, RUN, tmp_path, slide, _settings(tmp_path / "m", PATHAPP="/no/such/pathapp"))
    assert "set PATHAPP at the top of this script" in state["error"]


def test_import_script_finds_each_layout(groovy: str, computed, slide: Path, tmp_path: Path) -> None:
    results = computed[1] / "my slide"
    # nothing there yet: the image is skipped with a line, not an error
    state, log = _run_stand_in(groovy, IMPORT, tmp_path, slide, {})
    assert state["error"] is None and state["calls"] == [] and "pathapp: no results for my slide" in log
    # a folder of per-slide results (pathapp infer slides/ --out DIR)
    state, _ = _run_stand_in(groovy, IMPORT, tmp_path, slide, {"RESULTS_ROOT": str(computed[1])})
    _check_imported(state, results)
    # <project>/pathapp/<entry ID>/ as `pathapp infer project.qpproj` writes it
    shutil.copytree(results, tmp_path / "proj" / "pathapp" / "7")
    state, _ = _run_stand_in(groovy, IMPORT, tmp_path, slide, {})
    _check_imported(state, results)


def test_groovy_slide_stem_matches_pathapp(groovy: str, tmp_path: Path) -> None:
    """The scripts find results by the folder name pathapp gives a slide: same rule on both sides."""
    from pathapp.slide import open_slide

    names = ["my slide.svs", "a.b.svs", "OS-1-detail.ome.tif", "series"]
    sources = [SVS, SVS, "wsi/ome-tiff/OS-1-detail.ome.tif", "dicom/cmu-1-small-region-wsi2dcm"]
    for name, src in zip(names, sources):
        (tmp_path / name).symlink_to(data_file(src), target_is_directory=(name == "series"))
    stem = re.search(r"(def slideStem = \{.*?\n\})", RUN.read_text(), flags=re.S).group(1)
    assert stem in IMPORT.read_text()  # one rule, in both scripts
    probe = tmp_path / "probe.groovy"
    probe.write_text(stem + "\n" + "".join(f'println slideStem(new File("{tmp_path / n}"))\n' for n in names))
    proc = subprocess.run([groovy, str(probe)], capture_output=True, text=True, env=_groovy_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = []
    for n in names:
        with open_slide(tmp_path / n) as s:
            expected.append(s.name)
    assert proc.stdout.split("\n")[: len(names)] == expected


# QuPath's server paths (createID of RotatedImageServer, CroppedImageServer, AffineTransformImageServer
# and PyramidGeneratingImageServer, identical in 0.4.4 and 0.6.0) around a plain file's server path.
def _server_paths(image: Path) -> dict[str, str | None]:
    base = image.as_uri()
    return {
        "rotated": f"PyramidGeneratingImageServer:qupath.lib.images.servers.RotatedImageServer: {base} (Rotate=90)",
        "cropped": f'qupath.lib.images.servers.CroppedImageServer: + {base} {{"x":10,"y":20,"width":100,"height":90}}',
        "affine-transformed": f"qupath.lib.images.servers.AffineTransformImageServer: + {base} [1,0,0,1,5,5]",
        None: f"qupath.lib.images.servers.RotatedImageServer: {base} (Rotate=0)",  # shown as stored
    }


def test_moved_by_reads_qupath_server_paths(groovy: str, tmp_path: Path) -> None:
    """The scripts' rule for images QuPath shows moved, run on QuPath's own server paths."""
    rule = re.search(r"(def movedBy = \{.*?\n\})", RUN.read_text(), flags=re.S).group(1)
    paths = _server_paths(tmp_path / "my slide.svs")
    probe = tmp_path / "probe.groovy"
    probe.write_text(rule + "\n" + "".join(f"println movedBy({json.dumps(p)}).join(',')\n" for p in paths.values()))
    proc = subprocess.run([groovy, str(probe)], capture_output=True, text=True, env=_groovy_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[: len(paths)] == [k or "" for k in paths]


def test_scripts_refuse_images_shown_transformed(groovy: str, slide: Path, bundle: Path, tmp_path: Path) -> None:
    """Rotated, cropped or affine-transformed in QuPath: the run script stops before pathapp runs,
    the import script skips the image; both say why in one line. A misspelled colour map stops the
    run script before any work too."""
    paths = _server_paths(slide)
    state, _ = _run_stand_in(groovy, RUN, tmp_path, slide, _settings(bundle), server_path=paths["rotated"])
    assert state["error"].startswith("pathapp: QuPath shows this image rotated, but pathapp reads the file as stored")
    assert state["calls"] == [] and not (tmp_path / "proj" / "pathapp").exists()
    state, log = _run_stand_in(groovy, IMPORT, tmp_path, slide, {}, server_path=paths["cropped"])
    assert state["error"] is None and state["calls"] == []
    assert "pathapp: skipped entry 7: QuPath shows this image cropped" in log
    state, _ = _run_stand_in(groovy, RUN, tmp_path, slide, _settings(bundle, HEATMAP_COLORMAP="Viridiss"))
    assert state["error"] == 'pathapp: HEATMAP_COLORMAP "Viridiss" is not a QuPath colour map; use one of Viridis, Magma'
    assert state["calls"] == [] and not (tmp_path / "proj" / "pathapp").exists()


def test_import_reads_the_new_results_before_removing_the_old(groovy: str, computed, slide: Path,
                                                              tmp_path: Path) -> None:
    """A results file that cannot be read stops the import with the earlier pathapp objects kept."""
    results = tmp_path / "results" / "my slide"
    shutil.copytree(computed[1] / "my slide", results)
    (results / "tiles.geojson").write_text('{"type": "FeatureCollection", "features": [')  # cut short
    state, _ = _run_stand_in(groovy, IMPORT, tmp_path, slide, {"RESULTS_ROOT": str(results.parent)})
    assert state["error"] is not None and state["calls"] == []
    assert sorted(o["name"] or "" for o in state["objects"]) == ["", "", "pathapp", "pathapp: Tumor"]


# ---------------------------------------------------------------------------- pathapp_search.groovy

# Beyond the launcher's calls: ImageJ 1.x (bundled with QuPath 0.4-0.6) to show the mosaic, Groovy's
# JSON reader, java.io.File, and the script's own closure.
SEARCH_EXTRA = {"openImage", "show", "JsonSlurper", "parse", "getCanonicalFile", "isSearchHit"}


def test_search_script_calls_only_documented_api() -> None:
    text = (DATA.parent / "docs" / "INTEROP.md").read_text() if (DATA.parent / "docs" / "INTEROP.md").exists() else None
    if text is None:
        (pytest.fail if IN_CI else pytest.skip)("INTEROP.md missing")
    named = set(re.findall(r"\b([A-Za-z_]\w*)\b", text))
    unknown = _calls(SEARCH) - named - EXTRA_QUPATH_API - NOT_QUPATH - SEARCH_EXTRA
    assert not unknown, f"pathapp_search.groovy calls QuPath API not in INTEROP.md: {sorted(unknown)}"
    for imp in re.findall(r"^import (qupath\.[\w.]+)", SEARCH.read_text(), flags=re.M):
        assert imp.rsplit(".", 1)[1] in text, f"pathapp_search.groovy imports {imp}, not in INTEROP.md"
    help_text = subprocess.run([str(PATHAPP), "search", "--help"], capture_output=True, text=True).stdout
    for option in re.findall(r'"(--[a-z-]+)"', SEARCH.read_text()):
        assert option in help_text, f"the search script passes {option}, which `pathapp search` lacks"


def test_search_script_streams_pathapp_like_the_launcher() -> None:
    """One way to run pathapp and stream its log, written in both scripts (QuPath scripts cannot share code)."""
    block = re.compile(r"^def lastLines = .*?pathapp failed \(exit code .*?$", flags=re.S | re.M)
    assert block.search(RUN.read_text())[0] == block.search(SEARCH.read_text())[0]


@pytest.fixture(scope="module")
def search_index(tmp_path_factory, bundle: Path) -> tuple[Path, Path]:
    """An index holding the slide the stand-in has open (embedded on the way), and that slide."""
    folder = tmp_path_factory.mktemp("search")
    slide = _link_slide(folder)
    proc = subprocess.run([str(PATHAPP), "index", "add", str(folder / "idx"), str(slide), "--model", str(bundle),
                           "--mpp", "1.0", "--out", str(folder / "res"), "--workers", "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout
    return folder / "idx", slide


def test_search_script_shows_mosaic_and_adds_hits_in_this_image(groovy: str, search_index, tmp_path: Path) -> None:
    index, slide = search_index
    settings = {"PATHAPP": str(PATHAPP), "INDEX": str(index), "K": 6, "LEVEL": "tile"}
    state, log = _run_stand_in(groovy, SEARCH, tmp_path, slide, settings)
    assert state["error"] is None, state["error"]
    out = tmp_path / "proj" / "pathapp" / "7" / "search"
    query = json.loads((out / "query.geojson").read_text())["features"]
    assert len(query) == 1  # the selected annotation only
    assert f"IJ.openImage {out / 'mosaic.png'}" in log and f"IJ.show {out / 'mosaic.png'}" in log
    assert (out / "mosaic.png").stat().st_size > 10_000
    hits = [o for o in state["objects"] if (o["name"] or "").startswith("pathapp search #")]
    assert len(hits) == 6 and all(o["objectType"] == "detection" for o in hits)  # all hits lie in this slide
    assert state["calls"][-4:] == ["removeObjects 0", "addObjects 6", "resolveHierarchy", "fireHierarchyUpdate"]
    assert re.search(r"^pathapp \| search: \d+ query tile", log, flags=re.M), log
    assert sum(1 for o in state["objects"] if o["name"] is None) == 2  # the user's annotations stay


def test_search_script_fails_visibly(groovy: str, search_index, tmp_path: Path) -> None:
    _, slide = search_index
    state, log = _run_stand_in(groovy, SEARCH, tmp_path, slide, {"PATHAPP": str(PATHAPP), "INDEX": str(tmp_path / "none")})
    assert state["error"].startswith("pathapp failed (exit code 2)") and "no index here" in state["error"]
    assert "removeObjects" not in " ".join(state["calls"])  # nothing removed on failure
