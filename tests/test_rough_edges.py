"""Rough edges of issue #12: exclude on coupled groups, globs that match nothing, explain() widths,
labels and statuses, explain() of a compacted model, compact() that removes nothing, and the JSON
Schema of a policy (generated, shipped, referenced by the configs, and in step with the validators)."""

from __future__ import annotations

import json
import pathlib
import re
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import autosparse
from autosparse.errors import AutosparseWarning, NoGatesError, PolicyError
from autosparse.policy import (
    GateConfig,
    PenaltyConfig,
    Policy,
    Rule,
    Schedule,
    Target,
    json_schema,
    load_policy,
)
from autosparse.policy.json_schema import json_schema_text
from autosparse.policy.schema import yaml_key

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"
X = torch.randn(2, 3, 8, 8)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    """The stem conv writes the residual stream of layer1: stem.0, layer1.0.conv2, layer1.1.conv2 are one group."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(Block(width), Block(width))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer1(self.stem(x)).mean((2, 3)))


def _sparsify(model: nn.Module, rule: dict[str, Any], inputs: tuple = (X,)) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutosparseWarning)
        return autosparse.sparsify(model.eval(), {"rules": [{"granularity": "channel", **rule}]},
                                   example_inputs=inputs)


def _compact(net: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutosparseWarning)
        return autosparse.compact(net)


# ----------------------------------------------------------------------------- 1. exclude on coupled groups
STREAM = ["layer1.0.conv1", "layer1.1.conv1", "stem.0"]


@pytest.mark.parametrize(("exclude", "gated"), [
    ([], STREAM),
    (["stem*"], STREAM[:2]),            # the stem, a member of the stream
    (["stem.0"], STREAM[:2]),           # the group's own name
    (["layer1.1.conv2"], STREAM[:2]),   # any other member
    (["layer1.*.conv1"], ["stem.0"]),   # single-module groups, as before
])
def test_excluding_one_member_keeps_the_whole_coupled_group(exclude: list[str], gated: list[str]) -> None:
    net = _sparsify(ResNet(), {"exclude": exclude})
    assert sorted(autosparse.gates(net)) == gated
    for gate in autosparse.gates(net).values():
        gate.zero_(range(12))  # 12 of 16 units off in every gated group
    small = _compact(net)
    stem_width = small.stem[0].out_channels
    assert stem_width == (4 if "stem.0" in gated else 16)
    assert small.layer1[1].conv2.out_channels == stem_width  # the stream stays one width
    assert small.layer1[0].conv1.out_channels == (4 if "layer1.0.conv1" in gated else 16)


def test_explain_says_which_exclude_protected_the_group() -> None:
    net = _sparsify(ResNet(), {"name": "cnn", "exclude": ["stem*"]})
    row = {g.name: g for g in autosparse.explain(net).groups}["stem.0"]
    assert (row.status, row.kept) == ("candidate", None)
    assert row.reason == ("rule 'cnn' excludes 'stem.0' (exclude 'stem*'), a member of this coupled group "
                          "of 3 modules, so the group keeps its width")


# ----------------------------------------------------------------------------- 2. globs that match nothing
def test_a_modules_glob_that_matches_nothing_is_named_with_close_names() -> None:
    with pytest.warns(AutosparseWarning) as caught, pytest.raises(NoGatesError) as info:
        autosparse.sparsify(ResNet(), {"rules": [{"granularity": "channel", "modules": ["layer1.*.conv"]}]},
                            example_inputs=(X,))
    line = ("policy: rules[0].modules glob 'layer1.*.conv' (rule 'rule0') matched no module of ResNet; "
            "close names: 'layer1.1.conv2', 'layer1.1.conv1', 'layer1.0.conv2'")
    assert line in str(info.value).splitlines()
    assert line in [str(w.message) for w in caught]


def test_an_exclude_glob_that_matches_nothing_warns() -> None:
    with pytest.warns(AutosparseWarning, match=r"rules\[0\]\.exclude glob 'steam\*' .* close names: 'stem'"):
        net = autosparse.sparsify(ResNet(), {"rules": [{"granularity": "channel", "exclude": ["steam*"]}]},
                                  example_inputs=(X,))
    assert len(autosparse.gates(net)) == 3  # nothing excluded: the typo protected nothing


# ----------------------------------------------------------------------------- 3. explain: widths, names, labels
class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder_with_a_rather_long_descriptive_name = nn.Sequential(nn.Conv2d(3, 48, 1), nn.ReLU())
        self.head = nn.Conv2d(48, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder_with_a_rather_long_descriptive_name(x))


def test_explain_shows_the_width_compact_keeps_after_round_to() -> None:
    net = _sparsify(Wide(), {"round_to": 8})
    autosparse.gates(net)["encoder_with_a_rather_long_descriptive_name.0"].zero_(range(31))  # 17 open
    report = autosparse.explain(net)
    (row,) = report.groups
    assert (row.kept, row.open, row.units, row.status) == (24, 17, 48, "gated")
    text = str(report)
    assert "[gated] channel 24/48 kept  encoder_with_a_rather_long_descriptive_name.0 (1 conv, 48 ch)" in text
    assert "group 'encoder_with_a_rather_long_descriptive_name.0'; 17 of 48 gates open" in text
    assert _compact(net).encoder_with_a_rather_long_descriptive_name[0].out_channels == 24


def test_explain_labels_streams_and_marks_gated_and_candidate_groups() -> None:
    net = _sparsify(ResNet(), {"modules": ["layer1.0.*"]})
    report = autosparse.explain(net)
    rows = {g.name: (g.status, g.label, g.kept) for g in report.groups}
    assert rows == {
        "stem.0": ("gated", "layer1 residual stream (3 convs, 16 ch)", 16),
        "layer1.0.conv1": ("gated", "layer1.0.conv1 (1 conv, 16 ch)", 16),
        "layer1.1.conv1": ("candidate", "layer1.1.conv1 (1 conv, 16 ch)", None),
    }
    text = str(report)
    assert "3 groups: 2 gated, 1 candidate(s)" in text
    assert "    producers: stem.0, layer1.0.conv2, layer1.1.conv2" in text  # every member, none cut
    assert "[candidate] channel 16 units  layer1.1.conv1 (1 conv, 16 ch)" in text


def test_labels_of_an_unsparsified_model_and_a_stage_with_many_blocks() -> None:
    model = ResNet()
    model.layer1 = nn.Sequential(*(Block(16) for _ in range(5)))
    (stream, *_) = autosparse.explain(model.eval(), example_inputs=(X,)).groups
    assert (stream.status, stream.label) == ("candidate", "layer1 residual stream (6 convs, 16 ch)")


# ----------------------------------------------------------------------------- 4. explain a compacted model
def test_explain_of_a_compacted_model_says_so() -> None:
    net = _sparsify(ResNet(), {})
    autosparse.gates(net)["stem.0"].zero_(range(10))
    small = _compact(net)
    report = autosparse.explain(small)
    assert report.compacted == {"stem.0": {"before": 16, "after": 6}, "layer1.0.conv1": {"before": 16, "after": 16},
                                "layer1.1.conv1": {"before": 16, "after": 16}}
    assert report.groups == []
    assert str(report).startswith("already compacted: autosparse.compact() removed units from 1 of 3 groups")
    again = autosparse.explain(small, example_inputs=(X,))  # and a fresh analysis when asked
    assert again.compacted == report.compacted
    assert [(g.name, g.units) for g in again.groups][0] == ("stem.0", 6)


# ----------------------------------------------------------------------------- 5. compact that removes nothing
def test_compact_warns_when_no_unit_was_zeroed() -> None:
    net = _sparsify(ResNet(), {})
    with pytest.warns(AutosparseWarning, match=r"no unit was removed \(every gate of the 3 group\(s\) is still "
                                               r"open\).*raise penalty\.lambda.*target: \{flops: 0\.5\}"):
        small = autosparse.compact(net)
    assert small.stem[0].out_channels == 16


def test_compact_warns_when_the_floors_keep_every_zeroed_unit() -> None:
    net = _sparsify(ResNet(), {"round_to": 16})
    autosparse.gates(net)["stem.0"].zero_([0, 1, 2])
    with pytest.warns(AutosparseWarning, match=r"3 unit\(s\) have a zero gate, but the rules' min_keep / round_to"):
        autosparse.compact(net)


def test_compact_is_silent_when_units_go() -> None:
    net = _sparsify(ResNet(), {})
    autosparse.gates(net)["stem.0"].zero_([0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutosparseWarning)
        assert autosparse.compact(net).stem[0].out_channels == 15


# ----------------------------------------------------------------------------- 6. the JSON Schema of a policy
def test_the_shipped_schema_is_the_generated_one() -> None:
    shipped = (CONFIGS / "policy.schema.json").read_text()
    assert shipped == json_schema_text(), (
        "configs/policy.schema.json is stale; regenerate it with: python -c \"import autosparse.policy as p; "
        "open('configs/policy.schema.json', 'w').write(p.json_schema_text())\"")
    schema = json.loads(shipped)
    assert schema["required"] == ["rules"] and schema["additionalProperties"] is False
    assert schema["$defs"]["PenaltyConfig"]["properties"]["lambda"] == {
        "description": "Strength of the sparsity penalty relative to the task loss; > 0.",
        "type": "number", "exclusiveMinimum": 0, "default": 0.001}
    assert schema["$defs"]["Rule"]["required"] == ["granularity"]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_each_config_points_to_the_schema_and_validates(path: pathlib.Path) -> None:
    import yaml

    assert path.read_text().splitlines()[0] == "# yaml-language-server: $schema=policy.schema.json"
    assert validate(json_schema(), yaml.safe_load(path.read_text())) == []


def test_configs_validate_with_jsonschema_where_installed() -> None:
    import yaml

    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(json_schema())
    for path in sorted(CONFIGS.glob("*.yaml")):
        jsonschema.Draft202012Validator(json_schema()).validate(yaml.safe_load(path.read_text()))


def test_every_property_has_a_description_and_only_known_keywords() -> None:
    seen: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            seen.update(node)
            for key, value in node.items():
                if key != "default":  # data, not schema
                    walk(value if key not in ("properties", "$defs") else list(value.values()))
        elif isinstance(node, list):
            for item in node:
                walk(item)

    schema = json_schema()
    walk(schema)
    assert seen - {"$schema", "$defs", "title", "description", "default"} <= KEYWORDS
    for cls in (Policy, Rule, GateConfig, PenaltyConfig, Schedule, Target):
        obj = schema if cls is Policy else schema["$defs"][cls.__name__]
        assert all(prop["description"] for prop in obj["properties"].values()), cls.__name__


VALUES: list[Any] = [None, True, 0, 1, 2, -1, 0.5, 1.5, 1e-3, "channel", "ds", "flops", "x", "", " ", "1e-3",
                     [], ["*"], ["Conv2d"], ["torch.nn.Conv2d"], [""], ["a", 3], {}, [{"granularity": "head"}]]
CROSS_CHECKED = {("Rule", "exclude", json.dumps(["*"]))}  # legal alone, rejected with modules ['*']


def _document(cls: type, key: str, value: Any) -> dict[str, Any]:
    rule = {"granularity": "channel"}
    if cls is Rule:
        return {"rules": [{**rule, key: value}]}
    if cls is Policy:
        return {"rules": [rule], key: value} if key != "rules" else {"rules": value}
    section = {GateConfig: "gate", PenaltyConfig: "penalty", Schedule: "schedule", Target: "target"}[cls]
    return {"rules": [rule], section: {key: value}}


@pytest.mark.parametrize("cls", [Policy, Rule, GateConfig, PenaltyConfig, Schedule, Target], ids=lambda c: c.__name__)
def test_schema_and_validators_accept_the_same_values(cls: type) -> None:
    schema, disagree = json_schema(), []
    for field in cls.__dataclass_fields__:
        key = yaml_key(cls, field)
        for value in VALUES:
            if (cls.__name__, key, json.dumps(value)) in CROSS_CHECKED:
                continue
            document = _document(cls, key, value)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", AutosparseWarning)
                    load_policy(document)
                loads = True
            except PolicyError:
                loads = False
            if loads != (validate(schema, document) == []):
                disagree.append((key, value, loads))
    assert disagree == []


# A small validator for the keywords the policy schema uses (jsonschema may not be installed); the
# test above checks the schema uses no others, so a keyword added later fails loudly instead of passing.
KEYWORDS = {"type", "enum", "const", "anyOf", "$ref", "properties", "required", "additionalProperties", "items",
            "minItems", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
TYPES = {"null": lambda v: v is None, "boolean": lambda v: isinstance(v, bool), "string": lambda v: isinstance(v, str),
         "array": lambda v: isinstance(v, list), "object": lambda v: isinstance(v, dict),
         "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
         "integer": lambda v: TYPES["number"](v) and float(v).is_integer()}
BOUNDS = {"minimum": float.__ge__, "maximum": float.__le__,
          "exclusiveMinimum": float.__gt__, "exclusiveMaximum": float.__lt__}


def validate(root: dict[str, Any], value: Any, node: dict[str, Any] | None = None, at: str = "") -> list[str]:
    """Problems of ``value`` against ``node`` (default: the whole schema), as ``path: keyword`` strings."""
    node = root if node is None else node
    if "$ref" in node:
        return validate(root, value, root["$defs"][node["$ref"].rsplit("/", 1)[-1]], at)
    if "anyOf" in node and all(validate(root, value, option, at) for option in node["anyOf"]):
        return [f"{at}: anyOf"]
    bad = [k for k in ("type", "enum", "const", "pattern") if k in node and not _keyword_ok(k, node[k], value)]
    if TYPES["number"](value):
        bad += [k for k, ok in BOUNDS.items() if k in node and not ok(float(value), float(node[k]))]
    problems = [f"{at}: {k}" for k in bad]
    if isinstance(value, list):
        problems += [f"{at}: minItems"] if len(value) < node.get("minItems", 0) else []
        for i, item in enumerate(value):
            problems += validate(root, item, node["items"], f"{at}[{i}]") if "items" in node else []
    if isinstance(value, dict) and "properties" in node:
        props = node["properties"]
        problems += [f"{at}.{k}: required" for k in node.get("required", []) if k not in value]
        problems += [f"{at}.{k}: additionalProperties" for k in value if k not in props]
        for k, v in value.items():
            problems += validate(root, v, props[k], f"{at}.{k}") if k in props else []
    return problems


def _keyword_ok(keyword: str, expected: Any, value: Any) -> bool:
    if keyword == "type":
        return TYPES[expected](value)
    if keyword == "enum":
        return any(type(value) is type(e) and value == e for e in expected)
    if keyword == "const":
        return type(value) is type(expected) and value == expected
    return not isinstance(value, str) or re.search(expected, value) is not None
