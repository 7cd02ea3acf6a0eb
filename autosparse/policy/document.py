"""The policy: which groups to gate, at which granularity, and how hard to push them to zero.

:func:`load_policy` turns a YAML file, a dict or an existing :class:`Policy` into frozen dataclasses,
validated completely before anything touches a model. Every problem raises :class:`PolicyError`
naming the key path (``rules[1].granularity``), the offending value, what is allowed and, for YAML
files, ``file.yaml:line``. The dataclasses validate themselves at construction too, so an invalid
policy cannot exist however it was built.

This module holds the gate / penalty / schedule / target sections, :class:`Policy` and its loading;
one rule (:class:`Rule`, :class:`Granularity`) lives in :mod:`autosparse.policy_rule` and is
re-exported here, so every policy name imports from ``autosparse.policy``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch

from autosparse.errors import PolicyError, warn
from autosparse.policy.rule import Rule, glob_covers
from autosparse.policy.schema import (
    At,
    Check,
    Validated,
    choice,
    integer,
    is_int,
    load_yaml,
    number_hint,
    parse,
    real,
    section,
    with_schema,
)

GateKind = Literal["ds", "hard_concrete"]
GATE_KINDS: tuple[str, ...] = ("ds", "hard_concrete")
CostWeighting = Literal["none", "flops", "params"]
COST_WEIGHTINGS: tuple[str, ...] = ("none", "flops", "params")
Regime = Literal["scratch", "pretrained"]
REGIMES: tuple[str, ...] = ("scratch", "pretrained")


# ----------------------------------------------------------------------------- policy-level checks


@with_schema({"const": 1})
def _version(value: Any, at: At) -> int:
    if not (is_int(value) and value == 1):
        raise at.bad(value, "1 (the only policy format so far)", number_hint(value))
    return value


@with_schema({"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/Rule"}})  # names unique: not expressible
def _rules(value: Any, at: At) -> tuple[Rule, ...]:
    if isinstance(value, Mapping):
        raise at.bad(value, "a list of rules", " (start each rule with '- ')")
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise at.bad(value, "a non-empty list of rules")
    rules: list[Rule] = []
    first_index: dict[str, int] = {}
    for i, raw in enumerate(value):
        rule = raw if isinstance(raw, Rule) else parse(Rule, raw, at.item(i, raw))
        rule = rule if rule.name else dataclasses.replace(rule, name=f"rule{i}")
        if rule.name in first_index:
            name_at = at.item(i, raw).child("name")
            raise name_at.bad(rule.name, f"a unique rule name (rules[{first_index[rule.name]}] has it too)")
        first_index[rule.name] = i
        rules.append(rule)
    return tuple(rules)


# ----------------------------------------------------------------------------- the policy


@dataclasses.dataclass(frozen=True)
class GateConfig(Validated):
    """The ``gate`` section.

    Args:
        kind: ``ds`` (differentiable sparsification) or ``hard_concrete``.
        tau: Closing threshold; a unit closes when its gate falls below ``tau / n_units``. In (0, 1).
    """

    kind: GateKind = "ds"
    tau: float = 0.5

    _CHECKS: ClassVar[dict[str, Check]] = {
        "kind": choice(GATE_KINDS),
        "tau": real(gt=0, lt=1),
    }


@dataclasses.dataclass(frozen=True)
class PenaltyConfig(Validated):
    """The ``penalty`` section (``lambda`` in YAML is ``lam`` here).

    Args:
        lam: Strength of the sparsity penalty relative to the task loss; > 0.
        p: Exponent of the l_p quasi-norm on gate values; in (0, 1).
        cost_weighting: ``none``, or scale each group's penalty by its ``flops`` or ``params``.
    """

    lam: float = 1e-3
    p: float = 0.5
    cost_weighting: CostWeighting = "none"

    _CHECKS: ClassVar[dict[str, Check]] = {
        "lam": real(gt=0),
        "p": real(gt=0, lt=1),
        "cost_weighting": choice(COST_WEIGHTINGS),
    }
    _YAML_KEYS: ClassVar[dict[str, str]] = {"lam": "lambda"}


@dataclasses.dataclass(frozen=True)
class Schedule(Validated):
    """The ``schedule`` section.

    Args:
        warmup_steps: Lambda ramps linearly from 0 to its value over these steps; >= 0.
        freeze_step: After this step the gates stop changing; ``None`` or > ``warmup_steps``.
        regime: ``scratch`` (gates learn while the model trains from its initialisation) or
            ``pretrained`` (a trained model, a short fine-tune: gates start from the l2 magnitude of
            their units and units close progressively, never above the controller's reference; see
            docs/training.md).
    """

    warmup_steps: int = 0
    freeze_step: int | None = None
    regime: Regime = "scratch"

    _CHECKS: ClassVar[dict[str, Check]] = {
        "warmup_steps": integer(ge=0),
        "freeze_step": integer(null=True, ge=1),
        "regime": choice(REGIMES),
    }

    @classmethod
    def _cross_check(cls, values: dict[str, Any], at: At) -> None:
        warmup, freeze = values["warmup_steps"], values["freeze_step"]
        if freeze is not None and freeze <= warmup:
            raise at.child("freeze_step").bad(
                freeze, f"null or an integer > warmup_steps ({warmup}): gates must not freeze during warm-up"
            )


@dataclasses.dataclass(frozen=True)
class Target(Validated):
    """The ``target`` section: an optional budget, as a fraction of the dense model.

    Args:
        flops: Fraction of dense FLOPs to land on, in (0, 1); at most one of flops / params / latency.
        params: Fraction of dense parameters to land on, in (0, 1).
        latency: Fraction of the dense model's latency on the current device for the example inputs
            (at their batch size), in (0, 1); priced by a measured, cached per-module latency table.
        tolerance: How far from the fraction still counts as on target; in (0, 0.5].
    """

    flops: float | None = None
    params: float | None = None
    latency: float | None = None
    tolerance: float = 0.05

    _CHECKS: ClassVar[dict[str, Check]] = {
        "flops": real(noun="a fraction", null=True, gt=0, lt=1),
        "params": real(noun="a fraction", null=True, gt=0, lt=1),
        "latency": real(noun="a fraction", null=True, gt=0, lt=1),
        "tolerance": real(gt=0, le=0.5),
    }

    @classmethod
    def _cross_check(cls, values: dict[str, Any], at: At) -> None:
        budgets = [key for key in ("flops", "params", "latency") if values.get(key) is not None]
        if len(budgets) > 1:
            raise at.child(budgets[1]).bad(values[budgets[1]], f"null when {budgets[0]} is set (at most one budget)")

    @property
    def metric(self) -> Literal["flops", "params", "latency"] | None:
        """``"flops"``, ``"params"`` or ``"latency"``, whichever budget is set, or ``None`` for no budget."""
        if self.flops is not None:
            return "flops"
        if self.params is not None:
            return "params"
        return "latency" if self.latency is not None else None


@dataclasses.dataclass(frozen=True)
class Policy(Validated):
    """A validated policy: the rules plus gate, penalty, schedule and target settings.

    Args:
        rules: Non-empty; for each module the first matching rule wins. Unnamed rules get ``rule<i>``.
        gate: The gate settings.
        penalty: The penalty settings.
        schedule: The lambda warm-up and the gate freeze.
        target: An optional FLOPs or parameter budget.
        version: The policy format, 1.

    Raises:
        PolicyError: Any field is invalid, or two rules share a name.

    Example:
        >>> Policy(rules=(Rule("channel"),)).rules[0].name
        'rule0'
    """

    rules: tuple[Rule, ...]
    gate: GateConfig = GateConfig()
    penalty: PenaltyConfig = PenaltyConfig()
    schedule: Schedule = Schedule()
    target: Target = Target()
    version: int = 1

    _CHECKS: ClassVar[dict[str, Check]] = {
        "rules": _rules,
        "gate": section(GateConfig),
        "penalty": section(PenaltyConfig),
        "schedule": section(Schedule),
        "target": section(Target),
        "version": _version,
    }
    _REQUIRED_HINT: ClassVar[str] = "a policy needs a non-empty list of rules"

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain data that :func:`load_policy` reads back to an equal policy."""
        data = super().to_dict()
        return {"version": data.pop("version"), **data}

    def rule_for(self, module_name: str, module: torch.nn.Module | None = None) -> Rule | None:
        """The first rule that matches the module, or ``None``."""
        return next((r for r in self.rules if r.matches(module_name, module)), None)


