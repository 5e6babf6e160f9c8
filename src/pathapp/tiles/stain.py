"""Stain normalisation, fitted once per slide on its tissue and applied to batches of tiles on the
model's device.

Fitting (numpy / torchstain / scikit-learn, once per slide or reference):
- `macenko`: torchstain's Macenko fit (stain vectors from the extreme angles of the optical
  densities in their principal plane, and the 99th percentile of each stain's concentration).
- `vahadane`: sparse non-negative dictionary learning of the optical densities (Vahadane et al.
  2016), with scikit-learn's DictionaryLearning, the way TIAToolbox fits it; then concentrations
  and their 99th percentiles as for Macenko.
- `reinhard`: mean and standard deviation of each CIELAB channel (torchstain's colour
  conversion) over the tissue tiles or the reference image, after Reinhard et al. 2001.

Applying (torch, batched, on the tiles' device): with the slide's stains S_s, the reference's S_t
and their concentration percentiles c_s, c_t, Macenko's and Vahadane's normalisation is one 3×3
matrix in optical density, OD' = S_t diag(c_t / c_s) S_s⁺ OD (least-squares concentrations, as
torchstain computes them); Reinhard's is one affine map per LAB channel. Nothing is re-fitted per tile.

Checked: a reference or slide without enough stained tissue, a dark-field (fluorescence) image,
and a slide whose second stain is not the reference's (DAB in an IHC slide against eosin in an H&E
reference: the absorbance of DAB peaks in blue, eosin's in green) each stop with one line. A fit
that fails or is degenerate falls back (Vahadane to Macenko, also where the two disagree on the second
stain; a slide to no normalisation) and says so."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pathapp.errors import PathappError
from pathapp.tiles.tissue import TILE_SATURATION, tissue_pixels, to_rgb

if TYPE_CHECKING:
    import torch

    from pathapp.slide import Slide

METHODS = ("macenko", "reinhard", "vahadane")
IO = 240.0  # transmitted light (torchstain's default): OD = -ln((I + 1) / IO)
BETA = 0.15  # optical density under which a pixel is too transparent to fit stains on (torchstain)
MIN_PIXELS = 2000  # stained pixels a fit needs
FIT_PIXELS = 200_000  # pixels sampled for Macenko / Reinhard
VAHADANE_PIXELS = 2000  # dictionary learning is slow: a sample (two stain vectors need few pixels)
VAHADANE_MAX_ITER = 100  # dictionary-learning iterations; reaching them means it did not converge
VAHADANE_TOL = 1e-4  # relative change of the objective that ends it (scikit-learn's 1e-8 takes 7× longer
#                      for stain vectors within 1.5°)
DARK_FIELD = 120.0  # a brightfield image's brightest 5 % are glass, brighter than this grey level
MIN_STAIN_ANGLE = 5.0  # degrees between the two stain vectors below which a fit is degenerate
FIT_TILES = 64  # tissue tiles sampled to fit a slide
WHOLE_IMAGE_PX = 4096  # a reference no larger than this on a side is fitted on all its pixels


class StainError(PathappError):
    """A reference or slide that stain normalisation cannot use; the message says what to do."""


class StainFitError(StainError):
    """The fit itself failed (too little tissue, a degenerate result): a slide falls back to no
    normalisation, a reference stops the run."""


@dataclass
class StainFit:
    """A fitted stain appearance (of a slide or a reference). `stains`: 3 × 2 optical-density unit
    vectors (columns: haematoxylin, second stain), `max_conc`: their 99th-percentile concentrations;
    `lab_mean` / `lab_std`: CIELAB statistics in torchstain's units (L × 2.55, a + 128, b + 128)
    for Reinhard. `kind` names the second stain (every method checks it)."""

    method: str
    stains: list[list[float]]
    max_conc: list[float]
    lab_mean: list[float]
    lab_std: list[float]
    kind: str  # "eosin" or "DAB"
    pixels: int
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """Short hash of what the normalisation maps to: embeddings made with it are told apart."""
        import hashlib

        key = json.dumps([self.method, self.stains, self.max_conc, self.lab_mean, self.lab_std])
        return f"stain-{self.method}-" + hashlib.sha1(key.encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StainFit:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ------------------------------------------------------------------------------------ fitting


def stained_mask(rgb: np.ndarray) -> np.ndarray:
    """Which pixels of an RGB(A) image are stained, not ink, and not too transparent to fit on."""
    img = to_rgb(rgb)
    od = -np.log((img.astype(np.float32) + 1.0) / IO)
    return tissue_pixels(img, TILE_SATURATION) & ~np.any(od < BETA, axis=2)


def stained_pixels(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) uint8: the pixels of `stained_mask`."""
    return to_rgb(rgb)[stained_mask(rgb)]


