"""The zoo itself: every case builds deterministically, runs, and its ``traceable`` / ``exportable`` flags are true.

The Hugging Face cases are tiny (random weights, nothing downloaded) and run in CI; they are skipped only
where ``transformers`` is not installed.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from tests.zoo import (
    ALL_CASES,
    CNN_CASES,
    FAMILIES,
    HF_CNN_CASES,
    HF_TRANSFORMER_CASES,
    TRANSFORMER_CASES,
    ZooCase,
    get_case,
    output_tensors,
)

CASES = [pytest.param(case, id=case.name) for case in ALL_CASES]


@functools.cache
def _built(name: str) -> tuple[nn.Module, tuple]:
    """One shared build per case; the tests below only read the model."""
    case = get_case(name)
    if case.family.startswith("hf-"):
        pytest.importorskip("transformers")
    return case.build()


def _outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return output_tensors(model(*inputs))


def _assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], atol: float) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=atol, rtol=0.0)


def test_case_lists_are_consistent() -> None:
    lists = {
        "cnn": CNN_CASES,
        "hf-cnn": HF_CNN_CASES,
        "transformer": TRANSFORMER_CASES,
        "hf-transformer": HF_TRANSFORMER_CASES,
    }
    assert set(lists) == FAMILIES
    for family, cases in lists.items():
        assert cases and all(case.family == family for case in cases)
    assert ALL_CASES == [case for cases in lists.values() for case in cases]
    assert len({case.name for case in ALL_CASES}) == len(ALL_CASES)
    assert get_case("plain") is CNN_CASES[0]
    with pytest.raises(KeyError, match="known cases"):
        get_case("no-such-model")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("family", "rnn", "family 'rnn'"), ("tags", frozenset({"bogus"}), "unknown tags")],
)
def test_zoo_case_validates(field: str, value: object, match: str) -> None:
    kwargs = {"name": "x", "build": lambda: (nn.Identity(), ()), "family": "cnn", "traceable": True}
    with pytest.raises(ValueError, match=match):
        ZooCase(**{**kwargs, field: value})


@pytest.mark.parametrize("case", CASES)
def test_builds_deterministically_and_runs(case: ZooCase) -> None:
    model, inputs = _built(case.name)
    again, inputs_again = case.build()
    assert not any(m.training for m in model.modules())
    for x, y in zip(inputs, inputs_again, strict=True):
        assert torch.equal(x, y)
    reference = model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in again.state_dict().items())
    outputs = _outputs(model, inputs)
    assert outputs and all(torch.isfinite(t).all() for t in outputs if t.is_floating_point())
    _assert_close(_outputs(again, inputs), outputs, atol=0.0)


@pytest.mark.parametrize("case", CASES)
def test_batchnorm_statistics_are_not_trivial(case: ZooCase) -> None:
    model, _ = _built(case.name)
    for name, bn in model.named_modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)), name
            assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var)), name
            assert not torch.equal(bn.weight, torch.ones_like(bn.weight)), name


@pytest.mark.parametrize("case", CASES)
def test_traceable_flag(case: ZooCase) -> None:
    model, inputs = _built(case.name)
    if not case.traceable:
        with pytest.raises(Exception):  # noqa: B017, PT011 - fx fails in many ways; any failure confirms the flag
            torch.fx.symbolic_trace(model)
        return
    traced = torch.fx.symbolic_trace(model)
    _assert_close(_outputs(traced, inputs), _outputs(model, inputs), atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_exportable_flag(case: ZooCase) -> None:
    model, inputs = _built(case.name)
    if not case.exportable:
        with pytest.raises(Exception):  # noqa: B017, PT011 - export fails in many ways; any failure confirms the flag
            torch.export.export(model, inputs, strict=False)
        return
    exported = torch.export.export(model, inputs, strict=False)
    _assert_close(_outputs(exported.module(), inputs), _outputs(model, inputs), atol=1e-5)
