"""YAML-shaped data to validated frozen dataclasses, with errors that point at ``file.yaml:7``.

Two parts. The loader: mappings load as :class:`LineDict` and sequences as :class:`LineList`: plain ``dict`` / ``list``
subclasses that also carry the 1-based line of each key or item. Everything else is PyYAML's
``SafeLoader``, plus two fixes for configuration files: ``1e-3`` reads as a float (YAML 1.1 would
read it as a string) and a key written twice in one mapping is an error instead of silently
keeping the last value.

The schema: :class:`Validated` dataclasses declare one check per field; :func:`parse` builds them
from a mapping and reports unknown, missing and invalid keys through :class:`At`, which knows the
key path (``rules[1].granularity``) and, for YAML input, the file and line. The same checks run
again in ``__post_init__``, so a directly constructed object is validated as well.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import operator
import os
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeGuard, cast

import yaml
from yaml.constructor import ConstructorError

from autosparse.errors import PolicyError

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class LineDict(dict):
    """A mapping read from YAML.

    Attributes:
        line: 1-based line where the mapping starts.
        lines: 1-based line of each key.
    """

    def __init__(self, line: int = 0) -> None:
        super().__init__()
        self.line = line
        self.lines: dict[object, int] = {}


class LineList(list):
    """A sequence read from YAML.

    Attributes:
        line: 1-based line where the sequence starts.
        lines: 1-based line of each item, by index.
    """

    def __init__(self, line: int = 0) -> None:
        super().__init__()
        self.line = line
        self.lines: dict[object, int] = {}


class LineLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that builds :class:`LineDict` / :class:`LineList` and rejects duplicate keys."""


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _construct_map(loader: LineLoader, node: yaml.MappingNode):
    data = LineDict(_line(node))
    yield data  # yielded before filling, so that recursive (anchored) structures work
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node)
        if isinstance(key, Hashable) and key in data.lines:
            raise ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r} (first on line {data.lines[key]})",
                key_node.start_mark,
            )
        if isinstance(key, Hashable):
            data.lines[key] = _line(key_node)
    data.update(loader.construct_mapping(node))
    for key_node, _ in node.value:  # keys brought in by a `<<` merge point where they are defined
        key = loader.construct_object(key_node)
        if isinstance(key, Hashable):
            data.lines.setdefault(key, _line(key_node))


def _construct_seq(loader: LineLoader, node: yaml.SequenceNode):
    data = LineList(_line(node))
    yield data
    data.extend(loader.construct_sequence(node))
    data.lines.update({i: _line(item) for i, item in enumerate(node.value)})


