"""`pathapp cytomine task`: the App Engine contract end to end on a real slide. Inputs are files in
an inputs folder (as the App Engine writes them); every output declared in descriptor.yml must
exist and parse as its declared type.

The App Engine starts the task container with no command and no arguments (cytomine/cytomine
app-engine `KubernetesScheduler`: the "task" container has an image and the two folders mounted,
nothing else), so the image's entry point, docker/entrypoint.sh, is run here the same way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import shapely
import yaml
from click.testing import CliRunner

from conftest import data_file
from pathapp.cli import cli
from pathapp.qupath.geojson import read_objects

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEIGHT = 2967


def parse_value(path: Path, type_spec: dict | str) -> object:
    """Read an output as its descriptor type, failing on anything that is not."""
    type_id = type_spec if isinstance(type_spec, str) else type_spec["id"]
    if type_id == "array":
        assert path.is_dir(), path
        size = yaml.safe_load((path / "array.yml").read_text())["size"]
        assert sorted(p.name for p in path.iterdir()) == sorted(["array.yml", *map(str, range(size))])
        return [parse_value(path / str(i), type_spec["subtype"]) for i in range(size)]
    assert path.is_file(), path
    text = path.read_text(encoding="utf-8")
    if type_id == "geometry":
        geom = shapely.from_geojson(text)
        assert geom.is_valid and not geom.is_empty and geom.geom_type == "Polygon"
        return geom
    if type_id == "string":
        return text
    if type_id == "file":
        return json.loads(text)
    raise AssertionError(f"unexpected output type {type_id}")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from vit_factory import tiny_bundle

    folder = tmp_path_factory.mktemp("models")
    tiny_bundle(folder, num_classes=2, filename="tiny.pathapp")
    return folder


@pytest.fixture()
def inputs(tmp_path: Path) -> Path:
    """An inputs folder as the App Engine lays it out: one file per input, the image as `image`."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    shutil.copyfile(data_file("wsi/aperio/CMU-1-Small-Region.svs"), folder / "image")
    (folder / "model").write_text("tiny\n")
    (folder / "mpp").write_text("2")
    (folder / "min_prob").write_text("0.0")
    return folder


def run_task(inputs: Path, outputs: Path, models: Path):
    return CliRunner().invoke(cli, ["cytomine", "task", "--inputs", str(inputs), "--outputs", str(outputs),
                                   "--models-dir", str(models), "--device", "cpu"])


