"""Layer gates on post-activation CNN blocks ``relu(x + body(x))``: identity-shortcut blocks only.

The branch ends in a BatchNorm, so its gate folds into the BatchNorm's weight and bias; a block
with a downsample (projection) shortcut is never offered, since its branch changes the shape.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autosparse
from autosparse.compaction.record import record_of
from autosparse.measure import count_params
from autosparse.modules.blocks import ZeroBranch
from tests import zoo
from tests.zoo import (
    LAYER,
    LAYER_AND_CHANNEL,
    layer_gate,
    rel_diff,
    run_no_grad,
    sparsify_quietly,
    zero_random,
)

_STAGES = "resnet.encoder.stages"


def body(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
    )


class Block(nn.Module):
    """A hand-written post-activation residual block whose branch is one child Sequential.

    ``shortcut``: "identity" unless the shape changes (then a strided 1x1 conv + BatchNorm),
    "project" (a 1x1 conv even though the shape stays), "pool" (a parameter-free average pool).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut: str = "identity") -> None:
        super().__init__()
        self.body, self.shortcut = body(cin, cout, stride), shortcut
        same = stride == 1 and cin == cout and shortcut == "identity"
        self.down = None if same or shortcut == "pool" else zoo.conv_bn(cin, cout, 1, stride, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut == "pool":
            skip = F.avg_pool2d(x, 2)
        else:
            skip = x if self.down is None else self.down(x)
        return F.relu(skip + self.body(x))


def block_net() -> nn.Module:
    blocks = nn.Sequential(Block(8, 8), Block(8, 8), Block(8, 16, stride=2), Block(16, 16))
    return zoo.classifier(zoo.conv_bn(3, 8), blocks, width=16)


def downsample_net() -> nn.Module:
    return zoo.classifier(zoo.conv_bn(3, 8), Block(8, 16, stride=2), Block(16, 32, stride=2), width=32)


class Stage(nn.Module):
    """A stem child, then ``x = relu(x + blocks[i](x))`` over a ModuleList of Sequential bodies."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = zoo.conv_bn(3, 8)
        self.blocks = nn.ModuleList(body(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # the first block's skip comes from a sibling, but not from its own input
        for block in self.blocks:
            x = F.relu(x + block(x))
        return x


class LoopNet(nn.Module):
    """Post-activation blocks called in a loop over a ModuleList, after a stem without ReLU: a block
    whose body is gone still computes ``relu(x)``, which is not ``x``, so it must stay in the list."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = zoo.conv_bn(3, 8, act=None)
        self.blocks = nn.ModuleList(Block(8, 8) for _ in range(3))
        self.head = zoo.classifier(width=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def shortcut_net() -> nn.Module:
    """Between two identity blocks: a shape-keeping 1x1 projection shortcut (not an identity) and
    a strided branch beside a pooled skip (a ZeroBranch could not stand in for it)."""
    blocks = Block(8, 8), Block(8, 8, shortcut="project"), Block(8, 8, 2, shortcut="pool"), Block(8, 8)
    return zoo.classifier(zoo.conv_bn(3, 8), *blocks, width=8)


def _hf_resnet(config: dict) -> functools.partial:
    # two blocks per stage: the second block of each stage (and the first of stage 0 when its
    # width does not change) has an identity shortcut
    config = dict(config, depths=[2, 2])
    return functools.partial(zoo._build_hf, "ResNetForImageClassification", zoo._image, config)


# name -> (build, the branches that must be offered, in graph order)
CASES = {
    "block_net": (functools.partial(zoo._build, block_net, zoo._image), ["1.0.body", "1.1.body", "1.3.body"]),
    "stage_net": (functools.partial(zoo._build, lambda: zoo.classifier(Stage(), width=8), zoo._image),
                  ["0.blocks.0", "0.blocks.1"]),
    "shortcut_net": (functools.partial(zoo._build, shortcut_net, zoo._image), ["1.body", "4.body"]),
    "loop_net": (functools.partial(zoo._build, LoopNet, zoo._image), [f"blocks.{i}.body" for i in range(3)]),
    "hf_resnet_basic": (_hf_resnet(zoo._RESNET_BASIC), [
        f"{_STAGES}.0.layers.0.layer", f"{_STAGES}.0.layers.1.layer", f"{_STAGES}.1.layers.1.layer"]),
    "hf_resnet_bottleneck": (_hf_resnet(zoo._RESNET_BOTTLENECK), [
        f"{_STAGES}.0.layers.1.layer", f"{_STAGES}.1.layers.1.layer"]),
}



@pytest.mark.parametrize("name", CASES)
def test_identity_shortcut_blocks_are_offered_and_removed_exactly(name):
    build, expected = CASES[name]
    model, inputs = build()
    net = sparsify_quietly(model, LAYER, inputs)
    gate = layer_gate(net)
    assert list(gate.modules_controlled) == expected  # downsample blocks are not offered
    assert rel_diff(run_no_grad(model, inputs[0]), run_no_grad(net, inputs[0])) <= 1e-6
    removed = [0, len(expected) - 1] if len(expected) > 2 else [0]
    gate.zero_(removed)
    gated = run_no_grad(net, inputs[0])
    small = autosparse.compact(net)
    assert record_of(small).replaced == [expected[i] for i in removed]
    assert record_of(small).dropped_layers == []  # the blocks' own ReLU still runs
    assert rel_diff(gated, run_no_grad(small, inputs[0])) <= 1e-5
    for i in removed:
        stand_in = small.get_submodule(expected[i])
        assert isinstance(stand_in, ZeroBranch) and not list(stand_in.parameters())
    dropped = sum(count_params(model.get_submodule(expected[i])) for i in removed)
    assert count_params(small) == count_params(model) - dropped
    bigger = torch.randn(2, 3, 48, 48)  # ZeroBranch follows its input's shape
    assert rel_diff(run_no_grad(net, bigger), run_no_grad(small, bigger)) <= 1e-5


@pytest.mark.parametrize("name", CASES)
def test_layer_and_channel_gates_compact_exactly(name):
    build, expected = CASES[name]
    model, inputs = build()
    rng = np.random.default_rng(0)
    for _ in range(3):
        net = sparsify_quietly(model, LAYER_AND_CHANNEL, inputs)
        assert list(layer_gate(net).modules_controlled) == expected
        zero_random(net, rng)
        gated = run_no_grad(net, inputs[0])
        small = autosparse.compact(net)  # verify=True: raises if not equivalent
        assert rel_diff(gated, run_no_grad(small, inputs[0])) <= 1e-5
        assert count_params(small) < count_params(model)
        for replaced in record_of(small).replaced:
            assert isinstance(small.get_submodule(replaced), ZeroBranch)


def test_gate_folds_into_batchnorm_exactly_in_training_mode():
    build, _ = CASES["block_net"]
    model, inputs = build()
    net = sparsify_quietly(model, LAYER, inputs)
    with torch.no_grad():
        layer_gate(net).gamma.copy_(torch.tensor([0.3, -0.2, 0.1]))  # all kept, unequal values
    small = autosparse.compact(net)
    assert record_of(small).replaced == []
    net.train(), small.train()  # batch statistics do not depend on the BatchNorm's weight and bias
    assert rel_diff(run_no_grad(net, inputs[0]), run_no_grad(small, inputs[0])) <= 1e-5


@pytest.mark.parametrize("build", [functools.partial(zoo._build, downsample_net, zoo._image),
                                   zoo.get_case("hf_resnet_bottleneck").build], ids=["hand_written", "hf"])
def test_downsample_blocks_only_give_no_layer_gates(build):
    model, inputs = build()
    with pytest.raises(autosparse.NoGatesError):
        sparsify_quietly(model, LAYER, inputs)


@pytest.mark.parametrize("name", ["block_net", "hf_resnet_basic"])
def test_save_load_round_trip(name, tmp_path):
    build, _ = CASES[name]
    model, inputs = build()
    net = sparsify_quietly(model, LAYER_AND_CHANNEL, inputs)
    for gate in autosparse.gates(net).values():
        gate.zero_([0])
    small = autosparse.compact(net)
    assert record_of(small).replaced
    directory = autosparse.save(small, tmp_path / name, example_inputs=inputs)
    loaded = autosparse.load(directory, build()[0])
    assert isinstance(loaded.get_submodule(record_of(small).replaced[0]), ZeroBranch)
    assert count_params(loaded) == count_params(small)
    assert rel_diff(run_no_grad(small, inputs[0]), run_no_grad(loaded.eval(), inputs[0])) == 0.0


class NormEnded(nn.Module):
    """``x = x + blocks[i](x)`` whose bodies end in a GroupNorm (images) or a bias-free LayerNorm
    (sequences); ``export`` adds control flow on a size so that only torch.export captures it."""

    def __init__(self, norm: str, export: bool) -> None:
        super().__init__()
        self.export, self.norm = export, norm
        if norm == "group":
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.blocks = nn.ModuleList(nn.Sequential(
                nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8))
                for _ in range(3))
        else:
            self.stem = nn.Linear(3, 16)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.LayerNorm(16, bias=False))
                for _ in range(3))
        for m in self.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                nn.init.uniform_(m.weight, 0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.export and x.dim() < 0:  # control flow on a size: torch.fx cannot trace this
            x = -x
        x = self.stem(x if self.norm == "group" else x.flatten(2).transpose(1, 2))
        for block in self.blocks:
            x = x + block(x)
        return x


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
@pytest.mark.parametrize("norm", ["group", "layer"])
def test_group_and_layer_norm_ends_fold_exactly(norm, export):
    torch.manual_seed(0)
    model, inputs = NormEnded(norm, export).eval(), (torch.randn(2, 3, 8, 8),)
    net = sparsify_quietly(model, LAYER, inputs)
    gate = layer_gate(net)
    assert list(gate.modules_controlled) == ["blocks.0", "blocks.1", "blocks.2"]
    assert rel_diff(run_no_grad(model, inputs[0]), run_no_grad(net, inputs[0])) <= 1e-6
    with torch.no_grad():
        gate.gamma.copy_(torch.tensor([0.3, -0.2, 0.1]))  # unequal values folded into the norm
    gate.zero_([1])
    gated = run_no_grad(net, inputs[0])
    small = autosparse.compact(net)
    assert record_of(small).replaced == ["blocks.1"]
    assert rel_diff(gated, run_no_grad(small, inputs[0])) <= 1e-5


# ------------------------------------------------------------------ which list entries may go
def test_layer_is_kept_while_an_ungated_branch_still_runs():
    model, inputs = zoo.get_case("hf_llama").build()
    net = sparsify_quietly(model, {"rules": [{"granularity": "layer", "types": ["LlamaMLP"]}]}, inputs)
    layer_gate(net).zero_([0])  # layer 0 loses its MLP; its attention has no gate and stays
    gated = run_no_grad(net, inputs[0])
    small = autosparse.compact(net)
    record = record_of(small)
    assert record.replaced == ["model.layers.0.mlp"] and record.dropped_layers == []
    assert rel_diff(gated, run_no_grad(small, inputs[0])) <= 1e-5


def test_t5_position_bias_attention_is_not_a_branch_and_mixed_lists_keep_their_entries():
    model, inputs = zoo.get_case("hf_t5_encoder").build()
    net = sparsify_quietly(model, LAYER, inputs)
    # block 0's attention also returns the position bias later blocks read: no ZeroBranch for it,
    # which leaves block 1's attention alone in its kind (no gate)
    assert [list(g.modules_controlled) for g in autosparse.gates(net).values()] == [
        [f"encoder.block.{i}.layer.1.DenseReluDense" for i in range(2)]]
    layer_gate(net).zero_([0])
    gated = run_no_grad(net, inputs[0])
    small = autosparse.compact(net)
    # block.0.layer is [attention, feed-forward], read by position: the emptied entry stays
    assert record_of(small).dropped_layers == []
    assert rel_diff(gated, run_no_grad(small, inputs[0])) <= 1e-5
