"""The inference pipeline and `pathapp infer`, end to end on real slides with tiny random-weight
DINOv2 ViTs (LayerScale 1, so tiles really get different embeddings) at coarse µm/px."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import shapely
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import data_file, run_main
from qupath_rules import assert_qupath_conformant
from vit_factory import set_layerscale_one, tiny_bundle

from pathapp.cli import cli
from pathapp.infer import infer_slide
from pathapp.models.bundle import load_bundle
from pathapp.models.registry import create_backbone
from pathapp.qupath.geojson import QuPathObject, write_objects
from pathapp.results.pictures import image_box
from pathapp.slide import open_slide
from pathapp.tiles import detect_tissue, make_grid

SVS = "wsi/aperio/CMU-1-Small-Region.svs"
LUNA = "wsi/aperio/luna-1065626.svs"
NO_MPP = "wsi/aperio/tcga-cr-7395-01a-01-ts1.svs"
DICOM = "dicom/cmu-1-small-region-wsi2dcm"
OUTPUTS = {"tiles.geojson", "annotations.geojson", "overlay.png", "thumbnail.png", "embeddings.h5", "run.json",
           "report.html", ".done"}

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle"), num_classes=3)


def run_cli(*args: str) -> tuple[int, str]:
    """`pathapp ...` in-process (saves a torch import per call); exit code and stderr+stdout."""
    res = CliRunner().invoke(cli, list(args), standalone_mode=True)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def check_outputs(folder: Path, classes: list[str]) -> dict:
    """Every output exists and conforms; returns run.json."""
    names = {p.name for p in folder.iterdir()}
    assert OUTPUTS <= names, f"missing {OUTPUTS - names}"
    assert {f"heatmap-{c.replace(' ', '_')}.png" for c in classes} <= names
    assert not [n for n in names if ".tmp" in n], names
    run = json.loads((folder / "run.json").read_text())
    n = run["counts"]["tiles"]
    assert n > 0
    tiles = assert_qupath_conformant(folder / "tiles.geojson")
    assert len(tiles) == n
    assert {f["properties"]["classification"]["name"] for f in tiles} <= set(classes)
    regions = assert_qupath_conformant(folder / "annotations.geojson")
    classified = [f for f in regions if not f["properties"]["classification"]["name"].startswith("QC: ")]
    assert sum(f["properties"]["measurements"]["Tiles"] for f in classified) == n  # QC regions overlap them
    with h5py.File(folder / "embeddings.h5") as f:
        assert f["features"].shape[0] == n and f["coords"].shape == (n, 2)
        assert np.isfinite(f["features"][()]).all()
    x, y, w, h = image_box(folder / "overlay.png")  # the slide inside the picture (legend and title beside it)
    sw, sh = run["slide_size"]
    assert max(w, h) == min(1024, max(sw, sh)) and abs(w / h - sw / sh) < 0.02  # the whole slide, viewable
    assert (folder / "report.html").is_file() and (folder.parent / "index.html").is_file()
    return run


def test_pipeline_embeddings_equal_direct_forward(shared_data, bundle_path):
    """Through DataLoader workers and batching, each tile's embedding equals a direct forward of
    the same pixels, read and preprocessed independently of the pipeline."""
    bundle = load_bundle(bundle_path)
    slide = open_slide(data_file(SVS))
    res = infer_slide(slide, bundle, mpp=2.0, batch_size=5, workers=1, progress=False, precision="fp32")
    grid = make_grid(slide, 2.0, bundle.tile_size, tissue=detect_tissue(slide))
    np.testing.assert_array_equal(res.coords, grid.coords)
    assert len(res) >= 20

    backbone = create_backbone(bundle.spec)
    backbone.load_state_dict(bundle.backbone_state)
    mean = torch.tensor(bundle.mean).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std).view(1, 3, 1, 1)
    tiles = []
    for x, y in res.coords:
        region = slide.read(int(x), int(y), grid.read_size, grid.read_size, grid.level)
        img = Image.fromarray(region).resize((bundle.tile_size,) * 2, Image.BILINEAR)
        tiles.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    x = (torch.stack(tiles).float() / 255 - mean) / std
    with torch.no_grad():
        direct = backbone.forward_features(x)[:, 0].numpy()
    np.testing.assert_allclose(res.embeddings, direct, rtol=1e-4, atol=1e-4)
    # Non-degenerate: tiles differ from each other far more than the tolerance above.
    spread = np.linalg.norm(direct - direct.mean(0), axis=1)
    assert spread.min() > 0.05 * np.linalg.norm(direct, axis=1).mean()
    # probabilities are the head applied to those embeddings
    with torch.no_grad():
        head_probs = bundle.build_head()(torch.from_numpy(direct)).numpy()
    np.testing.assert_allclose(res.probs, head_probs, atol=1e-4)
    assert np.allclose(res.probs.sum(1), 1, atol=1e-5)
    assert {"tissue", "grid", "model", "data_wait", "compute"} <= set(res.timings)


@pytest.mark.parametrize("rel, mpp", [(SVS, "2.0"), (LUNA, "4.0"), (DICOM, "2.0")])
def test_end_to_end_real_slides(shared_data, bundle_path, tmp_path, rel, mpp):
    src = data_file(rel)
    code, out = run_cli("infer", str(src), "--model", str(bundle_path), "--mpp", mpp, "--out",
                        str(tmp_path), "--workers", "0", "--object-type", "detection")
    assert code == 0, out
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    run = check_outputs(folder, load_bundle(bundle_path).class_names)
    assert run["mpp"] == float(mpp) and run["slide_path"] == str(src)
    with open_slide(src) as s:
        assert run["slide_size"] == list(s.size) and folder.name == s.name
    tiles = json.loads((folder / "tiles.geojson").read_text())["features"]
    assert {f["properties"]["objectType"] for f in tiles} == {"detection"}
    # rerun with the same settings: complete slides are skipped, nothing rewritten
    stamp = (folder / "run.json").stat().st_mtime_ns
    code, out = run_cli("infer", str(src), "--model", str(bundle_path), "--mpp", mpp, "--out", str(tmp_path),
                        "--workers", "0", "--object-type", "detection")
    assert code == 0 and "already complete" in out and (folder / "run.json").stat().st_mtime_ns == stamp


def test_roi_class_restricts_tiles(shared_data, bundle_path, tmp_path):
    src = data_file(SVS)
    roi = tmp_path / "rois.geojson"
    write_objects(roi, [
        QuPathObject(shapely.box(0, 0, 1110, 2967), class_name="Tumor", color=(200, 0, 0)),
        QuPathObject(shapely.box(1110, 0, 2220, 2967), class_name="Other", color=(0, 0, 200)),
    ])
    code, out = run_cli("infer", str(src), "--model", str(bundle_path), "--mpp", "2.0", "--out", str(tmp_path / "o"),
                        "--workers", "0", "--roi", str(roi), "--roi-class", "Tumor")
    assert code == 0, out
    with h5py.File(tmp_path / "o" / "CMU-1-Small-Region" / "embeddings.h5") as f:
        coords, fp = f["coords"][()], f.attrs["footprint"]
    assert len(coords) > 3 and (coords[:, 0] + fp / 2 < 1110).all()


def test_headless_backbone_name_with_weights_file(shared_data, tmp_path):
    """`--model dinov2_vits14 --weights FILE` (a real-size ViT-S/14, timm safetensors layout)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = set_layerscale_one(create_backbone("dinov2_vits14"))
    weights = tmp_path / "vits14.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    code, out = run_cli("infer", str(data_file(SVS)), "--model", "dinov2_vits14", "--weights", str(weights),
                        "--mpp", "2.0", "--out", str(tmp_path / "o"), "--workers", "0")
    assert code == 0, out
    folder = tmp_path / "o" / "CMU-1-Small-Region"
    names = {p.name for p in folder.iterdir()}
    assert "pca.png" in names and not any(n.startswith("heatmap-") for n in names)
    tiles = assert_qupath_conformant(folder / "tiles.geojson")
    assert tiles and all("classification" not in f["properties"] for f in tiles)
    regions = json.loads((folder / "annotations.geojson").read_text())["features"]
    assert all(f["properties"]["classification"]["name"].startswith("QC: ") for f in regions)  # no class regions
    with h5py.File(folder / "embeddings.h5") as f:
        assert f["features"].shape == (len(tiles), 384) and f.attrs["model"] == "dinov2_vits14"


