"""The JSON Schema of a policy file, generated from the policy dataclasses, so it cannot drift.

Every field check carries the schema fragment of what it accepts (see
:func:`autosparse.policy.schema.with_schema`); descriptions come from the ``Args:`` section of each
dataclass's docstring and defaults from the dataclass defaults. ``configs/policy.schema.json`` is
this schema written out; the shipped YAML files point editors at it with a
``# yaml-language-server: $schema=policy.schema.json`` first line.

What JSON Schema cannot say, autosparse still checks when it loads a policy: rule names are unique,
``freeze_step > warmup_steps``, at most one of ``target.flops`` / ``target.params`` / ``target.latency``, an ``exclude``
that leaves something selected, and integers written as ``8.0`` (JSON has one number type).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from typing import Any

from autosparse.policy.document import GateConfig, PenaltyConfig, Policy, Schedule, Target
from autosparse.policy.rule import Rule
from autosparse.policy.schema import Validated, plain, yaml_key

DRAFT = "https://json-schema.org/draft/2020-12/schema"
SECTIONS: tuple[type[Validated], ...] = (Rule, GateConfig, PenaltyConfig, Schedule, Target)


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a policy document, as YAML editors and validators read it.

    Returns:
        A JSON-ready dict: the top-level policy object with ``$defs`` for the rule and each section.

    Raises:
        TypeError: a policy field has a check without a schema fragment (a bug in autosparse).

    Example:
        >>> json_schema()["properties"]["rules"]["items"]
        {'$ref': '#/$defs/Rule'}
    """
    top = _object(Policy)
    return {"$schema": DRAFT, "title": "autosparse policy", **top,
            "$defs": {cls.__name__: _object(cls) for cls in SECTIONS}}


def json_schema_text() -> str:
    """:func:`json_schema` as the text of ``configs/policy.schema.json`` (what ``autosparse policy --schema``
    prints).

    Example:
        >>> json_schema_text().startswith('{\\n  "$schema"')
        True
    """
    return json.dumps(json_schema(), indent=2) + "\n"


def _object(cls: type[Validated]) -> dict[str, Any]:
    """One dataclass as a closed JSON object: a property per YAML key, no other keys allowed."""
    docs = _field_docs(cls)
    properties, required = {}, []
    for f in dataclasses.fields(cls):
        fragment = getattr(cls._CHECKS.get(f.name), "json_schema", None)
        if fragment is None:
            raise TypeError(f"{cls.__name__}.{f.name}: its check has no JSON Schema fragment; "
                            "build it with autosparse.policy.schema's factories or @with_schema")
        prop = {"description": docs.get(f.name, ""), **fragment}
        if f.default is not dataclasses.MISSING:
            prop["default"] = plain(f.default)
        else:
            required.append(yaml_key(cls, f.name))
        properties[yaml_key(cls, f.name)] = prop
    summary = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    out: dict[str, Any] = {"description": summary, "type": "object", "properties": properties,
                           "additionalProperties": False}
    if required:
        out["required"] = required
    return out


def _field_docs(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``Args:`` section of a Google-style docstring (continuations joined)."""
    docs: dict[str, str] = {}
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    inside, current = False, None
    for line in lines:
        if line.strip() in ("Args:", "Raises:", "Example:", "Returns:"):
            inside, current = line.strip() == "Args:", None
            continue
        found = re.match(r"^    (\w+): (.*)$", line) if inside else None
        if found:
            current = found.group(1)
            docs[current] = found.group(2).strip()
        elif inside and current and line.startswith("        "):
            docs[current] += " " + line.strip()
    return docs
