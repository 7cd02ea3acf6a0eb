"""Graph patterns other structured-pruning tools get wrong, each model written the way users write it.

Users report pruning tools that treat channel shuffle and PixelShuffle as element-wise, fail on Swin's
relative-position tables and on detectors whose FPN adds upsampled maps to lateral convs, need YOLOv8's
C2f (chunk, then concat) rewritten by hand, trust split sizes read from an attribute pruning makes
stale, and mistake grouped or one-channel convolutions for depthwise ones. Here each pattern either
compacts exactly, with the widths a user expects, or is refused with a reason, never guessed.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import autosparse
from tests import zoo
from tests.zoo import (
    CHANNEL,
    HEAD_CHANNEL,
    channel_shuffle,
    classifier,
    conv_bn,
    get_case,
    images,
    rel_diff,
    run_no_grad,
    zero_random,
)


# ----------------------------------------------------------------------------- shuffles and Swin
class ShuffleV2Unit(nn.Module):
    """ShuffleNetV2's stride-1 unit: half the channels pass, half go through a branch, then shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            conv_bn(half, half, 1), conv_bn(half, half, 3, groups=half, act=None), conv_bn(half, half, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([a, self.branch(b)], 1), 2)


def test_channel_shuffle_is_refused_with_a_reason_and_the_branch_inside_still_prunes():
    # channel shuffle treated as element-wise (TP #14, #45, #98, #420)
    model, inputs = zoo._build(
        lambda: classifier(conv_bn(3, 16), ShuffleV2Unit(16), ShuffleV2Unit(16), width=16), images())
    report = autosparse.explain(model, example_inputs=inputs)
    reasons = dict(report.unprunable)
    assert "hard-codes the size 2 of the channel dim" in reasons["0.0"]  # the stem feeds the shuffle
    assert "hard-codes" in reasons["1.branch.2.0"]  # so does the branch's last conv
    assert {g.name: g.units for g in report.groups} == {"1.branch.0.0": 8, "2.branch.0.0": 8}
    net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    zero_random(net, 0)
    gated = run_no_grad(net, *inputs)
    small = autosparse.compact(net)
    assert rel_diff(gated, run_no_grad(small, *inputs)) <= 1e-5
    assert small[0][0].out_channels == 16 and small[1].branch[2][0].out_channels == 8  # shuffled: whole
    assert small[1].branch[0][0].out_channels < 8


def test_pixel_shuffle_units_are_whole_r_squared_channel_blocks():
    # PixelShuffle mis-handled as element-wise (TP #420)
    model, inputs = get_case("pixel_shuffle").build()  # conv 16 -> PixelShuffle(2) -> conv 4 -> ...
    net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    gate = autosparse.gates(net)["0.0"]
    assert gate.size == 4  # 16 channels = 4 output channels x r^2 = 4 sub-pixels each
    gate.zero_([1, 2])
    gated = run_no_grad(net, *inputs)
    small = autosparse.compact(net)
    assert small[0][0].out_channels == 8 and small[2][0].in_channels == 2  # 2 kept units x r^2
    assert rel_diff(gated, run_no_grad(small, *inputs)) <= 1e-5
    assert run_no_grad(small, torch.randn(3, 3, 24, 24)).shape == (3, 3, 48, 48)


