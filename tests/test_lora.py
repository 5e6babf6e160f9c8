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
