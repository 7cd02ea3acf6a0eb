"""The policy: which groups to gate, at which granularity, and how hard to push them to zero.

:func:`load_policy` turns a YAML file, a dict or an existing :class:`Policy` into frozen dataclasses,
validated completely before anything touches a model. Every problem raises :class:`PolicyError`
naming the key path (``rules[1].granularity``), the offending value, what is allowed and, for YAML
files, ``file.yaml:line``. The dataclasses validate themselves at construction too, so an invalid
policy cannot exist however it was built.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Literal

import torch

from autosparse._yaml import (
    At,
    Check,
    Validated,
    choice,
    integer,
    is_int,
    load_yaml,
    number_hint,
    optional,
    parse,
    real,
    section,
    strings,
)
from autosparse.errors import PolicyError, warn


class Granularity(str, enum.Enum):
    """What one unit of a group is: an output channel, an attention head, or a whole residual branch."""

    CHANNEL = "channel"
    HEAD = "head"
    LAYER = "layer"

    def __str__(self) -> str:
        return self.value


GateKind = Literal["ds", "hard_concrete"]
GATE_KINDS: tuple[str, ...] = ("ds", "hard_concrete")
CostWeighting = Literal["none", "flops", "params"]
COST_WEIGHTINGS: tuple[str, ...] = ("none", "flops", "params")


# ----------------------------------------------------------------------------- policy-specific checks


def _class_names(value: Any, at: At) -> tuple[str, ...]:
    names = strings("module class names")(value, at)
    for i, name in enumerate(names):
        if not name.isidentifier():
            hint = f" (write {name.rsplit('.', 1)[-1]!r})" if "." in name else ""
            raise at.item(i).bad(name, "a bare class name such as 'Conv2d'", hint)
    return names


def _name(value: Any, at: At) -> str:
    if not isinstance(value, str):
        raise at.bad(value, "a string (the rule's name)")
    return value


def _min_keep(value: Any, at: At) -> int | float:
    if (is_int(value) and value >= 1) or (isinstance(value, float) and 0 < value <= 1):
        return value
    raise at.bad(
        value,
        "an integer >= 1 (units) or a float in (0, 1] (fraction of the group)",
        number_hint(value, want_int=isinstance(value, float) and value > 1),
    )


def _version(value: Any, at: At) -> int:
    if not (is_int(value) and value == 1):
        raise at.bad(value, "1 (the only policy format so far)", number_hint(value))
    return value


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


def _covers(exclude: str, pattern: str) -> bool:
    """Whether glob ``exclude`` matches every name that glob ``pattern`` matches (conservative)."""
    if set(exclude) <= {"*"}:
        return True
    if any(c in "?[" for c in exclude + pattern):
        return False  # character classes make containment undecidable by a simple match
    return fnmatchcase(pattern, exclude)  # `*` only: the pattern read literally must fit the exclude


# ----------------------------------------------------------------------------- the policy


@dataclasses.dataclass(frozen=True)
class Rule(Validated):
    """One entry of ``policy.rules``: which modules to gate, at which granularity, and how.

    Args:
        granularity: ``channel``, ``head`` or ``layer``.
        name: Shown in reports and errors; an empty name becomes ``rule<i>`` inside a :class:`Policy`.
        modules: ``fnmatch`` globs over module names (``model.named_modules()``); one string is wrapped.
        types: Module class names; a module matches if any class in its MRO has one. Empty: any type.
        exclude: Globs of module names the rule never matches; they win over ``modules``.
        min_keep: Units every group keeps: an int >= 1, or a float in (0, 1] as a fraction of the group.
        round_to: Kept unit counts are rounded up to a multiple of this (hardware-friendly shapes).
        penalty_weight: Multiplies the penalty's lambda for the groups of this rule.

    Raises:
        PolicyError: A field is out of range or of the wrong type, or ``exclude`` removes everything.

    Example:
        >>> Rule("channel", modules="encoder.*", types=["Linear"]).matches("encoder.fc", torch.nn.Linear(2, 2))
        True
    """

    granularity: Granularity
    name: str = ""
    modules: tuple[str, ...] = ("*",)
    types: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_keep: int | float = 1
    round_to: int = 1
    penalty_weight: float = 1.0

    _CHECKS: ClassVar[dict[str, Check]] = {
        "granularity": choice([g.value for g in Granularity], Granularity),
        "name": _name,
        "modules": strings("glob patterns", wrap_str=True, non_empty=True),
        "types": _class_names,
        "exclude": strings("glob patterns"),
        "min_keep": _min_keep,
        "round_to": integer("an integer >= 1", lambda v: v >= 1),
        "penalty_weight": real("a number >= 0", lambda v: v >= 0),
    }
    _REQUIRED_HINT: ClassVar[str] = "every rule needs a granularity: 'channel', 'head' or 'layer'"

    @classmethod
    def _cross_check(cls, values: dict[str, Any], at: At) -> None:
        modules, exclude = values["modules"], values["exclude"]
        if all(any(_covers(e, m) for e in exclude) for m in modules):
            raise at.child("exclude").error(
                f"got {list(exclude)!r}, which excludes everything modules {list(modules)!r} selects; "
                "expected patterns that leave some module selected (narrow exclude or drop the rule)"
            )

    def matches(self, module_name: str, module: torch.nn.Module | None = None) -> bool:
        """Whether this rule selects the module.

        Args:
            module_name: The module's name in ``model.named_modules()``.
            module: The module itself; needed when the rule has ``types`` (without it such a
                rule does not match).

        Returns:
            True if a ``modules`` glob matches, no ``exclude`` glob does, and the type fits.

        Example:
            >>> Rule("channel", exclude=["head*"]).matches("head.fc")
            False
        """
        if not any(fnmatchcase(module_name, p) for p in self.modules):
            return False
        if any(fnmatchcase(module_name, p) for p in self.exclude):
            return False
        if not self.types:
            return True
        return module is not None and any(c.__name__ in self.types for c in type(module).__mro__)

    def resolve_min_keep(self, n_units: int) -> int:
        """The number of units a group of ``n_units`` must keep under this rule.

        Args:
            n_units: Units in the group (>= 1).

        Returns:
            ``min_keep`` itself for an int, ``ceil(min_keep * n_units)`` for a fraction; always
            between 1 and ``n_units``.

        Raises:
            PolicyError: ``n_units`` < 1.

        Example:
            >>> Rule("channel", min_keep=0.25).resolve_min_keep(10)
            3
        """
        _check_count(self, "n_units", n_units, 1)
        if isinstance(self.min_keep, float):
            # round() first: 0.3 * 10 is 3.0000000000000004, which must not become 4
            keep = math.ceil(round(self.min_keep * n_units, 9))
        else:
            keep = self.min_keep
        return max(1, min(keep, n_units))

    def round_keep(self, k: int, n: int) -> int:
        """Round a kept-unit count ``k`` up to a multiple of ``round_to``, capped at ``n``.

        Args:
            k: Units to keep (0 <= k <= n).
            n: Units in the group.

        Returns:
            The rounded count.

        Raises:
            PolicyError: ``k`` or ``n`` is negative, or ``k`` > ``n``.

        Example:
            >>> Rule("channel", round_to=8).round_keep(9, 20)
            16
        """
        _check_count(self, "n", n, 0)
        _check_count(self, "k", k, 0)
        if k > n:
            raise PolicyError(f"rule {self.name!r}: round_keep got k={k} > n={n}; k must be at most n")
        return min(n, -(-k // self.round_to) * self.round_to)


def _check_count(rule: Rule, what: str, value: object, lo: int) -> None:
    if not is_int(value) or value < lo:
        raise PolicyError(f"rule {rule.name!r}: got {what}={value!r}, expected an integer >= {lo}")


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
        "tau": real("a number in (0, 1)", lambda v: 0 < v < 1),
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
        "lam": real("a number > 0", lambda v: v > 0),
        "p": real("a number in (0, 1)", lambda v: 0 < v < 1),
        "cost_weighting": choice(COST_WEIGHTINGS),
    }
    _YAML_KEYS: ClassVar[dict[str, str]] = {"lam": "lambda"}


@dataclasses.dataclass(frozen=True)
class Schedule(Validated):
    """The ``schedule`` section.

    Args:
        warmup_steps: Lambda ramps linearly from 0 to its value over these steps; >= 0.
        freeze_step: After this step the gates stop changing; ``None`` or > ``warmup_steps``.
    """

    warmup_steps: int = 0
    freeze_step: int | None = None

    _CHECKS: ClassVar[dict[str, Check]] = {
        "warmup_steps": integer("an integer >= 0", lambda v: v >= 0),
        "freeze_step": optional(integer("null or an integer >= 1", lambda v: v >= 1)),
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
        flops: Fraction of dense FLOPs to land on, in (0, 1); at most one of flops / params.
        params: Fraction of dense parameters to land on, in (0, 1).
        tolerance: How far from the fraction still counts as on target; in (0, 0.5].
    """

    flops: float | None = None
    params: float | None = None
    tolerance: float = 0.05

    _CHECKS: ClassVar[dict[str, Check]] = {
        "flops": optional(real("null or a fraction in (0, 1)", lambda v: 0 < v < 1)),
        "params": optional(real("null or a fraction in (0, 1)", lambda v: 0 < v < 1)),
        "tolerance": real("a number in (0, 0.5]", lambda v: 0 < v <= 0.5),
    }

    @classmethod
    def _cross_check(cls, values: dict[str, Any], at: At) -> None:
        if values["flops"] is not None and values["params"] is not None:
            raise at.child("params").bad(values["params"], "null when flops is set (at most one budget)")

    @property
    def metric(self) -> Literal["flops", "params"] | None:
        """``"flops"`` or ``"params"``, whichever budget is set, or ``None`` for no budget."""
        return "flops" if self.flops is not None else "params" if self.params is not None else None


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
                and all(any(_covers(p, m) for p in earlier.modules) for m in rule.modules)
            ):
                warn(
                    f"policy: rules[{i}] ({rule.name!r}) never matches: rules[{j}] ({earlier.name!r}) takes "
                    f"every module it selects first; move it earlier or narrow rules[{j}].modules"
                )
                break
