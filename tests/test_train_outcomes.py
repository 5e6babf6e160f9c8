"""Slide outcomes with attention-MIL: a Cox model and a regression head must find a known effect of a
tile property in real tissue, and find nothing in shuffled outcomes.

The cohort: "slides" are PNG mosaics of real tiles, read at 1 µm/px from two real H&E slides
(CMU-1-Small-Region: type A; TCGA-CR-7395: type B). Each patient has a fraction f of type-A tiles in
their slides (1-2 slides, 9-20 tiles each, sizes drawn independently of the outcome); the hazard is
exp(8 (f - 0.5)) (exponential survival times, uniform censoring), the continuous target 10 f + noise.
The slides go through the path users run: tissue detection, tiling, a tiny random ViT (LayerScale 1),
the embedding cache, `pathapp train/evaluate/infer`. The best possible C-index on this cohort (the
true f as the risk) is printed by the fixture for reference."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import IN_CI
from pathapp.cli import cli
from pathapp.errors import PathappError
from pathapp.models.bundle import load_bundle
from vit_factory import tiny_bundle

if not IN_CI:  # CI installs the survival extra; a missing scikit-survival there is a failure
    pytest.importorskip("sksurv", reason="needs the survival extra: pip install -e '.[survival]'")

CELL = 56  # px per tile, = the tiny ViT's input; mosaics are read at 1 µm/px with --slide-mpp 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small bags train faster on one torch thread than on two that compete."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(*args) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def _refused(*args) -> str:
    """Run a command that must refuse its input: one PathappError line, no other exception."""
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert isinstance(res.exception, PathappError), repr(res.exception)
    message = str(res.exception)
    assert "\n" not in message
    return message


def _tile_pool(path: Path, slide_mpp: float | None, n_max: int, rng: np.random.Generator) -> np.ndarray:
    """Up to n_max real tissue tiles (≥ 90 % tissue) of a slide at 1 µm/px, 56 px."""
    from pathapp.slide import open_slide
    from pathapp.tiles import make_grid, read_tile

    with open_slide(path, slide_mpp=slide_mpp) as slide:
        grid = make_grid(slide, 1.0, CELL)
        keep = rng.permutation(np.flatnonzero(grid.tissue_fraction >= 0.9))[:n_max]
        return np.stack([read_tile(slide, grid, int(i)) for i in keep])


def _mosaic(tiles: np.ndarray) -> np.ndarray:
    """Tiles in rows of 5 on a white slide with a one-tile margin (cells align with the tile grid)."""
    rows = -(-len(tiles) // 5)
    img = np.full(((rows + 2) * CELL, 7 * CELL, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, 5)
        img[(r + 1) * CELL : (r + 2) * CELL, (c + 1) * CELL : (c + 2) * CELL] = t
    return img


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, shared_data):
    from sksurv.metrics import concordance_index_censored

    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    wsi = shared_data / "wsi" / "aperio"
    type_a = _tile_pool(wsi / "CMU-1-Small-Region.svs", None, 300, rng)
    type_b = _tile_pool(wsi / "tcga-cr-7395-01a-01-ts1.svs", 1.0, 200, rng)  # no µm/px in the file
    rows = []
    for p in range(60):
        f = rng.uniform()
        t = rng.exponential(np.exp(-8.0 * (f - 0.5))) * 24
        c = rng.uniform(0, 60)
        value = 10 * f + rng.normal(0, 0.5)
        for s in range(1 + (p % 3 == 0)):
            n = int(rng.integers(9, 21))
            k = int(round(f * n))
            tiles = np.concatenate([type_a[rng.integers(0, len(type_a), k)], type_b[rng.integers(0, len(type_b), n - k)]])
            name = f"p{p:02d}_{s}.png"
            Image.fromarray(_mosaic(tiles[rng.permutation(n)])).save(root / name)
            rows.append({"slide": name, "patient": f"p{p:02d}", "time": f"{min(t, c):.2f}", "event": int(t <= c),
                         "value": f"{value:.3f}", "fraction": k / n})
    _write_csv(root / "cohort.csv", rows)
    time = np.array([float(r["time"]) for r in rows])
    event = np.array([r["event"] for r in rows], bool)
    oracle = concordance_index_censored(event, time, np.array([r["fraction"] for r in rows]))[0]
    print(f"cohort: {len(rows)} slides, {event.sum()} events, oracle Harrell's C {oracle:.3f}")
    return {"root": root, "rows": rows, "csv": root / "cohort.csv", "cache": root / "cache",
            "base": tiny_bundle(root, 0, mpp=1.0, filename="base.pathapp")}


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def bags(cohort):
    """Every slide's bag of tile embeddings, computed once (through the cache the CLI tests reuse)."""
    from pathapp.models.loader import load_model
    from pathapp.train.api import bag_array, slide_bags
    from pathapp.train.labels import read_slide_csv

    sl = read_slide_csv(cohort["csv"], task="survival")
    return bag_array(slide_bags(sl, load_model(cohort["base"]), 1.0, cohort["cache"], "cpu", progress=False))


