"""Similarity search: the two index backends (FAISS in a folder, Qdrant in its local mode), the
`pathapp index` / `search` / `evaluate-search` commands on real slides and EBHI-Seg images with tiny
random-weight ViTs, and every bad input the issue names (one line each, exit code 2)."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import shapely
import torch
from click.testing import CliRunner
from conftest import DATA, IN_CI, data_file, run_main
from PIL import Image
from qupath_rules import assert_qupath_conformant
from shapely.geometry import shape
from vit_factory import tiny_bundle

from pathapp.cli import cli
from pathapp.index import (
    IndexModel,
    IndexStoreError,
    SlideEntry,
    SlideRecord,
    faiss_store,
    open_index,
)
from pathapp.index.evaluate import query_scores
from pathapp.index.search import exclusions, rank

SVS = "wsi/aperio/CMU-1-Small-Region.svs"
OME = "wsi/ome-tiff/OS-1-detail.ome.tif"
EBHI = "labeled/ebhi-seg/labels.csv"
MPP = "2.0"  # coarse tiles keep the tiny model fast: 56 px at 2 µm/px

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------ helpers

def clustered(n: int, dim: int, seed: int, centres: int = 20) -> np.ndarray:
    """Vectors around a few centres, as embeddings of tissue types are (iid noise has no neighbours)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim))
    return (c[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, dim))).astype(np.float32)


def entry(i: int, vectors: np.ndarray, case: str | None = None, probs: bool = False) -> SlideEntry:
    n = len(vectors)
    rec = SlideRecord(key=f"/slides/s{i}.svs", slide_path=f"/slides/s{i}.svs", name=f"s{i}", n_tiles=n,
                      footprint=224.0, slide_mpp=0.5, class_names=["A", "B"] if probs else [],
                      meta={"case": case or f"case{i}", "label": "AB"[i % 2]})
    coords = np.column_stack([np.arange(n) * 224, np.full(n, 224 * i)]).astype(np.int64)
    p = np.column_stack([np.linspace(0, 1, n), 1 - np.linspace(0, 1, n)]).astype(np.float32) if probs else None
    return SlideEntry(rec, vectors, coords, p)


MODEL = IndexModel("tiny", "f" * 64, 32, 0.5, 224)


def need_qdrant() -> None:
    """qdrant-client comes with the `qdrant` extra, which CI installs."""
    try:
        import qdrant_client  # noqa: F401
    except ImportError:
        (pytest.fail if IN_CI else pytest.skip)("qdrant-client missing: pip install -e '.[qdrant]'")


