"""Training with gates: the three ways to apply the penalty, schedules, freeze, cost model, budget, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autosparse
from autosparse import training
from autosparse.demo import budget_policy, fit, wide_cnn
from autosparse.demo.data import load_digits
from autosparse.errors import AutosparseWarning, PolicyError
from autosparse.measure import count_flops, count_params
from autosparse.policy import Schedule
from autosparse.training.budget import Controller, build_cost_model, enforce
from tests.zoo import CHANNEL, get_case, sparsify_quietly

torch.set_num_threads(2)


def _net(policy: dict | None = None, widths=(8, 16, 16)) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    x = (torch.randn(4, 1, 8, 8),)
    policy = policy or CHANNEL
    return sparsify_quietly(wide_cnn(1, 10, widths), policy, x), x


def _spread(net: nn.Module, seed: int = 1) -> None:
    """Random, non-uniform gates: the penalty's gradient is zero at the uniform start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in autosparse.gates(net).values():
            gate.gamma.copy_(0.3 * torch.randn(gate.size, generator=g))


def _grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("warmup", "step", "factor"),
    [(100, 0, 0.0), (100, 25, 0.25), (100, 100, 1.0), (100, 250, 1.0), (0, 0, 1.0), (0, 7, 1.0)],
)
def test_warmup_factor(warmup: int, step: int, factor: float) -> None:
    assert training.warmup_factor(Schedule(warmup_steps=warmup), step) == pytest.approx(factor)


def test_penalty_ramps_with_the_warmup() -> None:
    net, _ = _net(
        {"rules": [{"granularity": "channel"}], "penalty": {"lambda": 0.01}, "schedule": {"warmup_steps": 4}}
    )
    _spread(net)
    full = 0.01 * sum(g.penalty(0.5).item() for g in autosparse.gates(net).values())
    seen = []
    for _ in range(6):
        seen.append(autosparse.penalty(net).item())
        training.step(net)
    assert seen == pytest.approx([0.0, 0.25 * full, 0.5 * full, 0.75 * full, full, full], rel=1e-6)
    assert net._autosparse.step == 6


# ----------------------------------------------------------------------------- three ways to apply the penalty


def test_hook_penalty_gives_the_same_gradients_as_the_explicit_one() -> None:
    explicit, x = _net({"rules": [{"granularity": "channel"}], "penalty": {"lambda": 0.05}})
    _spread(explicit)
    hooked = copy.deepcopy(explicit)
    y = torch.tensor([1, 2, 3, 4])
    explicit.train(), hooked.train()
    (F.cross_entropy(explicit(*x), y) + autosparse.penalty(explicit)).backward()
    with training.attach(hooked):
        F.cross_entropy(hooked(*x), y).backward()
    a, b = _grads(explicit), _grads(hooked)
    assert a.keys() == b.keys() and any("gamma" in k for k in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)
    # the penalty really is in there: without it the gate gradients differ
    plain = copy.deepcopy(hooked)
    plain.zero_grad()
    F.cross_entropy(plain(*x), y).backward()
    gamma = next(k for k in a if "gamma" in k)
    assert not torch.allclose(dict(plain.named_parameters())[gamma].grad, a[gamma])


def test_attach_runs_an_unmodified_loop_and_can_be_removed() -> None:
    net, x = _net(
        {
            "rules": [{"granularity": "channel"}],
            "penalty": {"lambda": 0.05},
            "schedule": {"warmup_steps": 2, "freeze_step": 5},
        }
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)  # created before, as a Trainer would

    def foreign_loop(steps: int) -> None:  # knows nothing about autosparse
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(net(*x), torch.tensor([1, 2, 3, 4])).backward()
            optimizer.step()

    handle = training.attach(net)
    foreign_loop(7)
    assert net._autosparse.step == 7
    assert training.training_state(net).frozen  # freeze_step 5 reached through the hook
    handle.remove()
    foreign_loop(2)
    assert net._autosparse.step == 7


