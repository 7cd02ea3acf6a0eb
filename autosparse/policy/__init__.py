"""The policy stage: what to gate and how to train it, parsed and validated before anything runs.

* :mod:`~autosparse.policy.schema`: the strict mapping -> dataclass layer (unknown keys, types, hints);
* :mod:`~autosparse.policy.rule`: one rule (which modules, which granularity, ``min_keep`` / ``round_to``);
* :mod:`~autosparse.policy.document`: the whole document (rules, gate, penalty, schedule, target);
* :mod:`~autosparse.policy.json_schema`: the JSON Schema of a policy file, generated from the above.
"""

from __future__ import annotations

from autosparse.policy.document import (
    COST_WEIGHTINGS,
    GATE_KINDS,
    CostWeighting,
    GateConfig,
    GateKind,
    PenaltyConfig,
    Policy,
    Schedule,
    Target,
    load_policy,
)
from autosparse.policy.json_schema import json_schema, json_schema_text
from autosparse.policy.rule import Granularity, Rule

__all__ = [
    "COST_WEIGHTINGS",
    "GATE_KINDS",
    "CostWeighting",
    "GateConfig",
    "GateKind",
    "Granularity",
    "PenaltyConfig",
    "Policy",
    "Rule",
    "Schedule",
    "Target",
    "json_schema",
    "json_schema_text",
    "load_policy",
]