def run_cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, list(args), standalone_mode=True)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def one_error_line(code: int, text: str, *needles: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in text, text
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------- the backends

@pytest.fixture(params=["faiss-flat", "faiss-ivfpq", "qdrant-local"])
def location(request, tmp_path) -> tuple[str, str]:
    if request.param == "qdrant-local":
        need_qdrant()
        return f"qdrant:///{tmp_path}/qdrant/tiles", "auto"
    return str(tmp_path / "idx"), request.param.split("-")[1]


def test_backend_add_search_replace_remove(location) -> None:
    loc, kind = location
    slides = [entry(i, clustered(60, 32, seed=i), probs=i == 2) for i in range(6)]
    with open_index(loc, create=True, kind=kind) as idx:
        assert idx.add(slides[:3], MODEL) == [] and idx.add(slides[3:], MODEL) == []
        assert len(idx.slides()) == 6 and idx.model == MODEL
        # a stored tile finds itself first, at cosine ~1 (float16 storage)
        q = slides[2].vectors[[5, 17]]
        found = idx.search_tiles(q, 10)
        assert [(r[0].slide, r[0].tile) for r in found] == [("/slides/s2.svs", 5), ("/slides/s2.svs", 17)]
        assert all(r[0].similarity > 0.999 for r in found)
        assert all(r[i].similarity >= r[i + 1].similarity for r in found for i in range(len(r) - 1))
        # excluded slides never come back
        others = idx.search_tiles(q, 10, exclude={"/slides/s2.svs", "/slides/s0.svs"})
        assert others[0] and not {t.slide for r in others for t in r} & {"/slides/s2.svs", "/slides/s0.svs"}
        # slide vectors: the mean of a slide's tiles is nearest its own slide
        (best, sim), *_ = idx.search_slides(slides[4].vectors.mean(0), 3)
        assert best == "/slides/s4.svs" and sim > 0.99
        assert "/slides/s4.svs" not in dict(idx.search_slides(slides[4].vectors.mean(0), 3, exclude={"/slides/s4.svs"}))
        # payload round trip
        t = idx.tiles("/slides/s2.svs", vectors=True)
        np.testing.assert_array_equal(t.coords, slides[2].coords)
        np.testing.assert_allclose(t.probs, slides[2].probs, atol=1e-6)
        cos = np.sum(t.vectors * slides[2].vectors, 1) / np.linalg.norm(slides[2].vectors, axis=1)
        assert cos.min() > 0.999
        # adding a slide again replaces it; remove deletes
        new = entry(1, clustered(40, 32, seed=99))
        assert idx.add([new], MODEL) == ["/slides/s1.svs"]
        assert idx.slides()["/slides/s1.svs"].n_tiles == 40
        assert idx.search_tiles(new.vectors[:1], 1)[0][0].slide == "/slides/s1.svs"
        assert idx.remove(["/slides/s0.svs", "/slides/nope.svs"]) == ["/slides/s0.svs"]
        with pytest.raises(IndexStoreError, match="not the index's"):
            idx.add([slides[0]], IndexModel("other", "0" * 64, 32, 0.5, 224))
        with pytest.raises(IndexStoreError, match="µm/px"):
            idx.add([slides[0]], IndexModel("tiny", "f" * 64, 32, 1.0, 224))
    with open_index(loc) as idx:  # persisted
        assert sorted(idx.slides()) == [f"/slides/s{i}.svs" for i in range(1, 6)]
        assert sum(r.n_tiles for r in idx.slides().values()) == 40 + 4 * 60
        assert all(t.slide != "/slides/s0.svs" for t in idx.search_tiles(slides[0].vectors[:3], 20)[0])


def test_auto_switches_to_ivfpq_with_exact_reranking(tmp_path, monkeypatch) -> None:
    """Past FLAT_MAX live vectors the folder index becomes IVF-PQ; its shortlist is re-ranked against
    the stored vectors, so reported similarities are exact and recall@10 stays high."""
    monkeypatch.setattr(faiss_store, "FLAT_MAX", 2000)
    data, queries = np.split(clustered(4050, 32, seed=1), [4000])  # queries from the same tissue, not indexed
    with open_index(tmp_path / "idx", create=True) as idx:
        idx.add([entry(i, data[i * 500 : (i + 1) * 500]) for i in range(3)], MODEL)
        assert idx.describe()["kind"] == "flat"
        idx.add([entry(i, data[i * 500 : (i + 1) * 500]) for i in range(3, 8)], MODEL)
        info = idx.describe()
        assert info["kind"] == "ivfpq" and info["ivf"]["nlist"] == 64
        unit = data / np.linalg.norm(data, axis=1, keepdims=True)
        qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        exact = np.argsort(-(qn @ unit.T), axis=1)[:, :10]
        found = idx.search_tiles(queries, 10)
        rows = [[int(t.slide[9:-4]) * 500 + t.tile for t in r] for r in found]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact)])
        assert recall >= 0.95, recall
        for r, q in zip(found[:5], qn[:5]):  # similarities are the exact cosines of the stored rows
            np.testing.assert_allclose([t.similarity for t in r], unit[[int(t.slide[9:-4]) * 500 + t.tile for t in r]] @ q,
                                       atol=2e-3)


