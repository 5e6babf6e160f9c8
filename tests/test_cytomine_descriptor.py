"""descriptor.json (legacy Cytomine software router) and descriptor.yml (App Engine task.v0) are
checked against the keys and types their readers use: the router's boutiques Interpreter
(Cytomine-software-router `Interpreter.groovy`: id, type, value-key, command-line-flag, optional,
default-value, set-by-server, uri, uri-print-attribute, uri-sort-attribute) and the App Engine's
task.v0.json schema (required keys, name/namespace/semver patterns, typed inputs and outputs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
import yaml

from pathapp.cli.cytomine import job, task
from pathapp.cytomine.wkt import flip_y, from_cytomine_wkt, scale_to_cytomine, to_cytomine_wkt

ROOT = Path(__file__).resolve().parents[1]
ROUTER_TYPES = {"String", "Number", "Boolean", "Domain", "ListDomain", "Date", "List"}
SERVER_SET = {"cytomine_host", "cytomine_public_key", "cytomine_private_key", "cytomine_id_project",
              "cytomine_id_software"}
INPUT_KEYS = {"id", "name", "description", "type", "value-key", "command-line-flag", "optional",
              "default-value", "set-by-server", "server-parameter", "uri", "uri-print-attribute",
              "uri-sort-attribute", "minimum", "maximum", "equals", "values-choice"}


@pytest.fixture(scope="module")
def descriptor() -> dict:
    return json.loads((ROOT / "descriptor.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def task_descriptor() -> dict:
    return yaml.safe_load((ROOT / "descriptor.yml").read_text(encoding="utf-8"))


def test_descriptor_top_level(descriptor: dict) -> None:
    assert descriptor["schema-version"] == "cytomine-0.1"
    assert descriptor["name"] and descriptor["description"]
    image = descriptor["container-image"]
    assert image["type"] in {"singularity", "docker"} and image["image"]
    assert descriptor["command-line"].startswith("cytomine job ")


def test_every_input_is_well_typed(descriptor: dict) -> None:
    ids = [i["id"] for i in descriptor["inputs"]]
    assert len(ids) == len(set(ids))
    for inp in descriptor["inputs"]:
        assert set(inp) <= INPUT_KEYS, f"{inp['id']}: keys the router does not read: {set(inp) - INPUT_KEYS}"
        assert re.fullmatch(r"[a-z][a-z0-9_]*", inp["id"])
        assert inp["type"] in ROUTER_TYPES
        assert inp["value-key"] == "@ID" and inp["command-line-flag"] == "--@id"
        assert isinstance(inp["optional"], bool) and isinstance(inp["set-by-server"], bool)
        assert inp["name"] and inp["description"]
        if "default-value" in inp:
            expected = {"Number": (int, float), "String": str, "Boolean": bool}[inp["type"]]
            assert isinstance(inp["default-value"], expected), inp["id"]
        if inp["type"] in {"Domain", "ListDomain"}:
            assert inp["uri"].startswith("/api/") and inp["uri"].endswith(".json")
            assert inp["uri-print-attribute"] and inp["uri-sort-attribute"]


def test_server_set_and_domain_inputs(descriptor: dict) -> None:
    by_id = {i["id"]: i for i in descriptor["inputs"]}
    assert {k for k, v in by_id.items() if v["set-by-server"]} == SERVER_SET
    images = by_id["cytomine_id_images"]
    assert images["type"] == "ListDomain" and not images["optional"]
    assert images["uri"] == "/api/project/$currentProject$/imageinstance.json"
    roi = by_id["cytomine_id_roi_term"]
    assert roi["type"] == "Domain" and roi["optional"]
    assert roi["uri"] == "/api/ontology/$currentOntology$/term.json"
    for name in ("model", "mpp", "tile_size", "batch_size", "upload", "min_prob", "term_mapping"):
        assert name in by_id, name


def test_command_line_has_every_value_key_once(descriptor: dict) -> None:
    words = descriptor["command-line"].split()
    for inp in descriptor["inputs"]:
        key = inp["value-key"].replace("@ID", inp["id"].upper())
        assert words.count(key) == 1, key
    assert len(words) == 2 + len(descriptor["inputs"])


def router_command(descriptor: dict, values: dict[str, str]) -> list[str]:
    """The argv the router builds: each value key replaced by '<flag> <value>'."""
    flags = {i["id"].upper(): (i["command-line-flag"].replace("@id", i["id"]), i) for i in descriptor["inputs"]}
    argv: list[str] = []
    for word in descriptor["command-line"].split():
        if word in flags:
            flag, inp = flags[word]
            argv += [flag, str(values.get(inp["id"], inp.get("default-value", "")))]
        else:
            argv.append(word)
    return argv


def test_cli_accepts_every_descriptor_flag(descriptor: dict) -> None:
    """The click command parses the exact argv the router builds from the descriptor's defaults."""
    values = {"cytomine_host": "http://localhost", "cytomine_public_key": "a", "cytomine_private_key": "b",
              "cytomine_id_project": "1", "cytomine_id_software": "2", "cytomine_id_images": "3,4",
              "cytomine_id_roi_term": ""}
    argv = router_command(descriptor, values)
    assert argv[:2] == ["cytomine", "job"]
    ctx = job.make_context("job", argv[2:])
    for inp in descriptor["inputs"]:
        assert inp["id"] in ctx.params, inp["id"]
        if "default-value" in inp and inp["id"] not in values:
            assert ctx.params[inp["id"]] == inp["default-value"], inp["id"]


