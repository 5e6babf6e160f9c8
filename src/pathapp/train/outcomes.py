"""Slide-level outcomes (survival, continuous values): metrics, grouped cross-validation with
bootstrap CIs and floors, pictures, report.json.

Survival statistics are scikit-survival's: Harrell's C (`concordance_index_censored`), Uno's
IPCW C truncated at the last horizon (`concordance_index_ipcw`; the one to read when many slides are
censored, since Harrell's C then leans on early times), cumulative/dynamic time-dependent AUC
(`cumulative_dynamic_auc`), Kaplan–Meier estimates with log-log intervals and the log-rank test
(`compare_survival`). The censoring distribution for the IPCW weights is estimated on the slides
scored. Regression: scikit-learn's R², SciPy's Pearson and Spearman correlations.

Honesty rules as for classes (evaluate.py): folds and bootstrap keep a patient's slides together;
risk groups are split at the training slides' median risk (a survival head outputs its risk minus
that median, so "high risk" means risk > 0 in every fold and in `pathapp infer`); every score comes
with floors measured in the same run: chance (C = 0.5, R² = 0) and a model that sees only how much
tissue a slide has (its tile count), fitted on the same training folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pathapp.errors import PathappError
from pathapp.train.evaluate import (
    FitFn,
    SplitError,
    group_bootstrap,
    grouped_folds,
    holdout_split,
    save_fig,
    write_json,
)
from pathapp.train.labels import MIN_EVENTS

OUTCOME_TASKS = ("survival", "regression")


def outcome_strata(task: str, y: np.ndarray) -> np.ndarray:
    """What splits are stratified on: the class, the event indicator, or the value's tertile."""
    if task == "classification":
        return np.asarray(y, np.int64)
    if task == "survival":
        return np.asarray(y)[:, 1].astype(np.int64)
    cuts = np.quantile(y, [1 / 3, 2 / 3])
    return np.unique(np.digitize(y, cuts), return_inverse=True)[1]


def _sksurv():
    try:
        import sksurv.compare
        import sksurv.metrics
        import sksurv.nonparametric
        import sksurv.util
    except ImportError:
        raise PathappError("survival statistics need scikit-survival: pip install 'pathapp[survival]'") from None
    return sksurv


def default_horizons(time: np.ndarray, event: np.ndarray) -> list[float]:
    """The quartiles of the observed event times (3 significant digits)."""
    q = np.quantile(time[event.astype(bool)], [0.25, 0.5, 0.75])
    return sorted({float(f"{v:.3g}") for v in q})


SURVIVAL_KEYS = ("c_index", "c_index_uno", "td_auc")
REGRESSION_KEYS = ("r2", "pearson", "spearman", "mae")


def survival_metrics(time: np.ndarray, event: np.ndarray, risk: np.ndarray, horizons: Sequence[float],
                     keys: Sequence[str] = SURVIVAL_KEYS) -> dict:
    """Harrell's and Uno's C and the time-dependent AUC at each horizon (NaN where undefined, e.g. no
    event before a horizon or no comparable pair); only `keys` are computed."""
    sk = _sksurv()
    ev = event.astype(bool)
    surv = sk.util.Surv.from_arrays(ev, time)
    out: dict = {"n": int(len(time)), "n_events": int(ev.sum()), "censoring": float(1 - ev.mean())}
    if "c_index" in keys:
        out["c_index"] = _or_nan(lambda: sk.metrics.concordance_index_censored(ev, time, risk)[0])
    if "c_index_uno" in keys:
        out["c_index_uno"] = _or_nan(lambda: sk.metrics.concordance_index_ipcw(surv, surv, risk, tau=max(horizons))[0])
    if "td_auc" in keys:  # one call for the horizons where the AUC is defined: inside the follow-up
        # (scikit-survival's condition, which leaves a control after h) with a case, an event at or
        # before h (a resample may have none: then its true-positive rate would be 0 / 0)
        inside = [h for h in horizons if time.min() <= h < time.max() and (ev & (time <= h)).any()]
        auc = np.full(len(inside), np.nan)
        if inside:
            try:
                auc = sk.metrics.cumulative_dynamic_auc(surv, surv, risk, inside)[0]
            except ValueError:  # e.g. the censoring distribution is zero at a slide's time: no IPCW weight
                auc = [_or_nan(lambda h=h: sk.metrics.cumulative_dynamic_auc(surv, surv, risk, [h])[0][0])
                       for h in inside]
        by_h = dict(zip(inside, auc))
        out["td_auc"] = [float(by_h[h]) if h in by_h and np.isfinite(by_h[h]) else float("nan") for h in horizons]
    return out