def test_two_processes_adding_at_once_lose_nothing(tmp_path) -> None:
    """Two writers on one folder take turns through the lock; every slide of both is there."""
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(Path(__file__).parent)!r}]
        from test_index import MODEL, clustered, entry
        from pathapp.index import open_index
        first = int(sys.argv[1])
        for i in range(first, first + 8):
            with open_index({str(tmp_path / 'idx')!r}, create=True) as idx:
                idx.add([entry(i, clustered(30, 32, seed=i))], MODEL)
    """))
    procs = [subprocess.Popen([sys.executable, str(script), str(first)], stderr=subprocess.PIPE, text=True)
             for first in (0, 100)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    with open_index(tmp_path / "idx") as idx:
        expected = {f"/slides/s{i}.svs" for i in [*range(8), *range(100, 108)]}
        assert set(idx.slides()) == expected
        for i in (0, 7, 100, 107):
            hit = idx.search_tiles(clustered(30, 32, seed=i)[3], 1)[0][0]
            assert (hit.slide, hit.tile) == (f"/slides/s{i}.svs", 3)
        assert idx.describe()["tiles"] == 16 * 30 and idx.describe()["version"] == 16


def test_a_killed_writer_leaves_the_index_as_it_was(tmp_path) -> None:
    """Bytes appended after the last commit and a half-written structure file are ignored, then cleaned."""
    folder = tmp_path / "idx"
    with open_index(folder, create=True) as idx:
        idx.add([entry(i, clustered(30, 32, seed=i)) for i in range(3)], MODEL)
        before = idx.search_tiles(clustered(30, 32, seed=1)[:4], 5)
    manifest = json.loads((folder / faiss_store.MANIFEST).read_text())
    with open(folder / manifest["vector_file"], "ab") as f:
        f.write(b"\x00" * 64 * 17)  # a writer killed while appending
    (folder / f"faiss-{manifest['version'] + 1}.index").write_bytes(b"half")
    with open_index(folder) as idx:
        assert idx.search_tiles(clustered(30, 32, seed=1)[:4], 5) == before
        idx.add([entry(3, clustered(30, 32, seed=3))], MODEL)
        assert idx.search_tiles(clustered(30, 32, seed=3)[2], 1)[0][0].slide == "/slides/s3.svs"
        assert idx.search_tiles(clustered(30, 32, seed=1)[:4], 5, exclude={"/slides/s3.svs"}) == before
    assert (folder / manifest["vector_file"]).stat().st_size == 4 * 30 * 32 * 2
    assert [p.name for p in folder.glob("faiss-*.index")] == [json.loads((folder / faiss_store.MANIFEST).read_text())["faiss_file"]]


def test_removing_most_slides_compacts_the_store(tmp_path) -> None:
    """Once most stored rows belong to removed slides the store is rewritten with the live rows only;
    the kept slides' tiles, vectors and search hits survive the move to their new rows."""
    folder = tmp_path / "idx"
    data = {i: clustered(30, 32, seed=i) for i in range(5)}
    with open_index(folder, create=True) as idx:
        idx.add([entry(i, data[i]) for i in range(4)], MODEL)
        idx.remove(["/slides/s0.svs", "/slides/s2.svs", "/slides/s3.svs"])  # 90 of 120 rows dead
        m = idx.manifest
        assert (m["generation"], m["rows"], m["dead_rows"]) == (1, 30, 0)
        assert sorted(p.name for p in folder.glob("vectors-*")) == ["vectors-1.f16"]
        assert (folder / "vectors-1.f16").stat().st_size == 30 * 32 * 2
        idx.add([entry(4, data[4])], MODEL)
        for i in (1, 4):
            hit = idx.search_tiles(data[i][7], 1)[0][0]
            assert (hit.slide, hit.tile) == (f"/slides/s{i}.svs", 7) and hit.similarity > 0.999
            stored = idx.tiles(f"/slides/s{i}.svs", vectors=True).vectors
            np.testing.assert_allclose(stored, data[i] / np.linalg.norm(data[i], axis=1, keepdims=True), atol=1e-3)
        assert idx.search_slides(data[1].mean(0), 1)[0][0] == "/slides/s1.svs"

def test_slide_vector_is_the_attention_pooling_of_an_abmil_bundle() -> None:
    v = clustered(5, 32, seed=3)
    e = entry(0, v)
    unit = v / np.linalg.norm(v, axis=1, keepdims=True)
    mean = unit.mean(0)
    np.testing.assert_allclose(e.slide_vector(), mean / np.linalg.norm(mean), atol=1e-6)
    e.attention = np.array([0, 0, 1.0, 0, 0])
    np.testing.assert_allclose(e.slide_vector(), unit[2], atol=1e-6)


