"""Subclasses of built-in layers with their own forward, frozen (buffer-only) norms, and the dry run.

A module rule found through the class hierarchy may only apply to a subclass that runs the parent's
forward; a subclass with its own forward is traced into and its ops are analysed. For every built-in
module rule, a subclass computing the same thing with functional ops must compact exactly, or its
channels must be left ungated at sparsify().
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autosparse
from autosparse.errors import NoGatesError
from tests.zoo import rel_diff

POLICY = {"rules": [{"granularity": "channel"}]}


class Conv1dF(nn.Conv1d):
    def forward(self, x):
        return F.conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dF(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv3dF(nn.Conv3d):
    def forward(self, x):
        return F.conv3d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ConvT1dF(nn.ConvTranspose1d):
    def forward(self, x):
        return F.conv_transpose1d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)


class ConvT2dF(nn.ConvTranspose2d):
    def forward(self, x):
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)


class LinearF(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class BNAct(nn.BatchNorm2d):  # timm's BatchNormAct2d: weight and bias reach F.batch_norm by keyword
    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                   self.training, 0.1, self.eps))


class BN1dF(nn.BatchNorm1d):
    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, weight=self.weight, bias=self.bias, eps=self.eps)


class GroupNormF(nn.GroupNorm):
    def forward(self, x):
        return F.group_norm(x, self.num_groups, weight=self.weight, bias=self.bias, eps=self.eps)


class LayerNormF(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNormF(nn.RMSNorm):
    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class PReLUF(nn.PReLU):
    def forward(self, x):
        return F.prelu(x, self.weight)


class EmbeddingF(nn.Embedding):
    def forward(self, x):
        return F.embedding(x, self.weight)


class MHAF(nn.MultiheadAttention):
    def forward(self, x):
        out, _ = F.multi_head_attention_forward(
            x, x, x, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias, None, None,
            False, 0.0, self.out_proj.weight, self.out_proj.bias, training=False, need_weights=False)
        return out


class FrozenBN(nn.Module):
    """torchvision's FrozenBatchNorm2d: everything a buffer, the affine computed in forward."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, value in (("weight", torch.rand(n) + 0.5), ("bias", torch.randn(n)),
                            ("running_mean", torch.randn(n)), ("running_var", torch.rand(n) + 0.5)):
            self.register_buffer(name, value)

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift


def _img(*size):
    return (torch.randn(2, *size),)


# name -> (build model, inputs, units of the gate over the subclass's channels; 0: refused)
CASES = {
    "conv1d": (lambda: nn.Sequential(Conv1dF(3, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 8, 1)), _img(3, 10), 16),
    "conv2d": (lambda: nn.Sequential(Conv2dF(3, 16, 3, padding=1), nn.ReLU(), Conv2dF(16, 8, 1)), _img(3, 8, 8), 16),
    "conv3d": (lambda: nn.Sequential(Conv3dF(3, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 8, 1)),
               _img(3, 4, 4, 4), 16),
    "conv_transpose1d": (lambda: nn.Sequential(ConvT1dF(3, 16, 2, stride=2), nn.ReLU(), nn.Conv1d(16, 8, 1)),
                         _img(3, 6), 16),
    "conv_transpose2d": (lambda: nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), ConvT2dF(16, 12, 2, stride=2),
                                               nn.ReLU(), nn.Conv2d(12, 4, 1)), _img(3, 4, 4), 12),
    "linear": (lambda: nn.Sequential(LinearF(6, 16), nn.GELU(), LinearF(16, 4)), _img(6), 16),
    "batchnorm2d_act": (lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), BNAct(16), nn.Conv2d(16, 8, 3)),
                        _img(3, 8, 8), 16),
    "batchnorm1d": (lambda: nn.Sequential(nn.Linear(6, 16), BN1dF(16), nn.ReLU(), nn.Linear(16, 4)), _img(6), 16),
    "groupnorm": (lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), GroupNormF(4, 16), nn.Conv2d(16, 8, 1)),
                  _img(3, 6, 6), 4),
    "layernorm_spatial": (lambda: nn.Sequential(nn.Conv1d(3, 16, 1), LayerNormF(10), nn.Conv1d(16, 8, 1)),
                          _img(3, 10), 16),
    "layernorm_channels": (lambda: nn.Sequential(nn.Linear(6, 16), LayerNormF(16), nn.Linear(16, 4)), _img(6), 0),
    "rmsnorm_channels": (lambda: nn.Sequential(nn.Linear(6, 16), RMSNormF(16), nn.Linear(16, 4)), _img(6), 0),
    "prelu": (lambda: nn.Sequential(nn.Conv2d(3, 16, 1), PReLUF(16), nn.Conv2d(16, 8, 1)), _img(3, 4, 4), 16),
    "embedding": (lambda: nn.Sequential(EmbeddingF(20, 16), nn.Linear(16, 4)),
                  (torch.randint(0, 20, (2, 5)),), 16),
    "multihead_attention": (lambda: nn.Sequential(nn.Linear(6, 16), MHAF(16, 4, batch_first=False),
                                                  nn.Linear(16, 4)), (torch.randn(5, 2, 6),), 0),
    "frozen_batchnorm": (lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), FrozenBN(16), nn.ReLU(),
                                               nn.Conv2d(16, 8, 3)), _img(3, 8, 8), 16),
}


