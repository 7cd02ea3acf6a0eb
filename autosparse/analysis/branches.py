"""Residual branches (layer granularity): ``y = x + f(x)`` where ``f`` is one child module.

A branch qualifies when the add's other operand is the output of a single child module ``C`` of
the module ``M`` that performs the add, and that output comes straight from a weight (Linear,
Conv, Hugging Face Conv1D) through nothing but identity-like ops (dropout, dtype casts). Then
``g * f(x)`` folds exactly into that weight's rows and bias, and ``g == 0`` lets compaction
drop ``C`` altogether. Pre-norm transformer blocks (attention and MLP sub-blocks) fit this;
post-activation CNN blocks (``relu(x + f(x))``) do not and are left to channel gates.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from autosparse.capture import Capture

aten = torch.ops.aten
_ADDS = {operator.add, torch.add, aten.add.Tensor, "add"}
_PASS = {aten.dropout.default, aten.alias.default, aten.clone.default, aten._to_copy.default,
         aten.to.dtype, aten.to.dtype_layout, aten.contiguous.default, torch.nn.functional.dropout,
         operator.getitem, "contiguous", "to",
         # a branch gate is one scalar per branch, so it passes any reshuffle of positions
         aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
         aten.transpose.int, "view", "reshape", "permute", "transpose"}
_PRODUCERS = {aten.linear.default, aten.addmm.default, aten.conv1d.default, aten.conv2d.default,
              torch.nn.functional.linear, torch.addmm}


@dataclass(frozen=True)
class Branch:
    """One residual branch: child module ``module`` of ``parent``, ending in weight ``weight``."""

    module: str
    parent: str
    kind: str  # class name of the branch module; branches of one kind compete in one gate
    weight: str
    bias: str | None
    out_dim: int  # dim of ``weight`` that indexes the branch's output features
    size: int  # number of output features


def _path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return str(node.target) if node.op == "call_module" else None
    return list(stack.values())[-1][0].replace("L['self'].", "").replace("L__self___", "")


def _producer(capture: Capture, node: fx.Node) -> tuple[fx.Node, str, str | None, int] | None:
    """Walk back through identity-like ops to a weighted op; return (node, weight, bias, out_dim)."""
    for _ in range(6):
        if node.op == "call_module":
            module = capture.module(node)
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and getattr(module, "groups", 1) == 1:
                bias = f"{node.target}.bias" if module.bias is not None else None
                return node, f"{node.target}.weight", bias, 0
            return None
        if node.op != "call_function" and node.op != "call_method":
            return None
        if node.target in _PRODUCERS:
            if node.target in (aten.addmm.default, torch.addmm):
                w, b = capture.tensor_name(node.args[2]), capture.tensor_name(node.args[0])
                return (node, w, b, 1) if w else None
            w = capture.tensor_name(node.args[1])
            b = capture.tensor_name(node.args[2]) if len(node.args) > 2 else None
            return (node, w, b, 0) if w else None
        if node.target not in _PASS or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


def find_branches(capture: Capture, model: nn.Module) -> list[Branch]:
    """Every residual branch that layer gates can fold into and compaction can remove."""
    modules = dict(model.named_modules())
    found: dict[str, Branch] = {}
    for node in capture.graph.nodes:
        if node.target not in _ADDS or len(node.args) < 2:
            continue
        parent = _path(node)
        if parent is None or parent not in modules:
            continue
        for operand in node.args[:2]:
            if not isinstance(operand, fx.Node):
                continue
            hit = _producer(capture, operand)
            if hit is None:
                continue
            child = _child_on_path(parent, _path(hit[0]) or "")
            while child is not None and isinstance(modules.get(child), (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
                child = _child_on_path(child, _path(hit[0]) or "")  # x = x + blocks[i](x): one unit per block
            if child is None or child in found or not _branch_output_is_module(operand, child):
                continue
            if isinstance(modules.get(child), (nn.Linear, nn.Conv1d, nn.Conv2d)) or child not in modules:
                continue  # the branch is more than its last weight: removing only that saves little
            if isinstance(modules.get(child), nn.MultiheadAttention):
                continue  # nn.TransformerEncoderLayer's fast path reads its internals: cannot stand in
            size = int(model.get_parameter(hit[1]).shape[hit[3]])
            found[child] = Branch(child, parent, type(modules[child]).__name__, hit[1], hit[2], hit[3], size)
    return list(found.values())


def _child_on_path(parent: str, path: str) -> str | None:
    prefix = f"{parent}." if parent else ""
    if not path.startswith(prefix) or path == parent:
        return None
    head = path[len(prefix):].split(".")[0]
    return prefix + head


def _branch_output_is_module(operand: fx.Node, child: str) -> bool:
    """The operand must be computed inside ``child`` (or be a pass-through of such a node)."""
    node = operand
    for _ in range(6):
        path = _path(node) or ""
        if path == child or path.startswith(child + "."):
            return True
        if node.target not in _PASS or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]
    return False