def test_attention_mil_bundle_indexes_its_attention_pooling(tmp_path, shared_data) -> None:
    """Inference with an attention-MIL bundle writes each tile's attention into embeddings.h5; the
    index pools the slide vector with it."""
    from pathapp.index.sources import read_result

    mil = tiny_bundle(tmp_path, num_classes=2, head="abmil", filename="mil.pathapp")
    code, out = run_cli("infer", str(data_file(SVS)), "--model", str(mil), "--mpp", "4.0", "--out", str(tmp_path / "r"),
                        "--workers", "0")
    assert code == 0, out
    e, _ = read_result(tmp_path / "r" / "CMU-1-Small-Region")
    assert e.record.slide_vector == "attention" and e.attention is not None and len(e.attention) == len(e.vectors)
    assert e.attention.sum() == pytest.approx(1, abs=1e-4) and e.attention.std() > 0
    unit = e.vectors / np.linalg.norm(e.vectors, axis=1, keepdims=True)
    pooled = e.attention @ unit
    np.testing.assert_allclose(e.slide_vector(), pooled / np.linalg.norm(pooled), atol=1e-5)


def test_retrieval_scores_by_hand() -> None:
    s = query_scores(["B", "A", "A", "B", "C", "A", "A", "A", "A", "A"], "A")
    assert s["top1"] == 0.0
    assert s["mMV@5"] == 0.0  # A and B tie at 2 among the first 5; B is ranked first
    assert s["mAP@10"] == pytest.approx(np.mean([1 / 2, 2 / 3, 3 / 6, 4 / 7, 5 / 8, 6 / 9, 7 / 10]))
    s = query_scores(["A", "B", "A"], "A")
    assert (s["top1"], s["mMV@5"], s["mAP@10"]) == (1.0, 1.0, pytest.approx((1 + 2 / 3) / 2))
    assert query_scores(["B", "C"], "A") == {"top1": 0.0, "mMV@5": 0.0, "mAP@10": 0.0}


# -------------------------------------------------------------------- real slides, end to end

@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle"), num_classes=3)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, bundle, shared_data) -> Path:
    """Two real slides run through `pathapp infer`, indexed from their result folders with metadata."""
    root = tmp_path_factory.mktemp("indexed")
    code, out = run_cli("infer", str(data_file(SVS)), str(data_file(OME)), "--model", str(bundle), "--mpp", MPP,
                        "--out", str(root / "results"), "--workers", "0")
    assert code == 0, out
    (root / "cases.csv").write_text("slide,case,label,site\nCMU-1-Small-Region.svs,P1,squamous,skin\n"
                                    f"{data_file(OME)},P2,breast,breast\n")
    code, out = run_cli("index", "add", str(root / "idx"), str(root / "results"), "--meta", str(root / "cases.csv"))
    assert code == 0 and "2 slides indexed" in out, out
    return root


def test_index_info_lists_slides_with_payload(indexed) -> None:
    _, out = run_cli("index", "info", str(indexed / "idx"), "--slides")
    doc = json.loads(out[out.index("{"):])
    assert doc["backend"] == "faiss" and doc["kind"] == "flat" and doc["slides"] == 2
    assert doc["model"]["mpp"] == 2.0 and doc["model"]["tile_size"] == 56 and doc["model"]["dim"] == 64
    by_slide = {Path(s["slide"]).name: s for s in doc["slide_list"]}
    assert by_slide["CMU-1-Small-Region.svs"]["case"] == "P1" and by_slide["OS-1-detail.ome.tif"]["site"] == "breast"
    tiles = 0
    for name in ("CMU-1-Small-Region", "OS-1-detail"):  # every tile of both result folders, no more
        with h5py.File(indexed / "results" / name / "embeddings.h5") as h5:
            tiles += len(h5["features"])
    assert doc["tiles"] == tiles


