"""Dtypes, devices, modes and independence: sparsify and compact keep everything the user set.

- fp16 / bf16 models keep their dtype through sparsify and compact; gates compute in fp32.
- training/eval flags, ``requires_grad`` flags and BatchNorm running statistics are preserved
  (statistics are sliced, never recomputed); parameters stay on their device.
- two sparsified copies of one model (or a deep copy of a gated model) share no gate state.
- a CUDA run (marker ``gpu``) is skipped where no GPU is present.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autosparse
from tests.zoo import CHANNEL, run_no_grad, sparsify_quietly

HALF = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        return self.head(torch.relu(self.body(x)).mean((2, 3)))


def _x(dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)


def _sparsify(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return sparsify_quietly(model, CHANNEL, (x,))


def _zero(net: nn.Module, units: list[int]) -> None:
    for gate in autosparse.gates(net).values():
        gate.zero_(units)


def _own(net: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own parameters (not the gates), by their plain name."""
    out = {}
    for name, p in net.named_parameters():
        if ".parametrizations." in name and not name.endswith(".original"):
            continue
        out[name.replace(".parametrizations.", ".").removesuffix(".original")] = p
    return out


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_model_keeps_its_dtype(dtype: torch.dtype) -> None:
    x = _x(dtype)
    net = _sparsify(Net().to(dtype).eval(), x)
    assert {p.dtype for p in _own(net).values()} == {dtype}
    for gate in autosparse.gates(net).values():
        assert gate.gamma.dtype == torch.float32 and gate.values().dtype == torch.float32
    _zero(net, [0, 3, 5])
    gated = run_no_grad(net, x)
    small = autosparse.compact(net)
    assert {p.dtype for p in small.parameters()} == {dtype}
    assert small.bn.running_mean.dtype == dtype and small.bn.running_mean.shape == (5,)
    out = run_no_grad(small, x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), gated.float(), atol=2e-2 * float(gated.abs().max()), rtol=0)


@pytest.mark.parametrize("dtype", HALF)
def test_gates_compute_in_fp32_even_when_cast(dtype: torch.dtype) -> None:
    """A user who casts the whole gated model still gets fp32 gate values (softmax over many units)."""
    net = _sparsify(Net().eval(), _x())
    net.to(dtype)
    for gate in autosparse.gates(net).values():
        assert gate.values().dtype == torch.float32
        torch.testing.assert_close(gate.values(), torch.ones(gate.size))


def test_autocast_training_step_gives_fp32_gate_gradients() -> None:
    net = _sparsify(Net(), _x())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net(_x()).float().square().mean() + autosparse.penalty(net)
    loss.backward()
    for gate in autosparse.gates(net).values():
        assert gate.gamma.grad is not None and gate.gamma.grad.dtype == torch.float32
        assert torch.isfinite(gate.gamma.grad).all()