def _or_nan(fn) -> float:
    """A statistic that a (resampled) cohort may leave undefined: NaN rather than an exception."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v = float(fn())
    except (ValueError, ZeroDivisionError, FloatingPointError):
        return float("nan")
    return v if np.isfinite(v) else float("nan")


def regression_metrics(value: np.ndarray, pred: np.ndarray) -> dict:
    """R², Pearson r, Spearman ρ, mean absolute and root-mean-square error."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import r2_score

    out: dict = {"n": int(len(value))}
    constant = np.ptp(pred) == 0 or np.ptp(value) == 0
    out["r2"] = _or_nan(lambda: r2_score(value, pred)) if len(value) > 1 else float("nan")
    out["pearson"] = float("nan") if constant else _or_nan(lambda: pearsonr(value, pred)[0])
    out["spearman"] = float("nan") if constant else _or_nan(lambda: spearmanr(value, pred)[0])
    out["mae"] = float(np.mean(np.abs(value - pred)))
    out["rmse"] = float(np.sqrt(np.mean((value - pred) ** 2)))
    return out


def risk_groups(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> dict:
    """High (risk > 0: above the training median) vs low risk: size, events, Kaplan–Meier median
    survival time (None when not reached) and the log-rank p-value."""
    sk = _sksurv()
    high = risk > 0
    out: dict = {}
    for name, members in (("low", ~high), ("high", high)):
        median = None
        if members.any():
            t, s = sk.nonparametric.kaplan_meier_estimator(event[members].astype(bool), time[members])
            below = np.flatnonzero(s <= 0.5)
            median = float(t[below[0]]) if len(below) else None
        out[name] = {"n": int(members.sum()), "events": int(event[members].sum()), "median_time": median}
    surv = sk.util.Surv.from_arrays(event.astype(bool), time)
    out["logrank_p"] = _or_nan(lambda: sk.compare.compare_survival(surv, high.astype(int))[1]) \
        if 0 < high.sum() < len(high) else float("nan")
    return out


@dataclass
class OutcomeResult:
    """Predictions for every slide (out-of-fold, or by the bundle's head) and their scores."""

    task: str
    y: np.ndarray  # (N, 2) time, event or (N,) value
    pred: np.ndarray  # (N,) risk (centred on the training median) or value
    groups: np.ndarray
    fold: np.ndarray
    index: np.ndarray  # position of each scored slide in the input
    metrics: dict
    per_fold: list[dict] = field(default_factory=list)
    floors: dict = field(default_factory=dict)
    horizons: list[float] = field(default_factory=list)


def score(task: str, y: np.ndarray, pred: np.ndarray, groups: np.ndarray, horizons: Sequence[float],
          n_boot: int = 1000, seed: int = 0, ci_keys: Sequence[str] | None = None) -> dict:
    """The task's metrics on these predictions, with 95 % bootstrap CIs over whole groups for
    `ci_keys` (default: all of SURVIVAL_KEYS or REGRESSION_KEYS)."""
    keys = tuple(ci_keys or (SURVIVAL_KEYS if task == "survival" else REGRESSION_KEYS))

    def metrics(idx: np.ndarray, keys: Sequence[str] = SURVIVAL_KEYS) -> dict:
        if task == "survival":
            return survival_metrics(y[idx, 0], y[idx, 1], pred[idx], horizons, keys)
        return regression_metrics(y[idx], pred[idx])

    out = metrics(np.arange(len(y)))
    out["ci95"] = group_bootstrap(lambda idx: {k: v for k, v in metrics(idx, keys).items() if k in keys},
                                  groups, n_boot=n_boot, seed=seed)
    if task == "survival":
        out["risk_groups"] = risk_groups(y[:, 0], y[:, 1], pred)
    return out


def check_events_per_fold(y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]], source: str) -> None:
    """Each held-out fold needs MIN_EVENTS events to rank its slides; say how many folds would do."""
    counts = [int(y[te, 1].sum()) for _, te in folds]
    if min(counts) < MIN_EVENTS:
        total = int(y[:, 1].sum())
        raise SplitError(f"{source}: {total} observed events over {len(folds)} folds leave a fold with "
                         f"{min(counts)}; each fold needs at least {MIN_EVENTS}: use --folds "
                         f"{max(2, min(len(folds) - 1, total // MIN_EVENTS))} or fewer, or add slides with events")


