"""Heads a bundle can hold: small modules from embeddings to class probabilities.

Each head is an nn.Module rebuilt from `(kind, config, tensors)`, the form a bundle stores (JSON
config + named tensors), so training code can fit a head any way it likes (scikit-learn, torch) and
hand over plain arrays. With empty `tensors` a head starts from random init, ready to train.

Tile heads map embeddings (B, D) -> probabilities (B, C) and expose `logits`. The "abmil" head is a
slide head: a bag (N, D) -> (slide output, attention (N,)); its config `task` says what the slide
output is (`SLIDE_TASKS`): class probabilities (C,), a Cox risk score (1,) or a value (1,).

Optional input preparation shared by all heads (config keys): `"l2_normalize": true` divides each
embedding by its norm; `"standardize": true` subtracts tensor `input_mean` and divides by `input_std`
(as a StandardScaler would), applied after the L2 step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathapp.atomic import atomic_path
from pathapp.errors import PathappError
from pathapp.models.header import SEG_HEAD_KINDS

HEAD_KINDS: tuple[str, ...] = ("linear", "mlp", "prototype", "knn", "abmil", "seg_linear", "seg_decoder")
SLIDE_TASKS: tuple[str, ...] = ("classification", "survival", "regression")


class HeadError(PathappError):
    """A head config or tensor set that does not fit the head kind."""


class Head(nn.Module):
    """Common input preparation and (kind, config) bookkeeping."""

    kind: str = ""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        self.in_dim = int(_require(config, "in_dim", self.kind))
        self.num_classes = int(_require(config, "num_classes", self.kind))
        if config.get("standardize"):
            self.register_buffer("input_mean", torch.zeros(self.in_dim))
            self.register_buffer("input_std", torch.ones(self.in_dim))

    def prepare(self, x: Tensor) -> Tensor:
        if self.config.get("l2_normalize"):
            x = F.normalize(x, dim=-1)
        if self.config.get("standardize"):
            x = (x - self.input_mean) / self.input_std
        return x

    def logits(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x).softmax(dim=-1)


def _require(config: dict[str, Any], key: str, kind: str) -> Any:
    if key not in config:
        raise HeadError(f"head {kind!r} config lacks {key!r} (got keys {sorted(config)})")
    return config[key]


class LinearHead(Head):
    """Softmax regression. Tensors: `weight` (C, D), `bias` (C,).

    A binary scikit-learn LogisticRegression stores one row (1, D); it is accepted and expanded to
    two rows [-w/2, w/2] so that softmax gives exactly its sigmoid for class 1.
    """

    kind = "linear"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.fc = nn.Linear(self.in_dim, self.num_classes)

    def logits(self, x: Tensor) -> Tensor:
        return self.fc(self.prepare(x))

    @staticmethod
    def convert(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        tensors = dict(tensors)
        if "weight" in tensors:
            w, b = tensors.pop("weight"), tensors.pop("bias")
            if w.shape[0] == 1:
                w, b = torch.cat([-w / 2, w / 2]), torch.cat([-b / 2, b / 2])
            tensors["fc.weight"], tensors["fc.bias"] = w, b
        return tensors


class MLPHead(Head):
    """Small MLP. Config `hidden` (list of widths), `activation` ("gelu"|"relu"), `dropout`.
    Tensors `layers.<i>.weight|bias` as nn.Sequential names them."""

    kind = "mlp"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        act = {"gelu": nn.GELU, "relu": nn.ReLU}[config.get("activation", "gelu")]
        widths = [self.in_dim, *[int(h) for h in config.get("hidden", [256])]]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), act(), nn.Dropout(float(config.get("dropout", 0.0)))]
        layers.append(nn.Linear(widths[-1], self.num_classes))
        self.layers = nn.Sequential(*layers)

    def logits(self, x: Tensor) -> Tensor:
        return self.layers(self.prepare(x))


class PrototypeHead(Head):
    """Nearest class mean by cosine. Tensor `prototypes` (C, D); config `temperature` (0.1).
    probs = softmax(cos / T), i.e. softmax of -cosine distance / T."""

    kind = "prototype"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.temperature = float(config.get("temperature", 0.1))
        self.register_buffer("prototypes", torch.zeros(self.num_classes, self.in_dim))

    def logits(self, x: Tensor) -> Tensor:
        return F.normalize(self.prepare(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).T / self.temperature


class KNNHead(Head):
    """k nearest stored training embeddings by cosine; probs = vote fractions.
    Tensors `embeddings` (N, D) and `labels` (N,) int64; config `k`, `num_train`, and optionally
    `temperature` T: votes weighted by exp(cos / T) as in DINO's kNN evaluation (else one vote each),
    and `class_weight` (C,): each class's votes scaled (e.g. inverse frequency), then renormalised."""

    kind = "knn"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.k = int(config.get("k", 20))
        self.temperature = config.get("temperature")
        self.class_weight = config.get("class_weight")
        n = int(_require(config, "num_train", self.kind))
        self.register_buffer("embeddings", torch.zeros(n, self.in_dim))
        self.register_buffer("labels", torch.zeros(n, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        sims = F.normalize(self.prepare(x), dim=-1) @ F.normalize(self.embeddings, dim=-1).T
        top = sims.topk(min(self.k, sims.shape[1]), dim=1)
        votes = F.one_hot(self.labels[top.indices], self.num_classes).to(x.dtype)
        if self.temperature is None:
            probs = votes.mean(dim=1)
        else:
            weights = (top.values / float(self.temperature)).softmax(dim=1)
            probs = (votes * weights.unsqueeze(-1)).sum(dim=1)
        if self.class_weight is None:
            return probs
        probs = probs * torch.tensor(self.class_weight, dtype=probs.dtype, device=probs.device)
        return probs / probs.sum(dim=1, keepdim=True)

    def logits(self, x: Tensor) -> Tensor:
        """Log vote fractions (-inf where a class got no vote), for API symmetry."""
        return self.forward(x).log()


class ABMILHead(Head):
    """Gated attention MIL (Ilse et al. 2018) over a bag of tile embeddings.

    Config `hidden_dim` (256), `attn_dim` (128), `dropout`, and `task`:
    - "classification" (default): forward -> (probabilities (C,), attention (N,) summing to 1);
    - "survival": one output, the Cox log relative hazard minus `risk_offset` (the median over the
      training slides), so a risk above 0 means a worse prognosis than the median training slide;
    - "regression": one output, the value in the target's units (the head learns standardised
      targets; `target_mean` and `target_std` undo it).
    `logits` is always the raw output, what training losses see."""

    kind = "abmil"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.task = str(config.get("task", "classification"))
        if self.task not in SLIDE_TASKS:
            raise HeadError(f"abmil head task {self.task!r} is not one of {', '.join(SLIDE_TASKS)}")
        if self.task != "classification" and self.num_classes != 1:
            raise HeadError(f"an abmil {self.task} head has one output, not num_classes={self.num_classes}")
        hidden, attn = int(config.get("hidden_dim", 256)), int(config.get("attn_dim", 128))
        drop = float(config.get("dropout", 0.0))
        self.fc = nn.Sequential(nn.Linear(self.in_dim, hidden), nn.ReLU(), nn.Dropout(drop))
        self.attn_v = nn.Linear(hidden, attn)
        self.attn_u = nn.Linear(hidden, attn)
        self.attn_w = nn.Linear(attn, 1)
        self.classifier = nn.Linear(hidden, self.num_classes)

    def attend(self, bag: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(raw slide output (C,), attention (N,)) for a bag (N, D); or, for bags padded to (B, N, D)
        with `mask` (B, N) true where a tile is (training several bags at once), (B, C) and (B, N)."""
        h = self.fc(self.prepare(bag))
        scores = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attention = scores.softmax(dim=-1)
        return self.classifier((attention.unsqueeze(-2) @ h).squeeze(-2)), attention

    def logits(self, bag: Tensor) -> Tensor:
        return self.attend(bag)[0]

    def replace_one(self, bag: Tensor, index: int, candidates: Tensor) -> Tensor:
        """Slide probabilities (B, C) when tile `index` of the bag takes each of the B `candidates`
        embeddings in turn, the other tiles unchanged: how one tile's content moves the slide call."""
        h = self.fc(self.prepare(bag))
        scores = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)
        hc = self.fc(self.prepare(candidates))
        sc = self.attn_w(torch.tanh(self.attn_v(hc)) * torch.sigmoid(self.attn_u(hc))).squeeze(-1)
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep[index] = False
        top = torch.maximum(scores[keep].max() if keep.any() else sc.min(), sc.max())  # one shift: stable exp
        w_rest, w_new = (scores[keep] - top).exp(), (sc - top).exp()
        pooled = (w_rest @ h[keep] + w_new[:, None] * hc) / (w_rest.sum() + w_new)[:, None]
        return self.classifier(pooled).softmax(dim=-1)

    def forward(self, bag: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        out, attention = self.attend(bag)
        if self.task == "classification":
            return out.softmax(dim=-1), attention
        if self.task == "survival":
            return out - float(self.config.get("risk_offset", 0.0)), attention
        return out * float(self.config.get("target_std", 1.0)) + float(self.config.get("target_mean", 0.0)), attention


_KINDS: dict[str, type[Head]] = {c.kind: c for c in (LinearHead, MLPHead, PrototypeHead, KNNHead, ABMILHead)}


def build_head(kind: str, config: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> Head:
    """The head of `kind` from its JSON config; `tensors` (if any) must match its state exactly."""
    if kind in SEG_HEAD_KINDS:
        from pathapp.models.seg import SEG_HEADS

        head: Head = SEG_HEADS[kind](config)
    elif kind not in _KINDS:
        raise HeadError(f"unknown head kind {kind!r}; use one of {', '.join(HEAD_KINDS)}")
    else:
        head = _KINDS[kind](config)
    if tensors:
        if kind == "linear":
            tensors = LinearHead.convert(tensors)
        state = head.state_dict()
        missing = sorted(set(state) - set(tensors))
        unexpected = sorted(set(tensors) - set(state))
        wrong = [f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}" for k, v in state.items()
                 if k in tensors and tensors[k].shape != v.shape]
        if missing or unexpected or wrong:
            raise HeadError(f"{kind} head tensors do not fit its config: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}, shape {wrong[:3]}")
        head.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items()})
    return head.eval()


def head_state(head: Head) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """(kind, config, tensors) such that build_head(*head_state(h)) rebuilds `h`."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    return head.kind, dict(head.config), tensors


HEAD_FORMAT = "pathapp.head"


def save_head_file(path: str | Path, kind: str, config: dict[str, Any], tensors: dict[str, Tensor],
                   class_names: list[str] | None = None) -> Path:
    """A head on its own as safetensors (config + class names in the header), written atomically;
    `pathapp model create --head FILE` puts it into a bundle."""
    import json

    from safetensors.torch import save_file

    build_head(kind, config, tensors)  # refuse to write a head that would not load
    path = Path(path)
    meta = {"format": HEAD_FORMAT, "pathapp": json.dumps({"kind": kind, "config": config,
                                                           "class_names": class_names})}
    with atomic_path(path) as tmp:
        save_file({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path


def read_head_file(path: str | Path) -> tuple[str, dict[str, Any], dict[str, Tensor], list[str] | None]:
    """(kind, config, tensors, class names or None) from a head file:
    .safetensors (as `save_head_file` writes), .json or .pt/.pth holding
    {"kind", "config", "tensors": {name: array}, "class_names"?}."""
    import json

    path = Path(path)
    if not path.is_file():
        raise HeadError(f"{path}: no such head file")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if header.get("format") != HEAD_FORMAT:
                raise HeadError(f"{path}: a safetensors file without pathapp head metadata "
                                f"(format={HEAD_FORMAT!r}); write it with pathapp.models.heads.save_head_file")
            doc = json.loads(header["pathapp"])
        else:
            doc = json.loads(path.read_text()) if path.suffix == ".json" else \
                torch.load(path, map_location="cpu", weights_only=True)
            tensors = {k: torch.as_tensor(v) for k, v in (doc.get("tensors") or {}).items()}
        kind, config = doc["kind"], doc["config"]
    except HeadError:
        raise
    except Exception as e:  # json, torch and safetensors each raise their own errors
        from pathapp.models.weights import why_unreadable

        raise HeadError(f"{path}: not a head file ({why_unreadable(e)}); expected "
                        f'{{"kind", "config", "tensors"}} in .json/.pt or a .safetensors head') from None
    build_head(kind, config, tensors)
    return kind, config, tensors, doc.get("class_names")