def test_search_a_tile_finds_itself_and_writes_everything(indexed, bundle) -> None:
    x, y = 1000, 1500
    out = indexed / "hits_point"
    code, text = run_cli("search", str(indexed / "idx"), "--query", f"{data_file(SVS)}@{x},{y}", "--model", str(bundle),
                         "--k", "7", "--out", str(out))
    assert code == 0, text
    rows = read_rows(out / "hits.csv")
    assert len(rows) == 7 and [int(r["rank"]) for r in rows] == list(range(1, 8))
    first = rows[0]
    x0, y0, x1, y1 = (float(first[c]) for c in ("x0", "y0", "x1", "y1"))
    assert x0 <= x < x1 and y0 <= y < y1 and x1 - x0 == pytest.approx(2.0 / 0.499 * 56, abs=1)
    assert float(first["similarity"]) > 0.999 and first["slide"] == "CMU-1-Small-Region"
    assert first["label"] == "squamous" and first["case"] == "P1" and first["site"] == "skin"
    with open(out / "hits.csv", newline="") as f:
        header = next(csv.reader(f))
    assert len(header) == len(set(header))
    assert abs(sum(float(first[f"prob: {c}"]) for c in ("Tumor", "Stroma", "Immune cells")) - 1) < 1e-4
    sims = [float(r["similarity"]) for r in rows]
    assert sims == sorted(sims, reverse=True)
    # per hit slide a QuPath GeoJSON of its hit tiles, as detections with a similarity measurement
    doc = json.loads((out / "hits.json").read_text())
    assert doc["query"]["kind"] == "tile" and doc["query"]["tiles"] == 1
    for s in doc["slides"]:
        feats = assert_qupath_conformant(out / s["geojson"])
        mine = [r for r in rows if r["slide_path"] == s["slide_path"]]
        assert len(feats) == len(mine)
        assert all(f["properties"]["objectType"] == "detection" for f in feats)
        assert sorted(f["properties"]["measurements"]["similarity"] for f in feats) == pytest.approx(
            sorted(float(r["similarity"]) for r in mine), abs=1e-5)
        assert all(f["properties"]["name"].startswith("pathapp search #") for f in feats)
    with Image.open(out / "mosaic.png") as im:
        w, h = im.size
        pixels = np.asarray(im.convert("RGB"))
    assert w > 1000 and h > 400 and pixels.std() > 20  # pictures, not a blank canvas


def test_region_query_at_slide_level_excluding_own_case(indexed, bundle, tmp_path) -> None:
    """A QuPath annotation on CMU-1: its tiles rank slides by the mean of their best similarities;
    --exclude-case drops the query's own slide (case P1), so only the other case is left."""
    roi = tmp_path / "roi.geojson"
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": shapely.geometry.mapping(shapely.box(600, 1200, 1500, 2100)),
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}}]}))
    args = ["search", str(indexed / "idx"), "--query", str(data_file(SVS)), "--roi", str(roi), "--roi-class", "Tumor",
            "--level", "slide", "--model", str(bundle)]
    code, text = run_cli(*args, "--out", str(tmp_path / "a"))
    assert code == 0, text
    rows = read_rows(tmp_path / "a" / "hits.csv")
    assert [r["slide"] for r in rows] == ["CMU-1-Small-Region", "OS-1-detail"]
    assert float(rows[0]["similarity"]) > 0.999 > float(rows[1]["similarity"])  # its own tiles are in the index
    feats = assert_qupath_conformant(tmp_path / "a" / "geojson" / "CMU-1-Small-Region.geojson")
    region = shapely.box(600, 1200, 1500, 2100)
    assert all(region.contains(shape(f["geometry"]).centroid) for f in feats)  # best tiles: the query's own
    code, text = run_cli(*args, "--exclude-case", "--out", str(tmp_path / "b"))
    assert code == 0, text
    assert [r["slide"] for r in read_rows(tmp_path / "b" / "hits.csv")] == ["OS-1-detail"]
    assert json.loads((tmp_path / "b" / "hits.json").read_text())["excluded_case"] == "P1"


def test_exclusion_covers_every_slide_of_the_case(indexed) -> None:
    with open_index(indexed / "idx") as idx:
        key = next(k for k, r in idx.slides().items() if r.name == "CMU-1-Small-Region")
        exclude, case = exclusions(idx, key, True)
        assert case == "P1" and exclude == {key}
        q = idx.tiles(key, vectors=True).vectors[:3]
        assert all(h.record.case != "P1" for h in rank(idx, q, "tile", 20, exclude))