def tile_count_floor(task: str, y: np.ndarray, sizes: np.ndarray, tr: np.ndarray, te: np.ndarray) -> np.ndarray:
    """The floor model: log(tile count) alone, fitted on the training fold (survival: the direction
    that ranks the training slides better, centred on their median; regression: least squares)."""
    s = np.log(np.asarray(sizes, np.float64))
    if task == "survival":
        sk = _sksurv()
        c = _or_nan(lambda: sk.metrics.concordance_index_censored(y[tr, 1].astype(bool), y[tr, 0], s[tr])[0])
        sign = -1.0 if c < 0.5 else 1.0
        return sign * (s[te] - np.median(s[tr]))
    if np.ptp(s[tr]) == 0:
        return np.full(len(te), y[tr].mean())
    slope, intercept = np.polyfit(s[tr], y[tr], 1)
    return slope * s[te] + intercept


def outcome_folds(task: str, y: np.ndarray, groups: np.ndarray, n_folds: int = 5, seed: int = 0,
                  holdout: float | None = None, source: str = "") -> list[tuple[np.ndarray, np.ndarray]]:
    """Grouped folds stratified by event or value tertile (or one grouped split with `holdout`),
    refused when a held-out part would have too few events; cheap, so checked before embedding."""
    strata = outcome_strata(task, y)
    folds = [holdout_split(strata, groups, holdout, seed)] if holdout else grouped_folds(strata, groups, n_folds, seed)
    if task == "survival":
        check_events_per_fold(y, folds, source)
    return folds


def cross_validate_outcome(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    task: str,
    fit: FitFn,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    n_boot: int = 1000,
    seed: int = 0,
    horizons: Sequence[float] | None = None,
) -> OutcomeResult:
    """Over `folds` (outcome_folds) of slides (bags in the object array X): fit on the training part,
    predict the held-out one; metrics on the pooled held-out predictions (with 95 % CIs), per fold,
    and for the floors fitted on the same training parts."""
    if task == "survival":
        horizons = list(horizons or default_horizons(y[:, 0], y[:, 1]))
    sizes = np.asarray([len(b) for b in X])
    pred, floor, train_mean = np.zeros(len(y)), np.zeros(len(y)), np.zeros(len(y))
    fold_of = np.full(len(y), -1)
    per_fold = []
    for f, (tr, te) in enumerate(folds):
        pred[te] = fit(X[tr], y[tr], groups[tr])(X[te])
        floor[te] = tile_count_floor(task, y, sizes, tr, te)
        train_mean[te] = y[tr].mean() if task == "regression" else 0.0
        fold_of[te] = f
        if task == "survival":
            per_fold.append(survival_metrics(y[te, 0], y[te, 1], pred[te], horizons))
        else:
            per_fold.append(regression_metrics(y[te], pred[te]))
    s = np.flatnonzero(fold_of >= 0)
    y, groups, horizons = y[s], groups[s], list(horizons or [])
    floors = {"chance": {"c_index": 0.5} if task == "survival" else {"r2": 0.0},
              "tile_count": score(task, y, floor[s], groups, horizons, n_boot, seed,
                                  ("c_index",) if task == "survival" else ("r2", "spearman"))}
    if task == "regression":
        floors["training_mean"] = regression_metrics(y, train_mean[s])
    metrics = score(task, y, pred[s], groups, horizons, n_boot, seed)
    if len(folds) == 1:
        metrics["n_train"] = int(len(folds[0][0]))
    return OutcomeResult(task, y, pred[s], groups, fold_of[s], s, metrics, per_fold, floors, horizons)


def evaluate_outcome(y: np.ndarray, pred: np.ndarray, groups: np.ndarray, task: str, n_boot: int = 1000,
                     seed: int = 0, horizons: Sequence[float] | None = None) -> OutcomeResult:
    """Score a bundle's own predictions on held-out slides (no refit; the floor is chance)."""
    if task == "survival":
        horizons = list(horizons or default_horizons(y[:, 0], y[:, 1]))
    metrics = score(task, y, pred, groups, horizons or [], n_boot, seed)
    floors = {"chance": {"c_index": 0.5} if task == "survival" else {"r2": 0.0}}
    return OutcomeResult(task, y, pred, groups, np.zeros(len(y), int), np.arange(len(y)), metrics, [], floors,
                         list(horizons or []))