def test_cli_drops_a_bare_flag_left_by_an_empty_optional_value(descriptor: dict) -> None:
    """An empty optional value leaves `--flag` next to the following flag once the shell splits the
    router's command line; the flag must not swallow its neighbour."""
    values = {"cytomine_host": "h", "cytomine_public_key": "a", "cytomine_private_key": "b",
              "cytomine_id_project": "1", "cytomine_id_software": "2", "cytomine_id_images": "3",
              "cytomine_id_roi_term": "", "model": "tiny", "term_mapping": ""}
    argv = " ".join(router_command(descriptor, values)).split()
    assert "--cytomine_id_roi_term" in argv and argv[-1] == "--term_mapping"
    ctx = job.make_context("job", argv[2:])
    assert ctx.params["cytomine_id_roi_term"] == "" and ctx.params["model"] == "tiny"
    assert ctx.params["term_mapping"] == "" and ctx.params["cytomine_id_images"] == "3"


# ---------------------------------------------------------------- App Engine descriptor.yml

TYPE_IDS = {"integer", "number", "boolean", "string", "enumeration", "datetime", "geometry", "file", "image", "array"}
SEMVER = r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?"


def check_type(t: object, where: str) -> str:
    type_id = t if isinstance(t, str) else t["id"]  # type: ignore[index]
    assert type_id in TYPE_IDS, where
    if type_id == "array":
        assert isinstance(t, dict) and "subtype" in t, where
        check_type(t["subtype"], where + "/subtype")
    if type_id == "enumeration":
        assert isinstance(t, dict) and t["values"], where
    return type_id


