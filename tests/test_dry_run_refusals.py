"""Refusals the dry run used to catch, now made at analysis time (issue #11), and the dry run's copies.

Each pattern is a small module reproducing what a real model does; nothing is downloaded.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autosparse
from autosparse.compaction.compact import dry_run
from autosparse.compaction.copying import deep_copy, throwaway_copy
from autosparse.errors import NoGatesError

CHANNELS = {"rules": [{"granularity": "channel"}]}
HEADS = {"rules": [{"granularity": "head"}]}


# ------------------------------------------------------------- functional depthwise conv (timm BlurPool2d)
class Blur(nn.Module):
    """timm's anti-aliasing: a depthwise blur whose group count is an int attribute of the module."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("filt", torch.rand(channels, 1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [1, 1, 1, 1]), self.filt, stride=2, groups=self.channels)


class BlurPool2d(Blur):
    """timm's class name: its fixer rewrites ``channels`` from the sliced filter."""


def _blur_net(cls: type[nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), cls(8), nn.Conv2d(8, 4, 3)).eval()


def test_functional_grouped_conv_with_a_literal_group_count_is_refused_at_analysis() -> None:
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(NoGatesError, match="functional grouped convolution whose group count 8"):
        autosparse.sparsify(_blur_net(Blur), CHANNELS, example_inputs=(x,), verify=False)


def test_blurpool_channels_are_gated_and_compact_exactly() -> None:
    x = torch.randn(1, 3, 16, 16)
    net = autosparse.sparsify(_blur_net(BlurPool2d), CHANNELS, example_inputs=(x,), verify=False)
    gate = autosparse.gates(net)["0"]
    gate.zero_([0, 2, 5])
    small = autosparse.compact(net)  # verifies equivalence
    assert small[2].channels == 5 and small[2].filt.shape[0] == 5


# ------------------------------------------------------------- head-count literals under torch.export
class LoopAttention(nn.Module):
    """XGLM-style ``view(bsz, tgt_len, self.num_heads, self.head_dim)``; the loop over a size makes
    symbolic_trace fail, so the model is captured by torch.export, where every size is a literal."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        for _ in range(x.shape[0]):
            pass
        q, k, v = (p(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


def test_a_head_count_literal_that_equals_another_size_is_refused() -> None:
    with pytest.raises(NoGatesError, match="dim 1 has that size too"):
        autosparse.sparsify(LoopAttention().eval(), HEADS, example_inputs=(torch.randn(1, 4, 32),), verify=False)


def test_a_head_count_literal_told_apart_is_gated_and_compacts_exactly() -> None:
    net = autosparse.sparsify(LoopAttention().eval(), HEADS, example_inputs=(torch.randn(1, 6, 32),), verify=False)
    gates = autosparse.gates(net)
    assert [g.size for g in gates.values()] == [4]
    next(iter(gates.values())).zero_([1, 2])
    assert autosparse.compact(net).num_heads == 2


# ------------------------------------------------------------- the dry run's copies
def _gated() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(2, 3, 8, 8)
    model(x)
    return autosparse.sparsify(model.eval(), CHANNELS, example_inputs=(x,), verify=False), x


def test_throwaway_copy_shares_storage_and_compacting_it_leaves_the_model_alone() -> None:
    net, x = _gated()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        expected = net(x)
    copied = throwaway_copy(net)
    assert copied.state_dict()["0.weight"].data_ptr() == net.state_dict()["0.weight"].data_ptr()
    assert dry_run(net) == {}  # compacts (and discards) a throwaway copy
    with torch.no_grad():
        assert torch.equal(net(x), expected)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    small = autosparse.compact(net)
    assert all(p.data_ptr() != q.data_ptr() for p in small.parameters() for q in net.parameters())


def test_deep_copy_is_a_deepcopy() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GRU(4, 4))
    model.register_forward_hook(lambda m, a, out: (out[0] * 2, out[1]))  # a hook is copied as deepcopy does
    ours, theirs = deep_copy(model), copy.deepcopy(model)
    x = torch.randn(1, 3, 6, 6)
    model[0].weight.data.zero_()  # the copies own their tensors
    out, ref = ours[2](ours[1](ours[0](x)).flatten(2).permute(2, 0, 1)), theirs[2](
        theirs[1](theirs[0](x)).flatten(2).permute(2, 0, 1))
    assert torch.equal(out[0], ref[0])
    assert len(ours._forward_hooks) == 1
    assert list(ours.state_dict()) == list(model.state_dict())
    assert ours[2]._flat_weights[0] is ours[2].weight_ih_l0  # GRU's flat weight list points at its own copy


# ------------------------------------------------------------- explain lists what never became a group
class TransposedLinear(nn.Linear):
    """Falcon's FalconLinear: ``x @ self.weight.T`` (+ bias), the weight stored as nn.Linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(x.shape[0]) if self.export else ():  # symbolic_trace fails: captured by export
            pass
        return x @ self.weight.T + self.bias

    export = False


@pytest.mark.parametrize("export", [False, True])
def test_a_matmul_with_a_transposed_weight_is_a_linear(export: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TransposedLinear, "export", export)
    model = nn.Sequential(TransposedLinear(8, 16), nn.GELU(), TransposedLinear(16, 8)).eval()
    net = autosparse.sparsify(model, CHANNELS, example_inputs=(torch.randn(2, 8),))
    gate = autosparse.gates(net)["0"]
    gate.zero_(list(range(0, 16, 2)))
    small = autosparse.compact(net)
    assert small[0].weight.shape == (8, 8) and small[2].weight.shape == (8, 8)


class StandardisedConv(nn.Conv2d):
    """nf_resnet's ScaledStdConv2d: the weight is standardised in forward, so it cannot be sliced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                         momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_explain_lists_layers_whose_weight_is_computed() -> None:
    model = nn.Sequential(StandardisedConv(3, 8, 3, padding=1), nn.ReLU(), StandardisedConv(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4)).eval()
    reasons = dict(autosparse.explain(model, example_inputs=(torch.randn(1, 3, 8, 8),)).unprunable)
    assert "computed in forward" in reasons["0"] and "computed in forward" in reasons["2"]


def test_bench_sparsify_smoke(tmp_path: Path) -> None:
    from benchmarks import bench_sparsify

    payload = bench_sparsify.main(["--smoke", "--split", "--models", "resnet50", "--out", str(tmp_path)])
    row = payload["models"]["resnet50"]
    assert (tmp_path / "sparsify_smoke.json").exists() and row["gates"] > 0
    assert row["with_dry_run"]["cpu_min_s"] > 0 and row["split"]["dry_run_s"] > 0