LineLoader.add_constructor(_MAP_TAG, _construct_map)
LineLoader.add_constructor(_SEQ_TAG, _construct_seq)
# YAML 1.1 needs a dot in a float ("1.0e-3"); people write "1e-3" and mean a number.
LineLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(path: str | os.PathLike[str]) -> object:
    """Read one YAML document with line tracking.

    Args:
        path: The file to read.

    Returns:
        The document: :class:`LineDict` / :class:`LineList` for mappings and sequences,
        ``None`` for an empty file.

    Raises:
        PolicyError: The file is missing or unreadable, or is not valid YAML (the message
            gives ``file:line``).

    Example:
        >>> load_yaml("configs/channels.yaml").lines["rules"]  # doctest: +SKIP
        12
    """
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        hint = ""
        if "\n" in name or ": " in name:
            hint = " (strings are file paths; to use YAML text, pass yaml.safe_load(text) instead)"
        raise PolicyError(f"policy file {name!r} not found{hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"policy file {name!r} could not be read: {e}") from e
    try:
        return yaml.load(text, Loader=LineLoader)
    except yaml.YAMLError as e:
        raise PolicyError(_describe(name, e)) from e


def _describe(name: str, error: yaml.YAMLError) -> str:
    """``file:line: what is wrong`` for a PyYAML error, without PyYAML's ``<unicode string>`` noise."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f"{name}:{mark.line + 1}" if mark is not None else name
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    what = ", ".join(p for p in parts if p) or str(error)
    return f"{where}: malformed YAML: {what}"


# ----------------------------------------------------------------------------- schema

Check = Callable[[Any, "At"], Any]


class SchemaCheck(Protocol):
    """A :data:`Check` that carries the JSON Schema fragment of what it accepts (see :func:`with_schema`)."""

    json_schema: dict[str, Any]

    def __call__(self, value: Any, at: At, /) -> Any: ...


class At:
    """Where a value sits: its key path and, for YAML input, its file and 1-based line."""

    def __init__(self, path: str, file: str | None = None, line: int | None = None, node: object = None):
        self.path, self.file, self.line = path, file, line
        self._lines: dict[object, int] = getattr(node, "lines", {})

    def child(self, key: object, node: object = None) -> At:
        path = f"{self.path}.{key}" if self.path else str(key)
        return At(path, self.file, self._lines.get(key, self.line), node)

    def item(self, index: int, node: object = None) -> At:
        return At(f"{self.path}[{index}]", self.file, self._lines.get(index, self.line), node)

    def error(self, problem: str) -> PolicyError:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        return PolicyError(f"{where}{self.path or 'policy'}: {problem}")

    def bad(self, value: object, expected: str, hint: str = "") -> PolicyError:
        shown = repr(plain(value))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return self.error(f"got {shown}, expected {expected}{hint}")


# ----------------------------------------------------------------------------- value checks
# Each check takes (value, where) and returns the normalised value or raises PolicyError.


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML `true` is not 1


def is_real(value: object) -> bool:
    # int or float, but not bool: the same as `is_int(value) or isinstance(value, float)`
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def number_hint(value: object, want_int: bool = False) -> str:
    if isinstance(value, bool):
        return " (true/false is not a number)"
    if want_int and isinstance(value, float) and value.is_integer():
        return f" (write {int(value)}, without a decimal point)"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (a string; write the number without quotes)"
    return ""


def did_you_mean(value: object, allowed: Sequence[str]) -> str:
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value.lower(), allowed, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def with_schema(fragment: dict[str, Any]) -> Callable[[Check], SchemaCheck]:
    """Attach the JSON Schema of what a check accepts; :func:`autosparse.policy.json_schema` reads it.

    The factories below derive both the check and its fragment from one set of bounds; a
    hand-written check (``_min_keep``) declares its fragment right on itself with this decorator.

    Example:
        >>> @with_schema({"const": 1})
        ... def one(value, at): return value
        >>> one.json_schema
        {'const': 1}
    """

    def attach(check: Check) -> SchemaCheck:
        checked = cast(SchemaCheck, check)
        checked.json_schema = fragment
        return checked

    return attach


_BOUNDS = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum", "le": "maximum"}


def _range_text(bounds: Mapping[str, float]) -> str:
    """``in (0, 0.5]`` or ``>= 1``: the bounds as the error messages and the docs write them."""
    lo = next(((k, v) for k, v in bounds.items() if k in ("gt", "ge")), None)
    hi = next(((k, v) for k, v in bounds.items() if k in ("lt", "le")), None)
    if lo and hi:
        return f"in {'(' if lo[0] == 'gt' else '['}{lo[1]:g}, {hi[1]:g}{')' if hi[0] == 'lt' else ']'}"
    op = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return " ".join(f"{op[k]} {v:g}" for k, v in bounds.items())


def _within(value: float, bounds: Mapping[str, float]) -> bool:
    return all(getattr(operator, k)(value, v) for k, v in bounds.items())


def _bounded(kind: str, noun: str, null: bool, bounds: Mapping[str, float]) -> SchemaCheck:
    """One number check and its schema from one set of bounds (``gt``/``ge``/``lt``/``le``)."""
    expected = f"{'null or ' if null else ''}{noun} {_range_text(bounds)}"
    is_ok = is_int if kind == "integer" else is_real
    fragment: dict[str, Any] = {"type": kind, **{_BOUNDS[k]: v for k, v in bounds.items()}}

    @with_schema({"anyOf": [fragment, {"type": "null"}]} if null else fragment)
    def check(value: Any, at: At) -> Any:
        if null and value is None:
            return None
        if not is_ok(value) or not _within(value, bounds):
            raise at.bad(value, expected, number_hint(value, want_int=kind == "integer"))
        return value if kind == "integer" else float(value)

    return check


def integer(*, null: bool = False, **bounds: int) -> SchemaCheck:
    """An integer within ``bounds`` (``ge=1``); ``null`` also takes None. Message: ``an integer >= 1``."""
    return _bounded("integer", "an integer", null, bounds)


def real(*, noun: str = "a number", null: bool = False, **bounds: float) -> SchemaCheck:
    """A finite number within ``bounds`` (``gt=0, lt=1``), returned as a float: ``a number in (0, 1)``."""
    return _bounded("number", noun, null, bounds)


def choice(allowed: Sequence[str], convert: Callable[[str], Any] = str) -> SchemaCheck:
    @with_schema({"type": "string", "enum": list(allowed)})
    def check(value: Any, at: At) -> Any:
        if isinstance(value, str) and value in allowed:
            return convert(value)
        raise at.bad(value, "one of " + ", ".join(map(repr, allowed)), did_you_mean(value, allowed))

    return check


def boolean() -> SchemaCheck:
    """``true`` or ``false``; a quoted ``"true"`` or a 0/1 gets a hint. Message: ``true or false``."""

    @with_schema({"type": "boolean"})
    def check(value: Any, at: At) -> bool:
        if isinstance(value, bool):
            return value
        quoted = isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no")
        hint = " (a string; write true or false without quotes)" if quoted else ""
        raise at.bad(value, "true or false", hint)

    return check


NON_BLANK = {"type": "string", "pattern": "\\S"}  # what `item.strip()` below accepts


def strings(what: str, *, wrap_str: bool = False, non_empty: bool = False,
            item: dict[str, Any] = NON_BLANK) -> SchemaCheck:
    """A list of non-empty strings (globs or class names); ``wrap_str`` also takes one bare string.
    ``item`` is the JSON Schema of one string (the caller's own check may narrow it further)."""
    array: dict[str, Any] = {"type": "array", "items": item, **({"minItems": 1} if non_empty else {})}

    @with_schema({"anyOf": [item, array]} if wrap_str else array)
    def check(value: Any, at: At) -> tuple[str, ...]:
        if wrap_str and isinstance(value, str):
            value = [value]
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            hint = f" (write [{value}])" if isinstance(value, str) else ""
            raise at.bad(value, f"a list of {what}", hint)
        if non_empty and not value:
            raise at.bad(value, f"a non-empty list of {what} (use ['*'] for every module)")
        for i, entry in enumerate(value):
            if not isinstance(entry, str) or not entry.strip():
                raise at.item(i).bad(entry, f"a non-empty string ({what})")
        return tuple(value)

    return check


def section(cls: type[Validated]) -> SchemaCheck:
    """A nested section: an instance as is, a mapping parsed, ``None`` for all defaults."""

    @with_schema({"anyOf": [{"$ref": f"#/$defs/{cls.__name__}"}, {"type": "null"}]})
    def check(value: Any, at: At) -> Validated:
        if isinstance(value, cls):
            return value
        return parse(cls, {} if value is None else value, at)

    return check


# ----------------------------------------------------------------------------- construction


def yaml_key(cls: type[Validated], attr: str) -> str:
    return cls._YAML_KEYS.get(attr, attr)


def parse(cls: type[Validated], raw: Any, at: At) -> Any:
    """Build ``cls`` from a mapping of YAML keys, reporting unknown, missing and bad keys by path."""
    fields = {yaml_key(cls, f.name): f for f in dataclasses.fields(cls)}
    allowed = ", ".join(fields)
    if not isinstance(raw, Mapping):
        hint = " (the file is empty)" if raw is None and at.file and not at.path else ""
        raise at.bad(raw, f"a mapping with keys {allowed}", hint)
    for key in raw:
        if key not in fields:
            hint = did_you_mean(key, list(fields))
            raise at.child(key).error(f"unknown key {key!r}; expected one of: {allowed}{hint}")
    values: dict[str, Any] = {}
    for key, field in fields.items():
        if key in raw:
            values[field.name] = cls._CHECKS[field.name](raw[key], at.child(key, raw[key]))
        elif field.default is not dataclasses.MISSING:
            values[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            values[field.name] = field.default_factory()
        else:
            raise at.child(key).error(f"required key is missing; {cls._REQUIRED_HINT}")
    cls._cross_check(values, at)
    return cls(**values)


class Validated:
    """Mixin: check and normalise every field at construction, so no invalid object can exist."""

    _CHECKS: ClassVar[dict[str, Check]] = {}
    _YAML_KEYS: ClassVar[dict[str, str]] = {}  # dataclass field -> YAML key, where they differ
    _REQUIRED_HINT: ClassVar[str] = ""
    if TYPE_CHECKING:  # set by @dataclass on every subclass; declared so dataclasses.fields() accepts them
        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __post_init__(self) -> None:
        at = At(type(self).__name__)
        values = {
            name: check(getattr(self, name), at.child(yaml_key(type(self), name)))
            for name, check in self._CHECKS.items()
        }
        self._cross_check(values, at)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def _cross_check(cls, values: dict[str, Any], at: At) -> None:
        """Checks that involve several fields; ``values`` are already normalised."""

    def to_dict(self) -> dict[str, Any]:
        """The section as plain YAML-ready data (YAML key names, lists, strings)."""
        return {yaml_key(type(self), f.name): plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def plain(value: object) -> object:
    if isinstance(value, Validated):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value