def _shuffled_cv(cohort, bags, task: str) -> dict:
    """Cross-validated metrics on the same bags with the outcomes permuted between patients (a patient
    keeps one outcome for all their slides), through the functions `pathapp evaluate --folds 5` runs."""
    from pathapp.train.labels import read_slide_csv
    from pathapp.train.mil import abmil_fitter
    from pathapp.train.outcomes import cross_validate_outcome, outcome_folds

    sl = read_slide_csv(cohort["csv"], task=task)
    patients = np.unique(sl.groups)
    first = {p: np.flatnonzero(sl.groups == p)[0] for p in patients}
    perm = dict(zip(patients, np.random.default_rng(1).permutation(patients)))
    y = sl.y[[first[perm[g]] for g in sl.groups]]
    folds = outcome_folds(task, y, sl.groups, 5)
    return cross_validate_outcome(bags, y, sl.groups, task, abmil_fitter(task=task), folds, n_boot=100).metrics


def _ci(m: dict, key: str) -> str:
    lo, hi = m["ci95"][key]
    return f"{m[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _evaluate(cohort, data: Path, task: str, out: str) -> dict:
    _run("evaluate", "--data", data, "--model", cohort["base"], "--task", task, "--folds", 5, "--slide-mpp", 1.0,
         "--cache", cohort["cache"], "--bootstrap", 100, "--device", "cpu", "--out", cohort["root"] / out)
    return json.loads((cohort["root"] / out / "report.json").read_text())


def test_cox_loss_is_the_breslow_partial_likelihood():
    """Minimising cox_nll over a linear risk reproduces scikit-survival's Breslow Cox fit on real
    clinical data with tied times (the Veterans' lung cancer trial)."""
    from sksurv.datasets import load_veterans_lung_cancer
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    from pathapp.train.mil import cox_nll

    X, y = load_veterans_lung_cancer()
    cols = ["Age_in_years", "Karnofsky_score", "Months_from_Diagnosis"]
    x = X[cols].to_numpy(float)
    x = (x - x.mean(0)) / x.std(0)
    assert len(np.unique(y["Survival_in_days"])) < len(y)  # ties are there
    ref = CoxPHSurvivalAnalysis(ties="breslow").fit(x, y).coef_
    xt = torch.tensor(x)
    time = torch.tensor(np.ascontiguousarray(y["Survival_in_days"], dtype=np.float64))
    event = torch.tensor(np.ascontiguousarray(y["Status"], dtype=np.float64))
    beta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta], max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = cox_nll(xt @ beta, time, event)
        loss.backward()
        return loss

    opt.step(closure)
    assert np.abs(ref).max() > 0.3  # Karnofsky score matters: a real effect to match
    np.testing.assert_allclose(beta.detach().numpy(), ref, atol=1e-4)


def test_time_dependent_auc_without_a_case_before_the_horizon_is_nan_without_warnings():
    """A bootstrap resample can hold no event before a horizon (only censored patients there): its AUC
    is undefined, NaN, and is not handed to scikit-survival to divide 0 by 0 (RuntimeWarnings printed
    in the middle of `pathapp evaluate`'s progress bar); the other horizons keep scikit-survival's
    values. Real clinical data: the Veterans' lung cancer trial, events before day 100 left out."""
    import warnings

    from sksurv.datasets import load_veterans_lung_cancer
    from sksurv.metrics import cumulative_dynamic_auc
    from sksurv.util import Surv

    from pathapp.train.outcomes import survival_metrics

    X, y = load_veterans_lung_cancer()
    time, event = y["Survival_in_days"].astype(float), y["Status"]
    risk = -X["Karnofsky_score"].to_numpy(float)
    keep = ~event | (time > 100)
    time, event, risk = time[keep], event[keep], risk[keep]
    assert time.min() < 90 and not (event & (time <= 90)).any()  # inside the follow-up, no case
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = survival_metrics(time, event.astype(int), risk, [90.0, 200.0])
    surv = Surv.from_arrays(event, time)
    assert np.isnan(m["td_auc"][0])
    assert np.isfinite(m["td_auc"][1])
    assert m["td_auc"][1] == pytest.approx(cumulative_dynamic_auc(surv, surv, risk, [200.0])[0][0])