def test_explicit_penalty_while_hooked_warns_once() -> None:
    net, _ = _net()
    with training.attach(net), pytest.warns(AutosparseWarning, match="counts twice"):
        autosparse.penalty(net)


def test_per_group_weights_scale_each_term() -> None:
    policy = {
        "rules": [
            {"name": "first", "granularity": "channel", "modules": ["0.*"], "penalty_weight": 3.0},
            {"name": "rest", "granularity": "channel", "penalty_weight": 0.0},
        ],
        "penalty": {"lambda": 0.1},
    }
    net, _ = _net(policy)
    _spread(net)
    gates = list(autosparse.gates(net).values())
    assert [g.penalty_weight for g in gates] == [3.0, 0.0, 0.0]
    value = autosparse.penalty(net)
    unweighted = gates[0].shares().pow(0.5).sum().pow(2.0)
    assert value.item() == pytest.approx(0.1 * 3.0 * unweighted.item(), rel=1e-6)
    value.backward()
    assert gates[0].gamma.grad.abs().sum() > 0 and gates[1].gamma.grad.abs().sum() == 0


def test_cost_weights_follow_the_flops_of_a_unit() -> None:
    net, x = _net({"rules": [{"granularity": "channel"}], "penalty": {"cost_weighting": "flops"}})
    weights = training.training_state(net).weights
    # one unit of group i costs (FLOPs of the convs it feeds and comes from) / width; 8x8 then 4x4 maps
    per_unit = [
        (9 * 1 * 64) + (9 * 16 * 64),  # conv0 row + conv1 column (8x8)
        (9 * 8 * 64) + (9 * 16 * 16),  # conv1 row (8x8) + conv2 column (4x4)
        (9 * 16 * 16) + 10,
    ]  # conv2 row (4x4) + linear column
    mean = sum(c * n for c, n in zip(per_unit, (8, 16, 16))) / 40
    assert weights == pytest.approx([c / mean for c in per_unit], rel=1e-6)


# ----------------------------------------------------------------------------- freeze