def _randomise_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            for name in ("running_mean", "bias"):
                if isinstance(getattr(m, name, None), torch.Tensor):
                    getattr(m, name).normal_()
            if isinstance(getattr(m, "running_var", None), torch.Tensor):
                m.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_subclass_with_its_own_forward_compacts_exactly_or_is_refused(name: str) -> None:
    build, inputs, units = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    _randomise_norms(model)
    try:
        net = autosparse.sparsify(model, POLICY, example_inputs=inputs)
    except NoGatesError:
        assert not units, f"{name}: nothing was gated"
        return
    gates = autosparse.gates(net)
    assert gates
    for gate in gates.values():
        gate.zero_(list(range(0, gate.size, 2)))  # every other unit
    small = autosparse.compact(net)
    with torch.no_grad():
        assert rel_diff(net(*inputs), small(*inputs)) < 1e-5
    before = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    after = sum(p.numel() for p in small.parameters()) + sum(b.numel() for b in small.buffers())
    assert after < before
    if units:
        assert any(g.size == units for g in gates.values())


def test_frozen_batchnorm_slices_its_buffers_and_capture_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = CASES["frozen_batchnorm"][0]().eval()
    x = torch.randn(2, 3, 8, 8)
    attrs = set(vars(model))
    net = autosparse.sparsify(model, POLICY, example_inputs=(x,))
    assert set(vars(model)) == attrs  # no _tensor_constant* left on the user's model
    (gate,) = autosparse.gates(net).values()
    gate.zero_([0, 1, 2, 3])
    small = autosparse.compact(net)
    assert small[1].running_var.shape == (12,) and small[1].weight.shape == (12,)
    assert small[0].weight.shape == (12, 3, 3, 3) and small[3].weight.shape == (8, 12, 3, 3)
    assert rel_diff(net(x), small(x)) < 1e-6


class _SumsItsWeight(nn.Module):
    """Reads its per-channel weight twice: per channel, and summed (slicing would change the sum)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 1)
        self.scale = nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x):
        h = self.conv1(x) * self.scale.view(1, -1, 1, 1)
        return self.conv2(h) * self.scale.sum()


def test_a_vector_also_used_in_a_reduction_keeps_its_channels() -> None:
    torch.manual_seed(0)
    with pytest.raises(NoGatesError, match="slicing it would change the result"):
        autosparse.sparsify(_SumsItsWeight(), POLICY, example_inputs=(torch.randn(1, 3, 4, 4),))


def test_dry_run_passes_and_can_be_skipped() -> None:
    torch.manual_seed(0)
    model = CASES["conv2d"][0]().eval()
    inputs = CASES["conv2d"][1]
    checked = autosparse.sparsify(model, POLICY, example_inputs=inputs)
    unchecked = autosparse.sparsify(model, POLICY, example_inputs=inputs, verify=False)
    assert list(autosparse.gates(checked)) == list(autosparse.gates(unchecked))
    for gate in autosparse.gates(checked).values():
        assert not gate.forced_off.any()  # the dry run leaves the gates as they were
    assert rel_diff(model(*inputs), checked(*inputs)) < 1e-6


def _wrong_rule(ctx) -> None:
    """A deliberately wrong user rule: says torch.flip keeps channels in place (it reverses them)."""
    ctx.output(ctx.label(ctx.arg(0)))


class _Flip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 1)
        self.c, self.d = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.b(torch.flip(self.a(x), dims=[1])) + self.d(torch.relu(self.c(x)))


def test_dry_run_refuses_a_group_a_wrong_rule_would_break() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 4, 4)
    net = autosparse.sparsify(_Flip(), POLICY, example_inputs=(x,), op_rules={torch.flip: _wrong_rule})
    assert list(autosparse.gates(net)) == ["c"]  # "a" refused, "c" proved
    assert "dry-run compaction is not exact" in str(autosparse.explain(net))
    for gate in autosparse.gates(net).values():
        gate.zero_([0, 1, 2])
    autosparse.compact(net)  # accepted by sparsify: compacts exactly
    unchecked = autosparse.sparsify(_Flip(), POLICY, example_inputs=(x,), op_rules={torch.flip: _wrong_rule},
                                    verify=False)
    assert sorted(autosparse.gates(unchecked)) == ["a", "c"]
