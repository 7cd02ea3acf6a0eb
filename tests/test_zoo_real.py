"""Real zoo models (timm, torchvision, Hugging Face) from tiny configs: random zeros compact exactly.

Needs timm / torchvision / transformers (the zoo env); the main env skips the cases it cannot build.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import autosparse

CONFIGS = "configs/{}.yaml"


def _timm(name: str, **kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _hf(cls_name: str, **config):
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    return cls(cls.config_class(num_channels=3, attn_implementation="eager", **config)).eval()


def _fpn():
    backbone_utils = pytest.importorskip("torchvision.models.detection.backbone_utils")
    torch.manual_seed(0)
    model = backbone_utils.resnet_fpn_backbone(backbone_name="resnet18", weights=None).eval()
    for m in model.modules():  # FrozenBatchNorm2d: non-trivial statistics, so slicing them matters
        if type(m).__name__ == "FrozenBatchNorm2d":
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
    return model


_PVT = dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
            strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2])
_BEIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
             patch_size=8, use_relative_position_bias=True)

# id -> (build, image size, policy, head gates expected)
CASES = {
    "timm_vit": (lambda: _timm("vit_tiny_patch16_224", img_size=32, depth=2), 32, "heads", 2),
    "timm_swin": (lambda: _timm("swin_tiny_patch4_window7_224", img_size=56, embed_dim=24, depths=(1, 1),
                                num_heads=(2, 4)), 56, "heads", 2),
    "timm_mobilenetv2_bnact": (lambda: _timm("mobilenetv2_035"), 64, "channels", 0),
    "tv_resnet18_fpn_frozen_bn": (_fpn, 64, "channels", 0),
    "hf_beit_rel_pos_bias": (lambda: _hf("BeitModel", **_BEIT), 32, "heads", 2),
    "hf_segformer": (lambda: _hf("SegformerModel", **_PVT), 32, "heads", 1),  # stage 1 (two heads)
    "hf_pvt_v2": (lambda: _hf("PvtV2Model", **_PVT), 32, "layers", 0),
}


def _outputs(model, x) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out.to_tuple() if hasattr(out, "to_tuple") else out
    return [t for t in values if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("case", list(CASES))
def test_random_zeros_compact_exactly(case):
    build, size, policy, heads = CASES[case]
    model = build()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    net = autosparse.sparsify(model, CONFIGS.format(policy), example_inputs=(x,))
    gates = autosparse.gates(net)
    assert gates, case
    assert sum(g.granularity == "head" for g in gates.values()) >= heads
    rng = np.random.default_rng(0)
    for gate in gates.values():
        if gate.size > 1:
            gate.zero_(sorted(rng.choice(gate.size, size=max(1, gate.size // 3), replace=False).tolist()))
    gated = _outputs(net, x)
    small = autosparse.compact(net)
    for a, b in zip(gated, _outputs(small, x)):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= 1e-4 * max(float(a.abs().max()), 1e-6)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_hf_pvt_v2_heads_are_refused_at_sparsify_with_the_reshape_that_pins_them():
    model = _hf("PvtV2Model", **_PVT)
    reasons = dict(autosparse.explain(model, example_inputs=(torch.randn(1, 3, 32, 32),)).unprunable)
    # stage 0 has one head: its channels would go one by one through view(B, N, -1, 16)
    assert "hard-codes the head size 16" in reasons["encoder.layers.0.blocks.0.attention.query"]
    # stage 1: reshape(B, N, hidden_size) after attention keeps the model width
    assert "which is also 'hidden_size'" in reasons["encoder.layers.1.blocks.0.attention.query"]


def test_timm_pvt_v2_heads_are_refused_because_the_width_comes_from_the_input():
    model = _timm("pvt_v2_b0")
    reasons = dict(autosparse.explain(model, example_inputs=(torch.randn(1, 3, 64, 64),)).unprunable)
    assert "takes the size of the channel dim from" in reasons["stages.1.blocks.0.attn.q"]