def test_freeze_stops_the_gates_but_not_the_weights() -> None:
    net, x = _net(
        {
            "rules": [{"granularity": "channel"}],
            "penalty": {"lambda": 0.05},
            "schedule": {"warmup_steps": 1, "freeze_step": 3},
        }
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    y = torch.tensor([1, 2, 3, 4])
    snapshots = []
    for _ in range(8):
        optimizer.zero_grad(set_to_none=False)  # zero tensors, not None: momentum would still move them
        (F.cross_entropy(net(*x), y) + autosparse.penalty(net)).backward()
        optimizer.step()
        training.step(net)
        snapshots.append(
            (
                [g.gamma.detach().clone() for g in autosparse.gates(net).values()],
                net[1][0].parametrizations.weight.original.detach().clone(),
            )
        )
    assert not torch.equal(snapshots[0][0][0], snapshots[1][0][0])  # moving before the freeze
    for (gammas, weight), (later, later_weight) in zip(snapshots[2:], snapshots[3:]):
        assert all(torch.equal(a, b) for a, b in zip(gammas, later))
        assert not torch.equal(weight, later_weight)
    assert autosparse.penalty(net).item() == 0.0 and training.current_lambda(net) == 0.0


# ----------------------------------------------------------------------------- cost model


@pytest.mark.parametrize("case", ["resnet_basic", "mobilenetv2", "densenet"])
def test_cost_model_predicts_the_compacted_model_exactly(case: str) -> None:
    model, inputs = get_case(case).build()
    net = sparsify_quietly(model, "configs/channels.yaml", inputs)
    state = net._autosparse
    flops, params = build_cost_model(net, state, "flops"), build_cost_model(net, state, "params")
    assert flops.dense == count_flops(model, inputs) and params.dense == count_params(model)
    g = torch.Generator().manual_seed(0)
    for gate in autosparse.gates(net).values():
        gate.zero_(torch.randperm(gate.size, generator=g)[: gate.size // 2 + 1])
    small = autosparse.compact(net)
    assert flops.fraction(flops.kept_now(state)) * flops.dense == pytest.approx(
        count_flops(small, inputs), rel=1e-9
    )
    assert params.fraction(params.kept_now(state)) * params.dense == pytest.approx(
        count_params(small), rel=1e-9
    )


# ----------------------------------------------------------------------------- the controller and the budget


def test_controller_reference_and_direction() -> None:
    c = Controller(target=0.4, start=10, ramp_end=110)
    assert c.reference(0) == 1.0 and c.reference(10) == 1.0 and c.reference(110) == pytest.approx(0.4)
    assert c.reference(60) == pytest.approx(0.4 + 0.6 * 0.5**3)
    refs = [c.reference(t) for t in range(0, 200, 5)]
    assert all(a >= b for a, b in zip(refs, refs[1:]))
    assert c.update(5, 1.0) == 1.0  # before the ramp: no action
    up = c.update(60, 0.9)  # over the reference: lambda rises
    assert up > 1.0
    c2 = Controller(target=0.4, start=10, ramp_end=110)
    assert c2.update(120, 0.2) < 1.0  # under budget: lambda falls


def test_enforce_closes_units_until_the_budget_holds() -> None:
    net, _ = _net({"rules": [{"granularity": "channel", "min_keep": 2}], "target": {"flops": 0.3}})
    state = net._autosparse
    cost = training.training_state(net).costs["flops"]
    closed = enforce(state, cost, 0.3)
    assert closed and cost.fraction(cost.kept_now(state)) <= 0.3
    assert min(g.kept() for g in autosparse.gates(net).values()) >= 2


def test_budget_lands_within_tolerance_on_digits() -> None:
    data = load_digits()
    torch.manual_seed(0)
    model = wide_cnn(1, 10, (8, 16, 16))
    steps = 6 * math.ceil(len(data.x_train) / 16)  # the controller needs a few hundred steps
    example = (data.x_test[:16],)
    net = autosparse.sparsify(model, budget_policy(0.4, steps), example_inputs=example)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(net, data, epochs=6, batch_size=16)
    finally:
        torch.set_num_threads(threads)
    before_freeze = training.training_state(net).last["flops"]  # the controller alone, before freeze
    small = autosparse.compact(net)
    landed = count_flops(small, example) / count_flops(model, example)
    assert before_freeze <= 0.6  # the controller did most of the way from 1.0 (gates close at a finite pace)
    assert 0.35 <= landed <= 0.4 + 1e-9  # within tolerance, and never over budget
    accuracy = float((small(data.x_test).argmax(1) == data.y_test).float().mean())
    assert accuracy > 0.95


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"penalty": {"lambda": 0.0}}, "penalty.lambda"),
        ({"penalty": {"lambda": -1e-3}}, "penalty.lambda"),
        ({"penalty": {"p": 1.0}}, "penalty.p"),
        ({"penalty": {"p": 0.0}}, "penalty.p"),
        ({"schedule": {"warmup_steps": 100, "freeze_step": 50}}, "schedule.freeze_step"),
        ({"schedule": {"warmup_steps": 100, "freeze_step": 100}}, "schedule.freeze_step"),
        ({"target": {"flops": 1.5}}, "target.flops"),
        ({"target": {"flops": 0.5, "params": 0.5}}, "target.params"),
    ],
)
def test_bad_training_settings_name_the_key(override: dict, key: str) -> None:
    with pytest.raises(PolicyError, match=key.replace(".", r"\.")):
        _net({"rules": [{"granularity": "channel"}], **override})


