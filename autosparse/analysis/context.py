"""What an op rule sees: labels of its inputs, shapes, names, and the analysis state it updates."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx

from autosparse.analysis.labels import Label, normalize
from autosparse.analysis.unionfind import Elements
from autosparse.capture import Capture


class Role(str, enum.Enum):
    """What an op does with the elements of a :class:`Member`."""

    PRODUCER = "producer"  # creates them (a weight's output rows, its bias)
    CONSUMER = "consumer"  # contracts them away (a weight's input columns): a gate site
    FOLLOWER = "follower"  # applies element-wise (a norm's scale and shift)

    def __str__(self) -> str:
        return self.value


@dataclass
class Member:
    """A slice of one parameter or buffer that follows a set of elements.

    ``ids[i]`` is the element at position ``i`` of dimension ``dim`` of tensor ``name``.
    ``role`` says what the op does with these elements (:class:`Role`).
    """

    name: str
    dim: int
    ids: np.ndarray
    role: Role
    where: str


@dataclass(frozen=True)
class Derived:
    """A tensor computed element-wise from 1-D parameters or buffers (a frozen BatchNorm's scale).

    Position ``i`` along ``dim`` (of size ``size``) depends on entry ``i`` of each tensor of
    ``sources`` and on nothing else that varies along ``dim``, so slicing the sources slices it.
    See :mod:`autosparse.analysis.derived`.
    """

    dim: int
    size: int
    sources: tuple[str, ...]


@dataclass
class State:
    """Mutable analysis state shared by every rule while walking one graph."""

    capture: Capture
    elements: Elements = field(default_factory=Elements)
    env: dict[fx.Node, Any] = field(default_factory=dict)
    members: list[Member] = field(default_factory=list)
    head_elements: set[int] = field(default_factory=set)
    unknown: list[str] = field(default_factory=list)
    modules: dict[fx.Node, torch.nn.Module | None] = field(default_factory=dict)  # memo of module()

    live: set[fx.Node] | None = None  # nodes whose value can reach an output (see reaches_output)
    # Tensors also used where slicing them would change a value (a sum over a norm's weight):
    # any channels they follow are blocked when groups are built. Name -> where.
    pinned: dict[str, str] = field(default_factory=dict)
    # (ids, other ids, reason): a size read off another tensor that must shrink with these channels
    # (``x.view(b, c, 1, 1)`` with ``c`` read before a later op unites them); checked after the walk.
    same_size: list[tuple[np.ndarray, np.ndarray, str]] = field(default_factory=list)
    # Features that never became a group (a weighted op whose weight is computed in forward, such
    # as a weight-standardised conv): (module, reason), so explain() still lists them.
    refused: dict[str, str] = field(default_factory=dict)
    # (ids, k): the group holding these channels must keep a multiple of k of them (a kernel's
    # alignment, e.g. a grouped matmul's 16-byte strides); the plan rounds its rule's round_to up.
    multiple_of: list[tuple[np.ndarray, int]] = field(default_factory=list)

    def reaches_output(self, node: fx.Node) -> bool:
        """Whether ``node``'s value can affect the model's outputs.

        A node is live if it is the output, may have side effects (fx's impure ops, and any
        method or op whose name ends in ``_``: in-place), or feeds a live node. A dead value still
        runs in the eager model, so its ops must stay shape-consistent; only constraints on its
        *values* (a reduction over channels) can be skipped.
        """
        if self.live is None:
            self.live = set()
            for n in reversed(self.capture.graph.nodes):
                if n.op == "output" or _may_mutate(n) or any(u in self.live for u in n.users):
                    self.live.add(n)
        return node in self.live

    def module(self, node: fx.Node) -> torch.nn.Module | None:
        """The module a call_module node calls (memoised: rules ask several times per node)."""
        if node.op != "call_module":
            return None
        if node not in self.modules:
            self.modules[node] = self.capture.module(node)
        return self.modules[node]


def _may_mutate(node: fx.Node) -> bool:
    if node.op == "call_module":
        return True  # a module may keep state (BatchNorm statistics, caches)
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    trailing = str(name).split(".")[0] if "." in str(name) else str(name)
    try:
        impure = node.is_impure()
    except Exception:  # is_impure inspects the target; unknown targets count as impure
        impure = True
    return impure or (trailing.endswith("_") and not trailing.endswith("__"))


class OpContext:
    """The view of one fx node given to its rule."""

    def __init__(self, state: State, node: fx.Node) -> None:
        self.state = state
        self.node = node
        self.elements = state.elements
        self.where = state.capture.where(node)

    # -- reading -------------------------------------------------------------------------------
    @property
    def args(self) -> tuple:
        return self.node.args

    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        if index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def label(self, value: Any) -> Label | None:
        found = self.state.env.get(value) if isinstance(value, fx.Node) else None
        return found if isinstance(found, Label) else None

    def shape(self, value: Any = None) -> tuple[int, ...] | None:
        return self.state.capture.shape(self.node if value is None else value)

    def tensor_shape(self, value: Any = None) -> tuple[int, ...]:
        """:meth:`shape` of a value the rule knows is a tensor (its output, a weighted op's input)."""
        shape = self.shape(value)
        if shape is None:  # the TypeError that indexing None would raise, with a readable message
            raise TypeError(f"{self.node if value is None else value} at {self.where} is not a tensor")
        return shape

    def ndim(self, value: Any = None) -> int:
        shape = self.shape(value)
        return len(shape) if shape is not None else 0

    def tensor_name(self, value: Any) -> str | None:
        return self.state.capture.tensor_name(value)

    def derived(self, value: Any) -> Derived | None:
        found = self.state.env.get(value) if isinstance(value, fx.Node) else None
        return found if isinstance(found, Derived) else None

    def sources(self, value: Any, dim: int = 0) -> list[tuple[str, int]] | None:
        """The (tensor, dim) slices that slice ``value`` along ``dim`` when cut with it: ``[]`` for
        no tensor, the parameter/buffer it is, the 1-D sources of a :class:`Derived` vector varying
        along ``dim``; None for a computed tensor that nothing can slice."""
        if not isinstance(value, fx.Node) or self.shape(value) is None:
            return []
        name = self.tensor_name(value)
        if name is not None:
            return [(name, dim % max(self.ndim(value), 1))]
        found = self.derived(value)
        if found is not None and found.dim == dim % max(self.ndim(value), 1):
            return [(source, 0) for source in found.sources]
        return None

    def module(self) -> torch.nn.Module | None:
        return self.state.module(self.node)

    def owner(self) -> torch.nn.Module | None:
        """The innermost module whose forward holds the node (the tracer's module stack), or None."""
        stack = self.node.meta.get("nn_module_stack") or {}
        model = self.state.capture.model
        if not stack or model is None:
            return None
        try:
            return model.get_submodule(list(stack.values())[-1][0])
        except AttributeError:
            return None

    def owner_name(self) -> str:
        """The path of :meth:`owner` (the call_module target, else the node's name)."""
        if self.node.op == "call_module":
            return str(self.node.target)
        stack = self.node.meta.get("nn_module_stack") or {}
        return str(list(stack.values())[-1][0]) if stack else self.node.name

    def module_param(self, attr: str) -> str | None:
        """FQN of ``attr`` on a call_module node's module, if it is a tensor there."""
        module = self.module()
        if module is None or getattr(module, attr, None) is None:
            return None
        return f"{self.node.target}.{attr}"

    def tensor_inputs(self) -> list[fx.Node]:
        flat: list[Any] = []
        fx.node.map_arg((self.node.args, self.node.kwargs), flat.append)
        return [n for n in flat if self.shape(n) is not None]

    # -- writing -------------------------------------------------------------------------------
    def output(self, label: Label | Derived | list | None) -> None:
        self.state.env[self.node] = label

    def new(self, count: int) -> np.ndarray:
        return self.elements.new(count)

    def member(self, name: str | None, dim: int, ids: np.ndarray, role: Role) -> None:
        if name is not None:
            self.state.members.append(Member(name, dim, np.asarray(ids), role, self.where))

    def block(self, label: Label | None, why: str) -> None:
        if label is not None:
            self.elements.block(label.ids, f"{why} at {self.where}")

    def block_inputs(self, why: str) -> None:
        for node in self.tensor_inputs():
            self.block(self.label(node), why)

    def normalize(self, ids: np.ndarray, why: str) -> Label | None:
        return normalize(self.elements, ids, f"{why} at {self.where}")
