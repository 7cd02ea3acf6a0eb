"""Coupled-structure analysis: graph -> groups of units that must be removed together."""

from __future__ import annotations

import time
from collections.abc import Mapping

from autosparse.analysis import ops_experts, ops_layers, ops_mha, ops_shape, ops_tables, ops_tensor
from autosparse.analysis.context import Member, Role
from autosparse.analysis.groups import Analysis, Group, build_groups, walk
from autosparse.analysis.registry import Handler, Registry, RuleKey
from autosparse.capture import Capture

DEFAULT_RULES = Registry()
ops_tensor.register(DEFAULT_RULES)
ops_shape.register(DEFAULT_RULES)
ops_layers.register(DEFAULT_RULES)
ops_mha.register(DEFAULT_RULES)
ops_tables.register(DEFAULT_RULES)
ops_experts.register(DEFAULT_RULES)


def analyze(capture: Capture, op_rules: Registry | Mapping[RuleKey, Handler] | None = None) -> Analysis:
    """Find every group of coupled units in a captured graph (pure: the model is not touched)."""
    start = time.perf_counter()
    if isinstance(op_rules, Registry):
        rules = op_rules
    else:
        rules = DEFAULT_RULES.extended(op_rules) if op_rules else DEFAULT_RULES
    result = build_groups(walk(capture, rules))
    result.seconds = time.perf_counter() - start
    return result


__all__ = ["DEFAULT_RULES", "Analysis", "Group", "Member", "Registry", "Role", "analyze"]