def test_task_inputs_to_outputs(inputs: Path, models: Path, tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    res = run_task(inputs, outputs, models)
    assert res.exit_code == 0, res.output
    declared = yaml.safe_load((ROOT / "descriptor.yml").read_text())["outputs"]
    assert sorted(p.name for p in outputs.iterdir()) == sorted(declared)  # nothing else left behind
    values = {name: parse_value(outputs / name, spec["type"]) for name, spec in declared.items()}

    assert values["class_names"] == ["Tumor", "Stroma"]
    run = values["run"]
    assert run["counts"]["tiles"] > 0 and run["mpp"] == 2
    # The region polygons are the GeoJSON regions, mirrored into Cytomine's bottom-left frame.
    regions = {o.class_name: o.geometry for o in read_objects(values["annotations"])}
    for name, polys in zip(values["class_names"], values["class_regions"]):
        if name not in regions:
            assert polys == []
            continue
        flipped = shapely.transform(regions[name], lambda xy: xy * (1, -1) + (0, HEIGHT))
        assert shapely.union_all(polys).symmetric_difference(flipped).area < 1.0
    assert len(read_objects(values["tiles"])) == run["counts"]["tiles"]
    assert "tiles" in res.output


def test_task_bad_number_names_the_input(inputs: Path, models: Path, tmp_path: Path) -> None:
    (inputs / "mpp").write_text("half")
    res = run_task(inputs, tmp_path / "o", models)
    assert res.exit_code != 0
    assert str(inputs / "mpp") in str(res.exception) and "'half'" in str(res.exception)


def test_task_without_model_input_uses_the_baked_bundle(inputs: Path, models: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No model input: the image's bundle ($PATHAPP_DEFAULT_MODEL, set by the Dockerfile), else one line."""
    (inputs / "model").unlink()
    monkeypatch.delenv("PATHAPP_DEFAULT_MODEL", raising=False)
    res = run_task(inputs, tmp_path / "o", models)
    assert res.exit_code != 0
    assert "no model given and no default bundle" in str(res.exception) and "MODEL_BUNDLE" in str(res.exception)
    monkeypatch.setenv("PATHAPP_DEFAULT_MODEL", "nope.pathapp")
    res = run_task(inputs, tmp_path / "o", models)
    assert "'nope.pathapp' not found" in str(res.exception) and "tiny.pathapp" in str(res.exception)


def test_task_unknown_model_lists_available(inputs: Path, models: Path, tmp_path: Path) -> None:
    (inputs / "model").write_text("nope")
    res = run_task(inputs, tmp_path / "o", models)
    assert res.exit_code != 0
    assert "'nope' not found" in str(res.exception) and "tiny.pathapp" in str(res.exception)


def test_keep_confident_drops_uncertain_tiles() -> None:
    import numpy as np

    from pathapp.cytomine.analyse import keep_confident
    from pathapp.results.result import SlideResult

    probs = np.array([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8]], np.float32)
    result = SlideResult(slide_path="s.svs", slide_name="s", coords=np.array([[0, 0], [10, 0], [20, 0]]),
                         footprint=10.0, tile_size=56, mpp=2.0, slide_mpp=0.5, slide_size=(30, 10),
                         class_names=["A", "B"], class_colors=[(1, 2, 3), (4, 5, 6)], probs=probs,
                         embeddings=np.arange(6, dtype=np.float32).reshape(3, 2),
                         extra={"tissue fraction": np.array([1.0, 0.5, 0.7])})
    kept = keep_confident(result, 0.6)
    assert kept.coords.tolist() == [[0, 0], [20, 0]]
    assert kept.probs.tolist() == probs[[0, 2]].tolist() and kept.embeddings.tolist() == [[0, 1], [4, 5]]
    assert kept.extra["tissue fraction"].tolist() == [1.0, 0.7] and kept.params["min_prob"] == 0.6
    assert len(result) == 3 and keep_confident(result, 0.0) is result


def _entrypoint(args: list[str], env: dict[str, str], bin_dir: Path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PATHAPP_")}
    clean["PATH"] = f"{bin_dir}{os.pathsep}{clean['PATH']}"
    return subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, env={**clean, **env},
                          timeout=600)


def test_entrypoint_runs_the_task_without_arguments_and_the_cli_with(tmp_path: Path) -> None:
    """Which command the entry point starts: a `pathapp` that records its arguments stands in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.json"
    (bin_dir / "pathapp").write_text(f"#!{sys.executable}\nimport json, sys\n"
                                     f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    (bin_dir / "pathapp").chmod(0o755)
    cfg = yaml.safe_load((ROOT / "descriptor.yml").read_text())["configuration"]
    assert _entrypoint([], {}, bin_dir).returncode == 0
    assert json.loads(record.read_text()) == ["cytomine", "task", "--inputs", cfg["input_folder"],
                                              "--outputs", cfg["output_folder"]]
    job_line = json.loads((ROOT / "descriptor.json").read_text())["command-line"].split()[:4]
    for args in (["infer", "my slide.svs", "--model", "/models/x.pathapp"], job_line, ["--version"]):
        assert _entrypoint(args, {}, bin_dir).returncode == 0
        assert json.loads(record.read_text()) == args


def test_entrypoint_without_arguments_runs_a_task_on_sample_inputs(models: Path, tmp_path: Path) -> None:
    """The container's default command on an /inputs folder as the App Engine fills it (the image and
    one optional input; no model input, so the bundle baked into the image is used), with the real
    pathapp: every declared output is written and parses as its type."""
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    outputs.mkdir()
    shutil.copyfile(data_file("wsi/aperio/CMU-1-Small-Region.svs"), inputs / "image")
    (inputs / "mpp").write_text("2")
    env = {"PATHAPP_TASK_INPUTS": str(inputs), "PATHAPP_TASK_OUTPUTS": str(outputs),
           "PATHAPP_MODELS": str(models), "PATHAPP_DEFAULT_MODEL": "tiny.pathapp"}
    proc = _entrypoint([], env, Path(sys.executable).parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    declared = yaml.safe_load((ROOT / "descriptor.yml").read_text())["outputs"]
    assert sorted(p.name for p in outputs.iterdir()) == sorted(declared)
    values = {name: parse_value(outputs / name, spec["type"]) for name, spec in declared.items()}
    assert values["class_names"] == ["Tumor", "Stroma"] and values["run"]["counts"]["tiles"] > 0
    assert values["run"]["model"] == "tiny" and "tiles" in proc.stdout
    # A failing task exits non-zero with one line, which is how the App Engine learns it failed.
    (inputs / "mpp").write_text("half")
    proc = _entrypoint([], env, Path(sys.executable).parent)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == \
        [f"error: {inputs / 'mpp'}: cannot read 'half' as float; fix the input value"]
