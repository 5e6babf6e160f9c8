"""Pretraining engine: teacher/EMA, schedules, config, exact resume, online patching from real slides,
the `pathapp pretrain` command and its bundle."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import data_file
from pathapp.cli import cli
from pathapp.errors import PathappError
from pathapp.slide import open_slide
from pathapp.ssl.config import SSLConfig
from pathapp.ssl.data import SSLDataset, SlideTileSource, make_loader, open_sources
from pathapp.ssl.meta_arch import Student, Teacher
from pathapp.engine.schedules import CosineSchedule
from pathapp.ssl.schedules import build_schedules, param_groups, scaled_lr
from pathapp.ssl.train import build_backbone, pretrain
from ssl_tiny import TINY_SSL, tiny_config

torch.set_num_threads(1)
EBHI_NORMAL = "labeled/ebhi-seg/EBHI-SEG/Normal/image"
CMU = "wsi/aperio/CMU-1-Small-Region.svs"
TCGA = "wsi/aperio/tcga-cr-7395-01a-01-ts1.svs"
NCT = "tiles/nct-crc-he-100k-nonorm-samples"  # 9 real tiles, one per class folder


def _tiny_pair(cfg: SSLConfig) -> tuple[Student, Teacher]:
    torch.manual_seed(0)
    backbone, _ = build_backbone(cfg)
    student = Student(backbone, cfg)
    return student, Teacher(student)


def test_teacher_gets_no_gradients_and_follows_ema():
    cfg = tiny_config()
    student, teacher = _tiny_pair(cfg)
    g = torch.randn(4, 3, 42, 42)
    masks = torch.zeros(4, 9, dtype=torch.bool)
    masks[0, :3] = True
    out = student(g, torch.randn(4, 3, 28, 28), masks)
    t_out = teacher(g, masks)
    loss = out["global_logits"].sum() + out["local_logits"].sum() + out["masked_logits"].sum() + t_out["global_logits"].sum()
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for n, p in student.named_parameters() if "ibot" not in n)
    assert not teacher.training and not teacher.train().training  # drop-path is never active in the teacher
    with torch.no_grad():  # make the two differ, then check θ_t ← m θ_t + (1 − m) θ_s exactly
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    s = dict(student.named_parameters())
    teacher.ema_update(student, 0.9)
    for n, p in teacher.named_parameters():
        assert torch.allclose(p, 0.9 * before[n] + 0.1 * s[n], atol=1e-6, rtol=0), n


def test_schedules():
    c = CosineSchedule(1.0, 0.0, total=10, warmup=2, start_warmup=0.2, freeze=1)
    assert [round(c[i], 6) for i in range(3)] == [0.0, 0.2, 0.6]
    assert c[3] == pytest.approx(1.0) and c[9] < 0.1 and c[100] == 0.0
    assert scaled_lr(0.004, 256) == pytest.approx(0.002)
    cfg = tiny_config(steps=20, epoch_length=4, warmup_epochs=1, warmup_teacher_temp_epochs=2, freeze_last_layer_epochs=1)
    s = build_schedules(cfg, world_size=2)
    peak = scaled_lr(cfg.base_lr, 4 * 2)
    assert s.lr[4] == pytest.approx(peak) and s.lr[0] == 0.0
    assert all(s.last_layer_lr[i] == 0 for i in range(4)) and s.last_layer_lr[5] > 0
    assert s.teacher_temp[0] == pytest.approx(0.04) and s.teacher_temp[8] == pytest.approx(0.07)
    assert s.momentum[0] == pytest.approx(0.992) and s.momentum[19] == pytest.approx(1.0, abs=1e-4)
    assert s.wd[0] == pytest.approx(0.04) and s.wd[19] == pytest.approx(0.4, abs=1e-2)


def test_param_groups_layer_decay_patch_embed_and_no_weight_decay():
    cfg = tiny_config()
    student, _ = _tiny_pair(cfg)
    groups = param_groups(student, layer_decay=0.5, patch_embed_lr_mult=0.2)
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(student.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(named)
    lr = lambda n: where[id(named[n])]["lr_multiplier"]  # noqa: E731
    wd = lambda n: where[id(named[n])]["wd_multiplier"]  # noqa: E731
    # depth 2: embeddings 0.5³, block 0 0.5², block 1 0.5, final norm and heads 1; patch embed ×0.2
    assert lr("backbone.cls_token") == pytest.approx(0.125)
    assert lr("backbone.patch_embed.proj.weight") == pytest.approx(0.025)
    assert lr("backbone.blocks.0.attn.qkv.weight") == pytest.approx(0.25)
    assert lr("backbone.blocks.1.mlp.fc1.weight") == pytest.approx(0.5)
    assert lr("backbone.norm.weight") == 1.0 and lr("dino_head.mlp.0.weight") == 1.0
    assert wd("backbone.blocks.0.attn.qkv.bias") == 0 and wd("backbone.blocks.0.norm1.weight") == 0
    assert wd("backbone.blocks.0.ls1.gamma") == 0 and wd("backbone.blocks.0.attn.qkv.weight") == 1
    last = [g for g in groups if g["is_last_layer"]]
    assert last and all("last_layer" in n for n, p in named.items() if any(p is q for g in last for q in g["params"]))


def test_config_yaml_round_trip(tmp_path):
    cfg = tiny_config(mpp=[0.5, 1.0], regularizer="kde", centering="ema")
    cfg.save(tmp_path / "c.yaml")
    back = SSLConfig.load(tmp_path / "c.yaml")
    assert back == cfg and isinstance(back.global_crop_scale, tuple) and back.mpp == [0.5, 1.0]
    (tmp_path / "bad.yaml").write_text("batch_sise: 3\n")
    with pytest.raises(PathappError, match="batch_sise"):
        SSLConfig.load(tmp_path / "bad.yaml")
    with pytest.raises(PathappError, match="centering"):
        SSLConfig.from_dict({"centering": "mean"})
    # YAML 1.1 reads 1e-5 as a string; numbers in either spelling are numbers
    (tmp_path / "exp.yaml").write_text("layerscale_init: 1e-5\nbase_lr: 4e-3\nbatch_size: '8'\n")
    loaded = SSLConfig.load(tmp_path / "exp.yaml")
    assert (loaded.layerscale_init, loaded.base_lr, loaded.batch_size) == (1e-5, 0.004, 8)
    with pytest.raises(PathappError, match="base_lr must be a number"):
        SSLConfig.from_dict({"base_lr": "fast"})
    with pytest.raises(PathappError, match="balance"):
        SSLConfig.from_dict({"balance": "area"})


def _losses(run) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_reproduces_uninterrupted_run(tmp_path, shared_data):
    cfg = tiny_config(tiles=str(data_file(EBHI_NORMAL)), steps=5, checkpoint_every=100, regularizer="kde",
                      centering="ema")  # the EMA centre is state that must be resumed too
    pretrain(cfg, tmp_path / "a", progress=False)
    pretrain(cfg, tmp_path / "b", progress=False, stop_at=2)
    assert len(_losses(tmp_path / "b")) == 2
    pretrain(cfg, tmp_path / "b", progress=False, resume=True)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == len(b) == 5 and all(math.isfinite(x) for x in a)
    assert np.allclose(a, b, rtol=0, atol=1e-6), (a, b)
    ta = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["teacher"]
    tb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["teacher"]
    assert all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)


def test_online_patching_from_real_slides():
    slide_path = data_file(CMU)
    src = open_sources(slide_path, mpps=[0.5, 1.0], tile_size=64, min_tissue=0.6)
    from pathapp.tiles.tissue import tissue_fraction_rgb

    tiles = [src.sample(np.random.default_rng([1, i])) for i in range(12)]
    assert all(t.shape == (64, 64, 3) and t.dtype == np.uint8 for t in tiles)
    fracs = [tissue_fraction_rgb(t, focus=False) for t in tiles]
    assert np.mean([f > 0.6 for f in fracs]) >= 0.75  # the per-tile HSV check keeps tissue
    assert len({t.tobytes() for t in tiles}) == 12  # different places
    assert np.array_equal(src.sample(np.random.default_rng([1, 3])), tiles[3])  # a pure function of the seed
    # tiles are read at the asked µm/px: the centre half of a 1.0 µm/px tile is the 0.5 µm/px tile, halved
    entry = src.entries[0]
    cx, cy = entry.centres[0][len(entry.centres[0]) // 2]
    fine, coarse = src.read(entry, 0, cx, cy), src.read(entry, 1, cx, cy)  # entry.geometries: 0.5, 1.0 µm/px
    from PIL import Image

    halved = np.asarray(Image.fromarray(fine).resize((32, 32), Image.BILINEAR)).astype(float)
    assert np.abs(coarse[16:48, 16:48].astype(float) - halved).mean() < 12
    assert np.abs(coarse[16:48, 16:48].astype(float) - np.roll(halved, 8, axis=0)).mean() > 15
    # worker-safe: the slide handle pickles and reopens, and a worker produces the same batch
    clone = pickle.loads(pickle.dumps(src))
    assert np.array_equal(clone.sample(np.random.default_rng([1, 3])), tiles[3])
    cfg = tiny_config()
    ds = SSLDataset(src, cfg, patch_size=14)
    b0 = next(iter(make_loader(ds, 3, 2, rank=0, world_size=1, num_workers=0)))
    b1 = next(iter(make_loader(ds, 3, 2, rank=0, world_size=1, num_workers=1)))
    assert torch.equal(b0["global"], b1["global"]) and torch.equal(b0["masks"], b1["masks"])
    assert b0["global"].shape == (4, 3, 42, 42) and b0["local"].shape == (4, 3, 28, 28) and b0["masks"].shape == (4, 9)


def test_slides_balanced_by_slide_or_by_tissue_area():
    slides = [open_slide(data_file(CMU)), open_slide(data_file(TCGA), slide_mpp=1.0)]
    picks = {}
    for balance in ("slides", "tissue"):
        src = SlideTileSource(slides, [0.5], 32, 0.6, balance=balance)
        picks[balance] = np.mean([src.pick(np.random.default_rng([0, i])) for i in range(2000)])
    areas = [e.tissue_um2 for e in src.entries]
    share = areas[1] / sum(areas)
    assert 0.5 < share < 0.99  # the TCGA section holds most of the tissue (≈ 10 of 10.6 mm²)
    assert abs(picks["slides"] - 0.5) < 0.04  # each slide equally often whatever its size
    assert abs(picks["tissue"] - share) < 0.03  # each mm² of tissue equally often


def test_sampled_tiles_lie_inside_the_slide():
    # OS-1-detail is tissue edge to edge and only ~4 tiles wide at 1 µm/px: tiles reaching past its
    # border would come back with white (255) bands
    src = open_sources(data_file("wsi/ome-tiff/OS-1-detail.ome.tif"), mpps=[1.0], tile_size=64, min_tissue=0.6)
    tiles = [src.sample(np.random.default_rng([2, i])) for i in range(40)]
    padded = [t for t in tiles if (t == 255).all(axis=(1, 2)).any() or (t == 255).all(axis=(0, 2)).any()]
    assert len(padded) == 0, f"{len(padded)} of {len(tiles)} tiles reach outside the image"


def test_slides_csv_gives_per_slide_mpp(tmp_path):
    import os

    csv_path = tmp_path / "lists" / "slides.csv"
    csv_path.parent.mkdir()
    rel = os.path.relpath(data_file(TCGA), csv_path.parent)  # paths are relative to the CSV
    csv_path.write_text(f"slide,mpp\n{data_file(CMU)},\n{rel},1.0\n")
    src = open_sources(csv_path, mpps=[1.0], tile_size=64, min_tissue=0.6)
    assert {e.slide.path.name: e.slide.mpp for e in src.entries} == {"CMU-1-Small-Region.svs": 0.499, TCGA.split("/")[-1]: 1.0}
    csv_path.write_text(f"slide,mpp\n{data_file(CMU)},half\n")
    with pytest.raises(PathappError, match="line 2: mpp 'half'"):
        open_sources(csv_path, mpps=[1.0], tile_size=64, min_tissue=0.6)
    csv_path.write_text(f"slide,mpp\n{data_file(CMU)},\n,1.0\n")
    with pytest.raises(PathappError, match="line 3: no slide path"):
        open_sources(csv_path, mpps=[1.0], tile_size=64, min_tissue=0.6)
    csv_path.write_text(f"path\n{data_file(CMU)}\n")
    with pytest.raises(PathappError, match="columns slide"):
        open_sources(csv_path, mpps=[1.0], tile_size=64, min_tissue=0.6)


def test_bad_sources(tmp_path):
    with pytest.raises(PathappError, match="no slide with a known µm/px"):
        open_sources(data_file(TCGA), mpps=[0.5], tile_size=64, min_tissue=0.6)
    with pytest.raises(PathappError, match="no image tiles"):
        open_sources(tiles=tmp_path, mpps=[0.5], tile_size=64, min_tissue=0.6)
    with pytest.raises(PathappError, match="exactly one"):
        open_sources(mpps=[0.5], tile_size=64, min_tissue=0.6)


def test_fewer_tiles_than_a_batch_are_refused_before_any_write(tmp_path):
    """A batch draws distinct images: nine real NCT-CRC-HE tiles cannot fill a batch of 16, and the
    run stops in one line saying how many were found and needed, before its folder is made."""
    with pytest.raises(PathappError) as e:
        pretrain(tiny_config(tiles=str(data_file(NCT)), batch_size=16, steps=1), tmp_path / "run", progress=False)
    assert str(e.value) == (f"{data_file(NCT)}: 9 images found (ADI-AAQEFMRI.tif, BACK-AAQSHYMA.tif, DEB-ACHGAMCT.tif, …), fewer than one "
                            f"batch of 16; give a folder of at least 16 tile images or a --batch-size of 9 or less")
    assert not (tmp_path / "run").exists()


def _write_tiny_yaml(tmp_path) -> str:
    cfg = SSLConfig(**{k: v for k, v in TINY_SSL.items() if k != "backbone"})
    cfg.save(tmp_path / "tiny.yaml")
    return str(tmp_path / "tiny.yaml")


def test_cli_pretrain_on_a_slide_exports_a_usable_bundle(tmp_path):
    from pathapp.models.bundle import load_bundle

    out = tmp_path / "run"
    args = ["pretrain", "--slides", str(data_file(CMU)), "--backbone", "dinov2_vits14", "--mpp", "0.5", "--mpp", "1.0",
            "--config", _write_tiny_yaml(tmp_path), "--steps", "2", "--out", str(out), "--quiet"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "teacher.pathapp" in res.output
    saved = SSLConfig.load(out / "config.yaml")
    assert saved.mpp == [0.5, 1.0] and saved.steps == 2 and saved.slides.endswith("CMU-1-Small-Region.svs")
    assert saved.mean == (0.485, 0.456, 0.406)  # resolved from the backbone and recorded
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"loss", "dino", "ibot", "koleo", "lr", "wd", "momentum", "teacher_temp", "tiles_per_s"} <= rows[0].keys()
    bundle = load_bundle(out / "teacher.pathapp")
    # two scales trained at: the bundle records the median (upper middle), says so, and `model info` shows it
    assert bundle.spec.embed_dim == 48 and bundle.mpp == 1.0 and bundle.tile_size == 42
    assert bundle.provenance["trained_mpp"] == [0.5, 1.0] and "median" in bundle.provenance["recorded_mpp"]
    info = json.loads(CliRunner().invoke(cli, ["model", "info", str(out / "teacher.pathapp")]).output)
    assert info["preprocessing"]["mpp"] == 1.0 and info["provenance"]["trained_mpp"] == [0.5, 1.0]
    assert SSLConfig(mpp=[0.75, 1.0, 1.25]).inference_mpp == 1.0 and SSLConfig(mpp=[1.25, 0.75]).inference_mpp == 1.25
    assert SSLConfig(mpp=[0.75, 1.0, 1.25], bundle_mpp=0.8).inference_mpp == 0.8
    model = bundle.build()
    emb, probs = model(torch.rand(3, 3, 42, 42))
    assert emb.shape == (3, 48) and probs is None and not torch.allclose(emb[0], emb[1])
    # a second start into the same folder must not overwrite the run
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "--resume" in str(again.exception or again.output)


def test_cli_usage_errors(tmp_path):
    r = CliRunner().invoke(cli, ["pretrain", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "--slides" in r.output
    r = CliRunner().invoke(cli, ["pretrain", "--out", str(tmp_path / "x"), "--resume"])
    assert r.exit_code != 0 and "no run to resume" in str(r.exception)
    help_text = CliRunner().invoke(cli, ["pretrain", "--help"]).output
    assert "--init" in help_text and "torchrun" in help_text and "qpproj" in help_text


def test_init_dinov2_offline_message_and_init_from_file(tmp_path, monkeypatch):
    from pathapp.models.bundle import Bundle, load_bundle, save_bundle

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    tiles = str(data_file(EBHI_NORMAL))
    with pytest.raises(PathappError, match="--init FILE"):
        pretrain(tiny_config(tiles=tiles, init="dinov2", steps=1), tmp_path / "hub", progress=False)
    # continued pretraining from a file: at step 1 the lr is 0, so the teacher still equals the file
    backbone, spec = build_backbone(tiny_config(drop_path=0.0))
    with torch.no_grad():
        for p in backbone.parameters():
            p.normal_(0, 0.05)
    init = save_bundle(Bundle.from_model(backbone, spec), tmp_path / "init.pathapp")
    bundle = pretrain(tiny_config(tiles=tiles, init=str(init), steps=1), tmp_path / "cont", progress=False)
    got = load_bundle(bundle).backbone_state
    want = backbone.state_dict()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_qupath_project_source_uses_present_images(tmp_path, capsys):
    cmu, tcga = data_file(CMU), data_file(TCGA)

    def server(path, mpp):
        meta = {"width": 100, "height": 100}
        if mpp:
            meta["pixelCalibration"] = {"pixelWidth": {"value": mpp, "unit": "µm"}, "pixelHeight": {"value": mpp, "unit": "µm"}}
        return {"builderType": "uri", "providerClassName": "qupath.lib.images.servers.openslide.OpenslideServerBuilder",
                "uri": path.as_uri(), "args": [], "metadata": meta}

    servers = [server(cmu, None), server(tmp_path / "gone.svs", 0.5), server(tcga, 0.25)]
    images = [{"serverBuilder": s, "entryID": i + 1, "imageName": f"image {i + 1}", "metadata": {}} for i, s in enumerate(servers)]
    qpproj = tmp_path / "proj" / "project.qpproj"
    qpproj.parent.mkdir()
    qpproj.write_text(json.dumps({"version": "0.6.0", "uri": qpproj.as_uri(), "lastID": 3, "images": images}))
    src = open_sources(qpproj, mpps=[0.5], tile_size=64, min_tissue=0.6)
    # the missing image is reported and skipped; the TCGA slide without µm/px in its file gets QuPath's 0.25
    assert sorted(e.slide.path.name for e in src.entries) == sorted([cmu.name, tcga.name])
    assert {e.slide.path.name: e.slide.mpp for e in src.entries}[tcga.name] == 0.25
    assert "image 2" in capsys.readouterr().err


def test_bf16_autocast_and_gradient_accumulation(tmp_path):
    cfg = tiny_config(tiles=str(data_file(EBHI_NORMAL)), steps=2, precision="bf16", grad_accum=2, batch_size=2,
                      n_local_crops=0, ibot_separate_head=True, centering="sinkhorn")
    pretrain(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples_seen"] for r in rows] == [4, 8] and all(math.isfinite(r["loss"]) for r in rows)


def test_register_tokens_backbone():
    cfg = tiny_config(backbone="dinov2_vits14_reg4")
    student, teacher = _tiny_pair(cfg)
    assert student.num_prefix_tokens == 5
    masks = torch.zeros(2, 9, dtype=torch.bool)
    masks[:, 4] = True
    out = student(torch.randn(2, 3, 42, 42), None, masks)
    assert out["masked_logits"].shape == (2, 64) and "local_logits" not in out
    assert teacher(torch.randn(2, 3, 42, 42), masks)["masked_logits"].shape == (2, 64)
    with pytest.raises(PathappError, match="init"):
        SSLConfig.from_dict({"init": "/no/such/weights.pth"})


def test_max_minutes_stops_with_checkpoint_and_bundle(tmp_path):
    cfg = tiny_config(tiles=str(data_file(EBHI_NORMAL)), steps=50, max_minutes=1e-6, checkpoint_every=100)
    pretrain(cfg, tmp_path / "run", progress=False)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and (tmp_path / "run" / "teacher.pathapp").exists()
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 1


def test_sampling_inside_a_qupath_projects_own_annotations(tmp_path, capsys):
    """`pretrain --slides project.qpproj --roi-class NAME`: tile centres are drawn inside each image's
    own annotations of that class (read from its data.qpdata, no Java), as `infer --roi-class` tiles;
    an entry without a data file, or without that class, is skipped with one line."""
    import shapely
    from qupath_projects import annotated_project

    qpproj = annotated_project(tmp_path / "proj", entries=2, saved=1)  # entry 1: Upper y 0-1300, Lower y 1700-2967

    def sampled_centres(src, n=30):
        seen = []
        read = src.read

        def recording_read(entry, k, cx, cy):
            seen.append((cx, cy))
            return read(entry, k, cx, cy)

        src.read = recording_read  # the real reader, with the positions it was asked for noted
        tiles = [src.sample(np.random.default_rng([5, i])) for i in range(n)]
        assert all(t.shape == (64, 64, 3) for t in tiles)
        return np.array(seen)

    everywhere = open_sources(qpproj, mpps=[0.5, 1.0], tile_size=64, min_tissue=0.6)
    assert len(everywhere.entries) == 2 and everywhere.entries[0].roi is None
    ys = sampled_centres(everywhere)[:, 1]
    assert ys.min() < 1300 and ys.max() > 1700  # without --roi-class: the whole section
    capsys.readouterr()
    for name, inside in (("Upper", lambda y: y < 1300), ("Lower", lambda y: y > 1700)):
        src = open_sources(qpproj, mpps=[0.5, 1.0], tile_size=64, min_tissue=0.6, roi_class=[name])
        err = capsys.readouterr().err
        assert "entry 2 (slide 2.svs) has no data file" in err and "skipped" in err
        (entry,) = src.entries
        assert all(inside(c[:, 1]).all() for c in entry.centres), name
        xy = sampled_centres(src)
        assert len(xy) >= 30 and inside(xy[:, 1]).all(), name
        assert shapely.contains_xy(entry.roi, xy[:, 0], xy[:, 1]).all()
        assert entry.tissue_um2 < everywhere.entries[0].tissue_um2
    with pytest.raises(PathappError, match="no image with annotations of class Tumour"):
        open_sources(qpproj, mpps=[0.5], tile_size=64, min_tissue=0.6, roi_class=["Tumour"])
    assert "of class Tumour (annotation classes present: Lower, Upper)" in capsys.readouterr().err
    with pytest.raises(PathappError, match="--roi-class samples inside a QuPath project"):
        open_sources(data_file(CMU), mpps=[0.5], tile_size=64, min_tissue=0.6, roi_class=["Upper"])


def test_cli_pretrain_on_a_projects_annotations(tmp_path):
    from qupath_projects import annotated_project

    qpproj = annotated_project(tmp_path / "proj")
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["pretrain", "--slides", str(qpproj), "--roi-class", "Lower", "--mpp", "1.0",
                                   "--config", _write_tiny_yaml(tmp_path), "--steps", "1", "--out", str(out),
                                   "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert SSLConfig.load(out / "config.yaml").roi_class == ["Lower"]  # a resumed run samples the same region
    assert (out / "teacher.pathapp").is_file()
    res = CliRunner().invoke(cli, ["pretrain", "--slides", str(qpproj), "--roi-class", "Tumour", "--config",
                                   _write_tiny_yaml(tmp_path), "--steps", "1", "--out", str(tmp_path / "none")])
    assert res.exit_code != 0 and "no image with annotations of class Tumour" in str(res.exception or res.output)
