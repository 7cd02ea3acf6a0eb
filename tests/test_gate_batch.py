"""Batched gate values (autosparse.gate_batch): one computation per forward, same values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils import parametrize

import autosparse
from autosparse.gating.batch import _StartForward, unbatch_gates
from tests.zoo import get_case, output_tensors

POLICY = {"rules": [{"granularity": "channel"}, {"granularity": "head"}]}


def _gated(name: str = "resnet_bottleneck"):
    model, inputs = get_case(name).build()
    net = autosparse.sparsify(model, POLICY, example_inputs=inputs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in autosparse.gates(net).values():
            gate.gamma.normal_(0, 1, generator=g)  # unequal shares: some units off, others scaled
            gate.zero_([0])
    return net, inputs


def _grads(net, inputs) -> dict[str, torch.Tensor]:
    net.zero_grad(set_to_none=True)
    net.train()
    torch.manual_seed(0)
    out = net(*inputs)
    output_tensors(out)[0].square().mean().backward()
    return {name: gate.gamma.grad.clone() for name, gate in autosparse.gates(net).items()}


@pytest.mark.parametrize("name", ["resnet_bottleneck", "hf_llama"])
def test_batched_values_and_gradients_equal_the_per_gate_ones(name):
    net, inputs = _gated(name)
    lent = {}
    probe = net.register_forward_pre_hook(lambda m, a: lent.update(
        {n: g.values().detach().clone() for n, g in autosparse.gates(net).items()}))
    batched = _grads(net, inputs)
    probe.remove()
    alone = copy.deepcopy(net)
    unbatch_gates(alone)
    for n, gate in autosparse.gates(alone).items():
        expected = gate.values().detach()
        assert torch.allclose(lent[n], expected, rtol=1e-6, atol=1e-7), n
        assert torch.equal(lent[n] == 0, expected == 0), f"{n}: a unit is off in one path only"
    for n, grad in _grads(alone, inputs).items():
        assert torch.allclose(batched[n], grad, rtol=1e-4, atol=1e-8), n


def test_gates_are_lent_only_during_a_forward_even_when_it_fails():
    net, inputs = _gated()
    gates = list(autosparse.gates(net).values())
    net(*inputs)
    assert all(g.__dict__.get("_lent") is None for g in gates)
    with pytest.raises(RuntimeError):
        net(torch.randn(2, 5, 8, 8))  # wrong channel count: fails inside the forward
    assert all(g.__dict__.get("_lent") is None for g in gates)


def test_copies_hold_their_own_gates_and_compaction_removes_the_hooks():
    net, inputs = _gated()
    twin = copy.deepcopy(net)
    hook = next(h for h in twin._forward_pre_hooks.values() if isinstance(h, _StartForward))
    assert {id(g) for g in hook.gates} == {id(g) for g in autosparse.gates(twin).values()}
    small = autosparse.compact(net)
    assert not any(isinstance(h, _StartForward) for h in small._forward_pre_hooks.values())
    assert any(isinstance(h, _StartForward) for h in net._forward_pre_hooks.values())  # the gated model keeps them


def test_library_verbs_see_through_torch_compile():
    net, inputs = _gated()
    compiled = torch.compile(net)  # not run here: the wrapper alone must expose the gates
    assert autosparse.gates(compiled) == autosparse.gates(net)
    assert autosparse.penalty(compiled).item() == autosparse.penalty(net).item()


def test_batched_penalty_equals_the_per_gate_sum_with_the_same_gradients():
    net, _ = _gated("hf_llama")  # heads and channels: rows of different lengths
    gates = list(autosparse.gates(net).values())
    with torch.no_grad():
        gates[0].gamma[0] = -200.0  # a share that underflows to 0 must not turn the gradient into nan
    batched = autosparse.penalty(net)
    batched.backward()
    got = [g.gamma.grad.clone() for g in gates]
    for g in gates:
        g.gamma.grad = None
    from autosparse.training import current_lambda, training_state

    lam, weights = current_lambda(net), training_state(net).weights
    p = autosparse.state.get_state(net).policy.penalty.p
    alone = sum(lam * w * g.penalty(p) for g, w in zip(gates, weights))
    alone.backward()
    assert torch.allclose(batched, alone, rtol=1e-6)
    for g, grad in zip(gates, got):
        assert torch.isfinite(grad).all()
        assert torch.allclose(grad, g.gamma.grad, rtol=1e-5, atol=1e-10), g.name


def _reference_grads(net, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients through torch's own parametrization path, each gate computed alone:
    under ``parametrize.cached()`` the lean getters and the gated forwards of ``fast_paths`` stand aside."""
    unbatch_gates(net)
    net.zero_grad(set_to_none=True)
    with parametrize.cached():
        out = output_tensors(net(*inputs))[0]
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["resnet_bottleneck", "hf_bert", "hf_llama", "conv1d"])
def test_fast_paths_equal_torch_parametrization_in_values_and_gradients(name):
    net, inputs = _gated(name)
    net.train()
    twin = copy.deepcopy(net)
    net.zero_grad(set_to_none=True)
    out = output_tensors(net(*inputs))[0]
    out.square().mean().backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    ref_out, ref_grads = _reference_grads(twin, inputs)
    torch.testing.assert_close(out.detach(), ref_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and any("gamma" in n for n in grads)
    for n, grad in grads.items():  # gammas and the weights under the gates (parametrizations...original)
        torch.testing.assert_close(grad, ref_grads[n], rtol=1e-4, atol=1e-7, msg=n)


def test_fast_paths_keep_torch_parametrize_structure():
    model, inputs = get_case("resnet_bottleneck").build()
    keys = set(autosparse.sparsify(copy.deepcopy(model), POLICY, example_inputs=inputs).state_dict())
    net = autosparse.sparsify(model, POLICY, example_inputs=inputs)
    assert set(net.state_dict()) == keys and any(k.endswith("parametrizations.weight.original") for k in keys)
    owner = next(m for m in net.modules() if parametrize.is_parametrized(m, "weight") and "forward" in m.__dict__)
    gated = owner.weight.detach().clone()
    parametrize.remove_parametrizations(owner, "weight", leave_parametrized=True)
    assert not parametrize.is_parametrized(owner)
    assert torch.equal(owner.weight, gated)


def test_gated_forward_has_no_graph_break_under_torch_compile():
    net, inputs = _gated()
    net.train()
    torch._dynamo.reset()
    report = torch._dynamo.explain(net)(*inputs)
    assert report.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in report.break_reasons]