def test_survival_cross_validation_finds_the_known_hazard(cohort, bags):
    rep = _evaluate(cohort, cohort["csv"], "survival", "surv")
    m = rep["metrics"]
    print(f"\nsurvival: Harrell's C {_ci(m, 'c_index')}, Uno's C {_ci(m, 'c_index_uno')}, td-AUC at "
          f"{rep['horizons']}: {[round(a, 3) for a in m['td_auc']]}, log-rank p {m['risk_groups']['logrank_p']:.1e}, "
          f"floor (tile count) C {_ci(rep['floors']['tile_count'], 'c_index')}, risk groups {m['risk_groups']}")
    assert rep["task"] == "survival" and rep["n_folds"] == 5 and rep["n_groups"] == 60
    assert "patient" in rep["mode"] and rep["target"] == "time,event"
    lo, hi = m["ci95"]["c_index"]
    assert m["c_index"] >= 0.75 and lo <= m["c_index"] <= hi and lo > 0.6
    assert m["c_index_uno"] >= 0.7 and len(m["td_auc"]) == len(rep["horizons"]) == 3
    assert all(a > 0.7 for a in m["td_auc"])
    # the high-risk group (above each training fold's median) dies sooner
    groups = m["risk_groups"]
    assert groups["logrank_p"] < 0.01 and groups["high"]["events"] > groups["low"]["events"]
    # the floor fitted on the same folds (tile count alone) is beaten beyond its interval
    floor = rep["floors"]["tile_count"]
    assert m["c_index"] > floor["ci95"]["c_index"][1] and rep["floors"]["chance"]["c_index"] == 0.5
    assert len(rep["per_fold"]) == 5 and len(rep["predictions"]) == len(cohort["rows"])
    km = Image.open(cohort["root"] / "surv" / "km.png")
    assert km.size[0] >= 500 and np.asarray(km.convert("L")).std() > 10


def test_survival_with_shuffled_outcomes_is_chance(cohort, bags):
    m = _shuffled_cv(cohort, bags, "survival")
    lo, hi = m["ci95"]["c_index"]
    print(f"\nshuffled survival: Harrell's C {_ci(m, 'c_index')}")
    assert lo < 0.5 < hi and abs(m["c_index"] - 0.5) < 0.12


def test_regression_cross_validation_finds_the_known_value(cohort):
    rep = _evaluate(cohort, cohort["csv"], "regression", "reg")
    m = rep["metrics"]
    print(f"\nregression: R² {_ci(m, 'r2')}, Spearman {_ci(m, 'spearman')}, Pearson {_ci(m, 'pearson')}, "
          f"floor (tile count) R² {_ci(rep['floors']['tile_count'], 'r2')}, "
          f"training mean R² {rep['floors']['training_mean']['r2']:.3f}")
    assert rep["task"] == "regression" and rep["target"] == "value"
    assert m["r2"] >= 0.5 and m["spearman"] >= 0.75 and m["ci95"]["spearman"][0] > 0.5
    assert m["r2"] > rep["floors"]["tile_count"]["ci95"]["r2"][1]
    assert rep["floors"]["training_mean"]["r2"] <= 0.0
    assert (cohort["root"] / "reg" / "scatter.png").exists()


def test_regression_with_shuffled_values_is_chance(cohort, bags):
    m = _shuffled_cv(cohort, bags, "regression")
    lo, hi = m["ci95"]["spearman"]
    print(f"\nshuffled regression: R² {_ci(m, 'r2')}, Spearman {_ci(m, 'spearman')}")
    assert lo < 0 < hi and m["r2"] < 0.1