def test_index_add_embeds_slides_on_the_way_and_reuses_results(tmp_path, bundle, shared_data) -> None:
    """An image (no µm/px: --slide-mpp) embedded on the way; a rerun skips inference and replaces
    the slide; searching with the same image gives back its own vectors (one embedding path)."""
    image = data_file("labeled/ebhi-seg/EBHI-SEG/Normal/image/GT2000000-1-400-001.png")
    idx, res = str(tmp_path / "idx"), str(tmp_path / "res")
    add = ["index", "add", idx, str(image), "--model", str(bundle), "--mpp", MPP, "--out", res, "--workers", "0"]
    code, text = run_cli(*add)
    assert code == 1 and "--slide-mpp" in text and "0 slides indexed" in text  # its slide failed: no µm/px
    code, text = run_cli(*add, "--slide-mpp", "1.0")
    assert code == 0 and "1 slides indexed" in text, text
    code, text = run_cli(*add, "--slide-mpp", "1.0")
    assert code == 0 and "skip:" in text and "1 replaced" in text, text
    code, text = run_cli("search", idx, "--query", str(image), "--slide-mpp", "1.0", "--level", "slide",
                         "--out", str(tmp_path / "hits"))  # the model recorded by `index add --model`
    assert code == 0, text
    (row,) = read_rows(tmp_path / "hits" / "hits.csv")
    assert row["level"] == "slide" and float(row["similarity"]) > 0.9999


def test_index_a_qupath_project(tmp_path, bundle, shared_data) -> None:
    """Project entries are embedded into <project>/pathapp/<entry ID>/ and keep their entry ID; a
    missing image fails alone."""
    from test_infer import write_project

    qpproj = write_project(tmp_path / "proj", [data_file(SVS), Path("/nowhere/gone.svs")])
    code, text = run_cli("index", "add", str(tmp_path / "idx"), str(qpproj), "--model", str(bundle), "--mpp", "4.0",
                         "--workers", "0")
    assert code == 1 and "gone.svs" in text and "1 slides indexed" in text, text
    with open_index(tmp_path / "idx") as idx:
        (rec,) = idx.slides().values()
    assert rec.entry_id == "1" and rec.source == str(tmp_path / "proj" / "pathapp" / "1")
    code, text = run_cli("search", str(tmp_path / "idx"), "--query", f"{data_file(SVS)}@1200,1200", "--k", "1",
                         "--out", str(tmp_path / "hits"))
    assert code == 0, text
    assert read_rows(tmp_path / "hits" / "hits.csv")[0]["entry"] == "1"


def test_bad_inputs_get_one_line(tmp_path, indexed, bundle, monkeypatch, capsys) -> None:
    image = str(data_file("labeled/ebhi-seg/EBHI-SEG/Normal/image/GT2000000-1-400-001.png"))
    idx = str(indexed / "idx")
    # a query image without µm/px
    code, text = run_main(monkeypatch, capsys, "search", idx, "--query", image, "--model", str(bundle),
                          "--out", str(tmp_path / "o"))
    one_error_line(code, text, "--slide-mpp", Path(image).name)
    # a model other than the index's
    other = tiny_bundle(tmp_path, num_classes=0, filename="other.pathapp", depth=1)
    code, text = run_main(monkeypatch, capsys, "search", idx, "--query", f"{data_file(SVS)}@900,900", "--model",
                          str(other), "--out", str(tmp_path / "o"))
    one_error_line(code, text, "other.pathapp", "not the index's")
    # a folder that is not an index
    notindex = tmp_path / "photos"
    notindex.mkdir()
    (notindex / "a.txt").write_text("x")
    code, text = run_main(monkeypatch, capsys, "search", str(notindex), "--query", image, "--out", str(tmp_path / "o"))
    one_error_line(code, text, "not a pathapp index")
    # an empty index (every slide removed)
    empty = tmp_path / "empty"
    with open_index(empty, create=True) as e:
        e.add([entry(0, clustered(4, 64, 0))], IndexModel("x", "1" * 64, 64, 2.0, 56))
        e.remove(["/slides/s0.svs"])
    code, text = run_main(monkeypatch, capsys, "search", str(empty), "--query", image, "--out", str(tmp_path / "o"))
    one_error_line(code, text, "empty", "pathapp index add")
    # result folders of another model into an existing index
    code, text = run_main(monkeypatch, capsys, "index", "add", str(empty), str(indexed / "results" / "OS-1-detail"))
    assert code == 1 and "not the index's" in text and "Traceback" not in text


