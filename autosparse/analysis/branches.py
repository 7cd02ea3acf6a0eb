"""Residual branches (layer granularity): ``y = x + f(x)`` where ``f`` is one child module
(or is written inline in a block that returns ``x + f(x)``).

A branch qualifies when the add's other operand is the output of a single child module ``C`` of
the module ``M`` that performs the add, and that output comes straight, through nothing but
identity-like ops (dropout, dtype casts, reshapes), from

- a weight (Linear, Conv, Hugging Face Conv1D): ``g * f(x)`` folds into its output rows and bias;
- or an affine normalisation (BatchNorm, GroupNorm, LayerNorm, RMSNorm with a ``weight``):
  ``g * (w * n + b) == (g * w) * n + g * b``, exact in eval and in training (batch statistics
  do not depend on ``w``, ``b``). A bias is folded when there is one; a norm without ``weight``
  has nothing to fold into and is not a branch end.

Then ``g == 0`` lets compaction replace ``C`` by a ``ZeroBranch`` (zeros shaped like its input).
Pre-norm transformer blocks (attention and MLP sub-blocks) fit this, and so do post-activation CNN
blocks ``relu(x + body(x))`` (or ``h += x``) whose body ends in a BatchNorm, with an identity
shortcut. Every branch must also pass four checks:

- the add's other operand must not come from a sibling of ``C`` that reads ``C``'s own input (a
  projection or downsample shortcut); an earlier sibling feeding ``C`` (a stem) is fine;
- one of ``C``'s inputs must have the shape of its output, or a ``ZeroBranch`` cannot stand in;
- ``C`` must hold at least two weight matrices: a single conv(+norm) child is the tail of a branch
  written as siblings (``conv2(conv1(x))``), and removing it alone would leave the rest computing
  for nothing;
- nothing but the added output may leave ``C`` (T5's first attention also returns the position
  bias that later layers read, and a ZeroBranch returns None there).

``Branch.stream`` tells compaction when ``M`` may leave its ModuleList once every branch is gone:
only when ``M`` is nothing but its residual adds (a post-activation block still computes ``relu(x)``).

Inline branches: a block ``B`` whose own forward ends in ``return x + f(x)`` (Hugging Face
ConvNeXt) is a branch of its own (``Branch.inline``): with ``g == 0`` it computes ``x``, and
compaction replaces ``B`` by an ``IdentityBlock``. See :func:`_inline_blocks` for its conditions.

Containers: ``x = x + blocks[i](x)`` makes each ``blocks[i]`` a branch, but a container that is
itself called (``h = self.layer(x)`` with an ``nn.Sequential``, as Hugging Face ResNet does) is
the branch. The node's module stack tells which: a container descended into was never called.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from autosparse.capture import Capture

aten = torch.ops.aten
_ADDS = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor, "add", "add_"}
_PASS = {aten.dropout.default, aten.alias.default, aten.clone.default, aten._to_copy.default,
         aten.to.dtype, aten.to.dtype_layout, aten.contiguous.default, torch.nn.functional.dropout,
         operator.getitem, "contiguous", "to",
         # a branch gate is one scalar per branch, so it passes any reshuffle of positions
         aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
         aten.transpose.int, "view", "reshape", "permute", "transpose"}
_PRODUCERS = {aten.linear.default, aten.addmm.default, aten.conv1d.default, aten.conv2d.default,
              torch.nn.functional.linear, torch.addmm}
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORM_MODULES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
# norm op -> (position, keyword) of its weight and of its bias (None: the op has no bias)
_NORMS = {
    aten.batch_norm.default: ((1, "weight"), (2, "bias")),
    aten.native_batch_norm.default: ((1, "weight"), (2, "bias")),
    aten._native_batch_norm_legit_no_training.default: ((1, "weight"), (2, "bias")),
    aten._native_batch_norm_legit_functional.default: ((1, "weight"), (2, "bias")),
    aten.layer_norm.default: ((2, "weight"), (3, "bias")),
    aten.native_layer_norm.default: ((2, "weight"), (3, "bias")),
    aten.group_norm.default: ((2, "weight"), (3, "bias")),
    aten.rms_norm.default: ((2, "weight"), None),
    F.batch_norm: ((3, "weight"), (4, "bias")),
    F.layer_norm: ((2, "weight"), (3, "bias")),
    F.group_norm: ((2, "weight"), (3, "bias")),
    F.rms_norm: ((2, "weight"), None),
}
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
# ops that return their input's values unchanged in shape and layout (unlike _PASS's reshapes);
# a cast counts when it keeps the dtype (Hugging Face norms cast the residual to float32)
_SAME = {aten.alias.default, aten.clone.default, aten.contiguous.default, operator.getitem, "contiguous"}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, "to"}


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
    # every branch of ``parent`` when, with all of them zero, ``parent`` returns its input (so a
    # list may drop it); empty when something else runs on the stream, e.g. a post-add ReLU
    stream: tuple[str, ...] = ()
    # the branch is written inline: ``module`` returns ``x + f(x)`` as its last op, so with g == 0
    # the whole module computes ``x`` (``module == parent``; see autosparse/analysis/inline.py)
    inline: bool = False


def _clean(path: str) -> str:
    return path.replace("L['self'].", "").replace("L__self___", "")


def _path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        if node.op == "call_module":
            return str(node.target)
        # torch.fx leaves the stack empty in the root's own forward (torch.export names it "")
        return "" if node.op in ("call_function", "call_method") else None
    return _clean(list(stack.values())[-1][0])


def _stack(node: fx.Node) -> frozenset[str]:
    """Every module whose forward was running when ``node`` was recorded."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        return frozenset(_clean(v[0]) for v in stack.values())
    if node.op == "call_module":
        parts = str(node.target).split(".")
        return frozenset(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset()


def _arg(node: fx.Node, where: tuple[int, str] | None):
    if where is None:
        return None
    pos, key = where
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(key)


def _module_producer(capture: Capture, node: fx.Node) -> tuple[fx.Node, str, str | None, int] | None:
    module = capture.module(node)
    weighted = isinstance(module, _WEIGHTED) and getattr(module, "groups", 1) == 1
    affine = isinstance(module, _NORM_MODULES) and getattr(module, "weight", None) is not None
    if not (weighted or affine):
        return None
    bias = f"{node.target}.bias" if getattr(module, "bias", None) is not None else None
    return node, f"{node.target}.weight", bias, 0


def _function_producer(capture: Capture, node: fx.Node) -> tuple[fx.Node, str, str | None, int] | None:
    if node.target in (aten.addmm.default, torch.addmm):
        w, b = capture.tensor_name(node.args[2]), capture.tensor_name(node.args[0])
        return (node, w, b, 1) if w else None
    if node.target in _NORMS:
        weight, bias = _NORMS[node.target]
        w, b = capture.tensor_name(_arg(node, weight)), capture.tensor_name(_arg(node, bias))
        return (node, w, b, 0) if w else None  # no weight (affine=False): nothing to fold g into
    w = capture.tensor_name(node.args[1])
    b = capture.tensor_name(node.args[2]) if len(node.args) > 2 else None
    return (node, w, b, 0) if w else None


def _producer(capture: Capture, node: fx.Node) -> tuple[fx.Node, str, str | None, int] | None:
    """Walk back through identity-like ops to a weighted op; return (node, weight, bias, out_dim)."""
    for _ in range(6):
        if node.op == "call_module":
            return _module_producer(capture, node)
        if node.op != "call_function" and node.op != "call_method":
            return None
        if node.target in _PRODUCERS or node.target in _NORMS:
            return _function_producer(capture, node)
        if node.target not in _PASS or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


class _Modules:
    """Per-graph lookups: each node's module stack, and each module's inputs from outside it."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.stacks = {node: _stack(node) for node in capture.graph.nodes}
        self.members: dict[str, list[fx.Node]] = {}  # module -> the nodes computed inside it
        for node, stack in self.stacks.items():
            for path in stack:
                self.members.setdefault(path, []).append(node)
        self._inputs: dict[str, list[fx.Node]] = {}

    def exits(self, module: str) -> list[fx.Node]:
        """The nodes computed inside ``module`` that something outside it reads."""
        return [node for node in self.members.get(module, [])
                if any(module not in self.stacks[user] for user in node.users)]

    def unit(self, parent: str, node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
        """The child of ``parent`` that computed ``node``, looking inside containers never called."""
        path = _path(node) or ""
        child = _child_on_path(parent, path)
        while child is not None and isinstance(modules.get(child), _CONTAINERS) and child not in self.stacks[node]:
            child = _child_on_path(child, path)  # x = x + blocks[i](x): one unit per block
        return child

    def inputs(self, module: str) -> list[fx.Node]:
        """Activations ``module`` reads from outside itself (parameters and buffers left out)."""
        if module not in self._inputs:
            found: dict[fx.Node, None] = {}
            for node in self.members.get(module, []):
                found.update((a, None) for a in node.all_input_nodes if module not in self.stacks[a]
                             and a.op != "get_attr" and self.capture.tensor_name(a) is None)
            self._inputs[module] = list(found)
        return self._inputs[module]


def find_branches(capture: Capture, model: nn.Module) -> list[Branch]:
    """Every residual branch that layer gates can fold into and compaction can remove."""
    modules = dict(model.named_modules())
    lookup = _Modules(capture)
    found: dict[str, Branch] = {}
    adds: dict[str, list[tuple[fx.Node, fx.Node]]] = {}  # parent -> (add, skip operand) per branch
    for node in capture.graph.nodes:
        if node.target not in _ADDS or len(node.args) < 2:
            continue
        parent = _path(node)
        if parent is None or parent not in modules:
            continue
        for operand, other in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            if not isinstance(operand, fx.Node) or not isinstance(other, fx.Node):
                continue
            hit = _producer(capture, operand)
            if hit is None:
                continue
            child = lookup.unit(parent, hit[0], modules)
            if child is None or child in found or child not in modules:
                continue
            if not _is_branch(lookup, modules[child], child, parent, operand, other, modules):
                continue
            size = int(model.get_parameter(hit[1]).shape[hit[3]])
            found[child] = Branch(child, parent, type(modules[child]).__name__, hit[1], hit[2], hit[3], size)
            adds.setdefault(parent, []).append((node, other))
    streams = {parent: _returns_input(lookup, parent, pairs) for parent, pairs in adds.items()}
    out = [replace(b, stream=tuple(c.module for c in found.values() if c.parent == b.parent))
           if streams[b.parent] else b for b in found.values()]
    return out + _inline_blocks(lookup, model, modules, out)


def _is_branch(lookup: _Modules, module: nn.Module, child: str, parent: str, operand: fx.Node,
               other: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``parent`` adds ``child``'s output to a skip connection, and ``child`` can be replaced."""
    if isinstance(module, nn.MultiheadAttention):
        return False  # nn.TransformerEncoderLayer's fast path reads its internals: cannot stand in
    if sum(p.dim() >= 2 for p in module.parameters()) < 2:
        return False  # the branch is more than its last weight: removing only that saves little
    if not _branch_output_is_module(lookup, operand, child):
        return False
    return (_identity_shortcut(lookup, child, parent, other, modules)
            and _shaped_like_input(lookup, child, operand) and _only_output(lookup, child, operand))


def _identity_shortcut(lookup: _Modules, child: str, parent: str, other: fx.Node,
                       modules: dict[str, nn.Module]) -> bool:
    """The skip operand is not a projection of the branch's input (a downsample shortcut)."""
    sibling = lookup.unit(parent, other, modules)
    if sibling is None:
        return True  # computed by ``parent`` itself or before it: the block's input passing through
    if sibling == child:
        return False  # both operands come from the branch: no skip connection at all
    return not set(lookup.inputs(sibling)) & set(lookup.inputs(child))


def _shaped_like_input(lookup: _Modules, child: str, operand: fx.Node) -> bool:
    """A ZeroBranch returns zeros like its input, so some input must have the output's shape."""
    out = lookup.capture.shape(operand)
    shapes = [lookup.capture.shape(n) for n in lookup.inputs(child)]
    return out is None or out in shapes or all(s is None for s in shapes)


def _returns_input(lookup: _Modules, parent: str, pairs: list[tuple[fx.Node, fx.Node]]) -> bool:
    """With every branch zero ``parent`` computes ``x -> x``: each add's skip is the input or an
    earlier branch add, and all that leaves ``parent`` is a branch add (no activation after it)."""
    if not parent:
        return False  # the root is never a list entry
    stream = {add for add, _ in pairs}
    skips = [_unchanged(skip) for _, skip in pairs]
    if any(parent in lookup.stacks[skip] and skip not in stream for skip in skips):
        return False
    return all(_unchanged(node) in stream for node in lookup.exits(parent))


def _unchanged(node: fx.Node) -> fx.Node:
    """The node whose values ``node`` passes on unchanged (through aliases, copies, tuple items)."""
    for _ in range(6):
        if not node.args or not isinstance(node.args[0], fx.Node):
            break
        if node.target not in _SAME and not (node.target in _CASTS and _dtype(node) == _dtype(node.args[0])):
            break
        node = node.args[0]
    return node


def _dtype(node: fx.Node) -> torch.dtype | None:
    return getattr(node.meta.get("val", node.meta.get("tensor_meta")), "dtype", None)


def _only_output(lookup: _Modules, child: str, operand: fx.Node) -> bool:
    """Nothing else leaves the branch: a ZeroBranch returns None for a tuple's other entries (T5's
    first attention also returns the position bias every later layer reads)."""
    chain, node = {operand}, operand
    while node.target in _PASS and node.args and isinstance(node.args[0], fx.Node) and len(chain) < 8:
        node = node.args[0]
        chain.add(node)
    return all(node in chain for node in lookup.exits(child))


def _child_on_path(parent: str, path: str) -> str | None:
    prefix = f"{parent}." if parent else ""
    if not path.startswith(prefix) or path == parent:
        return None
    head = path[len(prefix):].split(".")[0]
    return prefix + head


def _branch_output_is_module(lookup: _Modules, operand: fx.Node, child: str) -> bool:
    """The operand must be computed inside ``child`` (or be a pass-through of such a node)."""
    node = operand
    for _ in range(6):
        if child in lookup.stacks[node]:
            return True
        if node.target not in _PASS or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]
    return False