def test_task_descriptor_schema(task_descriptor: dict) -> None:
    d = task_descriptor
    for key in ("$schema", "name", "namespace", "version", "authors", "configuration", "inputs", "outputs"):
        assert key in d, key
    assert d["$schema"].endswith("task.v0.json")
    assert 3 <= len(d["name"]) <= 30 and re.fullmatch(r"[a-zA-Z0-9_\s\-]+", d["name"])
    assert re.fullmatch(r"[a-zA-Z0-9_]*(\.[a-zA-Z0-9_-]+)+", d["namespace"])
    assert re.fullmatch(SEMVER, d["version"])
    assert d["authors"] and all({"first_name", "last_name", "organization", "email"} <= set(a) for a in d["authors"])
    cfg = d["configuration"]
    assert cfg["input_folder"] == "/inputs" and cfg["output_folder"] == "/outputs"
    assert cfg["image"]["file"].startswith("/") and cfg["image"]["file"].endswith(".tar")
    for section in ("inputs", "outputs"):
        for name, param in d[section].items():
            assert re.fullmatch(r"[a-zA-Z0-9_]+", name)
            assert param["description"], name
            type_id = check_type(param["type"], f"{section}/{name}")
            if section == "outputs":
                assert "default" not in param and "optional" not in param, name
            elif "default" in param:
                py = {"integer": int, "number": (int, float), "string": str, "boolean": bool}[type_id]
                assert isinstance(param["default"], py), name


def test_task_descriptor_matches_the_task(task_descriptor: dict) -> None:
    """The inputs the task reads and the outputs it writes are the ones declared."""
    from pathapp.cytomine import task as task_module

    assert set(task_descriptor["inputs"]) == {"image", "model", "mpp", "tile_size", "min_prob"}
    assert task_descriptor["inputs"]["model"]["optional"]  # empty: the bundle baked into the image
    assert task_descriptor["inputs"]["image"]["type"]["id"] == "image"
    outputs = task_descriptor["outputs"]
    assert set(outputs) == {"class_names", "class_regions"} | set(task_module.OUTPUT_FILES)
    assert outputs["class_regions"]["type"]["subtype"]["subtype"]["id"] == "geometry"
    assert {p.name for p in task.params} >= {"inputs_dir", "outputs_dir"}
    assert isinstance(task, click.Command)


# ---------------------------------------------------------------- bottom-left WKT


def test_wkt_flips_y_both_ways() -> None:
    import shapely

    height = 2967
    poly = shapely.Polygon([(100, 200), (400, 200), (400, 250), (100, 250)])
    wkt = to_cytomine_wkt(poly, height)
    back = shapely.from_wkt(wkt)
    assert {(round(x), round(y)) for x, y in back.exterior.coords} == {(100, 2767), (400, 2767), (400, 2717), (100, 2717)}
    assert back.exterior.is_ccw
    assert from_cytomine_wkt(wkt, height).equals(poly)
    assert flip_y(flip_y(poly, height), height).equals(poly)


def test_wkt_between_a_file_and_cytomine_s_image_at_another_size() -> None:
    """The file at half the size Cytomine shows: file px are scaled up, then flipped with
    Cytomine's height; the way back undoes both. Another aspect ratio is refused."""
    import shapely

    from pathapp.errors import PathappError

    scale = scale_to_cytomine((1110, 1500), (2220, 3000), "image 1")
    assert scale == (2.0, 2.0) and scale_to_cytomine((5, 7), (5, 7), "x") == (1.0, 1.0)
    poly = shapely.box(100, 200, 400, 250)
    wkt = to_cytomine_wkt(poly, 3000, scale=scale)
    assert shapely.from_wkt(wkt).equals(shapely.box(200, 3000 - 500, 800, 3000 - 400))
    assert from_cytomine_wkt(wkt, 3000, scale).equals(poly)
    with pytest.raises(PathappError, match=r"image 1: the file is 1110x1500 px but Cytomine shows .* 2220x1500 px"):
        scale_to_cytomine((1110, 1500), (2220, 1500), "image 1")


# ---------------------------------------------------------------- the App Engine bundle


