"""Custom layers, bare parameters and custom ops are pruned on the right dimension or reported.

Users find that custom layers silently yield no prunable groups and that bare parameters (a layer
scale, a per-column weight) are pruned on a dimension guessed from their size. A bare parameter must
follow the dimension it acts on (ConvNeXt's ``gamma`` is sliced with the residual stream, or the stream
is reported unprunable); an op without a rule is reported, and a user rule, keyed by the op or by the
decorated function, makes it prunable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import autosparse
from tests import zoo
from tests.zoo import CHANNEL, classifier, get_case, images, rel_diff, run_no_grad, zero_random


# ----------------------------------------------------------------------------- bare parameters
class LayerScaled(nn.Module):
    """Two bare parameters of the prunable width 16 on a 16x16 image: one per channel ``(16, 1, 1)``,
    one per image column ``(16,)``. Only the first may follow the channels; a size-based guess slices both."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        self.per_channel = nn.Parameter(torch.linspace(1.5, 0.5, 16).view(16, 1, 1))
        self.per_column = nn.Parameter(torch.linspace(0.5, 1.5, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.relu(self.c1(x)) * self.per_channel * self.per_column)


def test_bare_parameters_follow_the_dim_they_act_on_not_their_size():
    # bare parameters pruned on a guessed dimension (OTO #57)
    model, inputs = LayerScaled().eval(), (torch.randn(2, 3, 16, 16),)
    net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    autosparse.gates(net)["c1"].zero_([0, 3, 5])
    gated = run_no_grad(net, *inputs)
    small = autosparse.compact(net)
    assert small.per_channel.shape == (13, 1, 1) and small.per_column.shape == (16,)
    assert torch.equal(small.per_column, model.per_column)
    assert rel_diff(gated, run_no_grad(small, *inputs)) <= 1e-5


class ConvNeXtBNBlock(zoo.ConvNeXtBlock):
    """ConvNeXt with BatchNorm instead of LayerNorm: the residual stream, and so ``gamma``, is prunable."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.norm = nn.BatchNorm2d(channels)
        self.gamma = nn.Parameter(torch.linspace(0.2, 1.0, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)
        return x + (self.gamma * self.fc2(F.gelu(self.fc1(y)))).permute(0, 3, 1, 2)


def test_convnext_layer_scale_is_sliced_with_the_stream_or_reported():
    # TP warns about ConvNeXt's bare gamma (layer scale)
    stock, inputs = get_case("convnext_layernorm").build()
    report = autosparse.explain(stock, example_inputs=inputs)
    assert "normalised together" in dict(report.unprunable)["0"]  # LayerNorm'd stream: reported
    assert sorted(g.name for g in report.groups) == ["1.fc1", "2.fc1"]
    net = autosparse.sparsify(stock, CHANNEL, example_inputs=inputs)
    zero_random(net, 0)
    assert autosparse.compact(net)[1].gamma.shape == (16,)  # the stream stays, so does gamma

    model, inputs = zoo._build(
        lambda: classifier(nn.Conv2d(3, 16, 4, stride=4), ConvNeXtBNBlock(16), ConvNeXtBNBlock(16), width=16),
        images(size=32))
    net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    stream = autosparse.gates(net)["0"]
    assert {"1.fc2", "2.fc2", "1.dwconv"} <= set(stream.modules_controlled)
    stream.zero_([0, 3, 5])
    gated = run_no_grad(net, *inputs)
    small = autosparse.compact(net)
    keep = [i for i in range(16) if i not in (0, 3, 5)]
    assert torch.equal(small[1].gamma, model[1].gamma[keep]) and small[2].fc2.out_features == 13
    assert rel_diff(gated, run_no_grad(small, *inputs)) <= 1e-5


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("autosparse_custom_ops::softclip", mutates_args=())
def softclip(x: torch.Tensor) -> torch.Tensor:
    """A user's channel-wise custom op: autosparse has no rule for it."""
    return 2 * torch.tanh(x)


@softclip.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class CustomOpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(softclip(self.c1(x)))


def _channelwise(ctx) -> None:
    ctx.output(ctx.label(ctx.arg(0)))


def test_custom_op_is_reported_and_a_user_rule_makes_it_prunable():
    # custom layers silently yield no groups (OTO #57)
    model, inputs = CustomOpNet().eval(), (torch.randn(2, 3, 8, 8),)
    report = autosparse.explain(model, example_inputs=inputs)
    assert report.groups == [] and any("softclip" in op for op in report.unknown_ops)
    assert "add one with op_rules" in dict(report.unprunable)["c1"]
    rules = {torch.ops.autosparse_custom_ops.softclip.default: _channelwise}
    net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs, op_rules=rules)
    autosparse.gates(net)["c1"].zero_([2, 7])
    gated = run_no_grad(net, *inputs)
    small = autosparse.compact(net)
    assert small.c1.out_channels == 14 and rel_diff(gated, run_no_grad(small, *inputs)) <= 1e-5


def test_custom_op_rule_keyed_by_the_decorated_function():
    # custom layers silently yield no groups (OTO #57)
    model, inputs = CustomOpNet().eval(), (torch.randn(2, 3, 8, 8),)
    net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs, op_rules={softclip: _channelwise})
    assert "c1" in autosparse.gates(net)