def test_compact_after_casting_the_gated_model() -> None:
    net = _sparsify(Net().eval(), _x())
    net.to(torch.bfloat16)
    _zero(net, [0, 3])
    small = autosparse.compact(net)
    assert {p.dtype for p in small.parameters()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- modes, flags, buffers
def test_modes_grad_flags_and_buffers_are_preserved() -> None:
    model = Net().train()
    model.body.eval()
    model.stem.bias.requires_grad_(False)
    stats = (model.bn.running_mean.clone(), model.bn.running_var.clone(), int(model.bn.num_batches_tracked))
    net = _sparsify(model, _x())
    modes = {name: m.training for name, m in model.named_modules()}
    assert {name: m.training for name, m in net.named_modules() if name in modes} == modes
    assert not _own(net)["stem.bias"].requires_grad and _own(net)["stem.weight"].requires_grad
    assert torch.equal(net.bn.running_mean, stats[0]) and torch.equal(net.bn.running_var, stats[1])
    assert int(net.bn.num_batches_tracked) == stats[2], "capture must not run BatchNorm in training mode"
    _zero(net, [1, 2])
    small = autosparse.compact(net)
    assert {name: m.training for name, m in small.named_modules()} == modes
    assert not small.stem.bias.requires_grad and small.stem.weight.requires_grad
    kept = [i for i in range(8) if i not in (1, 2)]
    assert torch.equal(small.bn.running_mean, stats[0][kept])
    assert torch.equal(small.bn.running_var, stats[1][kept])


def test_parameters_stay_on_their_device() -> None:
    net = _sparsify(Net(), _x())
    devices = {p.device for p in net.parameters()} | {b.device for b in net.buffers()}
    small = autosparse.compact(net)
    assert devices == {torch.device("cpu")}
    assert {p.device for p in small.parameters()} == devices


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sparsify_train_compact() -> None:
    x = _x(device="cuda")
    net = _sparsify(Net().cuda(), x)
    assert {p.device.type for p in net.parameters()} == {"cuda"}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (net(x).square().mean() + autosparse.penalty(net)).backward()
        opt.step()
    _zero(net, [0, 3])
    net.eval()
    gated = run_no_grad(net, x)
    small = autosparse.compact(net)
    assert {p.device.type for p in small.parameters()} == {"cuda"}
    torch.testing.assert_close(run_no_grad(small, x), gated, atol=1e-5 * float(gated.abs().max()), rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_half_precision() -> None:
    x = _x(torch.float16, "cuda")
    net = _sparsify(Net().cuda().half().eval(), x)
    _zero(net, [0, 3])
    small = autosparse.compact(net)
    assert {(p.device.type, p.dtype) for p in small.parameters()} == {("cuda", torch.float16)}


# ----------------------------------------------------------------------------- independence
def test_two_sparsified_copies_share_no_gate_state() -> None:
    model, x = Net().eval(), _x()
    ref = run_no_grad(model, x)
    net1, net2 = _sparsify(model, x), _sparsify(model, x)
    g1, g2 = autosparse.gates(net1), autosparse.gates(net2)
    assert g1.keys() == g2.keys()
    for name in g1:
        assert g1[name] is not g2[name]
        assert g1[name].gamma.data_ptr() != g2[name].gamma.data_ptr()
    _zero(net1, [0, 1, 2])
    with torch.no_grad():
        next(iter(g1.values())).gamma.add_(1.0)
    torch.testing.assert_close(run_no_grad(net2, x), ref, atol=1e-6, rtol=0)
    assert all(g.kept() == g.size for g in g2.values())
    small1 = autosparse.compact(net1, inplace=True)  # folding net1's sites must not touch net2's
    assert small1 is net1
    torch.testing.assert_close(run_no_grad(net2, x), ref, atol=1e-6, rtol=0)
    _zero(net2, [4])
    autosparse.compact(net2)


def test_deep_copy_of_a_gated_model_is_independent() -> None:
    x = _x()
    net = _sparsify(Net().eval(), x)
    ref = run_no_grad(net, x)
    twin = copy.deepcopy(net)
    _zero(twin, [0, 1, 2, 3])
    assert not torch.allclose(run_no_grad(twin, x), ref), "the copy's own gates must drive the copy's forward"
    torch.testing.assert_close(run_no_grad(net, x), ref, atol=0, rtol=0)
    assert all(g.kept() == g.size for g in autosparse.gates(net).values())
    small = autosparse.compact(twin)
    assert small.stem.out_channels == 4 and small.body.out_channels == 4


def test_verification_runs_in_full_fp32_and_restores_the_tf32_flags() -> None:
    # On CUDA, convs default to TF32, whose rounding differs between a conv and its slimmer copy
    # (a 3e-5 "difference" on a DenseNet on an H200): compact() verifies with TF32 off, then restores.
    x = _x()
    net = _sparsify(Net(), x)
    for gate in autosparse.gates(net).values():
        gate.zero_([0])
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        autosparse.compact(net)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, before[1])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before[0]


def test_export_capture_works_without_the_stack_trace_switch(monkeypatch) -> None:
    # torch.fx.config.do_not_emit_stack_traces is recent (absent in torch 2.11): capture must not need it.
    from autosparse import capture as capture_module
    from tests.zoo import get_case

    monkeypatch.setattr(capture_module, "_STACK_TRACE_SWITCH", "a_switch_this_torch_does_not_have")
    model, inputs = get_case("hf_bert").build()
    assert capture_module.capture(model, inputs).kind == "export"
