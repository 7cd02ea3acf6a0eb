"""Bad input, nothing lost: every row is one mistake a user makes, the typed error it must raise, and
the words the message must contain (the key, module or value at fault). After each row the user's
model is compared with a snapshot: parameters, buffers, ``requires_grad`` and training flags, no
gates or parametrizations left behind.

Rows run against a dense model (``on="dense"``), a sparsified one (``on="gated"``: the gated model
must be unchanged) or nothing (``on="none"``, e.g. when the "model" is not a module at all).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import autosparse
from autosparse.errors import (
    AlreadySparsifiedError,
    AutosparseError,
    AutosparseWarning,
    CaptureError,
    EquivalenceError,
    ExampleInputsError,
    ModelTypeError,
    NoGatesError,
    NotSparsifiedError,
    PlanMismatchError,
    PolicyError,
    RegistryError,
)
from autosparse.io import load_gated_state
from autosparse.state import is_sparsified
from tests.zoo import get_case

CHANNEL = {"rules": [{"granularity": "channel"}]}


class Net(nn.Module):
    """Small CNN in training mode, with a frozen layer and one submodule in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)
        self.stem.weight.requires_grad_(False)
        with torch.no_grad():
            self.bn.running_mean.normal_()
        self.train()
        self.body.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        return self.head(torch.relu(self.body(x)).mean((2, 3)))


