"""Layer gates on blocks whose residual branch is written inline: ``return x + f(x)`` in the block's
own forward (Hugging Face ConvNeXt, hand-written MLP blocks). With the gate at zero the whole block
computes ``x``, so compaction replaces it by an IdentityBlock (or drops it from its ModuleList).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

import autosparse
from autosparse.compaction.record import record_of
from autosparse.measure import count_params
from autosparse.modules.blocks import IdentityBlock
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


class Block(nn.Module):
    """``x + fc2(act(fc1(x)))``; ``variant`` breaks one condition of an inline branch."""

    def __init__(self, dim: int, variant: str = "") -> None:
        super().__init__()
        self.fc1, self.fc2, self.variant = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), variant
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)
        self.proj = nn.Linear(dim, dim) if variant == "project" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(x)))
        if self.variant == "after":
            return torch.relu(x + h)  # something runs after the add: the block is not x -> x
        if self.variant == "project":
            return self.proj(x) + h  # the skip is not the block's input
        if self.variant == "reused":
            return x + h + h.mean()  # the branch's output is read twice: g cannot fold into fc2
        if self.variant == "alpha":
            return torch.add(h, x, alpha=2.0)  # with g == 0 the block computes 2 x, not x
        if self.variant == "gated":
            return x + h * torch.sigmoid(x)  # scaled by an activation, not by a constant
        return x + self.scale * h  # a per-channel scale commutes with the scalar gate


class LoopNet(nn.Module):
    def __init__(self, variant: str = "") -> None:
        super().__init__()
        self.stem, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.blocks = nn.ModuleList(Block(8, variant) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _tokens(length: int = 5) -> torch.Tensor:
    return torch.randn(2, length, 4)


def _sequential() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), Block(8), Block(8), Block(8), nn.Linear(8, 3))


def _convnext() -> tuple[nn.Module, tuple]:
    import transformers  # imported lazily: slow to import

    torch.manual_seed(0)
    config = transformers.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[2, 2],
                                         layer_scale_init_value=0.5)
    return transformers.ConvNextModel(config).eval(), (torch.randn(2, 3, 32, 32),)


_LAYERS = [f"encoder.stages.{s}.layers.{i}" for s in range(2) for i in range(2)]
# name -> (build, blocks offered, whether a ModuleList holds them (then they are dropped), bigger input)
CASES = {
    "sequential": (functools.partial(zoo._build, _sequential, _tokens), ["1", "2", "3"], False, _tokens(9)),
    "module_list": (functools.partial(zoo._build, LoopNet, _tokens), ["blocks.0", "blocks.1", "blocks.2"],
                    True, _tokens(9)),
    "hf_convnext": (_convnext, _LAYERS, True, torch.randn(2, 3, 48, 48)),
}







@pytest.mark.parametrize("name", CASES)
def test_inline_blocks_are_offered_and_removed_exactly(name):
    build, expected, in_list, bigger = CASES[name]
    model, inputs = build()
    net = sparsify_quietly(model, LAYER, inputs)
    gate = layer_gate(net)
    assert list(gate.modules_controlled) == expected
    assert rel_diff(run_no_grad(model, inputs[0]), run_no_grad(net, inputs[0])) <= 1e-6
    with torch.no_grad():
        gate.gamma.copy_(torch.linspace(0.3, -0.2, gate.size))  # unequal values folded into the last weight
    removed = [0, len(expected) - 1]
    gate.zero_(removed)
    gated = run_no_grad(net, inputs[0])
    small = autosparse.compact(net)
    record = record_of(small)
    assert record.replaced == [expected[i] for i in removed]
    assert record.dropped_layers == ([expected[i] for i in removed] if in_list else [])
    assert rel_diff(gated, run_no_grad(small, inputs[0])) <= 1e-5
    if not in_list:
        assert all(isinstance(small.get_submodule(expected[i]), IdentityBlock) for i in removed)
    assert not any(isinstance(m, IdentityBlock) for m in small.modules()) or not in_list
    dropped = sum(count_params(model.get_submodule(expected[i])) for i in removed)
    assert count_params(small) == count_params(model) - dropped
    assert rel_diff(run_no_grad(net, bigger), run_no_grad(small, bigger)) <= 1e-5


@pytest.mark.parametrize("name", CASES)
def test_layer_and_channel_gates_compact_exactly(name):
    build, expected, _, bigger = CASES[name]
    model, inputs = build()
    rng = np.random.default_rng(0)
    for _ in range(3):
        net = sparsify_quietly(model, LAYER_AND_CHANNEL, inputs)
        assert list(layer_gate(net).modules_controlled) == expected
        zero_random(net, rng)
        gated = run_no_grad(net, inputs[0])
        small = autosparse.compact(net)  # verify=True: raises if not equivalent
        assert rel_diff(gated, run_no_grad(small, inputs[0])) <= 1e-5
        assert rel_diff(run_no_grad(net, bigger), run_no_grad(small, bigger)) <= 1e-5
        assert count_params(small) < count_params(model)


@pytest.mark.parametrize("name", CASES)
def test_save_load_round_trip(name, tmp_path):
    build, _, _, _ = CASES[name]
    model, inputs = build()
    net = sparsify_quietly(model, LAYER_AND_CHANNEL, inputs)
    for gate in autosparse.gates(net).values():
        gate.zero_([0])
    small = autosparse.compact(net)
    assert record_of(small).replaced
    directory = autosparse.save(small, tmp_path / name, example_inputs=inputs)
    loaded = autosparse.load(directory, build()[0])
    assert [type(m) for m in loaded.modules()] == [type(m) for m in small.modules()]
    assert count_params(loaded) == count_params(small)
    assert rel_diff(run_no_grad(small, inputs[0]), run_no_grad(loaded.eval(), inputs[0])) == 0.0


def test_gate_folds_exactly_in_training_mode():
    build, *_ = CASES["hf_convnext"]
    model, inputs = build()
    net = sparsify_quietly(model, LAYER, inputs)
    with torch.no_grad():
        layer_gate(net).gamma.copy_(torch.tensor([0.3, -0.2, 0.1, 0.7]))  # all kept, unequal values
    small = autosparse.compact(net)
    assert record_of(small).replaced == []
    net.train(), small.train()
    assert rel_diff(run_no_grad(net, inputs[0]), run_no_grad(small, inputs[0])) <= 1e-5


@pytest.mark.parametrize("variant", ["after", "project", "reused", "alpha", "gated"])
def test_blocks_that_are_not_x_plus_a_foldable_branch_give_no_layer_gates(variant):
    model, inputs = zoo._build(functools.partial(LoopNet, variant), _tokens)
    with pytest.raises(autosparse.NoGatesError):
        sparsify_quietly(model, LAYER, inputs)


def test_default_convnext_config_offers_every_layer():
    import transformers

    config = transformers.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[2, 2])
    model = transformers.ConvNextModel(config).eval()  # layer scale 1e-6: the branches barely count
    net = sparsify_quietly(model, LAYER, (torch.randn(2, 3, 32, 32),))
    assert list(layer_gate(net).modules_controlled) == _LAYERS