def docker_save_tar(path: Path, tags: list[str]) -> Path:
    """An image archive in `docker save`'s layout: manifest.json naming the config and layer files."""
    import io
    import tarfile

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as t:
        data = b"#!/bin/sh\n"
        info = tarfile.TarInfo("usr/local/bin/pathapp-entrypoint")
        info.size, info.mode = len(data), 0o755
        t.addfile(info, io.BytesIO(data))
    files = {
        "manifest.json": json.dumps([{"Config": "config.json", "RepoTags": tags, "Layers": ["layer/layer.tar"]}]),
        "config.json": json.dumps({"architecture": "amd64", "os": "linux",
                                   "config": {"Entrypoint": ["/usr/local/bin/pathapp-entrypoint"]}}),
        "layer/layer.tar": layer.getvalue(),
    }
    with tarfile.open(path, "w") as t:
        for name, content in files.items():
            raw = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            t.addfile(info, io.BytesIO(raw))
    return path


def test_bundle_is_what_the_app_engine_upload_reads(task_descriptor: dict, tmp_path: Path) -> None:
    """The zip as `TaskService.uploadTask` reads it: a root entry whose whole name matches
    descriptor.(yml|yaml), and a `.tar` entry whose name, split at its first '-', gives the
    namespace (dots -> slashes) and version the image is pushed as."""
    import tarfile
    import zipfile

    from click.testing import CliRunner

    from pathapp.cli import cli

    ns, version = task_descriptor["namespace"], task_descriptor["version"]
    tar = docker_save_tar(tmp_path / "saved.tar", [f"{ns.replace('.', '/')}:{version}"])
    res = CliRunner().invoke(cli, ["cytomine", "bundle", str(tar), "--descriptor", str(ROOT / "descriptor.yml"),
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out" / f"{ns}-{version}.zip"
    assert res.output.strip() == f"wrote {out}"
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
        descriptors = [n for n in names if re.fullmatch(r"descriptor\.(yml|yaml)", n.lower())]
        images = [n for n in names if n.endswith(".tar")]
        assert len(descriptors) == 1 and len(images) == 1 and len(names) == 2
        assert yaml.safe_load(z.read(descriptors[0])) == task_descriptor
        full = images[0][: -len(".tar")]
        assert (full[: full.index("-")].replace(".", "/"), full[full.index("-") + 1 :]) == \
            (ns.replace(".", "/"), version)
        assert "/" + images[0] == task_descriptor["configuration"]["image"]["file"]
        with z.open(images[0]) as f, tarfile.open(fileobj=f) as t:
            assert json.load(t.extractfile("manifest.json"))[0]["RepoTags"] == [f"{ns.replace('.', '/')}:{version}"]


def test_bundle_refuses_what_the_app_engine_would_misread(task_descriptor: dict, tmp_path: Path) -> None:
    from pathapp.cytomine.bundle import write_task_bundle
    from pathapp.errors import PathappError

    wrong_tag = docker_save_tar(tmp_path / "t.tar", ["pathapp:latest"])
    with pytest.raises(PathappError, match=r"tagged \['pathapp:latest'\], not 'org/pathapp/dinov2/tiles:0.1.0'"):
        write_task_bundle(ROOT / "descriptor.yml", wrong_tag, tmp_path)
    (tmp_path / "not.tar").write_bytes(b"not a tar")
    with pytest.raises(PathappError, match="not an image saved by `docker save`"):
        write_task_bundle(ROOT / "descriptor.yml", tmp_path / "not.tar", tmp_path)
    dashed = dict(task_descriptor, namespace="org.path-app.tiles")
    (tmp_path / "descriptor.yml").write_text(yaml.safe_dump(dashed))
    with pytest.raises(PathappError, match="contains '-'"):
        write_task_bundle(tmp_path / "descriptor.yml", wrong_tag, tmp_path)
    moved = dict(task_descriptor, configuration={**task_descriptor["configuration"], "image": {"file": "/x.tar"}})
    (tmp_path / "descriptor.yml").write_text(yaml.safe_dump(moved))
    with pytest.raises(PathappError, match="expects '/org.pathapp.dinov2.tiles-0.1.0.tar'"):
        write_task_bundle(tmp_path / "descriptor.yml", wrong_tag, tmp_path)
    assert not list(tmp_path.glob("*.zip"))