class DataDependent(nn.Module):
    """Control flow on tensor values: neither torch.fx nor torch.export can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y) if y.sum() > 0 else self.b(-y)


X = torch.randn(2, 3, 8, 8)


@dataclass
class Ctx:
    model: nn.Module
    net: nn.Module | None
    tmp: Path

    def yaml(self, text: str) -> str:
        path = self.tmp / "policy.yaml"
        path.write_text(text)
        return str(path)


def _sparsify_with(policy_of: Callable[[Ctx], Any], **kwargs: Any) -> Callable[[Ctx], Any]:
    return lambda c: autosparse.sparsify(c.model, policy_of(c), example_inputs=kwargs.pop("inputs", (X,)), **kwargs)


def rule(**fields: Any) -> Callable[[Ctx], Any]:
    """sparsify with one channel rule carrying ``fields``."""
    return _sparsify_with(lambda c: {"rules": [{"granularity": "channel", **fields}]})


def policy(**sections: Any) -> Callable[[Ctx], Any]:
    """sparsify with the channel rule plus top-level ``sections``."""
    return _sparsify_with(lambda c: {**CHANNEL, **sections})


def raw_policy(value: Any) -> Callable[[Ctx], Any]:
    return _sparsify_with(lambda c: value)


def yaml_policy(text: str) -> Callable[[Ctx], Any]:
    return _sparsify_with(lambda c: c.yaml(text))


def inputs(value: Any) -> Callable[[Ctx], Any]:
    return lambda c: autosparse.sparsify(c.model, CHANNEL, example_inputs=value)


def _wrong_gate_size(c: Ctx) -> None:
    state = c.net.state_dict()
    key = next(k for k in state if k.endswith(".gamma"))
    state[key] = torch.zeros(3)
    load_gated_state(c.net, state)


def _missing_gate(c: Ctx) -> None:
    state = {k: v for k, v in c.net.state_dict().items() if not k.endswith(".gamma")}
    load_gated_state(c.net, state)


def _other_model_weights(c: Ctx) -> None:
    state = c.net.state_dict()
    state["head.bias"] = torch.zeros(5)
    state = {k: (v + 1 if k.endswith("bn.bias") else v) for k, v in state.items()}
    load_gated_state(c.net, state)


@dataclass
class Row:
    name: str
    call: Callable[[Ctx], Any]
    error: type[Exception]
    match: str
    on: str = "dense"
    warns: str | None = None


ROWS = [
    # --- malformed YAML and policy files
    Row("yaml_bad_indent", yaml_policy("rules:\n  - granularity: channel\n   min_keep: 2\n"), PolicyError,
        r"policy\.yaml:\d+: malformed YAML"),
    Row("yaml_duplicate_key", yaml_policy("rules:\n  - granularity: channel\n    granularity: head\n"),
        PolicyError, r"duplicate key 'granularity'"),
    Row("yaml_empty_file", yaml_policy(""), PolicyError, r"the file is empty"),
    Row("yaml_missing_file", raw_policy("/nonexistent/policy.yaml"), PolicyError, r"'/nonexistent/policy\.yaml' not found"),
    Row("yaml_text_not_a_path", raw_policy("rules:\n  - granularity: channel\n"), PolicyError,
        r"strings are file paths"),
    Row("yaml_unknown_key_with_line", yaml_policy("rules:\n  - granularity: channel\npenalty:\n  lamda: 0.1\n"),
        PolicyError, r"policy\.yaml:4: penalty\.lamda: unknown key 'lamda'.*did you mean 'lambda'"),
    Row("yaml_bad_value_with_line", yaml_policy("rules:\n  - granularity: channel\n    round_to: 0\n"),
        PolicyError, r"policy\.yaml:3: rules\[0\]\.round_to: got 0"),
    # --- unknown keys, with a suggestion
    Row("unknown_top_key", raw_policy({"rule": [{"granularity": "channel"}]}), PolicyError,
        r"unknown key 'rule'.*did you mean 'rules'"),
    Row("unknown_rule_key", rule(min_kep=2), PolicyError, r"rules\[0\]\.min_kep.*did you mean 'min_keep'"),
    Row("unknown_gate_key", policy(gate={"tua": 0.3}), PolicyError, r"gate\.tua.*did you mean 'tau'"),
    Row("unknown_granularity", raw_policy({"rules": [{"granularity": "channels"}]}), PolicyError,
        r"rules\[0\]\.granularity.*did you mean 'channel'"),
    Row("unknown_gate_kind", policy(gate={"kind": "hardconcrete"}), PolicyError, r"did you mean 'hard_concrete'"),
    # --- wrong types
    Row("policy_not_a_mapping", raw_policy(3), PolicyError, r"got a int object"),
    Row("policy_list", raw_policy([CHANNEL]), PolicyError, r"got a list object"),
    Row("rules_mapping", raw_policy({"rules": {"granularity": "channel"}}), PolicyError,
        r"rules: .*expected a list of rules"),
    Row("granularity_number", raw_policy({"rules": [{"granularity": 3}]}), PolicyError, r"rules\[0\]\.granularity"),
    Row("modules_number", rule(modules=3), PolicyError, r"rules\[0\]\.modules: got 3"),
    Row("lambda_quoted", policy(penalty={"lambda": "1e-3"}), PolicyError, r"penalty\.lambda.*without quotes"),
    Row("min_keep_bool", rule(min_keep=True), PolicyError, r"rules\[0\]\.min_keep.*true/false is not a number"),
    Row("dotted_type_name", rule(types=["torch.nn.Conv2d"]), PolicyError, r"rules\[0\]\.types\[0\].*'Conv2d'"),
    # --- missing and out-of-range values
    Row("rules_empty", raw_policy({"rules": []}), PolicyError, r"rules: .*non-empty list"),
    Row("granularity_missing", raw_policy({"rules": [{"min_keep": 2}]}), PolicyError,
        r"rules\[0\]\.granularity: required key is missing"),
    Row("min_keep_zero", rule(min_keep=0), PolicyError, r"rules\[0\]\.min_keep: got 0"),
    Row("min_keep_fraction_over_one", rule(min_keep=1.5), PolicyError, r"rules\[0\]\.min_keep: got 1\.5"),
    Row("round_to_zero", rule(round_to=0), PolicyError, r"rules\[0\]\.round_to: got 0"),
    Row("penalty_weight_negative", rule(penalty_weight=-1), PolicyError, r"rules\[0\]\.penalty_weight: got -1"),
    Row("lambda_negative", policy(penalty={"lambda": -1.0}), PolicyError, r"penalty\.lambda: got -1\.0"),
    Row("p_out_of_range", policy(penalty={"p": 1.5}), PolicyError, r"penalty\.p: got 1\.5"),
    Row("tau_out_of_range", policy(gate={"tau": 1.0}), PolicyError, r"gate\.tau: got 1\.0"),
    Row("freeze_before_warmup", policy(schedule={"warmup_steps": 10, "freeze_step": 5}), PolicyError,
        r"schedule\.freeze_step: got 5"),
    Row("target_fraction_over_one", policy(target={"flops": 1.5}), PolicyError, r"target\.flops: got 1\.5"),
    Row("two_targets", policy(target={"flops": 0.5, "params": 0.5}), PolicyError, r"target\.params"),
    Row("version_2", policy(version=2), PolicyError, r"version: got 2"),
    Row("duplicate_rule_names", raw_policy({"rules": [{"granularity": "channel", "name": "a"},
                                                      {"granularity": "head", "name": "a"}]}),
        PolicyError, r"rules\[1\]\.name: got 'a'"),
    Row("exclude_everything", rule(exclude=["*"]), PolicyError, r"rules\[0\]\.exclude.*excludes everything"),
    # --- rules that match nothing, excluded-everything by name
    Row("rule_matches_no_module", rule(modules=["encoder.*"]), NoGatesError, r"no channel rule matches \['stem'\]",
        warns=r"rule 'rule0' \(channel\) matched no prunable group"),
    Row("modules_glob_matches_nothing", rule(modules=["stme*"]), NoGatesError,
        r"rules\[0\]\.modules glob 'stme\*' \(rule 'rule0'\) matched no module of Net; close names: 'stem'",
        warns=r"rules\[0\]\.modules glob 'stme\*' .* matched no module of Net"),
    Row("modules_glob_nothing_close", rule(modules=["encoder.*"]), NoGatesError,
        r"glob 'encoder\.\*' .* matched no module of Net; its modules include 'stem', 'bn', 'body', 'head'"),
    Row("rule_matches_no_type", rule(types=["LSTM"]), NoGatesError, r"selected no prunable group",
        warns=r"matched no prunable group"),
    Row("excluded_every_producer", rule(exclude=["stem", "body", "bn"]), NoGatesError,
        r"stem: rule 'rule0' excludes 'stem' \(exclude 'stem'\) so the group keeps its width"),
    Row("head_rule_on_cnn", raw_policy({"rules": [{"granularity": "head"}]}), NoGatesError,
        r"Prunable groups exist at granularity: channel"),
    Row("no_gates_inplace", lambda c: autosparse.sparsify(c.model, {"rules": [{"granularity": "head"}]},
                                                          example_inputs=(X,), inplace=True),
        NoGatesError, r"selected no prunable group"),
    # --- models and example inputs
    Row("model_is_a_function", lambda c: autosparse.sparsify(lambda x: x, CHANNEL, example_inputs=(X,)),
        ModelTypeError, r"expects a torch\.nn\.Module, got function", on="none"),
    Row("model_is_a_state_dict", lambda c: autosparse.sparsify(c.model.state_dict(), CHANNEL, example_inputs=(X,)),
        ModelTypeError, r"got OrderedDict"),
    Row("model_not_capturable", lambda c: autosparse.sparsify(DataDependent(), CHANNEL, example_inputs=(X,)),
        CaptureError, r"could not capture DataDependent", on="none"),
    Row("inputs_missing", inputs(None), ExampleInputsError, r"Net: example_inputs are required"),
    Row("inputs_wrong_shape", inputs((torch.randn(2, 4, 8, 8),)), ExampleInputsError, r"Net fails on .*\(2, 4, 8, 8\)"),
    Row("inputs_wrong_dtype", inputs((torch.ones(2, 3, 8, 8, dtype=torch.long),)), ExampleInputsError,
        r"Net fails on"),
    Row("inputs_wrong_type", inputs({"x": X}), ExampleInputsError,
        r"dict of keyword inputs \(x\).*example_inputs=\(inputs\[.x.\],\)"),
    Row("inputs_too_many", inputs((X, X)), ExampleInputsError, r"Net fails on .*positional argument"),
    Row("op_rule_bad_key", lambda c: autosparse.sparsify(c.model, CHANNEL, example_inputs=(X,), op_rules={3: print}),
        RegistryError, r"rule key 3"),
    Row("op_rule_bad_handler", lambda c: autosparse.sparsify(c.model, CHANNEL, example_inputs=(X,),
                                                             op_rules={torch.roll: lambda a, b: None}),
        RegistryError, r"rule for .*roll.*exactly one argument"),
    Row("sparsify_twice", lambda c: autosparse.sparsify(c.net, CHANNEL, example_inputs=(X,)), AlreadySparsifiedError,
        r"Net is already sparsified", on="gated"),
    # --- verbs that need gates, state dicts that do not fit
    Row("compact_without_gates", lambda c: autosparse.compact(c.model), NotSparsifiedError,
        r"Net has no autosparse gates"),
    Row("penalty_without_gates", lambda c: autosparse.penalty(c.model), NotSparsifiedError, r"Net has no autosparse"),
    Row("gates_of_a_tensor", lambda c: autosparse.gates(X), NotSparsifiedError, r"got Tensor", on="none"),
    Row("compact_twice", lambda c: autosparse.compact(autosparse.compact(c.net)), NotSparsifiedError,
        r"no autosparse gates", on="gated"),
    Row("gate_state_wrong_size", _wrong_gate_size, PlanMismatchError, r"gate '\w+' has 8 units .* 3 in the checkpoint",
        on="gated"),
    Row("gate_state_missing_gate", _missing_gate, PlanMismatchError, r"no gate for group", on="gated"),
    Row("gate_state_other_model", _other_model_weights, PlanMismatchError, r"'head\.bias' has shape \(4,\) in this model but \(5,\)",
        on="gated"),
    Row("zero_gate_out_of_range", lambda c: next(iter(autosparse.gates(c.net).values())).zero_([8]), IndexError,
        r"gate '\w+' has 8 units; got indices \[8\]", on="gated"),
    Row("explain_without_inputs", lambda c: autosparse.explain(c.model), ExampleInputsError,
        r"example_inputs are required"),
]


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "sparsified": is_sparsified(model),
        "parametrized": [k for k, m in model.named_modules() if parametrize.is_parametrized(m)],
    }


def _assert_same(model: nn.Module, before: dict[str, Any]) -> None:
    after = _snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"
    for field in ("grad", "training", "sparsified", "parametrized"):
        assert after[field] == before[field], field


def _gated() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutosparseWarning)
        return autosparse.sparsify(Net(), CHANNEL, example_inputs=(X,))


@pytest.mark.parametrize("row", [pytest.param(r, id=r.name) for r in ROWS])
def test_bad_input(row: Row, tmp_path: Path) -> None:
    ctx = Ctx(Net(), _gated() if row.on == "gated" else None, tmp_path)
    watched = ctx.net if row.on == "gated" else ctx.model
    before = _snapshot(watched)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(row.error) as info:
            row.call(ctx)
    message = str(info.value)
    assert re.search(row.match, message, re.S), f"{row.error.__name__} message does not match {row.match!r}: {message}"
    if row.error is not IndexError:
        assert isinstance(info.value, AutosparseError)
    if row.warns:
        shown = [str(w.message) for w in caught if issubclass(w.category, AutosparseWarning)]
        assert any(re.search(row.warns, m) for m in shown), shown
    if row.on != "none":
        _assert_same(watched, before)


def test_table_is_large_and_unique() -> None:
    assert len(ROWS) >= 30
    assert len({r.name for r in ROWS}) == len(ROWS)


def test_every_policy_error_is_a_value_error() -> None:
    assert issubclass(PolicyError, ValueError) and issubclass(NoGatesError, ValueError)
    assert issubclass(CaptureError, RuntimeError) and issubclass(EquivalenceError, RuntimeError)


# ----------------------------------------------------------------------------- verify names the culprit
class Chain(nn.Module):
    """Ten conv groups in a row; ``torch.roll`` (channel mixing) sits after the ninth."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 6, 6, 1) for i in range(10))
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = torch.relu(conv(x))
            if i == 8:
                x = torch.roll(x, 1, 1)
        return self.head(x)


