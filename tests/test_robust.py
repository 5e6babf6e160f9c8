"""No surprises (issue #17): every bad input and fault gets one line (exit code ≠ 0, no traceback),
numbers are checked at the command line, a second run neither takes outputs for inputs nor keeps or
destroys results made with other settings, and an empty result says why. Real slides, tiny ViTs."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import shapely
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import yaml

from conftest import data_file
from qupath_projects import annotated_project
from ssl_tiny import TINY_SSL
from vit_factory import tiny_bundle

from pathapp.cli import COMMANDS, main
from pathapp.errors import DEBUG_ENV
from pathapp.models.bundle import load_bundle
from pathapp.qupath.geojson import QuPathObject, write_objects

SVS = "wsi/aperio/CMU-1-Small-Region.svs"  # 2220 x 2967 px at 0.499 µm/px
TINY_SLIDE = "wsi/aperio/openslide-python-small.svs"  # 16 x 16 px
NO_MPP = "wsi/aperio/tcga-cr-7395-01a-01-ts1.svs"
VECTRA = "wsi/qptiff/small_vectra.qptiff"  # 3-channel multiplex immunofluorescence
NCT_TILES = "tiles/nct-crc-he-100k-nonorm-samples"
BONE = "dicom/wsi2dcm-bone/jpeg.dicom"  # 957 x 715 px at 16.783 µm/px
UCSB = "labeled/ucsb-breast-cancer/labels.csv"  # 18 labelled images, 2 classes
COSCIA = "qupath/coscia-demo-project"  # a QuPath 0.6 project of a 1000² 15-channel image (not shipped)
MESSAGE = re.compile(r"^(error|failed|Error): ")

torch.set_num_threads(1)


def pathapp(*args: str) -> tuple[int, str, str]:
    """The console entry point (`pathapp.cli.main`) in-process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    argv, debug = sys.argv, os.environ.get(DEBUG_ENV)
    sys.argv = ["pathapp", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        if debug is None:  # `--debug` sets it for the process; keep tests independent
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = debug
    return code, out.getvalue(), err.getvalue()


def one_message(err: str) -> str:
    """The one `error:` / `failed:` / click `Error:` line of a failed command (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if MESSAGE.match(line)]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle"), num_classes=2)


@pytest.fixture(scope="module")
def evil(tmp_path_factory) -> Path:
    """A checkpoint whose pickle calls os.system when unpickled without weights_only."""

    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    path = tmp_path_factory.mktemp("evil") / "evil.pth"
    torch.save({"state_dict": Evil()}, path)
    return path


# id, argv (placeholders: {svs} {tiny} {nompp} {bundle} {out} {tmp} {evil} {file}), exit code, words the
# one message line must contain. "holds": behaviour that was already right and must stay so.
CASES = [
    ("tile --mpp inf", ["tile", "{svs}", "--mpp", "inf", "--out", "{out}"], 2, ["--mpp", "finite"]),
    ("tile --mpp 0.00001", ["tile", "{svs}", "--mpp", "0.00001", "--out", "{out}"], 2, ["--mpp", "0.01"]),
    ("tile --slide-mpp inf", ["tile", "{svs}", "--slide-mpp", "inf", "--out", "{out}"], 2, ["--slide-mpp"]),
    ("tile --min-tissue nan", ["tile", "{svs}", "--min-tissue", "nan", "--out", "{out}"], 2, ["--min-tissue"]),
    ("tile --tile-size 100000", ["tile", "{svs}", "--tile-size", "100000", "--out", "{out}"], 2, ["--tile-size"]),
    ("tile --out under a file", ["tile", "{svs}", "--out", "{file}/sub"], 1, ["failed:", "{svs}", "Error"]),
    ("infer --mpp inf", ["infer", "{svs}", "--model", "{bundle}", "--mpp", "inf", "--out", "{out}"], 2, ["--mpp"]),
    ("infer --slide-mpp inf", ["infer", "{svs}", "--model", "{bundle}", "--slide-mpp", "inf"], 2, ["--slide-mpp"]),
    ("infer --min-tissue nan", ["infer", "{svs}", "--model", "{bundle}", "--min-tissue", "nan"], 2, ["--min-tissue"]),
    ("infer --batch-size 0", ["infer", "{svs}", "--model", "{bundle}", "--batch-size", "0"], 2, ["--batch-size"]),
    ("infer --tile-size 100 (patch 14)", ["infer", "{svs}", "--model", "{bundle}", "--tile-size", "100", "--out",
                                          "{out}"], 2, ["tile size 100", "multiple of", "14", "--tile-size 98"]),
    ("infer --device tpu", ["infer", "{svs}", "--model", "{bundle}", "--device", "tpu", "--out", "{out}"], 2,
     ["--device 'tpu'", "cpu"]),
    ("infer --device cuda", ["infer", "{svs}", "--model", "{bundle}", "--device", "cuda", "--out", "{out}"], 2,
     ["--device cuda", "--device cpu"]),
    ("infer --device cuda:1", ["infer", "{svs}", "--model", "{bundle}", "--device", "cuda:1", "--out", "{out}"], 2,
     ["--device cuda:1"]),
    ("train --lr nan", ["train", "--data", "{svs}", "--out", "{tmp}/m.pathapp", "--lr", "nan"], 2, ["--lr"]),
    ("train --lora-alpha -inf", ["train", "--data", "{svs}", "--out", "{tmp}/m.pathapp", "--lora-alpha", "-inf"], 2,
     ["--lora-alpha"]),
    ("evaluate --holdout nan", ["evaluate", "--data", "{svs}", "--model", "{bundle}", "--out", "{out}", "--holdout",
                                "nan"], 2, ["--holdout"]),
    ("pretrain --max-minutes inf", ["pretrain", "--tiles", "{tmp}", "--out", "{out}", "--max-minutes", "inf"], 2,
     ["--max-minutes"]),
    ("pretrain --mpp 1e9", ["pretrain", "--tiles", "{tmp}", "--out", "{out}", "--mpp", "1e9"], 2, ["--mpp"]),
    ("model create --mpp 0", ["model", "create", "--backbone", "dinov2_vits14", "--mpp", "0", "--out",
                              "{tmp}/m.pathapp"], 2, ["--mpp"]),
    ("weights: malicious pickle", ["model", "create", "--backbone", "dinov2_vits14", "--weights", "{evil}",
                                   "--out", "{tmp}/m.pathapp"], 2, ["{evil}", "posix.system", "re-save it"]),
    # holds
    ("holds: infer slide without µm/px", ["infer", "{nompp}", "--model", "{bundle}", "--out", "{out}"], 1,
     ["failed:", "{nompp}", "--slide-mpp"]),
    ("holds: infer missing bundle", ["infer", "{svs}", "--model", "{tmp}/nope.pathapp"], 2, ["nope.pathapp"]),
    ("holds: info not a slide", ["info", "{file}"], 1, ["{file}"]),
    ("holds: tile --roi-class without --roi", ["tile", "{svs}", "--roi-class", "Tumor", "--out", "{out}"], 2,
     ["--roi"]),
    ("holds: infer --roi not GeoJSON", ["infer", "{svs}", "--model", "{bundle}", "--roi", "{file}"], 2, ["{file}"]),
    ("holds: truncated slide", ["infer", "{cut}", "--model", "{bundle}", "--out", "{out}"], 1, ["failed:", "{cut}"]),
    # a QuPath entry whose image is found by name must be that image (the project records size and channels)
    ("QuPath entry found by name is another image", ["infer", "{project}", "--model", "{bundle}", "--out", "{out}"],
     1, ["failed:", "entry 1", "{standin}", "(1445×1445 px, 3 channels)", "(1000×1000 px, 15 channels)"]),
    # fluorescence is never fed to a brightfield model: the file says so, or the background is dark
    ("infer a fluorescence QPTIFF", ["infer", "{vectra}", "--model", "{bundle}", "--out", "{out}"], 1,
     ["failed:", "{vectra}", "fluorescence image (3 channels; the file says so)", "pathapp tile"]),
    ("infer a dark-background image", ["infer", "{dark}", "--model", "{bundle}", "--slide-mpp", "1", "--out",
                                       "{out}"], 1, ["failed:", "{dark}", "its background is dark"]),
    ("qc a fluorescence QPTIFF", ["qc", "{vectra}", "--out", "{out}"], 1, ["failed:", "{vectra}", "fluorescence"]),
    ("train on a fluorescence slide's annotations", ["train", "--data", "{regions}", "--slides", "{vectra}", "--model",
                                                     "{bundle}", "--method", "prototype", "--out", "{tmp}/m.pathapp"],
     2, ["{vectra}", "fluorescence image (3 channels; the file says so)", "pathapp tile"]),
    ("train on labelled images, one fluorescence", ["train", "--data", "{fluo_labels}", "--model", "{bundle}",
                                                    "--method", "prototype", "--out", "{tmp}/m.pathapp"],
     2, ["{vectra}", "fluorescence image"]),
    ("train on a QuPath project of a fluorescence image", ["train", "--data", "{fluo_project}", "--model", "{bundle}",
                                                           "--method", "prototype", "--out", "{tmp}/m.pathapp"], 2,
     ["{fluo_project_image}", "fluorescence image (3 channels; the file says so)"]),
    ("pretrain on a fluorescence QPTIFF", ["pretrain", "--slides", "{vectra}", "--out", "{out}", "--steps", "1"], 2,
     ["{vectra}", "fluorescence"]),
    # bad inputs a new user hits beyond the list (the file named, what to do, nothing lost)
    ("train: labels.csv lists a missing image", ["train", "--data", "{missing_csv}", "--model", "{bundle}", "--method",
                                                 "prototype", "--out", "{tmp}/m.pathapp"], 2,
     ["{missing_csv}", "1 of 2 listed images do not exist", "gone.png", "relative to the CSV's folder"]),
    ("evaluate-search: labels.csv lists a missing image", ["evaluate-search", "--data", "{missing_csv}", "--model",
                                                          "{bundle}", "--out", "{out}"], 2,
     ["{missing_csv}", "1 of 2 listed images do not exist", "gone.png", "relative to the CSV's folder"]),
    ("holds: train on an empty labels.csv", ["train", "--data", "{empty_csv}", "--model", "{bundle}", "--out",
                                             "{tmp}/m.pathapp"], 2, ["{empty_csv}", "no rows", "image,label"]),
    ("train: labels.csv not UTF-8", ["train", "--data", "{latin1_csv}", "--model", "{bundle}", "--out",
                                     "{tmp}/m.pathapp"], 2, ["{latin1_csv}", "not UTF-8", "save it as CSV UTF-8"]),
    ("holds: train on GeoJSON that is not JSON", ["train", "--data", "{cut_json}", "--slides", "{svs}", "--model",
                                                  "{bundle}", "--out", "{tmp}/m.pathapp"], 2,
     ["{cut_json}", "not readable as GeoJSON"]),
    ("holds: evaluate on one class", ["evaluate", "--data", "{one_class}", "--model", "{bundle}", "--out", "{out}"], 2,
     ["{one_class}", "fewer than two classes"]),
    ("infer --model a folder", ["infer", "{svs}", "--model", "{run}", "--out", "{out}"], 2,
     ["{run}: a folder, not a model", "--model {run}/teacher.pathapp"]),
    ("train --out an existing file that is no bundle", ["train", "--data", "{svs}", "--model", "{bundle}", "--out",
                                                        "{file}"], 2, ["{file}", "not a pathapp bundle", "left as it is"]),
    ("holds: infer --out an existing file", ["infer", "{svs}", "--model", "{bundle}", "--out", "{file}"], 2,
     ["--out", "{file}", "is a file"]),
    ("infer a 16.8 µm/px slide at a 0.5 µm/px model", ["infer", "{bone}", "--model", "{bundle}", "--out", "{out}"], 1,
     ["failed:", "{bone}", "16.783 µm/px", "33.6× coarser than the 0.5 µm/px", "--slide-mpp 16.783"]),
    ("infer a zero-byte .svs", ["infer", "{zero}", "--model", "{bundle}", "--out", "{out}"], 1,
     ["failed:", "{zero}", "an empty file (0 bytes)", "copy it again"]),
    ("infer a folder of only a symlink loop", ["infer", "{loop}", "--model", "{bundle}", "--out", "{out}"], 1,
     ["failed:", "{loop}", "no slides found in this folder"]),
    ("tile an empty folder", ["tile", "{empty_dir}", "--out", "{out}"], 1, ["{empty_dir}", "no slides found"]),
    ("pretrain --tiles on `pathapp tile` output", ["pretrain", "--tiles", "{tiled}", "--out", "{out}", "--steps", "1"], 2,
     ["{tiled}: 1 image found (thumbnail.png), fewer than one batch of 2", "{tiled}/slide is `pathapp tile` output",
      "--slides"]),
    ("pretrain on an empty folder", ["pretrain", "--slides", "{empty_dir}", "--out", "{out}", "--steps", "1"], 2,
     ["{empty_dir}", "no slides found"]),
    ("infer a QuPath project without images", ["infer", "{empty_project}", "--model", "{bundle}", "--out", "{out}"],
     1, ["failed:", "{empty_project}: the project has no images", "add them in QuPath"]),
    ("train on a QuPath project without images", ["train", "--data", "{empty_project}", "--model", "{bundle}",
                                                  "--out", "{tmp}/m.pathapp"], 2,
     ["{empty_project}: the project has no images"]),
    # a batch that cannot fit in memory is refused before anything is written, with the largest that fits
    ("pretrain --batch-size beyond memory", ["pretrain", "--tiles", "{tiles}", "--config", "{ssl}", "--batch-size",
                                            "65536", "--steps", "1", "--out", "{out}"], 2,
     ["pretrain: --batch-size 65536 needs about", "GiB allowed", "the largest that fits is --batch-size",
      "--grad-accum"]),
    ("train --method lora --batch-size beyond memory", ["train", "--data", "{ucsb}", "--model", "{bundle}", "--method",
                                                        "lora", "--image-mpp", "0.5", "--tile-size", "224",
                                                        "--batch-size", "65536",
                                                        "--out", "{tmp}/m.pathapp"],
     2, ["train --method lora: --batch-size 65536 needs about", "the largest that fits is --batch-size"]),
]


@pytest.mark.parametrize("name, argv, code, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line(shared_data, bundle, evil, tmp_path, name, argv, code, words):
    if "cuda" in name and torch.cuda.device_count() > (1 if name.endswith(":1") else 0):
        pytest.skip("this machine has that GPU")
    (tmp_path / "notes.txt").write_text("not a slide\n")
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data_file(SVS).read_bytes()[:400_000])
    project = tmp_path / "project"  # the real QuPath 0.6 project, its 15-channel image replaced by an RGB one
    project.mkdir()
    (project / "project.qpproj").write_text(data_file(f"{COSCIA}/project.qpproj").read_text())
    (project / "TD_01_verysmall_mIF.ome.tif").symlink_to(data_file("wsi/ome-tiff/OS-2-vsi.ome.tif"))
    dark = tmp_path / "dark.png"  # a light blob on black, no metadata
    pixels = np.zeros((600, 800, 3), np.uint8)
    pixels[200:400, 300:500] = (40, 160, 90)
    Image.fromarray(pixels).save(dark)
    ssl = tmp_path / "ssl.yaml"  # a small ViT whose iBOT head still takes megabytes per image
    ssl.write_text(yaml.safe_dump({**TINY_SSL, "n_prototypes": 4096, "global_crop_size": 224, "tile_size": 224,
                                   "backbone_overrides": {**TINY_SSL["backbone_overrides"], "img_size": 224}}))
    regions = write_objects(tmp_path / "regions.geojson", [  # two classes over the left and right of the image
        QuPathObject(geometry=shapely.box(0, 0, 900, 1400), class_name="A"),
        QuPathObject(geometry=shapely.box(1000, 0, 1900, 1400), class_name="B")])
    fluo_project = annotated_project(tmp_path / "fluo project")  # its Upper/Lower annotations, on the QPTIFF
    fluo_image = fluo_project.parent / "images" / Path(data_file(SVS)).name
    fluo_image.unlink()
    fluo_image.symlink_to(data_file(VECTRA))
    record = json.loads(fluo_project.read_text())
    record["images"][0]["serverBuilder"]["metadata"].update(width=1920, height=1440, levels=[
        {"downsample": 1.0, "width": 1920, "height": 1440}])
    fluo_project.write_text(json.dumps(record))
    fluo_labels = tmp_path / "labels.csv"
    fluo_labels.write_text(f"image,label\n{data_file(SVS)},a\n{data_file(VECTRA)},b\n")
    for name, text in {"missing.csv": f"image,label\n{data_file(SVS)},a\ngone.png,b\n", "empty.csv": "",
                       "one_class.csv": f"image,label\n{data_file(SVS)},a\n{data_file(SVS)},a\n",
                       "cut.geojson": '{"type": "FeatureCollection", "features": ['}.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "latin1.csv").write_bytes(f"image,label\n{data_file(SVS)},caf\xe9\n".encode("latin-1"))
    (tmp_path / "run").mkdir()  # a pretraining run folder given as --model
    (tmp_path / "run" / "teacher.pathapp").symlink_to(bundle)
    (tmp_path / "zero.svs").touch()
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "self").symlink_to(tmp_path / "loop")
    (tmp_path / "empty").mkdir()
    (tmp_path / "tiled" / "slide").mkdir(parents=True)  # what `pathapp tile slide.svs --out tiled/` writes
    for name in ("tiles.geojson", "tissue.geojson"):
        (tmp_path / "tiled" / "slide" / name).write_text('{"type": "FeatureCollection", "features": []}')
    Image.fromarray(pixels).save(tmp_path / "tiled" / "slide" / "thumbnail.png")
    (tmp_path / "empty.qpproj").write_text(json.dumps({"version": "0.5.1", "images": []}))
    where = {"svs": data_file(SVS), "bone": data_file(BONE), "tiny": data_file(TINY_SLIDE), "nompp": data_file(NO_MPP), "bundle": bundle,
             "out": tmp_path / "out", "tmp": tmp_path, "evil": evil, "file": tmp_path / "notes.txt", "cut": cut,
             "project": project, "standin": project / "TD_01_verysmall_mIF.ome.tif", "vectra": data_file(VECTRA),
             "dark": dark, "ssl": ssl, "tiles": data_file(NCT_TILES), "ucsb": data_file(UCSB),
             "regions": regions, "fluo_labels": fluo_labels,
             "fluo_project": fluo_project, "fluo_project_image": fluo_image, "missing_csv": tmp_path / "missing.csv",
             "empty_csv": tmp_path / "empty.csv", "latin1_csv": tmp_path / "latin1.csv", "cut_json": tmp_path / "cut.geojson",
             "one_class": tmp_path / "one_class.csv", "run": tmp_path / "run", "zero": tmp_path / "zero.svs",
             "loop": tmp_path / "loop", "empty_dir": tmp_path / "empty", "tiled": tmp_path / "tiled", "empty_project": tmp_path / "empty.qpproj"}
    got, _, err = pathapp(*(a.format(**where) for a in argv))
    assert got == code, err
    line = one_message(err)
    for w in words:
        assert w.format(**where) in line, line
    assert not (tmp_path / "out").exists() or code == 1  # refused before anything was written
    assert not (tmp_path / "m.pathapp").exists()
    assert (tmp_path / "notes.txt").read_text() == "not a slide\n"  # a user's file given as --out is kept


def test_malicious_pickle_is_one_clean_line_from_the_console_script(evil, tmp_path):
    """The real console script (warnings on, as a user sees them): one whole sentence, nothing else."""
    exe = Path(sys.executable).with_name("pathapp")
    proc = subprocess.run([str(exe), "model", "create", "--backbone", "dinov2_vits14", "--weights", str(evil),
                           "--out", str(tmp_path / "m.pathapp")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(" or as .safetensors"), proc.stderr
    assert not (tmp_path / "m.pathapp").exists()


def test_debug_shows_the_traceback_only_when_asked(shared_data, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    args = ["tile", str(data_file(SVS)), "--out", str(tmp_path / "file" / "sub")]
    code, _, err = pathapp(*args)
    assert code == 1 and one_message(err).startswith(f"failed: {data_file(SVS)}: ")
    code, _, err = pathapp("--debug", *args)
    assert code == 1 and "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("failed:")
    monkeypatch.setenv(DEBUG_ENV, "1")
    assert "Traceback" in pathapp(*args)[2]


def _fsize_limit(limit: int):
    def apply() -> None:  # a full disk, as the writer sees it: EFBIG past `limit` bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_tile_on_a_full_disk_reports_each_slide_and_goes_on(shared_data, tmp_path):
    exe = Path(sys.executable).with_name("pathapp")
    slides = [data_file(SVS), data_file("wsi/aperio/luna-1065626.svs")]
    proc = subprocess.run([str(exe), "tile", *map(str, slides), "--mpp", "4", "--out", str(tmp_path / "t")],
                          capture_output=True, text=True, timeout=300, preexec_fn=_fsize_limit(4096))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    failed = [line for line in proc.stderr.splitlines() if line.startswith("failed: ")]
    assert [f.split(": ")[1] for f in failed] == [str(s) for s in slides], proc.stderr  # one line each, in order
    assert all("File too large" in f for f in failed)
    assert not [p for p in (tmp_path / "t").rglob("*") if ".tmp" in p.name]  # nothing half-written left


def test_bundle_on_a_full_disk_is_one_line_naming_it(bundle, tmp_path):
    """`train`/`model create` writing a bundle onto a full disk: one line naming the file, nothing left."""
    exe = Path(sys.executable).with_name("pathapp")
    out = tmp_path / "m.pathapp"
    proc = subprocess.run([str(exe), "model", "create", "--weights", str(bundle), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, preexec_fn=_fsize_limit(4096))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if MESSAGE.match(line)]
    assert len(lines) == 1 and f"{out}: cannot be written" in lines[0] and "free disk space" in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []  # no bundle, no temporary file


# ------------------------------------------------------------------ numbers: a property over every command

FINITE_EXAMPLES = [0, -0.0, -1, -1e-9, 1e-9, 0.005, 0.5, 1, 99.5, 1e300, 10**12, float("inf"), float("-inf"),
                   float("nan")]


def _in(lo: float, hi: float, integer: bool = False, lo_open: bool = False, hi_open: bool = False):
    def ok(v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if integer and float(v) != int(v):
            return False
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    return ok


MPP_OK = _in(0.01, 100)
# (command, its required arguments, option, which values it must accept): every numeric option of
# tile, infer, train and pretrain. The ranges are the contract in the README and --help.
NUMERIC = [
    ("tile", ["{svs}", "--out", "{tmp}"], "--mpp", MPP_OK),
    ("tile", ["{svs}", "--out", "{tmp}"], "--slide-mpp", MPP_OK),
    ("tile", ["{svs}", "--out", "{tmp}"], "--tile-size", _in(8, 8192, True)),
    ("tile", ["{svs}", "--out", "{tmp}"], "--overlap", _in(0, 8192, True)),
    ("tile", ["{svs}", "--out", "{tmp}"], "--min-tissue", _in(0, 1)),
    ("infer", ["{svs}"], "--mpp", MPP_OK),
    ("infer", ["{svs}"], "--slide-mpp", MPP_OK),
    ("infer", ["{svs}"], "--tile-size", _in(8, 8192, True)),
    ("infer", ["{svs}"], "--min-tissue", _in(0, 1)),
    ("infer", ["{svs}"], "--batch-size", _in(1, 65536, True)),
    ("infer", ["{svs}"], "--workers", _in(0, 256, True)),
    ("train", ["--data", "{svs}", "--out", "{tmp}/m"], "--mpp", MPP_OK),
    ("train", ["--data", "{svs}", "--out", "{tmp}/m"], "--slide-mpp", MPP_OK),
    ("train", ["--data", "{svs}", "--out", "{tmp}/m"], "--tile-size", _in(14, 8192, True)),
    ("train", ["--data", "{svs}", "--out", "{tmp}/m"], "--batch-size", _in(1, 65536, True)),
    ("train", ["--data", "{svs}", "--out", "{tmp}/m"], "--lora-rank", _in(1, 1024, True)),
    ("train", ["--data", "{svs}", "--out", "{tmp}/m"], "--lora-alpha", _in(0, 1e6, lo_open=True)),
    ("train", ["--data", "{svs}", "--out", "{tmp}/m"], "--epochs", _in(1, 10**9, True)),
    ("train", ["--data", "{svs}", "--out", "{tmp}/m"], "--max-steps", _in(1, 10**9, True)),
    ("train", ["--data", "{svs}", "--out", "{tmp}/m"], "--lr", _in(0, 10, lo_open=True)),
    ("pretrain", ["--out", "{tmp}"], "--mpp", MPP_OK),
    ("pretrain", ["--out", "{tmp}"], "--slide-mpp", MPP_OK),
    ("pretrain", ["--out", "{tmp}"], "--batch-size", _in(2, 65536, True)),
    ("pretrain", ["--out", "{tmp}"], "--grad-accum", _in(1, 10**9, True)),
    ("pretrain", ["--out", "{tmp}"], "--steps", _in(1, 10**9, True)),
    ("pretrain", ["--out", "{tmp}"], "--epochs", _in(0, 10**9, lo_open=True)),
    ("pretrain", ["--out", "{tmp}"], "--max-minutes", _in(0, 10**9, lo_open=True)),
    ("pretrain", ["--out", "{tmp}"], "--workers", _in(0, 256, True)),
]
INT_OPTIONS = {"--tile-size", "--overlap", "--batch-size", "--workers", "--lora-rank", "--max-steps",
               "--grad-accum", "--steps"}

numbers = st.one_of(st.sampled_from(FINITE_EXAMPLES), st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(-10**15, 10**15))


def _command(name: str) -> click.Command:
    module, attr = COMMANDS[name].split(":")
    return getattr(__import__(module, fromlist=[attr]), attr)


@pytest.mark.parametrize("command, required, option, accepts", NUMERIC, ids=[f"{c} {o}" for c, _, o, _ in NUMERIC])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=numbers)
def test_numeric_options_are_finite_and_in_range(shared_data, tmp_path, command, required, option, accepts, value):
    """Values in range parse; anything else (0, negatives, inf, nan, huge) is refused while parsing,
    before any work, with one line naming the option."""
    text = repr(value) if isinstance(value, float) else str(value)
    ssl = tmp_path / "ssl.yaml"  # a small ViT whose iBOT head still takes megabytes per image
    ssl.write_text(yaml.safe_dump({**TINY_SSL, "n_prototypes": 4096, "global_crop_size": 224, "tile_size": 224,
                                   "backbone_overrides": {**TINY_SSL["backbone_overrides"], "img_size": 224}}))
    where = {"svs": data_file(SVS), "tmp": tmp_path}
    args = [a.format(**where) for a in required] + [option, text]
    integer_option = option in INT_OPTIONS or (command == "train" and option == "--epochs")
    valid = accepts(value) and (not integer_option or isinstance(value, int))
    cmd = _command(command)
    if valid:
        cmd.make_context(command, list(args))  # parses; nothing runs
        return
    with pytest.raises(click.BadParameter) as e:
        cmd.make_context(command, list(args))
    assert option in e.value.param.opts
    code, _, err = pathapp(command, *args)  # the full entry point: one line, exit code 2
    assert code == 2 and option in one_message(err)


# ------------------------------------------------------------------ second runs

def _slides_folder(tmp_path: Path) -> Path:
    """A folder holding a link to the real slide (tests never copy shared data)."""
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "CMU-1-Small-Region.svs").symlink_to(data_file(SVS))
    return folder


def test_outputs_never_become_inputs(shared_data, bundle, tmp_path):
    """infer a slide (results beside it), tile it into the same folder, then infer the folder: only the
    slide is found, not pathapp's PNGs, TIFF-looking heatmaps or thumbnails."""
    folder = _slides_folder(tmp_path)
    slide = folder / "CMU-1-Small-Region.svs"
    assert pathapp("infer", slide, "--model", bundle, "--mpp", "4", "--workers", "0")[0] == 0
    assert pathapp("tile", slide, "--mpp", "4", "--out", folder / "tiles")[0] == 0
    assert (folder / "pathapp" / "CMU-1-Small-Region" / "overlay.png").exists()
    assert list((folder / "tiles").rglob("thumbnail.png"))
    code, _, err = pathapp("infer", folder, "--model", bundle, "--mpp", "4", "--workers", "0")
    assert code == 0, err
    assert err.count("skip: ") == 1 and "infer: 0 written, 1 already complete" in err, err
    from pathapp.slide import find_slides

    assert find_slides(folder) == [slide]


def _files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_rerun_with_other_settings_is_refused_then_overwrite_replaces_only_own_files(shared_data, bundle, tmp_path):
    headless = tiny_bundle(tmp_path, num_classes=0, filename="headless.pathapp")
    src, out = data_file(SVS), tmp_path / "out"
    folder = out / "CMU-1-Small-Region"
    base = ["infer", src, "--out", out, "--workers", "0", "--mpp", "4"]
    assert pathapp(*base, "--model", headless)[0] == 0
    assert (folder / "pca.png").exists()
    (folder / "notes.txt").write_text("mine")  # a user's file in pathapp's folder
    before = _files(folder)

    code, _, err = pathapp(*base, "--model", bundle, "--min-tissue", "0.5")
    assert code == 1, err
    line = one_message(err)
    assert line.startswith(f"failed: {src}: {folder} holds results of other settings (head (classes and weights) "
                           "none → ")  # the same backbone, now with a head
    assert "--min-tissue 0.1 → 0.5" in line and "--overwrite" in line
    assert "--mpp" not in line and "backbone" not in line
    assert _files(folder) == before  # neither skipped nor destroyed

    code, _, err = pathapp(*base, "--model", bundle, "--min-tissue", "0.5", "--overwrite")
    assert code == 0, err
    after = _files(folder)
    assert "pca.png" not in after and "heatmap-Tumor.png" in after  # the old run's own files went
    assert (folder / "notes.txt").read_text() == "mine"  # the user's did not
    run = json.loads((folder / "run.json").read_text())
    assert set(run["files"]) | {"run.json", ".done", ".pathapp", "notes.txt"} == set(after)
    recorded = json.loads((folder / ".done").read_text())
    assert recorded["min_tissue"] == 0.5 and recorded["mpp"] == 4.0 and recorded["object_type"] == "tile"
    b = load_bundle(bundle)
    assert recorded["model"] == b.fingerprint() == load_bundle(headless).fingerprint()
    assert recorded["head"] == b.head_fingerprint()

    code, _, err = pathapp(*base, "--model", bundle, "--min-tissue", "0.5")  # same settings: resumes
    assert code == 0 and "skip: " in err and _files(folder) == after, err
    roi = tmp_path / "roi.geojson"
    write_objects(roi, [QuPathObject(shapely.box(0, 0, 1500, 1500), class_name="Tumor", color=(200, 0, 0))])
    code, _, err = pathapp(*base, "--model", bundle, "--min-tissue", "0.5", "--roi", roi)
    assert code == 1 and "--roi/--roi-class none → " in one_message(err)


def test_empty_results_say_why_and_still_show_the_slide(shared_data, bundle, tmp_path):
    white = tmp_path / "blank.png"
    Image.fromarray(np.full((600, 800, 3), 245, np.uint8)).save(white)
    outside = tmp_path / "outside.geojson"
    write_objects(outside, [QuPathObject(shapely.box(50_000, 50_000, 60_000, 60_000), class_name="Tumor")])
    cases = [  # inputs, extra options, why
        ([data_file(TINY_SLIDE)], [], "is larger than the slide"),
        ([data_file(SVS)], ["--mpp", "100"], "is larger than the slide"),
        ([data_file(SVS)], ["--roi", outside], "lie outside the slide (2220×2967 px)"),
        ([white], ["--slide-mpp", "1"], "no tissue detected"),
    ]
    for i, (inputs, extra, why) in enumerate(cases):
        out = tmp_path / f"o{i}"
        code, _, err = pathapp("infer", *inputs, "--model", bundle, "--mpp", "2", "--out", out, "--workers", "0",
                               *extra)
        assert code == 0, err
        warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
        assert len(warnings) == 1 and why in warnings[0] and str(inputs[0]) in warnings[0], err
        assert "infer: 0 written, 1 empty" in err, err
        folder = next(out.iterdir())
        assert (folder / ".done").exists() and json.loads((folder / "run.json").read_text())["counts"]["tiles"] == 0
        assert Image.open(folder / "overlay.png").size[0] > 0  # the slide to look at
        code, stdout, err = pathapp("tile", *inputs, "--mpp", "2", "--tile-size", "56", "--out", tmp_path / f"t{i}",
                                    *extra)
        assert code == 0 and " 0 tiles " in stdout, err
        warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
        assert len(warnings) == 1 and why in warnings[0], err
        assert next((tmp_path / f"t{i}").iterdir()).joinpath("thumbnail.png").exists()


def test_bundles_follow_the_umask(tmp_path):
    path = tiny_bundle(tmp_path, num_classes=2)
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_evaluate_shows_progress_while_it_resamples(capsys):
    """The bootstrap and the folds take minutes on real data: a bar says how far they are."""
    from pathapp.train.evaluate import bootstrap_ci, cross_validate
    from pathapp.train.fit import head_fitter

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    X = rng.normal(size=(40, 4)) + y[:, None]
    groups = np.arange(40) // 2
    cross_validate(X, y, groups, 2, head_fitter("prototype", 2), n_folds=3, n_boot=20)
    err = capsys.readouterr().err
    assert "cross-validation: " in err and "fold/s" in err and "bootstrap 95% CI: " in err and "/20 " in err


def test_folders_odd_names_and_spreadsheet_csvs_just_work(shared_data, bundle, tmp_path):
    """What a new user hands over works as given: `tile` on a folder of slides (as `infer` takes one),
    whose names have spaces and accents, beside a symlink loop; `train` on labels.csv as Excel saves it
    ("CSV UTF-8": a BOM before the first column's name), naming images with spaces and accents."""
    slides = tmp_path / "slides ü"
    slides.mkdir()
    (slides / "CMU 1 é.svs").symlink_to(data_file(SVS))
    (slides / "loop").symlink_to(slides)
    code, out, err = pathapp("tile", slides, "--mpp", "4", "--out", tmp_path / "t")
    assert code == 0 and "Traceback" not in err, err
    assert json.loads((tmp_path / "t" / "CMU 1 é" / "tiles.geojson").read_text())["features"]
    rows = ["image,label"]
    for cls, folders in {"épithélium": ("TUM", "NORM"), "stroma": ("STR", "MUS")}.items():
        for folder in folders:
            tif = next(data_file(f"{NCT_TILES}/{folder}").glob("*.tif"))
            (tmp_path / f"{folder} tile é.tif").symlink_to(tif)
            rows.append(f"{folder} tile é.tif,{cls}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8-sig")
    code, out, err = pathapp("train", "--data", tmp_path / "labels.csv", "--model", bundle, "--method", "prototype",
                             "--image-mpp", "0.5", "--out", tmp_path / "m.pathapp", "--cache", tmp_path / "cache")
    assert code == 0, err
    assert sorted(load_bundle(tmp_path / "m.pathapp").class_names) == ["stroma", "épithélium"]


def test_fluorescence_is_tiled_with_a_detector_made_for_it(shared_data, tmp_path):
    """The Vectra multiplex IF scan (a TMA core on black): Otsu on the summed channels outlines the
    core, where the H&E detector (stained = saturated) takes the dark glass for tissue too."""
    from pathapp.slide import open_slide
    from pathapp.tiles.tissue import FLUORESCENCE, detect_tissue, tissue_pixels

    code, stdout, err = pathapp("tile", data_file(VECTRA), "--mpp", "2", "--tile-size", "64", "--out", tmp_path)
    assert code == 0 and "fluorescence: tissue found by Otsu on the summed channels" in stdout, err
    with open_slide(data_file(VECTRA)) as slide:
        assert (slide.modality, slide.channels, slide.background) == (FLUORESCENCE, 3, 0)
        tissue = detect_tissue(slide)
        w, h = slide.size
    assert tissue.modality == FLUORESCENCE
    core = tissue.geometry
    assert len(getattr(core, "geoms", [core])) == 1  # one core, not speckle
    assert 0.35 < core.area / (w * h) < 0.6  # a disc of about 0.7 of the height
    cx, cy = core.centroid.x / w, core.centroid.y / h
    assert 0.3 < cx < 0.45 and 0.4 < cy < 0.6, (cx, cy)
    assert tissue_pixels(tissue.rgb, 0.07).mean() > 0.75  # what the brightfield detector would have kept


@pytest.mark.parametrize("rel, extra", [(SVS, []), ("wsi/ome-tiff/OS-1-detail.ome.tif", [])])
def test_edge_tissue_is_tiled_with_padding_and_exact_footprints(shared_data, tmp_path, rel, extra):
    """Partial tiles at the right and bottom edges are kept (padded with the background, recorded in
    their measurements): at most 1 % of the detected tissue lies outside every tile (3.4 % and 19.8 %
    before). Footprints are written at their exact fractional starts: neighbours abut."""
    from pathapp.qupath.geojson import read_objects
    from pathapp.slide import open_slide
    from pathapp.tiles import make_grid, read_tile

    code, _, err = pathapp("tile", data_file(rel), *extra, "--out", tmp_path)
    assert code == 0, err
    folder = next(tmp_path.iterdir())
    tiles = read_objects(folder / "tiles.geojson")
    tissue = shapely.union_all([o.geometry for o in read_objects(folder / "tissue.geojson")])
    union = shapely.union_all([t.geometry for t in tiles])
    assert tissue.difference(union).area / tissue.area <= 0.01
    with open_slide(data_file(rel)) as slide:
        w, h = slide.size
        grid = make_grid(slide, 0.5, 224)
        f = grid.footprint
        padded = [t for t in tiles if t.measurements.get("padding fraction", 0) > 0]
        assert padded and all(t.measurements["padding value"] == 255 for t in padded)
        assert all("padding value" not in t.measurements for t in tiles if t not in padded)
        for t in padded:
            x0, y0, x1, y1 = t.geometry.bounds
            assert x1 > w or y1 > h
            inside = (min(x1, w) - x0) * (min(y1, h) - y0)
            assert t.measurements["padding fraction"] == pytest.approx(1 - inside / f**2, abs=1e-4)
        bottom = np.flatnonzero(grid.coords[:, 1] + f > h)  # tiles reaching past the bottom edge, read padded
        assert len(bottom)
        edge = int(bottom[0])
        pixels = read_tile(slide, grid, edge)
        beyond = int(np.ceil((h - grid.coords[edge, 1]) * 224 / f)) + 1
        assert (pixels[beyond:] == 255).all() and beyond < 224
    xs = sorted({round(t.geometry.bounds[0], 2) for t in tiles})  # QuPath GeoJSON keeps 2 decimals
    assert np.allclose(np.diff(xs), f, atol=0.011)  # exact starts i × footprint: no 0.45 px overlaps
    assert all(t.geometry.bounds[2] - t.geometry.bounds[0] == pytest.approx(f, abs=0.011) for t in tiles)
    assert union.area == pytest.approx(sum(t.geometry.area for t in tiles), rel=1e-5)


def test_batch_size_is_measured_and_chosen_from_memory():
    """Two probe steps give fixed and per-image memory (real peak RSS of this process); the batch is
    the largest power of two inside the budget, a larger one asked for is refused naming the largest."""
    from pathapp.engine.memory import BatchFit, choose_batch, memory_budget, probe
    from pathapp.errors import PathappError

    held = []

    def step(b: int) -> None:  # 64 MiB per image, touched so it is resident, then freed
        block = np.ones((b, 64 * 2**20), np.uint8)
        held.append(int(block[:, ::4096].sum()))

    fit = probe(step, torch.device("cpu"))
    assert fit.per_image == pytest.approx(64 * 2**20, rel=0.15)
    assert fit.budget == memory_budget(torch.device("cpu")) and fit.largest == int((fit.budget - fit.fixed) // fit.per_image)
    gib = 2**30
    fit = BatchFit(fixed=2 * gib, per_image=0.5 * gib, budget=10 * gib, largest=16)
    assert choose_batch(fit, None, 64, smallest=2, what="x", fix="f") == 16
    assert choose_batch(BatchFit(2 * gib, 0.4 * gib, 10 * gib, 20), None, 64, smallest=2, what="x", fix="f") == 16
    assert choose_batch(BatchFit(0, 1, 10 * gib, 10**9), None, 64, smallest=2, what="x", fix="f") == 64
    assert choose_batch(fit, 12, 64, smallest=2, what="x", fix="f") == 12
    with pytest.raises(PathappError, match=r"^x: --batch-size 17 needs about 10.5 GiB at peak of the 10.0 GiB "
                                           r"allowed; the largest that fits is --batch-size 16 \(f\)$"):
        choose_batch(fit, 17, 64, smallest=2, what="x", fix="f")
    with pytest.raises(PathappError, match="even a batch of 2 needs"):
        choose_batch(BatchFit(11 * gib, gib, 10 * gib, 0), None, 64, smallest=2, what="x", fix="f")
