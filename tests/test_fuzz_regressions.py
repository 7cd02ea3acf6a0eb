"""Regression tests for the bugs the soundness fuzzer found, each minimised to a tiny module.

Each test reproduces a bug the fuzzer once found (the diagnosis stays next to each case); all are fixed.
A new bug is added here as ``xfail(strict=True)`` together with an entry of ``tests.fuzz.KNOWN_BUGS``,
and the fix removes both (so that the fuzzer exercises the construct again).
``test_unknown_custom_op_is_never_compacted_through`` is not a bug: it pins down that an op without a
rule is a wall.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autosparse
from autosparse.errors import AutosparseWarning, NoGatesError
from tests.fuzz import opaque
from tests.test_fuzz import RTOL, assert_unchanged, outputs, rel_diff, snapshot
from tests.zoo import CHANNEL, LAYER_AND_CHANNEL, sparsify_quietly


# ----------------------------------------------------------------------------- unknown ops are walls
class OpaqueSandwich(nn.Module):
    """conv -> custom op (no rule, mixes channels) -> conv, plus a prunable side branch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 1)
        self.side, self.side_out = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 1)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        if not isinstance(y, torch.fx.Proxy):
            self.seen.append(tuple(y.shape))
        y = self.b(opaque(y))
        return y + self.side_out(torch.relu(self.side(x)))


def test_unknown_custom_op_is_never_compacted_through() -> None:
    model, x = OpaqueSandwich(), torch.randn(2, 3, 4, 4)
    net = sparsify_quietly(model, CHANNEL, (x,))
    report = autosparse.explain(net)
    assert any("opaque" in op for op in report.unknown_ops), report.unknown_ops
    assert "ops without a rule" in str(report) and "opaque" in str(report)
    assert "a" not in autosparse.gates(net), "channels entering an unknown op must not be gated"
    for gate in autosparse.gates(net).values():
        gate.zero_(range(gate.size))
    with torch.no_grad():
        ref = net(x)
    small = autosparse.compact(net, verify=True)
    small.seen.clear()
    with torch.no_grad():
        assert rel_diff([ref], [small(x)]) <= RTOL
    assert small.seen == [(2, 6, 4, 4)], "the custom op's input lost channels"
    assert small.a.out_channels == 6 and small.side.out_channels == 1  # the side branch was compacted


# ----------------------------------------------------------------------------- regressions found by fuzzing
def assert_sound(model: nn.Module, x: torch.Tensor, zero: list[int]) -> None:
    """The fuzz invariant on one hand-made model: zero ``zero`` in every gate (where in range)."""
    ref = outputs(model, x)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutosparseWarning)
        try:
            net = autosparse.sparsify(model, {"rules": [{"granularity": "channel"}, {"granularity": "head"}]},
                                      example_inputs=(x,))
        except NoGatesError:
            return assert_unchanged(model, before)  # refusing is sound
    assert_unchanged(model, before)
    assert rel_diff(ref, outputs(net, x)) <= RTOL
    for gate in autosparse.gates(net).values():
        gate.zero_([i for i in zero if i < gate.size])
    gated = outputs(net, x)
    assert rel_diff(gated, outputs(autosparse.compact(net, verify=False), x)) <= RTOL
    autosparse.compact(net, verify=True)


class BroadcastChannel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.one, self.four, self.head = nn.Conv2d(3, 1, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.one(x) + self.four(x))  # (B,1,H,W) broadcast over 4 channels


class ChannelPad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.pad(self.a(x), (0, 0, 0, 0, 1, 1)))  # pads the channel dim: 4 -> 6


class UnbatchedPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.pool, self.head = nn.Linear(3, 8), nn.AvgPool1d(2), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.a(x)))  # a 2-D input is one unbatched signal: pools the features


class LeNetView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).view(-1, 4 * 4 * 4))  # the PyTorch tutorial's flatten


class LiteralUnsqueezeView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).view(2, 3, 6, 1).flatten(2))  # heads of size 1, head count written as 6


class LiteralSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(4, dim=-1)  # nanoGPT's split(self.n_embd): a literal channel count
        return self.out(q * torch.sigmoid(k) + v)


class SlicedSplitCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat(self.a(x).chunk(2, dim=1)[::-1], dim=1))  # cat of a sliced tuple


class ConcatDepthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 4, 1)
        self.dw, self.head = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dw(torch.cat([self.a(x), self.b(x)], 1)))


class NormPositionalP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y / y.norm(2, 1, True))  # norm(p, dim, keepdim): channels normalised together


class ExportedNormalize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 0:  # control flow on a size: only torch.export captures this model
            x = -x
        return self.b(F.normalize(self.a(x), dim=1))


