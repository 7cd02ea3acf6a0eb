"""One-shot pruning (autosparse.pruning): budget, exactness, criteria, rule limits, bad input."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import autosparse
from autosparse.compaction.record import record_of
from autosparse.errors import ArgumentError, AutosparseWarning, PolicyError
from autosparse.measure import count_flops, count_params
from autosparse.pruning import prune, select_units, unit_importance
from autosparse.state import is_sparsified
from tests.zoo import get_case, rel_diff

CHANNELS = {"rules": [{"granularity": "channel"}]}
TRANSFORMER = {"rules": [{"name": "heads", "granularity": "head"},
                         {"name": "mlp", "granularity": "channel", "modules": ["*mlp*"]},
                         {"name": "blocks", "granularity": "layer", "exclude": ["*embed*", "lm_head"]}]}
# (zoo case, policy): a residual CNN, concat, grouped convs, and a Llama (GQA heads, MLP, branches)
CASES = [("resnet_basic", CHANNELS), ("densenet", CHANNELS), ("resnext", CHANNELS), ("hf_llama", TRANSFORMER)]


def _with_target(policy: dict, **target: float) -> dict:
    return {**policy, "target": target}


@functools.cache
def _built(name: str) -> tuple[nn.Module, tuple]:
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    return get_case(name).build()


def _run(model: nn.Module, inputs: tuple) -> object:
    with torch.no_grad():
        return model(*inputs)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # policy globs that match nothing in one of the zoo models
        return fn(*args, **kwargs)


@pytest.mark.parametrize("name,policy", CASES, ids=[c[0] for c in CASES])
def test_prune_lands_on_the_flops_budget_and_is_exact(name: str, policy: dict) -> None:
    model, inputs = _built(name)
    before = copy.deepcopy(model.state_dict())
    policy = _with_target(policy, flops=0.5)
    small = _quiet(prune, model, policy, example_inputs=inputs, importance="l2")

    # a plain model: no gates, no parametrizations left
    assert not is_sparsified(small)
    assert not any(parametrize.is_parametrized(m) for m in small.modules())
    # at or just under the budget
    fraction = count_flops(small, inputs) / count_flops(model, inputs)
    assert 0.46 <= fraction <= 0.5, fraction
    # the same decisions taken step by step give the same model, which equals the gated one
    net = _quiet(autosparse.sparsify, model, policy, example_inputs=inputs)
    selection = select_units(net, unit_importance(net, "l2"))
    assert selection.removed and selection.predicted <= 0.5
    assert abs(selection.predicted - fraction) < 0.01  # the cost model predicts what compaction gives
    stepwise = _quiet(autosparse.compact, net)
    assert rel_diff(_run(net, inputs), _run(stepwise, inputs)) < 1e-5
    assert rel_diff(_run(stepwise, inputs), _run(small, inputs)) < 1e-6
    # the user's model is untouched
    assert not is_sparsified(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_llama_prunes_heads_channels_and_branches() -> None:
    model, inputs = _built("hf_llama")
    small = _quiet(prune, model, _with_target(TRANSFORMER, flops=0.3), example_inputs=inputs)
    groups = record_of(small).groups
    kinds = {name: g for name, g in groups.items() if g["after"] < g["before"]}
    assert kinds, groups
    assert count_flops(small, inputs) / count_flops(model, inputs) <= 0.3


def _planted_mlp(seed: int = 0) -> nn.Sequential:
    """Linear(8, 16) -> ReLU -> Linear(16, 4) whose hidden units 2, 7 and 11 are 10x larger."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        for unit in PLANTED:
            net[0].weight[unit] *= 10
            net[0].bias[unit] = 1.0 + abs(float(net[0].bias[unit]))
            net[2].weight[:, unit] *= 10
    return net


PLANTED = [2, 7, 11]
# FLOPs of both Linears scale with the hidden width: keeping 3 of 16 units is 3/16 of them
THREE_OF_SIXTEEN = 3 / 16


@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_magnitude_keeps_the_planted_large_units(importance: str) -> None:
    net, x = _planted_mlp(), torch.randn(5, 8)
    small = prune(net, _with_target(CHANNELS, flops=THREE_OF_SIXTEEN), example_inputs=(x,), importance=importance)
    assert small[0].weight.shape == (3, 8) and small[2].weight.shape == (4, 3)
    assert torch.equal(small[0].weight, net[0].weight[PLANTED])
    assert torch.equal(small[2].weight, net[2].weight[:, PLANTED])
    assert count_flops(small, (x,)) * 16 == count_flops(net, (x,)) * 3