def load_policy(source: Policy | Mapping[str, Any] | str | os.PathLike[str]) -> Policy:
    """Load and validate a policy.

    Args:
        source: A :class:`Policy` (returned as is), a dict shaped like the YAML, or the path of a
            YAML file. Strings are always paths, never YAML text.

    Returns:
        The validated policy.

    Raises:
        PolicyError: The file is missing or malformed, or a key is unknown, missing or invalid;
            the message names the key path and, for files, ``file:line``.

    Example:
        >>> load_policy({"rules": [{"granularity": "channel"}]}).penalty.lam
        0.001
    """
    if isinstance(source, Policy):
        return source
    if isinstance(source, Mapping):
        policy = parse(Policy, source, At(""))
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        data = load_yaml(name)
        policy = parse(Policy, data, At("", name, getattr(data, "line", None), data))
    else:
        raise PolicyError(
            f"policy: got a {type(source).__name__} object, expected a Policy, a dict or the path of a YAML file"
        )
    _warn_suspicious(policy)
    return policy


def _warn_suspicious(policy: Policy) -> None:
    """Warn about what is legal but almost surely a mistake."""
    for i, rule in enumerate(policy.rules):
        if isinstance(rule.min_keep, float) and rule.min_keep == 1.0:
            warn(
                f"policy: rules[{i}].min_keep is 1.0, a fraction, so rule {rule.name!r} keeps every unit "
                "and prunes nothing; write 1 (an integer) to keep at least one unit"
            )
        for j, earlier in enumerate(policy.rules[:i]):
            if (
                earlier.granularity == rule.granularity
                and not earlier.types
                and not earlier.exclude
                and all(any(glob_covers(p, m) for p in earlier.modules) for m in rule.modules)
            ):
                warn(
                    f"policy: rules[{i}] ({rule.name!r}) never matches: rules[{j}] ({earlier.name!r}) takes "
                    f"every module it selects first; move it earlier or narrow rules[{j}].modules"
                )
                break