IMG, SEQ = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4)
REGRESSIONS = [
    ("broadcast_channel", BroadcastChannel, IMG, [0],
     "ops_tensor.pointwise unites a 1-channel operand with a C-channel one (union_arrays on unequal "
     "lengths): raw IndexError from sparsify"),
    ("channel_pad", ChannelPad, IMG, [0],
     "ops_layers.spatial passes the label through F.pad that pads dim 1: label 4 ids for 6 channels; "
     "the fresh gated model crashes"),
    ("unbatched_pool", UnbatchedPool, torch.randn(2, 3), [0],
     "ops_layers.spatial treats a 2-D input to AvgPool1d as batched: it pools the feature dim; the fresh "
     "gated model crashes"),
    ("lenet_view", LeNetView, IMG, [0],
     "ops_tensor.reshape only blocks literal sizes when a split fuses positions: view(-1, C*H*W) "
     "hard-codes C and the compacted model fails"),
    ("literal_unsqueeze_view", LiteralUnsqueezeView, SEQ, [0],
     "ops_tensor.reshape: view(b, t, 6, 1) hard-codes the channel count without fusing (head_dim 1)"),
    ("literal_split", LiteralSplit, SEQ, [0],
     "ops_tensor.split accepts split(4) with a literal part size; compacted parts no longer add up"),
    ("sliced_split_cat", SlicedSplitCat, IMG, [0],
     "ops_tensor.cat assumes a list argument; cat(getitem(chunk, slice)) gets a Node: raw TypeError"),
    ("norm_positional_p", NormPositionalP, IMG, [0],
     "ops_tensor.reduction reads argument 1 as dim, but Tensor.norm(p, dim, keepdim) has p there: "
     "norm(2, 1) is taken as a reduction over dim 2, channels normalised together get gated (silent)"),
    ("exported_normalize", ExportedNormalize, IMG, [0],
     "ops_tensor.reduction reads argument 1 of aten.linalg_vector_norm(x, ord, dim, keepdim) as dim: "
     "raw TypeError ('float' object is not iterable) from sparsify"),
    ("concat_depthwise_empty_producer", ConcatDepthwise, IMG, [0, 1],
     "a depthwise conv merges both concat parts into one group; min_keep is per group, so every unit "
     "of conv 'a' can go and replay refuses the empty slice (CompactionError)"),
]


@pytest.mark.parametrize(
    ("factory", "x", "zero"),
    [pytest.param(f, x, z, id=name) for name, f, x, z, _why in REGRESSIONS],
)
def test_regression(factory, x: torch.Tensor, zero: list[int]) -> None:
    assert_sound(factory(), x, zero)


# ----------------------------------------------------------------------------- layer granularity
class Mlp(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Stage(nn.Module):
    """Residual branches called in a loop over a ModuleList, the commonest way to write a stack."""

    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Mlp(d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


class TwoStages(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.body, self.body2, self.out = nn.Linear(4, 8), Stage(8, 3), Stage(8, 3), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body2(self.body(self.inp(x))))


def _layer_gated(model: nn.Module) -> nn.Module:
    return sparsify_quietly(model, LAYER_AND_CHANNEL, (torch.randn(2, 4),))


def test_regression_modulelist_branches_are_one_unit_each() -> None:
    net = _layer_gated(TwoStages())
    layer = [g for g in autosparse.gates(net).values() if g.granularity == "layer"]
    assert [g.size for g in layer] == [6]
    layer[0].zero_(range(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutosparseWarning)
        small = autosparse.compact(net)
    assert sum(type(m).__name__ == "Mlp" for m in small.modules()) == 1


def test_regression_explain_lists_every_gate() -> None:
    net = _layer_gated(TwoStages())
    shown = {g.name for g in autosparse.explain(net).groups}
    assert set(autosparse.gates(net)) <= shown


class Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branch = Branch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class StemAndResiduals(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.proj, self.r1, self.r2, self.head = nn.Linear(4, 6), nn.Linear(6, 3), Res(), Res(), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.r2(self.r1(self.proj(torch.relu(self.stem(x))))))


def test_regression_layer_gate_acts_only_on_its_branch() -> None:
    model, x = StemAndResiduals().eval(), torch.randn(2, 4)
    net = sparsify_quietly(model, {"rules": [{"granularity": "channel"}, {"granularity": "layer"}]}, (x,))
    layer = next(g for g in autosparse.gates(net).values() if g.granularity == "layer")
    layer.zero_([1])  # r2's branch off: the model must compute head(r1(proj(relu(stem(x)))))
    with torch.no_grad():
        expected = model.head(model.r1(model.proj(torch.relu(model.stem(x)))))
        assert rel_diff([expected], [net(x)]) <= RTOL


class ExportedLiteralHeads(nn.Module):
    """Attention whose views write the head count as a literal, in a model only torch.export captures."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.n, self.width = 2, 2  # names the head-attribute fixer does not know
        self.q, self.k, self.v, self.o = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 0:  # control flow on a size: torch.fx cannot trace this model
            x = -x
        q, k, v = (p(x).view(2, 3, self.n, self.width).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 3, -1))


def test_regression_exported_literal_head_count() -> None:
    assert_sound(ExportedLiteralHeads(), SEQ, [0])


def test_every_known_bug_has_its_regression_test() -> None:
    from tests.fuzz import KNOWN_BUG_TESTS

    here = {name for name in globals() if name.startswith("test_")}
    here |= {f"test_regression[{case[0]}]" for case in REGRESSIONS}
    missing = {bug: test for bug, test in KNOWN_BUG_TESTS.items() if test not in here}
    assert not missing, missing