# ------------------------------------------------------------------ branches written inline
_SCALES = {aten.mul.Tensor, aten.div.Tensor, operator.mul, operator.truediv, torch.mul, "mul", "div"}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout)


def _inline_blocks(lookup: _Modules, model: nn.Module, modules: dict[str, nn.Module],
                   taken: list[Branch]) -> list[Branch]:
    """Blocks ``B`` whose own forward ends in ``return x + f(x)``: with g == 0, ``B`` computes ``x``.

    The add must be what ``B`` returns, its other operand ``B``'s one input, and ``f`` end in a
    weight whose output reaches the add only through identity-like ops and scalings by constants
    (ConvNeXt's layer scale), each read by nothing else. A block next to (or inside) a branch of
    the child-module rule is left to that rule."""
    found: dict[str, Branch] = {}
    for node in lookup.capture.graph.nodes:
        plain = node.target in _ADDS and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1
        block = _path(node) if plain else None  # add(a, b, alpha=2) would not leave x when g == 0
        if not block or block in found or block not in modules or isinstance(modules[block], _CONTAINERS):
            continue
        if any(_nested(block, b.module) for b in [*taken, *found.values()]):
            continue
        for operand, other in ((node.args[1], node.args[0]), (node.args[0], node.args[1])):
            hit = _inline_producer(lookup, block, operand, node)
            if hit is None or not isinstance(other, fx.Node) or not _returns_skip(lookup, block, node, other):
                continue
            size = int(model.get_parameter(hit[1]).shape[hit[3]])
            kind = type(modules[block]).__name__
            found[block] = Branch(block, block, kind, hit[1], hit[2], hit[3], size, (block,), inline=True)
            break
    return list(found.values())