def write_project(folder: Path, images: list[Path]) -> Path:
    """A minimal QuPath 0.5 project whose entries point at `images` by absolute file URI."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, img in enumerate(images):
        builder = {"builderType": "uri", "uri": img.resolve().as_uri() if img.exists() else f"file:{img}",
                   "providerClassName": "qupath.lib.images.servers.openslide.OpenslideServerBuilder",
                   "args": [], "metadata": {"width": 2220, "height": 2967,
                                            "pixelCalibration": {"pixelWidth": {"value": 0.499, "unit": "µm"}}}}
        entries.append({"serverBuilder": builder, "entryID": i + 1, "randomizedName": f"r{i}",
                        "imageName": img.name, "metadata": {}})
    path = folder / "project.qpproj"
    path.write_text(json.dumps({"version": "0.5.1", "uri": path.as_uri(), "lastID": len(entries), "images": entries}))
    return path


def test_qupath_project_entries_and_missing_image(shared_data, bundle_path, tmp_path):
    """Entries run into <project>/pathapp/<entryID>/; a missing image fails alone; without QuPath
    --write-project leaves the GeoJSON there and says how to import it, once for the whole run."""
    qpproj = write_project(tmp_path / "proj", [data_file(SVS), Path("/nowhere/gone.svs"), data_file(SVS)])
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PAQUO_QUPATH_DIR", raising=False)
        code, out = run_cli("infer", str(qpproj), "--model", str(bundle_path), "--mpp", "4.0", "--workers", "0",
                            "--write-project")
    assert code == 1, out  # the missing image fails, clearly, and the other entry still runs
    assert "gone.svs" in out and "Traceback" not in out
    folder = tmp_path / "proj" / "pathapp" / "1"
    check_outputs(folder, load_bundle(bundle_path).class_names)
    assert not (tmp_path / "proj" / "pathapp" / "2").exists()
    assert (tmp_path / "proj" / "pathapp" / "3" / ".done").exists()
    assert out.count("wrote QuPath GeoJSON") == 1, out  # one message for the run, naming both entries' files
    assert str(folder / "tiles.geojson") in out and str(tmp_path / "proj" / "pathapp" / "3" / "tiles.geojson") in out
    assert out.count("pip install 'pathapp[qupath]'") == 1, out  # the hint once per command, not per entry


def test_int8_embeddings_close_to_fp32(shared_data, bundle_path):
    bundle = load_bundle(bundle_path)
    slide = open_slide(data_file(SVS))
    fp32 = infer_slide(slide, bundle, mpp=2.0, workers=0, progress=False)
    int8 = infer_slide(slide, bundle, mpp=2.0, workers=0, progress=False, precision="int8")
    a, b = fp32.embeddings, int8.embeddings
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(a, b)  # quantised for real, and still faithful
    assert int8.params["precision"] == "int8"


def test_cli_console_script_failures_are_one_line(shared_data, bundle_path, tmp_path, monkeypatch, capsys):
    """The real console script: a slide without µm/px fails with one line naming the file and
    --slide-mpp, the good slide is still written, exit code 1; --slide-mpp then fixes it (the same
    entry point, in process)."""
    pathapp = Path(sys.executable).with_name("pathapp")
    bad, good = data_file(NO_MPP), data_file(SVS)
    args = [str(pathapp), "infer", str(bad), str(good), "--model", str(bundle_path), "--mpp", "4.0",
            "--out", str(tmp_path), "--workers", "0"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    fail = [line for line in proc.stderr.splitlines() if line.startswith("failed:")]
    assert len(fail) == 1 and str(bad) in fail[0] and "--slide-mpp" in fail[0]
    assert (tmp_path / "CMU-1-Small-Region" / ".done").exists()
    code, text = run_main(monkeypatch, capsys, *args[1:], "--slide-mpp", "0.5")
    assert code == 0, text
    assert (tmp_path / bad.stem / ".done").exists()


def test_help_and_info_do_not_import_torch(shared_data):
    code = (
        "import sys\n"
        "from pathapp.cli import main\n"
        "sys.argv = ['pathapp'] + sys.argv[1:]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    for args in (["--help"], ["infer", "--help"], ["info", str(data_file(SVS))]):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH", (args, proc.stdout, proc.stderr)
    assert "--write-project" in subprocess.run([sys.executable, "-m", "pathapp", "infer", "--help"],
                                               capture_output=True, text=True, timeout=120).stdout


def test_a_bundles_first_run_keeps_its_trace_once_its_slides_are_written(shared_data, bundle_path, tmp_path, monkeypatch):
    """The first `pathapp infer` with a bundle runs the timm model and keeps the backbone's trace only after its
    slides (tracing beside the slide work raised that run's peak memory); later runs load the trace."""
    from pathapp.models import traced

    cache = tmp_path / "cache"
    monkeypatch.setattr(traced, "TRACED_CACHE", cache)
    kept_at_write, keep = [], traced.keep_traced

    def keep_noting_if_written(*args):  # was the slide's .done written when the trace was kept?
        kept_at_write.append((tmp_path / "a" / "CMU-1-Small-Region" / ".done").exists())
        keep(*args)

    monkeypatch.setattr(traced, "keep_traced", keep_noting_if_written)
    args = [str(data_file(SVS)), "--model", str(bundle_path), "--mpp", "2.0", "--workers", "0"]
    code, out = run_cli("infer", *args, "--out", str(tmp_path / "a"))
    assert code == 0 and kept_at_write == [True] and len(list(cache.glob("*.pt"))) == 1, out
    code, out = run_cli("infer", *args, "--out", str(tmp_path / "b"))
    assert code == 0 and kept_at_write == [True], out  # loaded, not traced again


def test_console_script_exits_without_teardown_keeping_exit_code_and_atexit(tmp_path):
    """`pathapp` ends right after the command (no module teardown: 1-2 s once torch is loaded), with the
    command's exit code and message, after the atexit handlers; a thread still working is waited for;
    malloc is asked for huge pages (the command starts again once, with GLIBC_TUNABLES)."""
    prelude = ("import atexit, os, sys, threading, time\n"  # __del__ writes to the fd: print may be torn down
               "class Teardown:\n    def __del__(self, write=os.write):\n        write(1, b'teardown\\n')\n"
               "kept = Teardown()\n"
               "atexit.register(lambda: print('atexit ran', flush=True))\n"
               f"sys.argv = ['pathapp', 'info', {str(tmp_path / 'missing.svs')!r}]\n")
    run, main = "from pathapp.cli import run\nrun()\n", "from pathapp.cli import main\nmain()\n"
    usual = subprocess.run([sys.executable, "-c", prelude + main], capture_output=True, text=True, timeout=120)
    assert usual.returncode != 0 and "missing.svs" in usual.stderr and usual.stdout == "atexit ran\nteardown\n"
    proc = subprocess.run([sys.executable, "-c", prelude + run], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr, proc.stdout) == (usual.returncode, usual.stderr, "atexit ran\n")
    worker = ("import pathapp.cli\ndone, command = threading.Event(), pathapp.cli.main\n"  # a thread that outlives main
              "def main():\n    try:\n        command()\n    finally:\n        done.set()\n"
              "pathapp.cli.main = main\n"
              "late = lambda: (done.wait(), time.sleep(0.2), print('thread done', flush=True))\n"
              "threading.Thread(target=late).start()\n")
    proc = subprocess.run([sys.executable, "-c", prelude + worker + run], capture_output=True, text=True, timeout=120)
    assert proc.returncode == usual.returncode
    assert proc.stdout.splitlines() == ["thread done", "atexit ran", "teardown"], proc.stdout
    # glibc's malloc is asked for huge pages: the command starts again once with the tunable set,
    # unless GLIBC_TUNABLES already says what to do with them
    show = "print(os.environ.get('GLIBC_TUNABLES'), flush=True)\n"
    for preset, seen in ((None, ["None", "glibc.malloc.hugetlb=1"]),
                         ("glibc.malloc.hugetlb=0", ["glibc.malloc.hugetlb=0"])):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        env.update({"GLIBC_TUNABLES": preset} if preset else {})
        proc = subprocess.run([sys.executable, "-c", prelude + show + run], capture_output=True, text=True,
                              timeout=120, env=env)
        assert proc.returncode == usual.returncode and proc.stdout.splitlines() == [*seen, "atexit ran"], proc.stdout


def test_first_slide_planned_and_read_ahead_by_a_child_before_torch(shared_data, bundle_path, tmp_path, capfd):
    """The run's first slide is planned by a child forked before torch is imported (the planner and the
    bundle header need no torch), which then reads and measures its first tiles; the plan is the one the
    parent would make, the results those of a slide read by the workers alone, a slide the child cannot
    plan (no µm/px) is left to the parent, and what is said about a slide is said by the parent, once."""
    from pathapp.infer.ahead import PlanAhead
    from pathapp.infer.options import InferOptions
    from pathapp.infer.pipeline import plan_tiles, prepare_model
    from pathapp.infer.planner import expand_inputs
    from pathapp.tiles import grid as grid_module
    from pathapp.tiles.qc import MEASURES

    code = "import sys, pathapp.infer.planner, pathapp.models.header; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout == "False\n"
    o = InferOptions(model=str(bundle_path), mpp=4.0)
    jobs = expand_inputs([data_file(SVS), data_file(NO_MPP)], tmp_path)
    bundle = load_bundle(bundle_path)
    # room for 5 tiles: the child reads those, the workers the rest
    ahead = PlanAhead(jobs[0], o, None, 4.0, bundle.tile_size, budget=5 * (bundle.tile_size**2 * 3 + 4 * len(MEASURES)))
    plan = ahead.take(jobs[0])
    with open_slide(data_file(SVS)) as slide:
        grid, thumbnail, empty = plan_tiles(slide, 4.0, bundle.tile_size, None, None, {})
    assert len(grid) > 8 and empty is None and plan.empty is None
    np.testing.assert_array_equal(plan.grid.coords, grid.coords)
    np.testing.assert_array_equal(plan.thumbnail, thumbnail)
    assert {"low-res read", "tissue", "grid"} <= plan.timings.keys()
    deadline = time.monotonic() + 60
    while ahead._count.value < 5:
        assert time.monotonic() < deadline, "the planning child read no tiles"
        time.sleep(0.05)
    rt = prepare_model(bundle, "cpu", "fp32")
    with open_slide(data_file(SVS)) as slide:
        ahead_res = infer_slide(slide, bundle, mpp=4.0, runtime=rt, plan=plan, workers=1, progress=False)
        plain = infer_slide(slide, bundle, mpp=4.0, runtime=rt, workers=1, progress=False)
    assert ahead_res.params["read_ahead"] == 5 and plain.params["read_ahead"] == 0
    np.testing.assert_array_equal(ahead_res.coords, plain.coords)
    np.testing.assert_allclose(ahead_res.embeddings, plain.embeddings, atol=1e-5)
    assert np.abs(plain.embeddings - plain.embeddings[0]).max() > 1e-3  # tiles differ (LayerScale 1)
    for name in MEASURES:
        np.testing.assert_array_equal(ahead_res.extra[f"qc: {name}"], plain.extra[f"qc: {name}"])
    assert PlanAhead.first(jobs[1:], o, None).take(jobs[1]) is None
    # what is said about a slide (here: its upsampling) is said by this process, once; the child is quiet
    grid_module._UPSAMPLING_SAID.discard((1.07, 0.5))
    capfd.readouterr()
    coarse = InferOptions(model=str(bundle_path), mpp=0.5, slide_mpp=1.07)
    plan = PlanAhead.first(jobs[:1], coarse, None).take(jobs[0])
    assert capfd.readouterr().err == ""
    plan.grid = plan.grid.subset(np.arange(3))
    with open_slide(data_file(SVS), slide_mpp=1.07) as slide:
        res = infer_slide(slide, load_bundle(bundle_path), mpp=0.5, plan=plan, workers=0, progress=False)
    assert len(res) == 3 and capfd.readouterr().err.count("warning:") == 1
    # a parent killed before it takes the plan (kill -9, out of memory) leaves no planning child behind
    code = ("import os; from pathlib import Path; from pathapp.infer.options import InferOptions\n"
            "from pathapp.infer.ahead import PlanAhead\nfrom pathapp.infer.planner import expand_inputs\n"
            f"jobs = expand_inputs([{str(data_file(SVS))!r}], Path({str(tmp_path / 'k')!r}))\n"
            f"print(PlanAhead.first(jobs, InferOptions(model={str(bundle_path)!r}, mpp=4.0), None)._process.pid)\n"
            "os._exit(0)\n")
    child = Path("/proc", subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                         timeout=120).stdout.split()[-1])
    deadline = time.monotonic() + 60
    while child.exists() and child.joinpath("stat").read_text().split(")")[-1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the planning child of a killed parent is still running"
        time.sleep(0.2)


def test_attention_mil_bundle_gives_slide_prediction_and_attention(shared_data, tmp_path):
    """A slide-level (ABMIL) head: tiles carry their attention, run.json the slide's prediction."""
    bundle = tiny_bundle(tmp_path, num_classes=2, head="abmil")
    code, out = run_cli("infer", str(data_file(SVS)), "--model", str(bundle), "--mpp", "2.0", "--out",
                        str(tmp_path / "o"), "--workers", "0")
    assert code == 0, out
    folder = tmp_path / "o" / "CMU-1-Small-Region"
    tiles = assert_qupath_conformant(folder / "tiles.geojson")
    attention = np.array([f["properties"]["measurements"]["attention"] for f in tiles])
    assert attention.sum() == pytest.approx(1, abs=1e-4) and attention.std() > 0
    prediction = json.loads((folder / "run.json").read_text())["parameters"]["slide_prediction"]
    assert set(prediction) == {"Tumor", "Stroma"} and sum(prediction.values()) == pytest.approx(1, abs=1e-5)
    with h5py.File(folder / "embeddings.h5") as f:  # the raw map: one cell per tile, NaN elsewhere
        grid = f["heatmaps"]["attention"][()]
    shown = grid[np.isfinite(grid)]
    assert len(shown) == len(tiles) and sorted(shown) == pytest.approx(sorted(attention), abs=1e-6)
    x, y, w, h = image_box(folder / "heatmap-attention.png")  # the picture: attention in colour over the slide
    pic = np.asarray(Image.open(folder / "heatmap-attention.png").convert("RGB"))[y:y + h, x:x + w]
    assert len(np.unique(pic.reshape(-1, 3), axis=0)) > 50


def test_progress_lines_when_not_a_terminal(shared_data, bundle_path, monkeypatch):
    """Logs (QuPath's log window, torchrun) get plain `progress:` lines instead of a tqdm bar."""
    import pathapp.infer.pipeline

    monkeypatch.setattr(pathapp.infer.pipeline, "PROGRESS_EVERY_S", 0.0)
    logged: list[str] = []
    res = infer_slide(open_slide(data_file(SVS)), load_bundle(bundle_path), mpp=4.0, batch_size=4, workers=0,
                      log=logged.append)
    n = len(res)
    assert len(logged) == -(-n // 4) and logged[-1].startswith(f"progress: CMU-1-Small-Region: {n}/{n} tiles, ")
