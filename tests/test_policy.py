"""Tests of the policy layer: shipped configs, every kind of bad input, round trips, rule matching."""

from __future__ import annotations

import math
import pathlib
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from autosparse.errors import AutosparseWarning, PolicyError
from autosparse.policy import (
    GateConfig,
    Granularity,
    PenaltyConfig,
    Policy,
    Rule,
    Schedule,
    Target,
    load_policy,
)

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.yaml"))


def _rule(**overrides: object) -> dict[str, object]:
    return {"granularity": "channel", **overrides}


def _policy(**overrides: object) -> dict[str, object]:
    return {"rules": [_rule()], **overrides}


# ----------------------------------------------------------------------------- shipped configs


def test_the_four_configs_ship() -> None:
    assert {p.name for p in CONFIGS} >= {"channels.yaml", "heads.yaml", "layers.yaml", "transformer.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_validates_and_round_trips(path: pathlib.Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a shipped config must not even be suspicious
        policy = load_policy(path)
        assert load_policy(str(path)) == policy
        assert load_policy(policy.to_dict()) == policy
    assert policy.rules and all(isinstance(r.granularity, Granularity) for r in policy.rules)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_comments_every_key(path: pathlib.Path) -> None:
    lines = [
        line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    uncommented = [line for line in lines if ":" in line.split("#")[0] and "#" not in line]
    assert not uncommented, f"{path.name}: keys without a comment: {uncommented}"


def test_transformer_rules_first_match_wins() -> None:
    policy = load_policy(CONFIGS[[p.name for p in CONFIGS].index("transformer.yaml")])
    mlp = torch.nn.Linear(4, 4)
    assert policy.rule_for("blocks.0.attn", torch.nn.MultiheadAttention(4, 2)).granularity == "head"
    assert policy.rule_for("blocks.0.mlp.fc1", mlp).name == "mlp_channels"
    assert policy.rule_for("blocks.0", torch.nn.Sequential()).granularity == Granularity.LAYER
    assert policy.rule_for("embed_tokens", torch.nn.Embedding(3, 4)) is None


# ----------------------------------------------------------------------------- bad dict inputs

# (id, source, key path the message must name, other text it must contain)
# one row per case, so the table stays readable
# fmt: off
BAD_DICTS = [
    ("no_rules", {}, "rules", "required key is missing"),
    ("empty_rules", {"rules": []}, "rules", "non-empty list"),
    ("rules_is_str", {"rules": "channel"}, "rules", "'channel'"),
    ("rules_is_mapping", {"rules": _rule()}, "rules", "start each rule with '- '"),
    ("rule_not_mapping", {"rules": ["channel"]}, "rules[0]", "a mapping with keys"),
    ("granularity_missing", {"rules": [{}]}, "rules[0].granularity", "'channel', 'head' or 'layer'"),
    ("granularity_typo", {"rules": [_rule(granularity="chanel")]}, "rules[0].granularity", "did you mean 'channel'?"),
    ("granularity_not_str", {"rules": [_rule(granularity=1)]}, "rules[0].granularity", "got 1"),
    ("unknown_rule_key", {"rules": [_rule(granulrity=1)]}, "rules[0].granulrity", "did you mean 'granularity'?"),
    ("unknown_top_key", {"rule": [_rule()]}, "rule", "did you mean 'rules'?"),
    ("name_not_str", {"rules": [_rule(name=3)]}, "rules[0].name", "got 3"),
    ("duplicate_names", {"rules": [_rule(name="a"), _rule(name="a", modules="x")]}, "rules[1].name", "rules[0]"),
    ("modules_empty", {"rules": [_rule(modules=[])]}, "rules[0].modules", "non-empty list"),
    ("modules_not_str", {"rules": [_rule(modules=["a", 1])]}, "rules[0].modules[1]", "got 1"),
    ("modules_dict", {"rules": [_rule(modules={"a": 1})]}, "rules[0].modules", "a list of glob"),
    ("types_str", {"rules": [_rule(types="Conv2d")]}, "rules[0].types", "write [Conv2d]"),
    ("types_dotted", {"rules": [_rule(types=["nn.Conv2d"])]}, "rules[0].types[0]", "write 'Conv2d'"),
    ("exclude_str", {"rules": [_rule(exclude="head*")]}, "rules[0].exclude", "'head*'"),
    ("exclude_star", {"rules": [_rule(exclude=["*"])]}, "rules[0].exclude", "excludes everything"),
    ("exclude_covers", {"rules": [_rule(modules=["enc.*"], exclude=["enc*"])]}, "rules[0].exclude", "excludes everything"),
    ("min_keep_zero", {"rules": [_rule(min_keep=0)]}, "rules[0].min_keep", "got 0"),
    ("min_keep_big_float", {"rules": [_rule(min_keep=2.0)]}, "rules[0].min_keep", "write 2"),
    ("min_keep_bool", {"rules": [_rule(min_keep=True)]}, "rules[0].min_keep", "true/false is not a number"),
    ("min_keep_nan", {"rules": [_rule(min_keep=math.nan)]}, "rules[0].min_keep", "nan"),
    ("round_to_zero", {"rules": [_rule(round_to=0)]}, "rules[0].round_to", "integer >= 1"),
    ("round_to_float", {"rules": [_rule(round_to=8.0)]}, "rules[0].round_to", "write 8"),
    ("penalty_weight_neg", {"rules": [_rule(penalty_weight=-1)]}, "rules[0].penalty_weight", ">= 0"),
    ("uniform_quoted", {"rules": [_rule(uniform="true")]}, "rules[0].uniform", "without quotes"),
    ("uniform_int", {"rules": [_rule(uniform=1)]}, "rules[0].uniform", "got 1, expected true or false"),
    ("uniform_layer", {"rules": [_rule(granularity="layer", uniform=True)]}, "rules[0].uniform", "channel or head rule"),
    ("version_2", _policy(version=2), "version", "got 2"),
    ("version_bool", _policy(version=True), "version", "true/false"),
    ("gate_str", _policy(gate="ds"), "gate", "a mapping with keys kind, tau"),
    ("gate_kind_typo", _policy(gate={"kind": "hardconcrete"}), "gate.kind", "did you mean 'hard_concrete'?"),
    ("tau_one", _policy(gate={"tau": 1.0}), "gate.tau", "(0, 1)"),
    ("tau_zero", _policy(gate={"tau": 0}), "gate.tau", "got 0"),
    ("lambda_zero", _policy(penalty={"lambda": 0}), "penalty.lambda", "> 0"),
    ("lambda_quoted", _policy(penalty={"lambda": "1e-3"}), "penalty.lambda", "without quotes"),
    ("lambda_inf", _policy(penalty={"lambda": math.inf}), "penalty.lambda", "inf"),
    ("lam_field_name", _policy(penalty={"lam": 1e-3}), "penalty.lam", "did you mean 'lambda'?"),
    ("p_one", _policy(penalty={"p": 1}), "penalty.p", "(0, 1)"),
    ("cost_typo", _policy(penalty={"cost_weighting": "flop"}), "penalty.cost_weighting", "did you mean 'flops'?"),
    ("cost_null", _policy(penalty={"cost_weighting": None}), "penalty.cost_weighting", "'none'"),
    ("warmup_neg", _policy(schedule={"warmup_steps": -1}), "schedule.warmup_steps", ">= 0"),
    ("warmup_float", _policy(schedule={"warmup_steps": 1.5}), "schedule.warmup_steps", "got 1.5"),
    ("freeze_eq_warmup", _policy(schedule={"warmup_steps": 10, "freeze_step": 10}), "schedule.freeze_step", "> warmup_steps (10)"),
    ("freeze_zero", _policy(schedule={"freeze_step": 0}), "schedule.freeze_step", "got 0"),
    ("target_flops_big", _policy(target={"flops": 1.5}), "target.flops", "(0, 1)"),
    ("target_both", _policy(target={"flops": 0.5, "params": 0.5}), "target.params", "at most one"),
    ("tolerance_big", _policy(target={"tolerance": 0.6}), "target.tolerance", "(0, 0.5]"),
    ("target_list", _policy(target=[0.5]), "target", "a mapping"),
]
# fmt: on


@pytest.mark.parametrize(
    ("source", "path", "text"), [c[1:] for c in BAD_DICTS], ids=[c[0] for c in BAD_DICTS]
)
def test_bad_dict_raises_policy_error_naming_the_key(source: dict, path: str, text: str) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(source)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert text in message, message
    assert isinstance(info.value, ValueError)


# ----------------------------------------------------------------------------- bad YAML files

# (id, YAML text with the offending line marked `# <-`, key path, other text). Path None: YAML syntax.
# one row per case, so the table stays readable
# fmt: off
BAD_FILES = [
    ("granularity_typo", "rules:\n  - name: a\n    granularity: chanel  # <-\n", "rules[0].granularity", "did you mean"),
    ("unknown_key", "rules:\n  - granularity: head\n    min_kep: 1  # <-\n", "rules[0].min_kep", "did you mean 'min_keep'?"),
    ("missing_granularity", "rules:\n  - name: a  # <-\n    modules: ['*']\n", "rules[0].granularity", "required key"),
    ("second_rule", "rules:\n  - granularity: head\n  - granularity: layer\n    round_to: 0  # <-\n", "rules[1].round_to", "got 0"),
    ("bool_lambda", "rules: [{granularity: channel}]\npenalty:\n  lambda: yes  # <-\n", "penalty.lambda", "true/false"),
    ("freeze", "rules: [{granularity: layer}]\nschedule:\n  warmup_steps: 5\n  freeze_step: 3  # <-\n", "schedule.freeze_step", "warmup_steps (5)"),
    ("dup_rule_name", "rules:\n  - name: a\n    granularity: head\n  - name: a  # <-\n    granularity: layer\n", "rules[1].name", "unique"),
    ("exclude_all", "rules:\n  - granularity: channel\n    exclude: ['*']  # <-\n", "rules[0].exclude", "excludes everything"),
    ("types_item", "rules:\n  - granularity: channel\n    types:\n      - Linear\n      - torch.nn.Conv2d  # <-\n", "rules[0].types[1]", "'Conv2d'"),
    ("top_is_list", "- granularity: channel  # <-\n", "policy", "a mapping with keys"),
    ("rules_empty", "version: 1\nrules: []  # <-\n", "rules", "non-empty"),
    ("dup_yaml_key", "rules:\n  - granularity: head\n    granularity: layer  # <-\n", None, "duplicate key 'granularity'"),
    ("unclosed_list", "rules:\n  - granularity: head\n    modules: [a, b\ngate: {}  # <-\n", None, "malformed YAML"),
    ("bad_indent", "rules:\n  - granularity: head\n   name: x  # <-\n", None, "malformed YAML"),
]
# fmt: on


@pytest.mark.parametrize(
    ("text", "path", "needle"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_file_names_file_line_and_key(
    tmp_path: pathlib.Path, text: str, path: str | None, needle: str
) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "# <-" in row)
    with pytest.raises(PolicyError) as info:
        load_policy(file)
    message = str(info.value)
    prefix = f"{file}:{line}: " + (f"{path}: " if path else "")
    assert message.startswith(prefix), message
    assert needle in message, message


def test_empty_file(tmp_path: pathlib.Path) -> None:
    file = tmp_path / "empty.yaml"
    file.write_text("# nothing here\n")
    with pytest.raises(PolicyError, match=r"empty\.yaml: policy: got None.*the file is empty"):
        load_policy(file)


def test_missing_file_and_yaml_text_are_not_found() -> None:
    with pytest.raises(PolicyError, match="'no/such.yaml' not found"):
        load_policy("no/such.yaml")
    with pytest.raises(PolicyError, match="not found.*strings are file paths"):
        load_policy("rules:\n  - granularity: channel\n")


def test_wrong_source_type() -> None:
    with pytest.raises(PolicyError, match="got a int object, expected a Policy, a dict or the path"):
        load_policy(3)  # type: ignore[arg-type]


def test_yaml_reads_1e_minus_3_as_a_number(tmp_path: pathlib.Path) -> None:
    file = tmp_path / "p.yaml"
    file.write_text("rules: [{granularity: channel}]\npenalty: {lambda: 1e-3}\n")
    assert load_policy(file).penalty.lam == pytest.approx(1e-3)


# ----------------------------------------------------------------------------- construction, round trip


def test_defaults_and_shortcuts() -> None:
    policy = load_policy({"rules": [{"granularity": "head", "modules": "enc.*"}, {"granularity": "layer"}]})
    assert [r.name for r in policy.rules] == ["rule0", "rule1"]
    assert policy.rules[0].modules == ("enc.*",)
    assert policy.rules[0].granularity is Granularity.HEAD
    assert policy.gate == GateConfig(kind="ds", tau=0.5)
    assert policy.penalty == PenaltyConfig(lam=1e-3, p=0.5, cost_weighting="none")
    assert policy.schedule == Schedule(warmup_steps=0, freeze_step=None)
    assert policy.target == Target() and policy.target.metric is None
    assert policy.version == 1
    assert load_policy(policy) is policy


def test_null_sections_mean_defaults() -> None:
    policy = load_policy({"rules": [_rule()], "gate": None, "target": None})
    assert policy.gate == GateConfig() and policy.target == Target()


def test_round_trip_of_a_full_policy() -> None:
    source = {
        "version": 1,
        "rules": [
            {
                "name": "h",
                "granularity": "head",
                "modules": ["*attn*"],
                "min_keep": 0.25,
                "penalty_weight": 0,
            },
            {"granularity": "channel", "types": ["Linear"], "exclude": ["head*"], "round_to": 8, "uniform": True},
        ],
        "gate": {"kind": "hard_concrete", "tau": 0.2},
        "penalty": {"lambda": 2, "p": 0.7, "cost_weighting": "flops"},
        "schedule": {"warmup_steps": 10, "freeze_step": 100},
        "target": {"params": 0.3, "tolerance": 0.1},
    }
    policy = load_policy(source)
    data = policy.to_dict()
    assert data["penalty"]["lambda"] == 2.0 and "lam" not in data["penalty"]
    assert data["rules"][1]["name"] == "rule1" and data["rules"][0]["granularity"] == "head"
    assert load_policy(data) == policy
    assert hash(load_policy(data)) == hash(policy)
    assert policy.target.metric == "params"
    assert [r.uniform for r in policy.rules] == [False, True] and data["rules"][1]["uniform"] is True


def test_dataclasses_validate_at_construction() -> None:
    with pytest.raises(PolicyError, match=r"^Rule\.granularity: got 'x'"):
        Rule("x")  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match=r"^GateConfig\.tau: got 2"):
        GateConfig(tau=2)
    with pytest.raises(PolicyError, match=r"^PenaltyConfig\.lambda: got -1"):
        PenaltyConfig(lam=-1)
    with pytest.raises(PolicyError, match=r"^Schedule\.freeze_step"):
        Schedule(warmup_steps=3, freeze_step=2)
    with pytest.raises(PolicyError, match=r"^Policy\.rules\[1\]\.name: got 'a'"):
        Policy(rules=(Rule("channel", name="a"), Rule("head", name="a")))
    with pytest.raises(PolicyError, match=r"^Policy\.rules: got \[\], expected a non-empty list"):
        Policy(rules=())


def test_policies_are_frozen() -> None:
    policy = load_policy(_policy())
    with pytest.raises(AttributeError):
        policy.rules[0].round_to = 2  # type: ignore[misc]


def test_suspicious_but_legal_policies_warn() -> None:
    with pytest.warns(AutosparseWarning, match=r"rules\[1\] \('late'\) never matches: rules\[0\]"):
        load_policy({"rules": [_rule(), _rule(name="late", modules=["enc.*"])]})
    with pytest.warns(AutosparseWarning, match=r"min_keep is 1.0, a fraction"):
        load_policy({"rules": [_rule(min_keep=1.0)]})


# ----------------------------------------------------------------------------- matching and counts


@pytest.mark.parametrize(
    ("rule", "name", "module", "expected"),
    [
        (Rule("channel"), "anything.at.all", None, True),
        (Rule("channel", modules=("enc.*",)), "enc.fc", None, True),
        (Rule("channel", modules=("enc.*",)), "dec.fc", None, False),
        (Rule("channel", modules=("enc.*",)), "Enc.fc", None, False),  # case-sensitive
        (Rule("channel", modules=("enc.*", "dec.?")), "dec.3", None, True),
        (Rule("channel", exclude=("head*",)), "head.fc", None, False),
        (Rule("channel", modules=("head*",), exclude=("head.fc",)), "head.fc", None, False),
        (Rule("channel", modules=("head*",), exclude=("head.fc",)), "head.out", None, True),
        (Rule("channel", types=("Linear",)), "fc", torch.nn.Linear(2, 2), True),
        (Rule("channel", types=("Linear",)), "fc", torch.nn.Conv2d(2, 2, 1), False),
        (Rule("channel", types=("Linear",)), "fc", None, False),
        (Rule("channel", types=("_ConvNd",)), "c", torch.nn.Conv2d(2, 2, 1), True),  # any class in the MRO
        (Rule("channel", types=("Module",)), "m", torch.nn.ReLU(), True),
        (Rule("channel", types=("Conv2d", "Linear")), "m", torch.nn.Linear(2, 2), True),
    ],
)
def test_rule_matches(rule: Rule, name: str, module: torch.nn.Module | None, expected: bool) -> None:
    assert rule.matches(name, module) is expected


@pytest.mark.parametrize(
    ("min_keep", "n", "expected"),
    [
        (1, 10, 1),
        (3, 10, 3),
        (20, 10, 10),
        (0.25, 10, 3),
        (0.3, 10, 3),
        (0.5, 3, 2),
        (0.01, 10, 1),
        (1.0, 7, 7),
    ],
)
def test_resolve_min_keep(min_keep: int | float, n: int, expected: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutosparseWarning)
        assert Rule("channel", min_keep=min_keep).resolve_min_keep(n) == expected


@pytest.mark.parametrize(
    ("round_to", "k", "n", "expected"),
    [(1, 5, 10, 5), (8, 9, 20, 16), (8, 16, 20, 16), (8, 17, 20, 20), (4, 0, 10, 0), (3, 10, 10, 10)],
)
def test_round_keep(round_to: int, k: int, n: int, expected: int) -> None:
    assert Rule("channel", round_to=round_to).round_keep(k, n) == expected


def test_counts_reject_bad_arguments() -> None:
    rule = Rule("channel", name="r")
    with pytest.raises(PolicyError, match="n_units=0"):
        rule.resolve_min_keep(0)
    with pytest.raises(PolicyError, match="k=5 > n=4"):
        rule.round_keep(5, 4)
    with pytest.raises(PolicyError, match="k=-1"):
        rule.round_keep(-1, 4)


@given(
    fraction=st.floats(min_value=1e-6, max_value=1.0, exclude_min=False),
    n=st.integers(min_value=1, max_value=10_000),
    round_to=st.integers(min_value=1, max_value=64),
)
def test_counts_stay_in_range(fraction: float, n: int, round_to: int) -> None:
    rule = Rule("channel", min_keep=fraction, round_to=round_to)
    keep = rule.resolve_min_keep(n)
    assert 1 <= keep <= n and keep >= fraction * n - 1e-6
    rounded = rule.round_keep(keep, n)
    assert keep <= rounded <= n and (rounded % round_to == 0 or rounded == n)