@pytest.mark.parametrize("metric", ["flops", "params"])
def test_unreachable_budget_names_the_key(metric: str) -> None:
    policy = {"rules": [{"granularity": "channel", "min_keep": 0.75}], "target": {metric: 0.2}}
    net, _ = _net(policy)
    with pytest.raises(PolicyError, match=rf"target\.{metric}.*min_keep"):
        autosparse.penalty(net)
    with pytest.raises(PolicyError, match=rf"target\.{metric}"):
        training.attach(net)


def test_history_is_thinned_not_unbounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training.schedule, "HISTORY", 5)
    net, _ = _net()
    for _ in range(40):
        training.step(net)
    tr = training.training_state(net)
    steps = [int(r["step"]) for r in tr.history]
    assert len(steps) <= 10 and steps == sorted(steps) and tr.last["step"] == 40
    assert all(s % tr.stride == 0 for s in steps[-3:])


# ----------------------------------------------------------------------------- the alternative gate


def _use_hard_concrete(net: nn.Module) -> None:
    """Swap every gate of a sparsified model for a hard-concrete one (what gate.kind will select)."""
    from autosparse.gating.gate import GateSite
    from autosparse.gating.hard_concrete import HardConcreteGate

    state = net._autosparse
    new = {
        id(g): HardConcreteGate(
            g.name, g.granularity, g.size, modules=g.modules_controlled, penalty_weight=g.penalty_weight
        )
        for g in state.gates
    }
    for module in net.modules():
        if isinstance(module, GateSite):
            module.gates[:] = [new[id(g)] for g in module.gates]
            for name, child in list(module.named_children()):
                if id(child) in new:
                    setattr(module, name, new[id(child)])
    state.gates[:] = [new[id(g)] for g in state.gates]


def test_hard_concrete_gate_is_exact_when_fresh_and_samples_only_in_training() -> None:
    from autosparse.gating.hard_concrete import HardConcreteGate

    gate = HardConcreteGate("g", "channel", 64).eval()  # in training mode it samples, like dropout
    assert torch.equal(gate.values(), torch.ones(64)) and gate.kept() == 64
    torch.manual_seed(0)
    with torch.no_grad():
        gate.gamma.fill_(0.0)
    sampled = gate.train().values()
    assert sampled.min() == 0.0 and sampled.max() == 1.0 and len(torch.unique(sampled)) > 10
    assert torch.equal(gate.eval().values(), torch.full((64,), 0.5))
    assert gate.penalty(0.5).item() == pytest.approx(
        64 * torch.sigmoid(torch.tensor(2 / 3 * math.log(11))).item()
    )
    gate.train()
    with torch.no_grad():
        assert torch.equal(gate.values(), torch.full((64,), 0.5))  # bookkeeping never samples


def test_hard_concrete_gates_train_to_a_budget_and_compact_exactly() -> None:
    data = load_digits()
    torch.manual_seed(0)
    model = wide_cnn(1, 10, (8, 16, 16))
    example = (data.x_test[:16],)
    net = autosparse.sparsify(
        model, budget_policy(0.5, 4 * math.ceil(len(data.x_train) / 32)), example_inputs=example
    )
    _use_hard_concrete(net)
    fit(net, data, epochs=4, batch_size=32, gate_lr=0.05)
    small = autosparse.compact(net)  # verifies equality with the (deterministic, eval-mode) gated model
    assert count_flops(small, example) <= 0.5 * count_flops(model, example)
    assert float((small(data.x_test).argmax(1) == data.y_test).float().mean()) > 0.8


def test_policy_gate_kind_selects_the_hard_concrete_gate():
    from tests.zoo import get_case

    model, inputs = get_case("plain").build()
    policy = {"rules": [{"granularity": "channel"}], "gate": {"kind": "hard_concrete"}}
    net = autosparse.sparsify(model, policy, example_inputs=inputs)
    gates = autosparse.gates(net).values()
    assert gates and all(isinstance(g, autosparse.HardConcreteGate) for g in gates)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net(*inputs), model(*inputs), atol=1e-5)  # deterministic and open in eval