def test_survival_bundle_risk_in_run_json_and_on_the_slide_annotation(cohort):
    out = cohort["root"] / "cox.pathapp"
    _run("train", "--data", cohort["csv"], "--model", cohort["base"], "--method", "abmil", "--task", "survival",
         "--slide-mpp", 1.0, "--cache", cohort["cache"], "--device", "cpu", "--out", out)
    b = load_bundle(out)
    assert b.task == "survival" and b.class_names == ["risk"] and "risk_offset" in b.head_config
    rows = sorted(cohort["rows"], key=lambda r: r["fraction"])
    risks = {}
    for r in (rows[0], rows[-1]):
        _run("infer", cohort["root"] / r["slide"], "--model", out, "--slide-mpp", 1.0, "--workers", 0,
             "--device", "cpu", "--out", cohort["root"] / "infer")
        folder = cohort["root"] / "infer" / Path(r["slide"]).stem
        record = json.loads((folder / "run.json").read_text())
        risk = record["parameters"]["slide_prediction"]["risk"]
        # the slide annotation carries the same number, and the tiles their attention
        slide_object = [f for f in json.loads((folder / "annotations.geojson").read_text())["features"]
                        if f["properties"].get("name") == "slide"]
        assert len(slide_object) == 1 and slide_object[0]["properties"]["measurements"]["risk"] == pytest.approx(risk, abs=1e-4)
        att = [f["properties"]["measurements"]["attention"]
               for f in json.loads((folder / "tiles.geojson").read_text())["features"]]
        assert sum(att) == pytest.approx(1, abs=1e-3) and (folder / "heatmap-attention.png").exists()
        # and it is the bundle's head applied to the slide's embeddings
        import h5py

        with h5py.File(folder / "embeddings.h5") as h5:
            feats = torch.from_numpy(h5["features"][:])
        with torch.no_grad():
            assert float(b.build_head()(feats)[0][0]) == pytest.approx(risk, abs=1e-4)
        risks[r["fraction"]] = risk
    low, high = risks[rows[0]["fraction"]], risks[rows[-1]["fraction"]]
    assert high > 0 > low  # more type-A tissue, higher hazard; 0 is the median training slide


@pytest.mark.parametrize("column,value,expected", [
    ("time", "-3", "negative time"),
    ("time", "", "time '' is missing"),
    ("event", "2", "event is 2"),
    ("event", "yes", "event 'yes' is missing or not a number"),
])
def test_bad_survival_rows_are_refused_by_row(tmp_path, cohort, column, value, expected):
    rows = [dict(r) for r in cohort["rows"][:10]]
    rows[4][column] = value
    path = _write_csv(tmp_path / "bad.csv", [{**r, "slide": str(cohort["root"] / r["slide"])} for r in rows])
    message = _refused("train", "--data", path, "--model", cohort["base"], "--method", "abmil", "--task", "survival",
                       "--out", tmp_path / "m.pathapp")
    assert str(path) in message and "row 6" in message and expected in message


def test_too_few_events_are_refused(tmp_path, cohort):
    rows = [{**r, "slide": str(cohort["root"] / r["slide"]), "event": 0} for r in cohort["rows"]]
    rows[0]["event"] = 1
    path = _write_csv(tmp_path / "one_event.csv", rows)
    message = _refused("train", "--data", path, "--model", cohort["base"], "--method", "abmil", "--task", "survival",
                       "--out", tmp_path / "m.pathapp")
    assert str(path) in message and "only 1 of" in message and "at least 2" in message
    for r in rows[1:7]:
        r["event"] = 1  # 7 events cannot give 5 folds 2 events each
    _write_csv(path, rows)
    message = _refused("evaluate", "--data", path, "--model", cohort["base"], "--task", "survival", "--folds", 5,
                       "--out", tmp_path / "rep")
    assert str(path) in message and "7 observed events over 5 folds" in message and "--folds 3 or fewer" in message


def test_bad_regression_value_and_mismatched_task_are_refused(tmp_path, cohort):
    rows = [{**r, "slide": str(cohort["root"] / r["slide"])} for r in cohort["rows"][:10]]
    rows[2]["value"] = "n/a"
    path = _write_csv(tmp_path / "bad.csv", rows)
    message = _refused("train", "--data", path, "--model", cohort["base"], "--method", "abmil", "--task", "regression",
                       "--out", tmp_path / "m.pathapp")
    assert str(path) in message and "row 4" in message and "value 'n/a'" in message
    message = _refused("train", "--data", path, "--model", cohort["base"], "--method", "linear", "--task", "regression",
                       "--out", tmp_path / "m.pathapp")
    assert "--method abmil" in message
    message = _refused("evaluate", "--data", cohort["csv"], "--model", cohort["base"], "--task", "survival",
                       "--out", tmp_path / "rep")
    assert "--folds" in message  # a headless bundle cannot be scored as it is