def _teacher_data(net: nn.Module, batches: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    xs = [torch.randn(32, 8, generator=generator) for _ in range(batches)]
    with torch.no_grad():  # labels from a noisy copy of the model: a loss with real gradients
        return [(x, (net(x) + 0.5 * torch.randn(32, 4, generator=generator)).argmax(1)) for x in xs]


def _hand_taylor(net: nn.Sequential, data: list) -> torch.Tensor:
    """``sum_batches |dL/ds|`` for a multiplier ``s = 1`` on the hidden units, by hand."""
    total = torch.zeros(16, dtype=torch.float64)
    for x, y in data:
        s = torch.ones(16, requires_grad=True)
        loss = nn.functional.cross_entropy(net[2](net[1](net[0](x)) * s), y)
        (grad,) = torch.autograd.grad(loss, s)
        total += grad.abs().double()
    return total


def test_taylor_is_the_first_order_loss_change_of_each_unit() -> None:
    net = _planted_mlp()
    with torch.no_grad():
        net[2].weight[:, :5] = 0.0  # units 0-4 feed nothing: removing them changes nothing
    data = _teacher_data(net)
    gated = autosparse.sparsify(net, CHANNELS, example_inputs=(data[0][0],))
    (scores,) = unit_importance(gated, "taylor", data=data)
    torch.testing.assert_close(scores, _hand_taylor(net, data), rtol=1e-5, atol=1e-9)
    assert scores[:5].tolist() == [0.0] * 5 and bool((scores[5:] > 0).all())
    assert all(g.kept() == 16 for g in autosparse.gates(gated).values())  # scoring zeroes nothing
    small = prune(net, _with_target(CHANNELS, flops=11 / 16), example_inputs=(data[0][0],), importance="taylor",
                  data=data)
    assert _kept_rows(net[0].weight, small[0].weight) == list(range(5, 16))


def _kept_rows(full: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    return [i for i in range(full.shape[0]) if any(torch.equal(full[i], row) for row in pruned)]


def test_taylor_takes_a_custom_loss() -> None:
    net = _planted_mlp()
    data = [(x, y.float()) for x, y in _teacher_data(net)]
    small = prune(net, _with_target(CHANNELS, flops=0.25), example_inputs=(data[0][0],), importance="taylor",
                  data=data, loss_fn=lambda out, y: (out.sum(1) - y).pow(2).mean())
    assert small[0].out_features == 4


def test_random_is_seeded_and_reproducible() -> None:
    model, inputs = _built("resnet_basic")
    policy = _with_target(CHANNELS, flops=0.4)
    first, again = (prune(model, policy, example_inputs=inputs, importance="random", seed=3) for _ in range(2))
    other = prune(model, policy, example_inputs=inputs, importance="random", seed=4)
    a, b, c = first.state_dict(), again.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].shape != c[k].shape or not torch.equal(a[k], c[k]) for k in a)


def test_min_keep_and_round_to_are_honoured() -> None:
    model, inputs = _built("resnet_basic")
    policy = {"rules": [{"granularity": "channel", "min_keep": 4, "round_to": 4}], "target": {"flops": 0.3}}
    small = prune(model, policy, example_inputs=inputs)
    groups = record_of(small).groups
    assert groups and any(g["after"] < g["before"] for g in groups.values())
    for g in groups.values():
        assert g["after"] >= 4 and (g["after"] % 4 == 0 or g["after"] == g["before"]), groups
    assert 0.26 <= count_flops(small, inputs) / count_flops(model, inputs) <= 0.3


def test_a_budget_just_below_the_floor_lands_on_the_floor_with_a_warning() -> None:
    model, inputs = _built("resnet_basic")
    # every group at min_keep 4 is 0.2085 of the FLOPs: within target.tolerance (0.05) of 0.2
    policy = {"rules": [{"granularity": "channel", "min_keep": 4}], "target": {"flops": 0.2}}
    with pytest.warns(AutosparseWarning, match="target.flops: every group is at its rule's floor"):
        small = prune(model, policy, example_inputs=inputs)
    assert all(g["after"] == 4 for g in record_of(small).groups.values())
    assert count_flops(small, inputs) / count_flops(model, inputs) == pytest.approx(0.2085, abs=5e-4)


def test_params_budget() -> None:
    model, inputs = _built("resnet_basic")
    small = prune(model, _with_target(CHANNELS, params=0.5), example_inputs=inputs, importance="l1")
    assert 0.46 <= count_params(small) / count_params(model) <= 0.5


@pytest.mark.parametrize(
    "policy,kwargs,error,match",
    [
        (CHANNELS, {}, PolicyError, "target"),
        (_with_target(CHANNELS, flops=0.5), {"importance": "l3"}, ArgumentError, "importance"),
        (_with_target(CHANNELS, flops=0.5), {"importance": "taylor"}, ArgumentError, "data="),
        (_with_target(CHANNELS, flops=0.5), {"importance": "taylor", "data": [], "loss_fn": 3}, ArgumentError,
         "loss_fn"),
        (_with_target(CHANNELS, flops=0.5), {"importance": "taylor", "data": []}, ArgumentError, "no batch"),
        ({"rules": [{"granularity": "channel", "min_keep": 0.9}], "target": {"flops": 0.1}}, {}, PolicyError,
         "target.flops"),
    ],
    ids=["no-target", "unknown-importance", "taylor-without-data", "loss-not-callable", "empty-data",
         "below-min-keep"],
)
def test_bad_input_raises_a_typed_error(policy: dict, kwargs: dict, error: type, match: str) -> None:
    net, x = _planted_mlp(), torch.randn(5, 8)
    with pytest.raises(error, match=match):
        prune(net, policy, example_inputs=(x,), **kwargs)
