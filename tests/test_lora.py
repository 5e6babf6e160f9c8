"""LoRA: frozen weights stay bit-identical while training; the merged model equals base + adapter."""

from __future__ import annotations

import copy

import pytest
import torch

from pathapp.models.lora import LoRALinear, apply_lora, lora_parameters, lora_state_dict, merge_lora


def _tiny_vit():
    import timm

    torch.manual_seed(0)
    m = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=28, embed_dim=48, depth=2, num_heads=3, num_classes=0
    )
    for mod in m.modules():
        if hasattr(mod, "gamma"):
            mod.gamma.data.fill_(1.0)
    return m.eval()


def test_lora_trains_only_adapters_and_merges_exactly():
    torch.set_num_threads(1)
    model = _tiny_vit()
    base = copy.deepcopy(model)
    frozen_before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        ref = model(x)
    names = apply_lora(model, rank=4, alpha=8, targets=("qkv", "proj", "fc1", "fc2"))
    assert len(names) == 2 * 4 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # B = 0 at start: adapted == base
    head = torch.nn.Linear(48, 2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}
    opt = torch.optim.AdamW(trainable + list(head.parameters()), lr=1e-2)
    y = torch.tensor([0, 1, 0, 1])
    model.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(head(model(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    # every frozen tensor is bit-identical; the adapters moved
    after = model.state_dict()
    for k, v in frozen_before.items():
        wrapped = k.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(after.get(k, after.get(wrapped)), v), k
    adapters = lora_state_dict(model)
    assert adapters and any(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith("lora_b"))
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, ref)
        # adapter output = base output + scale * B A x, layer by layer
        lin = model.get_submodule(names[0])
        h = torch.randn(5, lin.base.in_features)
        assert torch.allclose(lin(h), lin.base(h) + lin.scale * h @ lin.lora_a.T @ lin.lora_b.T, atol=1e-6)
        merged = merge_lora(copy.deepcopy(model))
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert torch.allclose(merged(x), adapted, atol=1e-5)
        # merged state dict has exactly the base model's keys: any timm loader reads it
        assert set(merged.state_dict()) == set(base.state_dict())
        base.load_state_dict(merged.state_dict())
        assert torch.allclose(base(x), adapted, atol=1e-5)


def test_lora_rejects_bad_targets():
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_lora(_tiny_vit(), targets=("nope",))
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(torch.nn.Linear(3, 3), rank=0)


class _Interrupting:
    """Tiles that fail after `limit` reads: a run killed part-way through."""

    def __init__(self, tiles, limit):
        self.tiles, self.limit, self.reads = tiles, limit, 0

    def __len__(self):
        return len(self.tiles)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > self.limit:
            raise KeyboardInterrupt
        return self.tiles[i]


def test_finetune_resume_equals_uninterrupted_run(tmp_path):
    """A run killed after 2 of 3 epochs and resumed from its checkpoint ends with exactly the weights of
    the uninterrupted run; the export is a merged plain bundle whose head separates the classes."""
    import numpy as np

    from pathapp.models.bundle import load_bundle
    from pathapp.train.finetune import FinetuneError, LoraConfig, finetune_lora
    from vit_factory import tiny_bundle

    torch.set_num_threads(1)
    base = load_bundle(tiny_bundle(tmp_path, 0))
    rng = np.random.default_rng(0)
    y = np.arange(24) % 2
    tiles = rng.integers(0, 120, (24, 56, 56, 3), dtype=np.uint8)
    tiles[y == 1, :, :, 0] += 120  # class 1 is redder
    groups = np.arange(24) // 2
    cfg = LoraConfig(rank=2, alpha=4, epochs=3, batch_size=8, lr=5e-3, warmup_steps=2, patience=10)

    def run(data, ckpt, resume=False, config=cfg):
        return finetune_lora(base, data, y, groups, ["a", "b"], config, ckpt, resume, "cpu", progress=False)

    full, hist = run(tiles, tmp_path / "full")
    assert hist["n_val"] > 0 and len(hist["history"]) == 3
    with pytest.raises(KeyboardInterrupt):
        run(_Interrupting(tiles, 2 * 24), tmp_path / "part")  # every epoch reads 24 tiles (train + val)
    assert torch.load(tmp_path / "part" / "last.pt", weights_only=False)["state"]["epoch"] == 2
    with pytest.raises(FinetuneError, match="other LoRA options"):
        run(tiles, tmp_path / "part", True, LoraConfig(rank=4, epochs=3, batch_size=8))
    resumed, rhist = run(tiles, tmp_path / "part", resume=True)
    assert len(rhist["history"]) == 3
    for k, v in full.backbone_state.items():
        assert torch.equal(v, resumed.backbone_state[k]), k
    for k, v in full.head_tensors.items():
        assert torch.equal(v, resumed.head_tensors[k]), k
    with torch.no_grad():
        _, p = full.build()(torch.from_numpy(tiles).permute(0, 3, 1, 2))
    assert p.shape == (24, 2) and (p.argmax(1).numpy() == y).mean() >= 0.75