def test_swin_heads_and_mlp_compact_exactly_with_the_relative_position_tables():
    # Swin fails in other tools (TP issues)
    model, inputs = get_case("hf_swin").build()
    net = autosparse.sparsify(model, HEAD_CHANNEL, example_inputs=inputs)
    assert {g.granularity for g in autosparse.gates(net).values()} == {"head", "channel"}
    rng = np.random.default_rng(0)
    for gate in autosparse.gates(net).values():
        gate.zero_(rng.permutation(gate.size)[: gate.size // 2].tolist())
    gated = run_no_grad(net, *inputs)
    small = autosparse.compact(net)
    assert rel_diff(gated, run_no_grad(small, *inputs)) <= 1e-5
    for stage, heads in ((0, 1), (1, 2)):
        attn = small.encoder.layers[stage].blocks[0].attention
        assert attn.num_attention_heads == heads and attn.q_proj.out_features == heads * attn.head_dim
        assert attn.relative_position_bias.relative_position_bias_table.shape[1] == heads
    bigger = torch.randn(3, 3, 32, 32)
    assert rel_diff(run_no_grad(net, bigger), run_no_grad(small, bigger)) <= 1e-5


# ----------------------------------------------------------------------------- feature pyramid (FPN)
class FPN(nn.Module):
    """A three-level backbone, a torchvision-style FPN (laterals + top-down path), a shared head."""

    def __init__(self) -> None:
        super().__init__()
        self.c2, self.c3, self.c4 = conv_bn(3, 8, 3, 2), conv_bn(8, 16, 3, 2), conv_bn(16, 32, 3, 2)
        self.inner = nn.ModuleList([nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 1), nn.Conv2d(32, 16, 1)])
        self.layer = nn.ModuleList(conv_bn(16, 16) for _ in range(3))
        self.cls = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c2 = self.c2(x)
        c3 = self.c3(c2)
        feats = [c2, c3, self.c4(c3)]
        last = self.inner[2](feats[2])
        results = [self.layer[2](last)]
        for idx in (1, 0):
            lateral = self.inner[idx](feats[idx])
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")  # torchvision's idiom
            results.insert(0, self.layer[idx](last))
        return [self.cls(r) for r in results]


def test_fpn_detector_with_top_down_skips_compacts_exactly():
    # NNI speedup fails on detectors with FPN / skip connections (nni #5738, #5307)
    model, inputs = zoo._build(FPN, images(size=32))
    net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    gates = autosparse.gates(net)
    assert {"c2.0", "c3.0", "c4.0"} <= set(gates)
    assert len(gates["layer.2.0"].modules_controlled) == 3  # one head shared by the three levels
    for seed in range(2):
        trial = copy.deepcopy(net)
        zero_random(trial, seed)
        gated = run_no_grad(trial, *inputs)
        small = autosparse.compact(trial)
        assert rel_diff(gated, run_no_grad(small, *inputs)) <= 1e-5
        assert small.c3[0].out_channels == small.inner[1].in_channels < 16


def test_fpn_lateral_width_stays_prunable_when_spatial_sizes_are_read():
    # FPN (nni #5738): torchvision's FPN reads lateral.shape[-2:], never the channel count
    model, inputs = zoo._build(FPN, images(size=32))
    report = autosparse.explain(model, example_inputs=inputs)
    assert "inner.2" not in dict(report.unprunable)
    assert any("inner.2" in g.producers and g.units == 16 for g in report.groups)


# ----------------------------------------------------------------------------- split and chunk (C2f)
class Conv(nn.Module):
    """Ultralytics' Conv: conv + BatchNorm + SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(c1, c2, k, 1, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1, self.cv2, self.add = Conv(c1, c2, 3), Conv(c2, c2, 3), shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8's C2f, verbatim: ``list(chunk)``, then each bottleneck reads the last part."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, e: float = 0.5) -> None:
        super().__init__()
        self.c = int(c2 * e)
        self.cv1, self.cv2 = Conv(c1, 2 * self.c, 1), Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C2fSplit(C2f):
    """C2f's ``forward_split``: split sizes read from ``self.c``, an attribute pruning makes stale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class Yolo(nn.Module):
    def __init__(self, block: type[C2f] = C2f) -> None:
        super().__init__()
        self.stem, self.c2f, self.head = Conv(3, 16, 3), block(16, 32, n=2, shortcut=True), nn.Conv2d(32, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c2f(self.stem(x)))


def test_yolov8_c2f_chunk_compacts_exactly_without_a_rewrite():
    # C2f's chunk needs a hand rewrite to C2f_v2 (TP #147, OTO #5)
    model, inputs = zoo._build(Yolo, images())
    net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    gate = autosparse.gates(net)["c2f.cv1.conv"]
    assert gate.size == 16  # a unit is channel i of both chunks: chunk(2) must stay equal halves
    assert set(gate.modules_controlled) == {"c2f.cv1.conv", "c2f.m.0.cv2.conv", "c2f.m.1.cv2.conv"}  # + residuals
    for seed in range(3):
        trial = copy.deepcopy(net)
        zero_random(trial, seed)
        gated = run_no_grad(trial, *inputs)
        small = autosparse.compact(trial)
        assert rel_diff(gated, run_no_grad(small, *inputs)) <= 1e-5  # OTO's sanity check: <= 1e-4
        c2f, half = small.c2f, small.c2f.m[0].cv1.conv.in_channels
        assert type(c2f) is C2f and half < 16
        assert c2f.cv1.conv.out_channels == 2 * half and c2f.cv2.conv.in_channels == 4 * half
        assert run_no_grad(small, torch.randn(1, 3, 24, 24)).shape == (1, 5, 24, 24)


def test_split_with_sizes_from_a_stale_attribute_is_refused_not_guessed():
    # C2f.forward_split reads self.c; pruning cv1 would leave split((16, 16)) wrong
    model, inputs = zoo._build(lambda: Yolo(C2fSplit), images())
    report = autosparse.explain(model, example_inputs=inputs)
    assert "split that hard-codes the part size 16 (use chunk)" in dict(report.unprunable)["c2f.cv1.conv"]
    net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    assert "c2f.cv1.conv" not in autosparse.gates(net)
    zero_random(net, 0)
    small = autosparse.compact(net)
    assert small.c2f.cv1.conv.out_channels == 2 * small.c2f.c == 32
    assert small.c2f.m[0].cv1.conv.out_channels < 16  # the rest of the block still prunes
    assert run_no_grad(small, torch.randn(1, 3, 24, 24)).shape == (1, 5, 24, 24)


# ----------------------------------------------------------------------------- grouped and depthwise convs
def test_grouped_conv_with_three_groups_loses_whole_groups():
    # arbitrary groups (TP #9)
    model, inputs = zoo._build(lambda: classifier(conv_bn(3, 12), conv_bn(12, 12, 3, groups=3),
                                                  conv_bn(12, 24, 1, groups=3), conv_bn(24, 16), width=16),
                               images())
    net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    gate = autosparse.gates(net)["0.0"]
    assert gate.size == 3 and set(gate.modules_controlled) == {"0.0", "1.0", "2.0"}  # one unit per conv group
    gate.zero_([1])
    autosparse.gates(net)["3.0"].zero_([0, 5])
    gated = run_no_grad(net, *inputs)
    small = autosparse.compact(net)
    assert rel_diff(gated, run_no_grad(small, *inputs)) <= 1e-5
    assert (small[0][0].out_channels, small[1][0].groups, small[1][0].out_channels) == (8, 2, 8)
    assert (small[2][0].groups, small[2][0].in_channels, small[2][0].out_channels) == (2, 8, 16)
    assert small[1][0].weight.shape == (8, 4, 3, 3) and small[2][0].weight.shape == (16, 4, 1, 1)
    kept = model[1][0].weight[[0, 1, 2, 3, 8, 9, 10, 11]]  # groups 0 and 2, in order
    assert torch.equal(small[1][0].weight, kept)


class SpatialAttentionNet(nn.Module):
    """Grayscale stem (a conv with 1 input channel) and a 1-output-channel attention map."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body = conv_bn(1, 8), conv_bn(8, 16)
        self.att, self.refine = nn.Conv2d(16, 1, 1), nn.Conv2d(1, 1, 3, padding=1)  # in == out == groups == 1
        self.head = classifier(width=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(self.stem(x))
        return self.head(f * torch.sigmoid(self.refine(self.att(f))))


def test_one_channel_convs_are_not_mistaken_for_depthwise():
    # a 1-output-channel conv misread as depthwise (TP #179)
    model, inputs = zoo._build(SpatialAttentionNet, images(channels=1))
    net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    gates = autosparse.gates(net)
    assert {name: g.size for name, g in gates.items()} == {"stem.0": 8, "body.0": 16}
    gates["stem.0"].zero_([0, 1, 2])
    gates["body.0"].zero_(range(0, 16, 2))
    gated = run_no_grad(net, *inputs)
    small = autosparse.compact(net)
    assert rel_diff(gated, run_no_grad(small, *inputs)) <= 1e-5
    assert (small.stem[0].in_channels, small.stem[0].out_channels, small.body[0].out_channels) == (1, 5, 8)
    assert (small.att.in_channels, small.att.out_channels) == (8, 1)
    assert small.refine.weight.shape == (1, 1, 3, 3)