def test_unreachable_qdrant_gets_one_line(monkeypatch, capsys, tmp_path) -> None:
    need_qdrant()
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("QDRANT_API_KEY", "secret-key-never-printed")
    url = f"qdrant://127.0.0.1:{port}/tiles"
    for args in (["index", "info", url], ["index", "add", url, str(tmp_path)]):
        code, text = run_main(monkeypatch, capsys, *args)
        one_error_line(code, text, f"qdrant://127.0.0.1:{port}/tiles", "reach")
        assert "secret-key" not in text


def test_qdrant_index_through_the_cli(indexed, bundle, tmp_path) -> None:
    """The same commands against Qdrant (its embedded local mode: the same API in process)."""
    need_qdrant()
    loc = f"qdrant:///{tmp_path}/q/slides"
    code, text = run_cli("index", "add", loc, str(indexed / "results"), "--meta", str(indexed / "cases.csv"))
    assert code == 0 and "2 slides indexed" in text, text
    ranked = {}
    for name, where in (("qdrant", loc), ("faiss", str(indexed / "idx"))):
        code, text = run_cli("search", where, "--query", f"{data_file(SVS)}@1000,1500", "--model", str(bundle),
                             "--k", "3", "--out", str(tmp_path / name))
        assert code == 0, text
        ranked[name] = read_rows(tmp_path / name / "hits.csv")
    rows = ranked["qdrant"]
    assert rows[0]["slide"] == "CMU-1-Small-Region" and float(rows[0]["similarity"]) > 0.999
    assert [r["tile"] for r in rows] == [r["tile"] for r in ranked["faiss"]]  # both backends rank alike


# ------------------------------------------------------------------------------ evaluate-search

def test_evaluate_search_leave_one_case_out(tmp_path, bundle, shared_data) -> None:
    rows = read_rows(data_file(EBHI))
    picked, seen = [], {}
    for r in rows:  # 3 classes x 4 cases, one image each
        if r["label"] in ("Adenocarcinoma", "Normal", "Polyp") and len(seen.setdefault(r["label"], set())) < 4 \
                and r["case_prefix"] not in seen[r["label"]]:
            seen[r["label"]].add(r["case_prefix"])
            picked.append({**r, "image": str(DATA / "labeled" / "ebhi-seg" / r["image"])})
    data = tmp_path / "labels.csv"
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(picked)
    out = tmp_path / "eval"
    code, text = run_cli("evaluate-search", "--data", str(data), "--model", str(bundle), "--slide-mpp", "1.0",
                         "--mpp", MPP, "--out", str(out), "--workers", "0", "--n-boot", "200")
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 12 and report["case_column"] == "case_prefix"
    for level, n_queries in (("tile", 12 * 4), ("slide", 12)):
        rows_ = report["levels"][level]
        assert rows_["queries"] == n_queries and rows_["cases"] == 12
        assert rows_["chance_top1"] == pytest.approx(3 / 11)  # 3 other images of the class among 11
        for metric in ("top1", "mMV@5", "mAP@10"):
            for method in ("model", "colour"):
                v, lo, hi = rows_[metric][method]
                assert 0 <= lo <= v <= hi <= 1
            d, lo, hi = rows_[metric]["model_minus_colour"]
            assert d == pytest.approx(rows_[metric]["model"][0] - rows_[metric]["colour"][0]) and lo <= d <= hi
    assert "| tile (48 queries, 12 cases) | top1 |" in text
    with Image.open(out / "evaluation.png") as im:
        assert im.size[0] > 800
    assert sorted(p.name for p in (out / "examples").iterdir()) == ["Adenocarcinoma.png", "Normal.png", "Polyp.png"]
    with open_index(out / "index") as idx:  # the index the numbers came from never hits a query's own case
        for key, r in idx.slides().items():
            exclude, case = exclusions(idx, key, True)
            hits = rank(idx, idx.tiles(key, vectors=True).vectors[:1], "tile", 10, exclude)
            assert len(hits) == 10 and all(h.record.case != case for h in hits)