def _check_brightfield(rgb: np.ndarray, label: str) -> None:
    bright = float(np.percentile(to_rgb(rgb).mean(axis=2), 95)) if rgb.size else 0.0
    if bright < DARK_FIELD:
        raise StainError(f"{label}: a dark background (brightest 5 % at grey {bright:.0f}): a fluorescence or "
                         f"dark-field image; stain normalisation is for brightfield stains (H&E, IHC)")


def _second_stain(stains: np.ndarray) -> str:
    """Eosin absorbs green most, DAB blue (Ruifrok & Johnston's vectors)."""
    e = stains[:, 1]
    return "DAB" if e[2] > e[1] else "eosin"


def _valid(stains: np.ndarray, max_conc: np.ndarray) -> str:
    """Why a stain fit is unusable, or '' when it is fine."""
    if not (np.all(np.isfinite(stains)) and np.all(np.isfinite(max_conc))):
        return "not finite"
    if np.any(max_conc <= 0):
        return "a stain with no concentration"
    cos = float(np.clip(stains[:, 0] @ stains[:, 1], -1.0, 1.0))
    if np.degrees(np.arccos(cos)) < MIN_STAIN_ANGLE:
        return "the two stain vectors coincide"
    return ""


def _macenko(px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from torchstain.torch.normalizers import TorchMacenkoNormalizer

    n = TorchMacenkoNormalizer()
    n.fit(torch.from_numpy(np.ascontiguousarray(px.T.reshape(3, 1, -1))), Io=IO, beta=BETA)
    return n.HERef.double().numpy(), n.maxCRef.double().numpy()


def _concentration_percentiles(px: np.ndarray, stains: np.ndarray) -> np.ndarray:
    od = -np.log((px.astype(np.float64) + 1.0) / IO)
    conc = od @ np.linalg.pinv(stains).T
    return np.percentile(conc, 99, axis=0)


def _vahadane(px: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, bool]:
    """Stain vectors by sparse non-negative dictionary learning; (stains, max_conc, converged)."""
    from sklearn.decomposition import DictionaryLearning

    rng = np.random.default_rng(seed)
    sample = px[rng.permutation(len(px))[:VAHADANE_PIXELS]]
    od = -np.log((sample.astype(np.float64) + 1.0) / IO)
    dl = DictionaryLearning(n_components=2, alpha=0.1, max_iter=VAHADANE_MAX_ITER, tol=VAHADANE_TOL,
                            fit_algorithm="cd", transform_algorithm="lasso_cd", positive_dict=True,
                            positive_code=True, random_state=seed)
    with warnings.catch_warnings():  # the inner lasso's iteration warnings; convergence is judged below
        warnings.simplefilter("ignore")
        dl.fit(od)
    d = dl.components_.T / np.maximum(np.linalg.norm(dl.components_, axis=1), 1e-12)  # 3 × 2 unit columns
    d = d[:, np.argsort(-d[0])]  # haematoxylin first: it absorbs red most (as torchstain orders them)
    return d, _concentration_percentiles(px, d), dl.n_iter_ < dl.max_iter


def _lab_stats(px: np.ndarray) -> tuple[list[float], list[float]]:
    import torch
    from torchstain.torch.utils import rgb2lab

    lab = rgb2lab(torch.from_numpy(px.T.reshape(3, 1, -1).astype(np.float32) / 255.0)).reshape(3, -1).double()
    return lab.mean(dim=1).tolist(), lab.std(dim=1).clamp_min(1e-3).tolist()


def fit_pixels(px: np.ndarray, method: str, label: str, every_px: np.ndarray | None = None) -> StainFit:
    """Fit `method` to the stained pixels `px` (N, 3) uint8 of one slide or reference named
    `label`; Reinhard's statistics are of `every_px` (background included, as Reinhard's are: the
    map then keeps glass white), default `px`."""
    if method not in METHODS:
        raise StainError(f"--stain-norm must be one of {', '.join(METHODS)}, not {method!r}")
    if len(px) < MIN_PIXELS:
        raise StainFitError(f"{label}: only {len(px)} stained pixels (at least {MIN_PIXELS} needed): no tissue to fit "
                         f"a stain on; give a tile or slide with tissue")
    rng = np.random.default_rng(0)
    px = px[rng.permutation(len(px))[:FIT_PIXELS]]
    every_px = px if every_px is None else every_px[rng.permutation(len(every_px))[:FIT_PIXELS]]
    notes: list[str] = []
    try:
        stains, max_conc = _macenko(px)
    except Exception as e:  # torchstain raises what torch raises (eigh, kthvalue) on a degenerate sample
        stains, max_conc = np.full((3, 2), np.nan), np.full(2, np.nan)
        notes.append(f"macenko failed ({type(e).__name__})")
    if method == "vahadane":
        v_stains, v_conc, converged = _vahadane(px)
        why = "did not converge" if not converged else _valid(v_stains, v_conc)
        if not why and not notes and _second_stain(v_stains) != _second_stain(stains):
            # the sparse dictionary's second atom leans the other way than Macenko's on the same pixels
            # (an H&E crop with little eosin): the sample does not pin the second stain down
            why = f"found {_second_stain(v_stains)} where macenko finds {_second_stain(stains)}"
        if why:
            notes.append(f"vahadane {why}; fitted with macenko instead")
        else:
            stains, max_conc = v_stains, v_conc
    why = _valid(stains, max_conc)
    if why:
        raise StainFitError(f"{label}: the stain fit failed ({why}{'; ' + '; '.join(notes) if notes else ''})")
    mean, std = _lab_stats(every_px)
    return StainFit(method=method, stains=stains.tolist(), max_conc=max_conc.tolist(), lab_mean=mean, lab_std=std,
                    kind=_second_stain(stains), pixels=int(len(px)), source=label, notes=notes)


def fit_image(rgb: np.ndarray, method: str, label: str) -> StainFit:
    """Fit a tile or image (RGB or RGBA uint8)."""
    _check_brightfield(rgb, label)
    return fit_pixels(stained_pixels(rgb), method, label, to_rgb(rgb).reshape(-1, 3))


def fit_slide(slide: Slide, method: str, *, mpp: float = 0.5, tile_size: int = 224, tiles: int = FIT_TILES,
              grid: Any = None) -> StainFit:
    """Fit a slide on up to `tiles` of its tissue tiles (from `grid`, or a grid at `mpp` µm/px over
    its detected tissue), spread over the slide, so every region counts and no tile alone decides;
    whole tiles where there are any (edge tiles are partly padding)."""
    from pathapp.tiles.dataset import read_tile
    from pathapp.tiles.grid import make_grid

    label = str(slide.path)
    if grid is None:
        grid = make_grid(slide, mpp, tile_size)
    if len(grid) == 0:
        raise StainFitError(f"{label}: no tissue tiles: no tissue to fit a stain on; give a slide with tissue")
    whole = np.flatnonzero(grid.geometry.padding(grid.coords, grid.slide_size) == 0)  # no edge padding
    candidates = whole if len(whole) else np.arange(len(grid))
    pick = candidates[np.linspace(0, len(candidates) - 1, min(tiles, len(candidates))).round().astype(int)]
    images = [read_tile(slide, grid, int(i)) for i in np.unique(pick)]
    every = np.concatenate([im.reshape(-1, 3) for im in images])
    _check_brightfield(every[:, None, :], label)
    return fit_pixels(np.concatenate([stained_pixels(im) for im in images]), method, label, every)


def load_reference(ref: str | Path, method: str, *, mpp: float = 0.5, tile_size: int = 224) -> StainFit:
    """The target appearance from REF: a saved target (`.json`: a StainFit, or the run.json of an
    earlier run, which records its target), a tile or image file, or a slide."""
    from pathapp.slide import open_slide

    p = Path(ref)
    if not p.exists():
        raise StainError(f"{p}: no such stain reference; give a tile, a slide, or a saved target (.json)")
    if p.suffix.lower() == ".json":
        try:
            d = json.loads(p.read_text())
            d = d.get("stain", {}).get("target", d) if "stain" in d else d
            fit = StainFit.from_dict(d)
        except (ValueError, TypeError, AttributeError) as e:
            raise StainError(f"{p}: not a saved stain target or run.json with one ({e})") from None
        if fit.method != method:
            raise StainError(f"{p}: a target fitted with {fit.method}; use --stain-norm {fit.method}, or give the "
                             f"tile or slide it came from ({fit.source}) to fit {method}")
        return fit
    with open_slide(p) as slide:
        if max(slide.size) <= WHOLE_IMAGE_PX:  # a tile or small image: every pixel counts
            return fit_image(slide.read(0, 0, *slide.size), method, str(p))
        return fit_slide(slide, method, mpp=mpp, tile_size=tile_size)


def stain_target(method: str | None, ref: str | Path | None, *, mpp: float = 0.5,
                 tile_size: int = 224) -> StainFit | None:
    """The target of `--stain-norm METHOD --stain-ref REF` (None when neither is given)."""
    if method is None and ref is None:
        return None
    if method is None or ref is None:
        raise StainError("stain normalisation needs both --stain-norm METHOD and --stain-ref REF (a tile, a slide, "
                         "or a saved target)")
    if method not in METHODS:
        raise StainError(f"--stain-norm must be one of {', '.join(METHODS)}, not {method!r}")
    return load_reference(ref, method, mpp=mpp, tile_size=tile_size)


def check_match(fit: StainFit, target: StainFit) -> None:
    """A slide must carry the reference's stains: an IHC slide against an H&E reference is an error."""
    if fit.kind != target.kind:
        what = {"DAB": "IHC (haematoxylin + DAB)", "eosin": "H&E"}
        raise StainError(f"{fit.source}: its stains look like {what[fit.kind]} but the reference {target.source} is "
                         f"{what[target.kind]}; normalise against a reference of the same stain, or drop --stain-norm")


# ----------------------------------------------------------------------------------- applying


@dataclass
class StainNormalizer:
    """Maps one slide's stain appearance onto a target's; call it on uint8 batches (B, 3, H, W)."""

    source: StainFit
    target: StainFit

    def matrix(self) -> np.ndarray:
        """The 3×3 optical-density map of Macenko / Vahadane (module docstring)."""
        s, t = np.asarray(self.source.stains), np.asarray(self.target.stains)
        scale = np.diag(np.asarray(self.target.max_conc) / np.asarray(self.source.max_conc))
        return t @ scale @ np.linalg.pinv(s)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        b, c, h, w = x.shape
        rgb = x.float()
        if self.target.method == "reinhard":
            from torchstain.torch.utils import lab2rgb, rgb2lab

            flat = rgb.permute(1, 0, 2, 3).reshape(3, b * h, w) / 255.0  # torchstain converts (3, H, W)
            lab = rgb2lab(flat)
            mu_s, sd_s, mu_t, sd_t = (torch.tensor(v, dtype=lab.dtype, device=x.device).view(3, 1, 1) for v in
                                      (self.source.lab_mean, self.source.lab_std, self.target.lab_mean,
                                       self.target.lab_std))
            out = lab2rgb((lab - mu_s) / sd_s * sd_t + mu_t)  # (b*h, w, 3) in 0..1
            out = out.reshape(b, h, w, 3).permute(0, 3, 1, 2) * 255.0
        else:
            m = torch.tensor(self.matrix(), dtype=torch.float32, device=x.device)
            od = -torch.log((rgb + 1.0) / IO)
            od = torch.einsum("ij,bjhw->bihw", m, od)
            out = IO * torch.exp(-od)
        return out.round().clamp_(0, 255).to(torch.uint8)

    def tile(self, rgb: np.ndarray) -> np.ndarray:
        """One (H, W, 3) uint8 tile normalised (for pipelines that augment tile by tile after it)."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(to_rgb(rgb))).permute(2, 0, 1)[None]
        return self(x)[0].permute(1, 2, 0).numpy()

    def record(self) -> dict[str, Any]:
        """What run.json keeps: the method, the slide's and the target's fits, and the OD matrix."""
        rec: dict[str, Any] = {"method": self.target.method, "slide": self.source.to_dict(),
                               "target": self.target.to_dict()}
        if self.target.method != "reinhard":
            rec["od_matrix"] = self.matrix().tolist()
        return rec


def slide_normalizer(slide: Slide, grid: Any, target: StainFit, *, mpp: float = 0.5,
                     tile_size: int = 224) -> tuple[StainNormalizer | None, dict[str, Any]]:
    """The normaliser of one slide onto `target`, fitted once on its tissue tiles (`grid`, or a grid
    at `mpp` µm/px and `tile_size` over its tissue), and
    what run.json records. A fit that fails leaves the slide unnormalised and says why in the
    record (`fallback`); a slide of another stain than the reference, or a fluorescence slide,
    raises StainError (normalising it would make garbage)."""
    try:
        fit = fit_slide(slide, target.method, mpp=mpp, tile_size=tile_size, grid=grid)
    except StainFitError as e:
        return None, {"method": target.method, "target": target.to_dict(),
                      "fallback": f"not normalised: {e}"}
    check_match(fit, target)
    norm = StainNormalizer(fit, target)
    return norm, norm.record()


def image_normalizer(rgb: np.ndarray, target: StainFit, label: str) -> StainNormalizer | None:
    """The normaliser of one image (a labelled tile is its own scan) onto `target`, or None when its
    fit fails or gives other stains than the target's (the image is then used as it is: one small
    image's fit is too unsure to stop a whole data set, e.g. an H&E crop with little eosin whose
    second stain vector leans to blue)."""
    try:
        fit = fit_image(rgb, target.method, label)
        check_match(fit, target)
    except StainFitError:
        return None
    except StainError:
        if fit.kind != target.kind:
            return None
        raise
    return StainNormalizer(fit, target)
