"""One policy rule: which modules to gate, at which granularity, and how many units to keep.

:class:`Rule` and :class:`Granularity`, with the field checks only a rule needs. The rest of the
policy (the gate / penalty / schedule / target sections, :class:`~autosparse.policy.Policy` and
:func:`~autosparse.policy.load_policy`) lives in :mod:`autosparse.policy`, which re-exports both
names here: import them from there.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from fnmatch import fnmatchcase
from typing import Any, ClassVar

import torch

from autosparse.errors import PolicyError
from autosparse.policy.schema import (
    At,
    Check,
    Validated,
    boolean,
    choice,
    integer,
    is_int,
    number_hint,
    real,
    strings,
    with_schema,
)


class Granularity(str, enum.Enum):
    """What one unit of a group is: an output channel, an attention head, or a whole residual branch."""

    CHANNEL = "channel"
    HEAD = "head"
    LAYER = "layer"

    def __str__(self) -> str:
        return self.value



# ----------------------------------------------------------------------------- field checks of a rule


_CLASS_NAMES = strings("module class names", item={"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"})


@with_schema(_CLASS_NAMES.json_schema)
def _class_names(value: Any, at: At) -> tuple[str, ...]:
    names = _CLASS_NAMES(value, at)
    for i, name in enumerate(names):
        if not name.isidentifier():
            hint = f" (write {name.rsplit('.', 1)[-1]!r})" if "." in name else ""
            raise at.item(i).bad(name, "a bare class name such as 'Conv2d'", hint)
    return names


@with_schema({"type": "string"})
def _name(value: Any, at: At) -> str:
    if not isinstance(value, str):
        raise at.bad(value, "a string (the rule's name)")
    return value


@with_schema({"anyOf": [{"type": "integer", "minimum": 1},
                         {"type": "number", "exclusiveMinimum": 0, "maximum": 1}]})
def _min_keep(value: Any, at: At) -> int | float:
    if (is_int(value) and value >= 1) or (isinstance(value, float) and 0 < value <= 1):
        return value
    raise at.bad(
        value,
        "an integer >= 1 (units) or a float in (0, 1] (fraction of the group)",
        number_hint(value, want_int=isinstance(value, float) and value > 1),
    )


def glob_covers(exclude: str, pattern: str) -> bool:
    """Whether glob ``exclude`` matches every name that glob ``pattern`` matches (conservative)."""
    if set(exclude) <= {"*"}:
        return True
    if any(c in "?[" for c in exclude + pattern):
        return False  # character classes make containment undecidable by a simple match
    return fnmatchcase(pattern, exclude)  # `*` only: the pattern read literally must fit the exclude


# ----------------------------------------------------------------------------- the rule


@dataclasses.dataclass(frozen=True)
class Rule(Validated):
    """One entry of ``policy.rules``: which modules to gate, at which granularity, and how.

    Args:
        granularity: ``channel``, ``head`` or ``layer``.
        name: Shown in reports and errors; an empty name becomes ``rule<i>`` inside a :class:`Policy`.
        modules: ``fnmatch`` globs over module names (``model.named_modules()``); one string is wrapped.
        types: Module class names; a module matches if any class in its MRO has one. Empty: any type.
        exclude: Globs of module names the rule never matches; they win over ``modules``. Excluding
            one member of a coupled group (say a stem conv that feeds a residual stream) keeps
            the whole group out of this rule, so the excluded module's width stays.
        min_keep: Units every group keeps: an int >= 1, or a float in (0, 1] as a fraction of the group.
        round_to: Kept unit counts are rounded up to a multiple of this (hardware-friendly shapes).
        penalty_weight: Multiplies the penalty's lambda for the groups of this rule.
        uniform: Every group of this rule keeps the same number of units (heads per layer, MLP
            width per layer), so a Hugging Face config can state the widths and plain
            ``from_pretrained`` loads the compacted model. The freeze step cuts each group to the
            rounded mean of the groups' open units (its lowest gates go); channel and head rules only.

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
    uniform: bool = False

    _CHECKS: ClassVar[dict[str, Check]] = {
        "granularity": choice([g.value for g in Granularity], Granularity),
        "name": _name,
        "modules": strings("glob patterns", wrap_str=True, non_empty=True),
        "types": _class_names,
        "exclude": strings("glob patterns"),
        "min_keep": _min_keep,
        "round_to": integer(ge=1),
        "penalty_weight": real(ge=0),
        "uniform": boolean(),
    }
    _REQUIRED_HINT: ClassVar[str] = "every rule needs a granularity: 'channel', 'head' or 'layer'"

    @classmethod
    def _cross_check(cls, values: dict[str, Any], at: At) -> None:
        if values["uniform"] and values["granularity"] == Granularity.LAYER:
            raise at.child("uniform").error(
                "got true on a layer rule; a layer rule's branches already form one group, so there is "
                "nothing to make uniform: drop uniform, or put it on a channel or head rule"
            )
        modules, exclude = values["modules"], values["exclude"]
        if all(any(glob_covers(e, m) for e in exclude) for m in modules):
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
        return self.selects(module_name, module) and self.excluded_by(module_name) is None

    def selects(self, module_name: str, module: torch.nn.Module | None = None) -> bool:
        """Whether ``modules`` and ``types`` select the module, before ``exclude`` is applied.

        Example:
            >>> Rule("channel", exclude=["head*"]).selects("head.fc")
            True
        """
        if not any(fnmatchcase(module_name, p) for p in self.modules):
            return False
        if not self.types:
            return True
        return module is not None and any(c.__name__ in self.types for c in type(module).__mro__)

    def excluded_by(self, module_name: str) -> str | None:
        """The first ``exclude`` glob that matches the module's name, or ``None``.

        A plan uses it on every member of a coupled group: one excluded member keeps the whole
        group ungated by this rule, since its units cannot go without the excluded module's.

        Example:
            >>> Rule("channel", exclude=["stem*", "head"]).excluded_by("stem.0")
            'stem*'
        """
        return next((p for p in self.exclude if fnmatchcase(module_name, p)), None)

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


    def kept_count(self, nonzero: int, n: int) -> int:
        """How many of a group's ``n`` units survive compaction when ``nonzero`` gates are open:
        at least ``min_keep``, rounded up to ``round_to`` (the one place this rule is written down).

        Example:
            >>> Rule("channel", min_keep=2, round_to=4).kept_count(5, 20)
            8
        """
        return self.round_keep(max(nonzero, self.resolve_min_keep(n)), n)


def _check_count(rule: Rule, what: str, value: object, lo: int) -> None:
    if not is_int(value) or value < lo:
        raise PolicyError(f"rule {rule.name!r}: got {what}={value!r}, expected an integer >= {lo}")
