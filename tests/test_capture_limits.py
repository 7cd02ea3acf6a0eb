"""Graph capture works where users set models up, and fails loudly with the fix where it cannot.

Users of tracer-based pruning tools hit graphs silently empty when setup runs under ``no_grad``,
tokenizer dict inputs that cannot be passed as example inputs, and torch.fx errors on control flow.
``sparsify`` must give a trainable model under ``no_grad`` and ``inference_mode``, a typed error naming
what to pass for dict inputs, a torch.export fallback for shape-dependent control flow, and a capture
error naming the fix (the model untouched) for value-dependent control flow. Models wrapped in
DistributedDataParallel are covered in test_ddp.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import autosparse
from tests import zoo
from tests.zoo import CHANNEL, classifier, conv_bn, get_case, images, rel_diff, run_no_grad


# ----------------------------------------------------------------------------- no_grad and inference_mode
def test_sparsify_under_no_grad_finds_the_same_groups_and_trains():
    # graphs silently empty when built under no_grad (TP #178)
    model, inputs = get_case("resnet_basic").build()
    outside = autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    with torch.no_grad():
        inside = autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    sizes = {name: g.size for name, g in autosparse.gates(outside).items()}
    assert len(sizes) == 4 and {name: g.size for name, g in autosparse.gates(inside).items()} == sizes
    inside.train()
    (inside(*inputs).square().mean() + autosparse.penalty(inside)).backward()
    assert all(float(g.gamma.grad.abs().sum()) > 0 for g in autosparse.gates(inside).values())


def test_sparsify_under_inference_mode_gives_a_trainable_model():
    # setup code run under a grad-disabling context must not break training (TP #178)
    model, inputs = get_case("plain").build()
    with torch.inference_mode():
        net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    assert not any(p.is_inference() for p in net.parameters())
    net.train()
    (net(*inputs).square().mean() + autosparse.penalty(net)).backward()
    assert all(g.gamma.grad is not None for g in autosparse.gates(net).values())


# ----------------------------------------------------------------------------- dict inputs
def test_tokenizer_dict_inputs_get_a_typed_error_that_says_what_to_pass():
    # dict inputs; best practice: PEFT's one line that keeps the model usable as before
    model, (ids,) = get_case("hf_bert").build()
    encoded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with pytest.raises(autosparse.ExampleInputsError) as info:
        autosparse.sparsify(model, CHANNEL, example_inputs=encoded)
    assert isinstance(info.value, autosparse.AutosparseError) and isinstance(info.value, ValueError)
    advice = "example_inputs=(inputs['input_ids'], inputs['attention_mask'])"
    assert advice in str(info.value)
    net = autosparse.sparsify(model, CHANNEL, example_inputs=(encoded["input_ids"], encoded["attention_mask"]))
    assert type(net) is type(model) and net.config.to_dict() == model.config.to_dict()
    before, after = run_no_grad(model, **encoded), run_no_grad(net, **encoded)  # called exactly as before
    assert rel_diff(before, after) <= 1e-6


# ----------------------------------------------------------------------------- control flow
class ShapeBranch(nn.Module):
    """Control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = conv_bn(3, 8), conv_bn(8, 8), classifier(width=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 8:
            x = F.avg_pool2d(x, 2)
        return self.head(self.b(self.a(x)))


class ValueBranch(ShapeBranch):
    """Control flow on a value: no tracer can capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if y.mean() > 0:
            y = self.b(y)
        return self.head(y)


def test_shape_dependent_control_flow_falls_back_to_torch_export():
    # torch.fx control-flow errors (transformers #31200)
    model, inputs = zoo._build(ShapeBranch, images())
    report = autosparse.explain(model, example_inputs=inputs)
    assert report.capture_kind == "export"
    assert {g.name: g.units for g in report.groups} == {"a.0": 8, "b.0": 8}


def test_value_dependent_control_flow_is_a_capture_error_naming_the_fix():
    # torch.fx control-flow errors (transformers #31200)
    model, inputs = zoo._build(ValueBranch, images())
    with pytest.raises(autosparse.CaptureError) as info:
        autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError) and "could not capture ValueBranch" in message
    assert "torch.fx.symbolic_trace" in message and "torch.export" in message
    assert "Make data-dependent control flow static" in message
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


class _NumpyScale(torch.autograd.Function):
    """A custom autograd.Function whose forward leaves torch: no tracer can follow it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.detach().numpy() * 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * 2


class NumpyFunctionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(_NumpyScale.apply(self.a(x)))


def test_capture_error_hint_fits_the_cause_not_always_control_flow():
    with pytest.raises(autosparse.CaptureError) as info:
        autosparse.sparsify(NumpyFunctionNet(), {"rules": [{"granularity": "channel"}]},
                            example_inputs=(torch.randn(1, 3, 8, 8),))
    message = str(info.value)
    assert "converts a tensor to NumPy" in message and "control flow" not in message
