"""Input gating (gating.gate.fast_paths): a consumer whose input is smaller than its weight multiplies the
input by the gate instead of the weight. It must compute the same outputs and gradients as weight
gating, switch itself off where it does not apply, and never leak out of the consumer's forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autosparse
from autosparse.gating.gate import GateSite, _GatedForward, remove_input_gating
from autosparse.state import get_state
from tests.zoo import CHANNEL


def _conv(n: int, cin: int, cout: int, **kw) -> nn.Module:
    return getattr(nn, f"Conv{n}d")(cin, cout, 3, padding=1, **kw)


# (name, model, input): the consumer of the gated units reads a small activation and a large weight.
CASES = {
    "linear_2d": (lambda: nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                        nn.Linear(64, 8)), (2, 16)),
    "linear_tokens": (lambda: nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 48), nn.GELU(),
                                            nn.Linear(48, 8)), (2, 3, 16)),
    "conv1d": (lambda: nn.Sequential(_conv(1, 3, 32), nn.ReLU(), _conv(1, 32, 32), nn.ReLU(),
                                     _conv(1, 32, 8)), (2, 3, 4)),
    "conv2d_reflect": (lambda: nn.Sequential(_conv(2, 3, 32), nn.BatchNorm2d(32), nn.ReLU(),
                                             _conv(2, 32, 32, padding_mode="reflect"), nn.ReLU(),
                                             _conv(2, 32, 8)), (2, 3, 3, 3)),
    "conv3d": (lambda: nn.Sequential(_conv(3, 2, 16), nn.ReLU(), _conv(3, 16, 16), nn.ReLU(),
                                     _conv(3, 16, 4)), (1, 2, 2, 2, 2)),
}


def _gated(case: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = CASES[case]
    torch.manual_seed(seed)
    x = torch.randn(*shape)
    net = autosparse.sparsify(factory(), CHANNEL, example_inputs=(x,))
    with torch.no_grad():  # uneven gates with exact zeros: the interesting case for both paths
        for gate in autosparse.gates(net).values():
            gate.gamma.normal_(0.0, 0.5)
            gate.zero_([0])
    return net.train(), x


def _weight_gated_twin(net: nn.Module) -> nn.Module:
    twin = copy.deepcopy(net)
    for module in twin.modules():
        remove_input_gating(module)
    return twin


def _input_gated_calls(net: nn.Module) -> list[bool]:
    """Record, per consumer call, whether it multiplied its input (it then never read its weight
    through the site)."""
    seen: list[bool] = []
    for module in net.modules():
        chain = module.parametrizations["weight"] if hasattr(module, "parametrizations") else []
        site = next((s for s in chain if isinstance(s, GateSite) and s.dim == 1), None)
        if site is None:
            continue
        reads: list[int] = []

        def spy(weight, s=site, reads=reads):  # an instance attribute: the fast paths call site.forward
            reads.append(1)
            return GateSite.forward(s, weight)

        site.forward = spy
        module.register_forward_pre_hook(lambda m, a, r=reads: r.clear())
        module.register_forward_hook(lambda m, a, o, r=reads: seen.append(not r))
    return seen


@pytest.mark.parametrize("case", sorted(CASES))
def test_input_gating_matches_weight_gating(case: str) -> None:
    net, x = _gated(case)
    get_state(net)  # installs the hooks, as penalty / gates / training.step do
    twin = _weight_gated_twin(net)
    seen = _input_gated_calls(net)
    out, ref = net(x), twin(x)
    assert seen and all(seen), "every consumer should have gated its (smaller) input"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (out.square().sum() + autosparse.penalty(net)).backward()
    (ref.square().sum() + autosparse.penalty(twin)).backward()
    grads = dict(twin.named_parameters())
    for name, param in net.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any("gamma" in name and p.grad.abs().sum() > 0 for name, p in net.named_parameters())


def test_weight_stays_gated_outside_the_forward_and_after_errors() -> None:
    net, x = _gated("conv2d_reflect")
    get_state(net)
    conv = net[3]
    site = conv.parametrizations.weight[0]
    expected = conv.parametrizations.weight.original * site.multiplier()
    seen = _input_gated_calls(net)
    net(x)
    assert seen == [True, True]
    torch.testing.assert_close(conv.weight, expected, rtol=0, atol=0)  # other readers see W * g
    with pytest.raises(RuntimeError):
        conv(torch.randn(1, 32, 1, 1))  # reflect padding of a 1x1 map fails inside the forward
    torch.testing.assert_close(conv.weight, expected, rtol=0, atol=0)


def test_large_inputs_and_tracing_keep_weight_gating() -> None:
    net, _ = _gated("conv2d_reflect")
    get_state(net)
    seen = _input_gated_calls(net)
    net(torch.randn(8, 3, 32, 32))  # activations now larger than the weights
    assert seen and not any(seen)
    traced = torch.fx.symbolic_trace(net)  # hooks see Proxies: they must stand aside, not fail
    torch.testing.assert_close(traced(torch.randn(2, 3, 3, 3)).shape, torch.Size([2, 8, 3, 3]))


def test_hooks_survive_copies_and_leave_with_compaction() -> None:
    net, x = _gated("linear_tokens")
    get_state(net)
    copied = copy.deepcopy(net)
    forwards = [m.__dict__["forward"] for m in copied.modules() if "forward" in m.__dict__]
    assert forwards and all(isinstance(f, _GatedForward) and f.module.forward is f for f in forwards)
    seen = _input_gated_calls(copied)
    torch.testing.assert_close(copied(x), net(x))
    assert seen and all(seen)
    small = autosparse.compact(net.eval())
    assert not any("forward" in m.__dict__ for m in small.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in small.modules())
    torch.testing.assert_close(small(x), net(x), rtol=1e-5, atol=1e-6)


def test_site_with_one_whole_gate_reads_its_values_directly() -> None:
    from autosparse.gating.gate import Gate

    gate, other = Gate("a", "channel", 4), Gate("b", "channel", 2)
    with torch.no_grad():
        gate.gamma.copy_(torch.tensor([0.3, -2.0, 0.1, 0.5]))
    whole = GateSite([gate], torch.arange(4).numpy(), 1, 2)
    mixed = GateSite([gate, other], torch.tensor([0, 1, 2, 3, 6, 4]).numpy(), 1, 2)  # 6: no gate
    assert whole.whole and not mixed.whole
    torch.testing.assert_close(whole.multiplier(), gate.values().view(1, -1), rtol=0, atol=0)
    torch.testing.assert_close(mixed.values(), torch.cat([gate.values(), torch.ones(1), other.values()[:1]]))
