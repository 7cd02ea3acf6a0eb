"""Heads of ``nn.MultiheadAttention``: analysed through autosparse.mha, compacted into its subclass.

The zoo (test_equivalence) covers the exactness of random head patterns on ``mha_block``,
``mha_seq_first`` and ``nn.TransformerEncoder``; these tests cover what is specific to the module:
masks, the fast paths of nn.Transformer*, returned attention weights, cross-attention, reloading.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autosparse
from autosparse import io
from autosparse.modules.mha import PrunedMultiheadAttention
from tests.zoo import HEAD_CHANNEL, get_case, rel_diff


def _compact_encoder() -> tuple[nn.Module, nn.Module, tuple]:
    model, inputs = get_case("torch_encoder").build()
    net = autosparse.sparsify(model, HEAD_CHANNEL, example_inputs=inputs)
    for gate in autosparse.gates(net).values():
        gate.zero_([0, 2])
    return net, autosparse.compact(net), inputs


def test_encoder_heads_are_removed_and_the_module_stays_a_multihead_attention():
    net, small, inputs = _compact_encoder()
    attn = small.layers[0].self_attn
    assert type(attn) is PrunedMultiheadAttention and isinstance(attn, nn.MultiheadAttention)
    assert (attn.num_heads, attn.head_dim, attn.embed_dim) == (2, 8, 32)
    assert attn.in_proj_weight.shape == (3 * 2 * 8, 32) and attn.out_proj.weight.shape == (32, 16)
    assert set(small.state_dict()) == set(get_case("torch_encoder").build()[0].state_dict())  # same keys
    # the gated model still holds a real nn.MultiheadAttention: the swap is only for the capture
    assert type(net.layers[0].self_attn) is nn.MultiheadAttention


@pytest.mark.parametrize("grad", [False, True], ids=["fast_path_eligible", "slow_path"])
def test_encoder_with_padding_mask_matches_under_and_outside_no_grad(grad: bool):
    net, small, (x,) = _compact_encoder()
    padding = torch.zeros(x.shape[:2], dtype=torch.bool)
    padding[0, -3:] = True  # no_grad + eval + mask is where nn.TransformerEncoder takes its fused path
    with torch.set_grad_enabled(grad):
        assert rel_diff(net(x, src_key_padding_mask=padding), small(x, src_key_padding_mask=padding)) <= 1e-5
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        assert rel_diff(net(x, mask=causal), small(x, mask=causal)) <= 1e-5


def test_encoder_with_nested_tensor_fast_path_matches_at_real_positions():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2).eval()  # enable_nested_tensor=True, PyTorch's default
    x = torch.randn(2, 8, 32)
    net = autosparse.sparsify(model, {"rules": [{"granularity": "head"}]}, example_inputs=(x,))
    for gate in autosparse.gates(net).values():
        gate.zero_([1])
    small = autosparse.compact(net)
    assert model.use_nested_tensor and not small.use_nested_tensor
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[0, -3:] = True
    with torch.no_grad():  # the gated model packs a nested tensor (zeros at padding), the compacted one cannot
        gated, compacted = net(x, src_key_padding_mask=padding), small(x, src_key_padding_mask=padding)
    real = ~padding
    assert rel_diff(gated[real], compacted[real]) <= 1e-5


def test_returned_attention_weights_pin_the_heads():
    class ReturnsWeights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x: torch.Tensor):
            return self.attn(x, x, x)  # (output, weights averaged over heads): both reach the output

    report = autosparse.explain(ReturnsWeights(), example_inputs=(torch.randn(2, 5, 32),))
    assert not any(g.granularity == "head" for g in report.groups)
    assert any("need_weights=False" in why for _, why in report.unprunable)


def test_per_head_attention_mask_pins_the_heads():
    class PerHeadMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.fc = nn.MultiheadAttention(32, 4, batch_first=True), nn.Linear(32, 8)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.fc(self.attn(x, x, x, attn_mask=mask, need_weights=False)[0])

    inputs = (torch.randn(2, 5, 32), torch.randn(2 * 4, 5, 5))  # one mask per (batch, head)
    report = autosparse.explain(PerHeadMask(), example_inputs=inputs)
    assert not any(g.granularity == "head" for g in report.groups)
    with pytest.raises(autosparse.NoGatesError):
        autosparse.sparsify(PerHeadMask(), {"rules": [{"granularity": "head"}]}, example_inputs=inputs)


def test_cross_attention_keeps_shared_projection_columns_whole():
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.attn = nn.Linear(16, 32), nn.MultiheadAttention(32, 4)

        def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            return self.attn(self.query(x), memory, memory, need_weights=False)[0]

    torch.manual_seed(0)
    model, inputs = Cross().eval(), (torch.randn(5, 2, 16), torch.randn(7, 2, 32))
    net = autosparse.sparsify(model, HEAD_CHANNEL, example_inputs=inputs)
    gates = autosparse.gates(net)
    assert set(gates) == {"attn"}  # the query's channels share in_proj columns with the memory's
    gates["attn"].zero_([1, 3])
    small = autosparse.compact(net)
    with torch.no_grad():
        assert rel_diff(net(*inputs), small(*inputs)) <= 1e-5
    assert small.attn.num_heads == 2 and small.query.out_features == 32


def test_unbatched_inputs_and_the_callers_model_class_are_preserved():
    model, _ = get_case("mha_block").build()
    x = torch.randn(6, 32)  # unbatched (seq, dim): fx cannot branch on rank, torch.export can
    net = autosparse.sparsify(model, HEAD_CHANNEL, example_inputs=(x,))
    assert all(type(m) is nn.MultiheadAttention for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    # export keeps the discarded head average unless dead code is dropped: heads must still be found
    assert sorted(g.granularity for g in autosparse.gates(net).values()) == ["channel", "channel", "head", "head"]
    for gate in autosparse.gates(net).values():
        gate.zero_([1])
    small = autosparse.compact(net)
    with torch.no_grad():
        assert rel_diff(net(x), small(x)) <= 1e-5
        assert small(torch.randn(3, 9, 32)).shape == (3, 9, 32)


def test_training_gradients_reach_the_head_gates():
    model, (x,) = get_case("mha_block").build()
    net = autosparse.sparsify(model, {"rules": [{"granularity": "head"}]}, example_inputs=(x,))
    net.train()
    (net(x).square().mean() + autosparse.penalty(net)).backward()
    for gate in autosparse.gates(net).values():
        assert gate.gamma.grad is not None and gate.gamma.grad.abs().sum() > 0


def test_save_and_load_rebuild_the_pruned_attention(tmp_path):
    net, small, inputs = _compact_encoder()
    io.save(small, tmp_path / "enc", example_inputs=inputs)
    base = get_case("torch_encoder").build()[0]
    loaded = io.load(tmp_path / "enc", base)
    assert type(loaded.layers[1].self_attn) is PrunedMultiheadAttention
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), small(*inputs))


def test_pruned_attention_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    model, inputs = get_case("mha_block").build()
    net = autosparse.sparsify(model, {"rules": [{"granularity": "head"}]}, example_inputs=inputs)
    for gate in autosparse.gates(net).values():
        gate.zero_([0, 1])
    small = autosparse.compact(net)
    path = autosparse.export(small, tmp_path / "mha.onnx", example_inputs=inputs, format="onnx")
    assert path.stat().st_size > 0  # export() itself runs the file in onnxruntime against eager


@pytest.mark.parametrize("options", [{"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 16, "vdim": 16}])
def test_unsupported_configurations_are_reported_by_name(options):
    class Uses(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(8, 32), nn.Linear(32, 4)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True, **options)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            kv = h[..., :16] if "kdim" in options else h
            return self.out(self.attn(h, kv, kv, need_weights=False)[0])

    report = autosparse.explain(Uses(), example_inputs=(torch.randn(2, 5, 8),))
    assert not any(g.granularity == "head" for g in report.groups)
    expected = next(iter(options)).replace("kdim", "kdim/vdim")
    assert any(expected in why and "nn.MultiheadAttention" in why for _, why in report.unprunable)