def _wrongly_pointwise(ctx) -> None:
    """A user rule that claims torch.roll is element-wise: the analysis now lets channels through."""
    from autosparse.analysis.ops_tensor import pointwise

    pointwise(ctx)


def _gated_chain_with_wrong_rule() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutosparseWarning)
        # verify=False: sparsify's dry run would refuse the group (tests/test_subclass_rules.py checks
        # that); here compact()'s own check, the last line of defence, is under test.
        net = autosparse.sparsify(Chain(), CHANNEL, example_inputs=(X,), op_rules={torch.roll: _wrongly_pointwise},
                                  verify=False)
    for gate in autosparse.gates(net).values():
        gate.zero_([0, 1])
    return net


def test_verify_catches_a_wrong_rule_and_leaves_the_gated_model_alone() -> None:
    net = _gated_chain_with_wrong_rule()
    before = _snapshot(net)
    with pytest.raises(EquivalenceError, match=r"differs from the gated model"):
        autosparse.compact(net)
    _assert_same(net, before)
    small = autosparse.compact(net, verify=False)  # without verify the damage is silent: that is why it exists
    with torch.no_grad():
        assert not torch.allclose(small(X), net(X), atol=1e-4)


def test_verify_names_the_group_most_likely_responsible() -> None:
    net = _gated_chain_with_wrong_rule()
    with pytest.raises(EquivalenceError, match=r"convs\.8"):
        autosparse.compact(net)