def _nested(a: str, b: str) -> bool:
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def _inline_producer(lookup: _Modules, block: str, operand, add: fx.Node):
    """Walk back from the add to a weight inside ``block`` through ops that commute with a scalar;
    every node on the way must be read only by the next one (``g`` folds into the weight's output)."""
    node, reader = operand, add
    for _ in range(10):
        if not isinstance(node, fx.Node) or block not in lookup.stacks[node] or list(node.users) != [reader]:
            return None
        reader = node
        if node.op == "call_module" and isinstance(lookup.capture.module(node), _IDENTITY_MODULES):
            node = node.args[0] if node.args else None
        elif node.target in _SCALES and len(node.args) == 2:
            node = _scaled(lookup.capture, node)
        elif node.target in _PASS and node.args:
            node = node.args[0]
        else:
            hit = _producer(lookup.capture, node)
            return hit if hit is not None and hit[0] is node else None
    return None


def _scaled(capture: Capture, node: fx.Node) -> fx.Node | None:
    """The activation operand of ``a * c`` (or ``a / c``) when ``c`` is a number, parameter or buffer."""
    first, second = node.args
    divide = node.target in (aten.div.Tensor, operator.truediv, "div")
    for act, const in ((first, second), (second, first))[: 1 if divide else 2]:
        constant = isinstance(const, (int, float)) or (
            isinstance(const, fx.Node) and (const.op == "get_attr" or capture.tensor_name(const) is not None))
        if isinstance(act, fx.Node) and constant:
            return act
    return None


def _returns_skip(lookup: _Modules, block: str, add: fx.Node, other: fx.Node) -> bool:
    """``block`` reads one activation, adds it unchanged, and returns that add, shaped like it."""
    skip = _unchanged(other)
    if block in lookup.stacks[skip] or lookup.inputs(block) != [skip]:
        return False
    exits = lookup.exits(block)
    if not exits or any(_unchanged(n) is not add for n in exits):
        return False
    shape = lookup.capture.shape(add)
    return shape is not None and shape == lookup.capture.shape(skip)
