"""How good the QC flags are: labelled cases and precision / recall per artefact flag.

Two kinds of case. Real tiles labelled by their file names (histolab's QC fixtures: pen marks,
no tissue, a line on glass, tissue of every density). And real tissue tiles with damage of known
strength, each made the way the artefact arises: Gaussian blur of a known σ in µm (defocus), JPEG at
a known quality, a fold (a second layer of the same section: optical densities add, Beer-Lambert),
a blurred disc (an air bubble or a local focus failure), and tissue made pale by scaling its optical
density (a thin or weakly stained section), which must NOT be flagged. Used by
`benchmarks/bench_qc.py` (the README table) and by the tests."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pathapp.tiles.qc import ARTEFACTS, QCThresholds, artefact_flags, measure_tiles, with_fold
from pathapp.tiles.tissue import to_rgb


@dataclass
class Case:
    """One tile and what the flags should say: `expected` flags must fire; flags in `judged` and
    not in `expected` must stay off; flags outside `judged` are not scored on this tile."""

    name: str
    tile: np.ndarray
    mpp: float
    expected: frozenset[str]
    judged: frozenset[str] = field(default_factory=lambda: frozenset(ARTEFACTS))
    group: str = ""  # the damage and its strength, for recall per strength
    slide: str = ""  # the slide it stands for: `fold` is judged against the slide's other tiles
    in_reference: bool = True  # part of its slide's reference (local damage, a fold or a disc, is not)


# ------------------------------------------------------------------------------------ damage


def blur(tile: np.ndarray, sigma_um: float, mpp: float) -> np.ndarray:
    """Gaussian blur of σ = sigma_um µm (defocus of known strength)."""
    from scipy import ndimage as ndi

    s = sigma_um / mpp
    return np.clip(ndi.gaussian_filter(tile.astype(np.float32), (s, s, 0)) + 0.5, 0, 255).astype(np.uint8)


def jpeg(tile: np.ndarray, quality: int) -> np.ndarray:
    """The tile JPEG-encoded at `quality` and decoded (8×8 blocks from the tile's corner)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, "JPEG", quality=int(quality))
    return np.asarray(Image.open(buf).convert("RGB"))


def _od(tile: np.ndarray) -> np.ndarray:
    return -np.log((tile.astype(np.float32) + 1.0) / 256.0)


def _from_od(od: np.ndarray) -> np.ndarray:
    return np.clip(256.0 * np.exp(-od) - 1.0 + 0.5, 0, 255).astype(np.uint8)


def pale(tile: np.ndarray, factor: float) -> np.ndarray:
    """The same tissue with `factor` × its optical density: a thinner or more weakly stained section."""
    return _from_od(_od(tile) * factor)


def _band(shape: tuple[int, int], fraction: float) -> np.ndarray:
    """A diagonal band covering about `fraction` of an image (folds are long and straight-ish)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    d = (xx / w + yy / h) / 2.0  # 0 at the top-left corner, 1 at the bottom-right
    return np.abs(d - 0.5) < fraction / 2.0


def fold(tile: np.ndarray, fraction: float = 0.4) -> np.ndarray:
    """A fold over a diagonal band: the section lies on itself there (the mirrored tissue's optical
    density added to the tile's)."""
    band = _band(tile.shape[:2], fraction)[..., None]
    return _from_od(_od(tile) + band * _od(tile[::-1, ::-1]))


def blurred_disc(tile: np.ndarray, sigma_um: float, mpp: float, fraction: float = 0.5) -> np.ndarray:
    """A disc covering `fraction` of the tile blurred by σ µm (an air bubble, a focus failure)."""
    h, w = tile.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.sqrt(fraction * h * w / np.pi)
    inside = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < r * r)[..., None]
    return np.where(inside, blur(tile, sigma_um, mpp), tile)


# ------------------------------------------------------------------------------------- cases

BLUR_SIGMAS_UM = (0.5, 1.0, 2.0, 4.0)  # defocus counted as an artefact from 1 µm
BLUR_FROM_UM = 1.0
JPEG_QUALITIES = (10, 20, 30, 50, 70, 90)  # compression counted as an artefact at quality ≤ 20
JPEG_UPTO = 20
PALE_FACTORS = (0.6, 0.4)
FOLD_MIN_STAINED = 0.75  # folds are made on tiles this much stained: a folded film of fat is still pale


def stained_fraction(tile: np.ndarray) -> float:
    """1 − `qc: background` of a tile."""
    from pathapp.tiles.qc import GLASS_CHROMA, od_spread

    return float((od_spread(to_rgb(tile)) >= GLASS_CHROMA).mean())


def histolab_cases(folder: Path, min_px: int = 256) -> list[Case]:
    """histolab's QC tiles labelled by file name (tiles under `min_px` are left out: too small to
    judge focus or folds on). Their µm/px is unknown (TCGA levels 0-2), so only the scale-free
    flags are judged: pen (`*-pen*`), background (`no-tissue*`, `almost-white*`; ink-only tiles are
    judged on pen alone), and no flag at all on clean tissue (`tissue-*`, `*-nuclei-score-*`)."""
    from PIL import Image

    cases = []
    for p in sorted(Path(folder).glob("*.png")):
        with Image.open(p) as im:
            tile = to_rgb(np.asarray(im))
        if min(tile.shape[:2]) < min_px:
            continue
        name = p.stem
        if "-pen" in name:
            expected, judged = {"pen"}, {"pen"} if name.startswith("no-tissue") else {"pen", "background"}
        elif name.startswith(("no-tissue", "almost-white")):
            expected, judged = {"background"}, {"background", "pen"}
        else:
            expected, judged = set(), {"background", "pen", "fold"}
        cases.append(Case(name, tile, 0.5, frozenset(expected), frozenset(judged), group="histolab", slide=name))
    return cases


def synthetic_cases(tiles: list[tuple[str, np.ndarray]], mpp: float, *, jpeg_sources: set[str] | None = None) -> list[Case]:
    """Each clean tissue tile (name, RGB at `mpp`) as it is, pale, blurred, compressed, folded (when
    at least FOLD_MIN_STAINED of it is stained) and with a blurred disc. The clean, pale and damaged
    versions are judged on every flag except compression, which is judged only on tiles named in
    `jpeg_sources` (a tile already JPEG-compressed by the scanner at its own grid is compressed,
    whatever is done to it). Tiles named `SLIDE#…` come from one slide: a damage done to every tile
    (pale, blur, JPEG) makes a slide of its own, a local one (fold, disc) lies on the clean slide."""
    cases: list[Case] = []
    for name, t in tiles:
        jp = jpeg_sources is None or name in jpeg_sources
        every = frozenset(ARTEFACTS) if jp else frozenset(ARTEFACTS) - {"compression"}
        slide = name.split("#")[0]

        def add(what: str, tile: np.ndarray, expected: frozenset[str], judged: frozenset[str], group: str,
                local: bool = False) -> None:
            cases.append(Case(f"{name} {what}", tile, mpp, expected, judged, group,
                              slide if local or group == "clean" else f"{slide} {group}", in_reference=not local))

        add("clean", t, frozenset(), every, "clean")
        for k in PALE_FACTORS:
            add(f"pale ×{k}", pale(t, k), frozenset(), every, f"pale ×{k}")
        for s in BLUR_SIGMAS_UM:
            exp = frozenset({"blur", "out of focus"}) if s >= BLUR_FROM_UM else frozenset()
            add(f"blur {s} µm", blur(t, s, mpp), exp, frozenset({"blur", "out of focus", "fold", "pen"}), f"blur σ {s} µm")
        if stained_fraction(t) >= FOLD_MIN_STAINED:
            add("fold", fold(t), frozenset({"fold"}), frozenset({"fold", "pen"}), "fold", local=True)
        add("blurred disc", blurred_disc(t, 2.0, mpp), frozenset({"out of focus"}),
            frozenset({"out of focus", "fold", "pen"}), "blurred disc (σ 2 µm, half the tile)", local=True)
        if jp:
            for q in JPEG_QUALITIES:
                exp = frozenset({"compression"}) if q <= JPEG_UPTO else frozenset()
                add(f"jpeg q{q}", jpeg(t, q), exp, frozenset({"compression", "blur", "fold", "pen"}), f"JPEG quality {q}")
    return cases


def case_measures(cases: list[Case], thresholds: QCThresholds = QCThresholds()) -> dict[str, np.ndarray]:
    """Every case measured (columns), with `fold` relative to each case's slide: the median `eosin`
    of the slide's reference cases, as `with_fold` takes it over a real slide's tiles."""
    by_mpp: dict[float, list[int]] = {}
    for i, c in enumerate(cases):
        by_mpp.setdefault(c.mpp, []).append(i)
    measured: dict[str, np.ndarray] = {}
    for mpp, idx in by_mpp.items():
        cols = measure_tiles([cases[i].tile for i in idx], mpp, thresholds=thresholds)
        for k, v in cols.items():
            measured.setdefault(k, np.full(len(cases), np.nan))[idx] = v
    fold = np.full(len(cases), np.nan)
    slides = np.array([c.slide for c in cases])
    ref = np.array([c.in_reference for c in cases])
    for s in np.unique(slides):
        here = slides == s
        fold[here] = with_fold({"eosin": measured["eosin"][here]}, reference=measured["eosin"][here & ref])["fold"]
    return {**measured, "fold": fold}


# ------------------------------------------------------------------------------------- score


@dataclass
class FlagScore:
    """Counts of one flag over the cases that judge it."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")


def evaluate(cases: list[Case], thresholds: QCThresholds = QCThresholds(),
             measures: dict[str, np.ndarray] | None = None) -> tuple[dict[str, FlagScore], list[dict]]:
    """Measure every case (unless `measures`, from `case_measures`, are given), then per flag its
    counts, and per case what fired (rows for a report)."""
    rows: list[dict] = []
    scores = {k: FlagScore() for k in ARTEFACTS}
    flags = artefact_flags(case_measures(cases, thresholds) if measures is None else measures, thresholds)
    fired = [{k for k, v in flags.items() if v[i]} for i in range(len(cases))]
    for c, f in zip(cases, fired):
        for k in c.judged:
            s = scores[k]
            if k in c.expected:
                s.tp, s.fn = s.tp + (k in f), s.fn + (k not in f)
            else:
                s.fp, s.tn = s.fp + (k in f), s.tn + (k not in f)
        wrong = sorted((f & c.judged) ^ c.expected)
        rows.append({"name": c.name, "group": c.group, "expected": sorted(c.expected), "fired": sorted(f),
                     "wrong": wrong})
    return scores, rows