# ----------------------------------------------------------------------------- missing typed errors
@pytest.mark.parametrize("rtol", [-1.0, "1e-5"])
def test_compact_validates_rtol(rtol: Any) -> None:
    net = _gated()
    with pytest.raises(AutosparseError, match="rtol"):
        autosparse.compact(net, rtol=rtol)


def test_keyword_example_inputs_get_the_positional_tuple_to_pass():
    model, (ids,) = get_case("hf_bert").build()
    with pytest.raises(autosparse.ExampleInputsError,
                       match=r"example_inputs=\(inputs\['input_ids'\], None, inputs\['token_type_ids'\]\)"):
        autosparse.sparsify(model, "configs/heads.yaml", example_inputs={"input_ids": ids, "token_type_ids": ids * 0})
    with pytest.raises(autosparse.ExampleInputsError, match=r"no positional parameter\(s\) \['pixels'\]"):
        autosparse.explain(model, example_inputs={"pixels": ids})


def test_a_list_of_example_inputs_is_stored_as_the_positional_tuple():
    model, (x,) = get_case("plain").build()
    net = autosparse.sparsify(model, {"rules": [{"granularity": "channel"}]}, example_inputs=[x])
    autosparse.gates(net)["0.0"].zero_([1])
    small = autosparse.compact(net)  # verification replays model(*inputs): needs (x,), not ([x],)
    assert small[0][0].out_channels == 7
