"""The ``pretrained`` regime: gates from l2 magnitude, progressive closing along the reference, one switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autosparse
from autosparse import training
from autosparse.demo import budget_policy, fit
from autosparse.demo.data import Dataset
from autosparse.demo.run import lr_factors
from autosparse.pruning.importance import unit_importance
from autosparse.state import get_state
from autosparse.training.budget import build_cost_model
from autosparse.training.init import init_from_magnitude, initial_values, magnitude_scores
from autosparse.training.progressive import close_to

X = torch.randn(8, 2, 32, generator=torch.Generator().manual_seed(0))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Conv1d(16, 24, 3, padding=1), nn.BatchNorm1d(24), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(24, 5)).eval()


def _policy(regime: str = "pretrained", **schedule) -> dict:
    return {"rules": [{"granularity": "channel", "min_keep": 2}],
            "schedule": {"warmup_steps": 4, "freeze_step": 30, "regime": regime, **schedule},
            "target": {"flops": 0.3}}


def test_initial_gates_rank_units_like_l2_magnitude_and_keep_the_function():
    net = autosparse.sparsify(_cnn(), _policy(), example_inputs=(X,))
    l2 = unit_importance(net, "l2")  # autosparse.prune's criterion, on the untouched weights
    m = _cnn()  # the same weights: the first group's units are conv0's rows, bn0's affine, conv1's columns
    by_hand = (m[0].weight.pow(2).sum((1, 2)) + m[0].bias.pow(2) + m[1].weight.pow(2) + m[1].bias.pow(2)
               + m[3].weight.pow(2).sum((0, 2))).sqrt().double()
    assert torch.allclose(magnitude_scores(net)[0], by_hand) and torch.allclose(l2[0], by_hand)
    before = net(X)
    assert init_from_magnitude(net) == 2
    assert torch.allclose(net(X), before, atol=1e-5)  # folded into the weights: the same function
    for gate, scores in zip(get_state(net).gate_list(), l2):
        values = gate.values().detach().double()
        assert torch.allclose(values, initial_values(scores), atol=1e-5)  # mean 1, floored, as documented
        assert torch.equal(torch.argsort(values), torch.argsort(initial_values(scores)))


def test_initial_values_floor_and_mean():
    v = initial_values(torch.tensor([0.0, 1.0, 2.0, 5.0]))
    assert float(v.mean()) == pytest.approx(1.0) and float(v.min()) > 0
    assert torch.equal(initial_values(torch.zeros(3)), torch.ones(3, dtype=torch.float64))  # no information


def test_progressive_closing_follows_the_reference_and_reaches_the_budget_by_the_ramp_end():
    net = autosparse.sparsify(_cnn().train(), _policy(), example_inputs=(X,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    y = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(1))
    tr = training.training_state(net)
    controller = tr.controller
    assert controller is not None and controller.ramp_end == 4 + int(0.75 * 26)  # 23
    for step in range(1, 31):
        loss = F.cross_entropy(net(X), y) + autosparse.penalty(net)  # the state was built before a forward
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 30:
            kept_before_freeze = [g.kept() for g in get_state(net).gate_list()]
        training.step(net)
        frac = training.cost_fraction(net)
        if step >= controller.start:
            assert frac <= controller.reference(step) + 1e-9  # never above the reference
        if step >= controller.ramp_end:
            assert frac <= 0.3 + 1e-9  # the budget, by the stated step
    assert tr.frozen
    assert [g.kept() for g in get_state(net).gate_list()] == kept_before_freeze  # the freeze closed nothing


def test_progressive_closing_cuts_every_group_by_the_same_fraction_when_gates_carry_no_information():
    net = autosparse.sparsify(_cnn(), _policy(), example_inputs=(X,))
    state = get_state(net)
    cost = build_cost_model(net, state, "flops")
    closed = close_to(state, cost, 0.25)
    assert closed and cost.fraction(cost.kept_now(state)) <= 0.25
    fractions = [g.kept() / g.size for g in state.gate_list()]
    assert max(fractions) - min(fractions) < 0.15  # no bottleneck: about a uniform cut


def test_scratch_regime_leaves_gates_fresh():
    net = autosparse.sparsify(_cnn(), _policy("scratch"), example_inputs=(X,))
    training.training_state(net)
    net(X)
    training.step(net)
    assert _fresh(net)


def _fresh(net: nn.Module) -> bool:
    return all(torch.equal(g.gamma, torch.zeros_like(g.gamma)) for g in get_state(net).gate_list())


def test_pretrained_regime_initialises_at_the_first_step_and_a_teacher_copy_is_untouched():
    net = autosparse.sparsify(_cnn(), _policy(), example_inputs=(X,))
    autosparse.penalty(net)  # builds the training state (after a forward, in a real loop)
    kd = autosparse.distill(net)  # a plain copy of the dense model
    net(X)
    assert _fresh(net)  # not while a forward graph may hold the weights
    training.step(net)
    assert not _fresh(net)
    assert torch.allclose(net(X), kd.teacher(X), atol=1e-5)  # initialised, folded: the dense function


@pytest.mark.parametrize("schedule, key", [
    ({"regime": "pretrain"}, "schedule.regime"),
    ({"regime": 1}, "schedule.regime"),
    ({"regim": "pretrained"}, "schedule.regim"),
])
def test_bad_regime_keys_raise_policy_errors_naming_the_key(schedule, key):
    with pytest.raises(autosparse.PolicyError, match=key.replace(".", r"\.")):
        autosparse.load_policy({"rules": [{"granularity": "channel"}], "schedule": schedule})


def test_budget_policy_pretrained_recipe_and_a_constant_gate_lr_until_the_freeze():
    policy = budget_policy(0.3, 100, regime="pretrained")
    assert policy["schedule"] == {"warmup_steps": 3, "freeze_step": 30, "regime": "pretrained"}
    schedule = autosparse.load_policy(policy).schedule
    weights, gates = lr_factors(100, schedule)
    assert [gates(t) for t in (0, 15, 29)] == [1.0, 1.0, 1.0]  # constant while the gates train
    assert weights(15) < 1.0 and weights(30) == pytest.approx(1.0)  # weights: cosine, restarted at the freeze
    scratch = lr_factors(100, autosparse.load_policy(budget_policy(0.3, 100)).schedule)
    assert scratch[1](30) < 1.0  # the scratch recipe decays the gates too


def test_fit_trains_the_pretrained_recipe_end_to_end():
    g = torch.Generator().manual_seed(0)
    data = Dataset("toy", torch.randn(64, 2, 32, generator=g), torch.randint(0, 5, (64,), generator=g),
                   X, torch.randint(0, 5, (8,), generator=g), 5)
    net = autosparse.sparsify(_cnn(), budget_policy(0.3, 8, regime="pretrained"), example_inputs=(X,))
    fit(net, data, epochs=2, batch_size=16)
    assert training.training_state(net).frozen
    assert training.cost_fraction(net) <= 0.3 + 1e-9
    autosparse.compact(net)