def save_km_plot(result: OutcomeResult, path: Path, title: str) -> Path:
    """Kaplan–Meier curves (95 % log-log bands, + at censored times) of the low- and high-risk
    groups, with the log-rank p-value and numbers at risk under the time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sk = _sksurv()
    time, event = result.y[:, 0], result.y[:, 1].astype(bool)
    high = result.pred > 0
    fig, (ax, table) = plt.subplots(2, 1, figsize=(6.4, 5.2), height_ratios=[4, 1], sharex=True)
    ticks = np.linspace(0, time.max(), 6)
    rows = []
    for name, members, colour in (("low risk", ~high, "tab:blue"), ("high risk", high, "tab:red")):
        if not members.any():
            continue
        t, s, ci = sk.nonparametric.kaplan_meier_estimator(event[members], time[members], conf_type="log-log")
        t, s = np.r_[0.0, t], np.r_[1.0, s]
        lo, hi = np.r_[1.0, ci[0]], np.r_[1.0, ci[1]]
        label = f"{name} (n={members.sum()}, events={event[members].sum()})"
        ax.step(t, s, where="post", color=colour, label=label)
        ax.fill_between(t, lo, hi, step="post", color=colour, alpha=0.15, lw=0)
        cens = time[members & ~event]
        ax.plot(cens, s[np.searchsorted(t, cens, side="right") - 1], "+", color=colour, ms=7)
        rows.append((name, colour, [int((time[members] >= x).sum()) for x in ticks]))
    p = result.metrics.get("risk_groups", {}).get("logrank_p", float("nan"))
    c = result.metrics.get("c_index", float("nan"))
    ax.set_title(f"{title}\nhigh risk: above the training slides' median; log-rank p = {p:.2g}, "
                 f"Harrell's C = {c:.3f}", fontsize=9)
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    table.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    for k, (_, colour, counts) in enumerate(rows):
        for x, n in zip(ticks, counts):
            table.text(x, k, str(n), ha="center", va="center", color=colour, fontsize=8)
    table.set_ylim(-0.5, len(rows) - 0.5)
    table.set_xlabel("time (units of the CSV)")
    table.set_title("number at risk", fontsize=8, loc="left")
    for side in ("top", "right", "left"):
        table.spines[side].set_visible(False)
    table.tick_params(left=False)
    fig.tight_layout()
    save_fig(fig, path)
    return path


def save_scatter_plot(result: OutcomeResult, path: Path, title: str, target: str) -> Path:
    """Predicted vs true value per slide (coloured by fold), with the identity line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(result.y, result.pred, c=result.fold, cmap="tab10", s=18, alpha=0.8, vmin=0, vmax=9)
    lo, hi = float(min(result.y.min(), result.pred.min())), float(max(result.y.max(), result.pred.max()))
    ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
    m = result.metrics
    ax.set_title(f"{title}\nR² = {m['r2']:.3f}, Spearman ρ = {m['spearman']:.3f}", fontsize=9)
    ax.set_xlabel(f"true {target}")
    ax.set_ylabel(f"predicted {target}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_fig(fig, path)
    return path


def write_outcome_report(result: OutcomeResult, out_dir: Path, extra: dict, names: Sequence[str] | None = None) -> Path:
    """report.json (with every slide's prediction) plus km.png (survival) or scatter.png
    (regression) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    title = extra.get("mode", "")
    if result.task == "survival":
        save_km_plot(result, out_dir / "km.png", title)
    else:
        save_scatter_plot(result, out_dir / "scatter.png", title, extra.get("target", "value"))
    report = {
        "task": result.task,
        "n_samples": int(len(result.y)),
        "n_groups": int(len(np.unique(result.groups))),
        "n_folds": int(result.fold.max() + 1),
        "metrics": result.metrics,
        "per_fold": result.per_fold,
        "floors": result.floors,
        **extra,
    }
    if result.task == "survival":
        report["horizons"] = result.horizons
        report["primary_c_index"] = "c_index_uno" if result.metrics["censoring"] > 0.5 else "c_index"
    names = [str(names[i]) if names is not None else str(i) for i in result.index]
    report["predictions"] = [{"slide": n, "group": str(g), "fold": int(f), "prediction": float(p)}
                             for n, g, f, p in zip(names, result.groups, result.fold, result.pred)]
    return write_json(report, out_dir / "report.json")
