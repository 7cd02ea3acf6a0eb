"""Seeded random architectures for soundness fuzzing.

``generate(seed)`` draws a :class:`Spec`: a DAG of nodes over four kinds of values (``img`` B,C,H,W;
``sig`` B,C,L; ``seq`` B,T,D; ``flat`` B,F), each node one op from :data:`OPS`. ``FuzzNet(spec)``
turns it into an ``nn.Module`` whose ``forward`` is a loop over the spec, unrolled by
``torch.fx.symbolic_trace``. Every op has a category:

- ``safe``: the analysis has a rule that may let channels through (conv, norms, attention, ...);
- ``block``: the analysis has a rule that must refuse the channels it touches (channel softmax, ...);
- ``unknown``: no rule exists (roll, gather, a ``torch.library`` custom op, ...); the channels it
  touches must be kept whole and the op must show up in ``explain()``.

The net records the input shape of every ``block`` / ``unknown`` node when run eagerly, so a
checker can prove that compaction never changed what such an op sees. Everything is a function
of the seed: the spec, the weights (``torch.manual_seed(seed)``), the inputs.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

B = 2  # batch size of every generated input
CDIM = {"img": 1, "sig": 1, "seq": 2, "flat": 1}  # where each kind of value keeps its channels


@torch.library.custom_op("autosparse_fuzz::opaque", mutates_args=())
def opaque(x: torch.Tensor) -> torch.Tensor:
    """A custom op autosparse has no rule for; it mixes channels, so compacting through it is wrong."""
    return x.roll(1, 1) + x


@opaque.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@dataclass(frozen=True)
class Node:
    """One op of a spec: ``v<i+1> = op(*[v<j> for j in inputs])``; value 0 is the model input."""

    op: str
    inputs: tuple[int, ...]
    kind: str
    shape: tuple[int, ...]
    arg: tuple = ()


@dataclass(frozen=True)
class Spec:
    seed: int
    in_kind: str
    in_shape: tuple[int, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[int, ...]
    capture: str = "fx"  # "export": the model defeats torch.fx, so capture falls back to torch.export

    def code(self) -> str:
        """A readable listing, printed with every failure so a case can be rebuilt by hand."""
        lines = [f"# seed {self.seed}: v0 = input {self.in_kind} {self.in_shape}, captured by {self.capture}"]
        for i, n in enumerate(self.nodes, 1):
            args = ", ".join(f"v{j}" for j in n.inputs)
            lines.append(f"v{i} = {n.op}({args}{', ' if n.arg else ''}{', '.join(map(repr, n.arg))})"
                         f"  # {n.kind} {n.shape}")
        lines.append("return " + ", ".join(f"v{j}" for j in self.outputs))
        return "\n".join(lines)

    def categories(self) -> set[str]:
        return {OPS[n.op].category for n in self.nodes if n.op in OPS}


@dataclass(frozen=True)
class Op:
    """How to propose an op on a value (``None``: not applicable) and its category."""

    category: str
    kinds: tuple[str, ...]
    propose: Callable[[random.Random, tuple[int, ...], str], tuple[str, tuple[int, ...], tuple] | None]
    weight: int = 1  # relative frequency within its category


def _divisors(n: int, lo: int = 2) -> list[int]:
    return [d for d in range(lo, n + 1) if n % d == 0]


def _with_c(shape: tuple[int, ...], kind: str, c: int) -> tuple[int, ...]:
    out = list(shape)
    out[CDIM[kind]] = c
    return tuple(out)


def _spatial(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    return shape[2:] if kind in ("img", "sig") else ()


def _scale_spatial(shape: tuple[int, ...], f: float) -> tuple[int, ...]:
    return shape[:2] + tuple(int(s * f) for s in shape[2:])


def _width(rng: random.Random) -> int:
    return rng.choice([1, 2, 3, 4, 4, 6, 8, 8, 12]) if rng.random() < 0.15 else rng.choice([2, 3, 4, 6, 8])


# ----------------------------------------------------------------------------- op proposals
def _p_conv(rng, s, k):
    cout, ksz = _width(rng), rng.choice([1, 3])
    stride = 2 if min(_spatial(s, k)) >= 4 and rng.random() < 0.2 else 1
    return k, (s[0], cout) + tuple(-(-d // stride) for d in s[2:]), (cout, ksz, stride, rng.random() < 0.7)


def _p_gconv(rng, s, k):
    gs = [g for g in _divisors(s[1]) if g < s[1]]
    if not gs:
        return None
    g = rng.choice(gs)
    cout = g * rng.choice([1, 2])
    return k, _with_c(s, k, cout), (cout, g)


def _p_dwconv(rng, s, k):
    mult = rng.choice([1, 1, 2])
    return k, _with_c(s, k, s[1] * mult), (mult,)


def _p_convt(rng, s, k):
    ksz = rng.choice([1, 2])
    if max(_spatial(s, k)) * ksz > 16:
        return None
    cout = _width(rng)
    return k, _with_c(_scale_spatial(s, ksz), k, cout), (cout, ksz)


def _p_gn(rng, s, k):
    gs = [g for g in _divisors(s[1]) if g > 1]
    return (k, s, (rng.choice(gs),)) if gs else None


ACTS = ("relu", "gelu", "silu", "sigmoid", "tanh", "leaky", "hardswish", "F.relu", "F.gelu", "torch.tanh",
        "sigmoid_", "relu6")


def _p_act(rng, s, k):
    return k, s, (rng.choice(ACTS),)


def _p_same(rng, s, k):
    return k, s, ()


def _p_scale(rng, s, k):
    return k, s, (rng.choice(["mul", "add"]),)


def _p_pool(rng, s, k):
    sp = _spatial(s, k)
    mode = rng.choice(["max", "avg", "F.max", "adaptive"])
    if mode == "adaptive":
        return k, s[:2] + (1,) * len(sp), (mode,)
    if min(sp) < 2:
        return None
    return k, s[:2] + tuple(d // 2 for d in sp), (mode,)


def _p_up(rng, s, k):
    return (k, _scale_spatial(s, 2), (rng.choice(["module", "F"]),)) if max(_spatial(s, k)) <= 8 else None


def _p_spad(rng, s, k):
    return (k, s[:2] + tuple(d + 2 for d in _spatial(s, k)), ()) if max(_spatial(s, k)) <= 10 else None


def _p_pshuffle(rng, s, k):
    return (k, (B, s[1] // 4, s[2] * 2, s[3] * 2), ()) if s[1] % 4 == 0 and s[2] <= 8 else None


def _p_punshuffle(rng, s, k):
    return (k, (B, s[1] * 4, s[2] // 2, s[3] // 2), ()) if s[2] % 2 == 0 and s[3] % 2 == 0 else None


def _p_shuffle(rng, s, k):
    gs = [g for g in _divisors(s[1]) if g < s[1]]
    return (k, s, (rng.choice(gs),)) if gs else None


def _p_chunk(rng, s, k):
    ks = [d for d in _divisors(s[CDIM[k]]) if d <= 3]
    if not ks:
        return None
    n = rng.choice(ks)
    return k, _with_c(s, k, s[CDIM[k]] // n), (n,)


def _p_glu(rng, s, k):
    c = s[CDIM[k]]
    return (k, _with_c(s, k, c // 2), ()) if c % 2 == 0 else None


def _p_revcat(rng, s, k):
    ks = [d for d in _divisors(s[CDIM[k]]) if d <= 4]
    return (k, s, (rng.choice(ks), rng.choice(["list", "slice"]))) if ks else None


def _p_flatten(rng, s, k):
    return ("flat", (B, math.prod(s[1:])), ()) if math.prod(s[1:]) <= 256 else None


def _p_gap(rng, s, k):
    return "flat", (B, s[1]), ()


def _p_to_seq(rng, s, k):
    return "seq", (B, math.prod(s[2:]), s[1]), ()


def _p_to_sig(rng, s, k):
    return "sig", (B, s[2], s[1]), ()


def _p_linear(rng, s, k):
    cout = _width(rng)
    return k, s[:-1] + (cout,), (cout, rng.random() < 0.7)


def _p_attn(rng, s, k):
    d = s[2]
    head_dims = [h for h in (1, 2, 3, 4) if d % h == 0 and d // h >= 2]
    if not head_dims:
        return None
    hd = rng.choice(head_dims)
    heads = d // hd
    kv = rng.choice([g for g in _divisors(heads, 1)]) if rng.random() < 0.3 else heads
    view = rng.choice(["neg1", "neg1", "fixed", "size"])
    core = rng.choice(["sdpa", "manual"]) if kv == heads else "sdpa"
    packed = rng.choice(["chunk", "split"]) if kv == heads and rng.random() < 0.3 else ""
    return k, s, (heads, hd, kv, view, core, packed)


def _p_resblock(rng, s, k):
    styles = ["plain", "list"] + (["prenorm"] if k == "seq" else [])
    return k, s, (rng.choice([2, 4, 8]), rng.choice(styles))


def _p_cl_linear(rng, s, k):
    cout = _width(rng)
    return k, _with_c(s, k, cout), (cout,)


def _p_tokpool(rng, s, k):
    return "flat", (B, s[2]), (rng.choice(["mean", "first"]),)


def _p_chanop(rng, s, k):
    return (k, s, ()) if s[CDIM[k]] >= 2 else None


def _p_slice(rng, s, k):
    c = s[CDIM[k]]
    return (k, _with_c(s, k, c - 1), ()) if c >= 3 else None


def _p_split_uneq(rng, s, k):
    c = s[CDIM[k]]
    return (k, s, (1,)) if c >= 3 else None


def _p_chshuffle(rng, s, k):
    gs = [g for g in _divisors(s[1]) if g < s[1]]
    return (k, s, (rng.choice(gs),)) if gs else None


def _p_repeat(rng, s, k):
    return k, _with_c(s, k, 2 * s[1]), ()


def _p_spatial_same(rng, s, k):
    return (k, s, ()) if math.prod(_spatial(s, k)) > 1 else None


def _p_amax(rng, s, k):
    return k, _with_c(s, k, 1), ()


def _p_fixview(rng, s, k):
    gs = [g for g in _divisors(s[1]) if g < s[1]]
    return (k, s, (rng.choice(gs),)) if gs else None


def _p_cpad(rng, s, k):
    return k, _with_c(s, k, s[CDIM[k]] + 2), ()


def _p_unbatched_pool(rng, s, k):
    if k == "flat":
        return (k, (B, s[1] // 2), ()) if s[1] % 2 == 0 else None
    return (k, (B, s[1] // 2, s[2] // 2), ()) if s[1] % 2 == 0 and s[2] % 2 == 0 else None


CONVISH, ALL = ("img", "sig"), ("img", "sig", "seq", "flat")
OPS: dict[str, Op] = {
    # safe: the analysis may carry channels through these
    "conv": Op("safe", CONVISH, _p_conv, 6),
    "gconv": Op("safe", CONVISH, _p_gconv, 2),
    "dwconv": Op("safe", CONVISH, _p_dwconv, 2),
    "convT": Op("safe", CONVISH, _p_convt),
    "bn": Op("safe", ("img", "sig", "flat"), _p_same, 2),
    "gn": Op("safe", CONVISH, _p_gn),
    "act": Op("safe", ALL, _p_act, 2),
    "scalar": Op("safe", ALL, _p_same),
    "scale": Op("safe", ALL, _p_scale),
    "pool": Op("safe", CONVISH, _p_pool),
    "up": Op("safe", CONVISH, _p_up),
    "spad": Op("safe", CONVISH, _p_spad),
    "pshuffle": Op("safe", ("img",), _p_pshuffle),
    "punshuffle": Op("safe", ("img",), _p_punshuffle),
    "shuffle": Op("safe", ("img",), _p_shuffle),
    "chunk": Op("safe", ALL, _p_chunk),
    "glu": Op("safe", ALL, _p_glu),
    "revcat": Op("safe", ALL, _p_revcat),
    "flatten": Op("safe", CONVISH, _p_flatten),
    "gap": Op("safe", CONVISH, _p_gap),
    "to_seq": Op("safe", CONVISH, _p_to_seq),
    "to_sig": Op("safe", ("seq",), _p_to_sig),
    "linear": Op("safe", ("seq", "flat"), _p_linear, 6),
    "attn": Op("safe", ("seq",), _p_attn, 3),
    "tokpool": Op("safe", ("seq",), _p_tokpool),
    "resblock": Op("safe", ALL, _p_resblock, 3),
    "cl_linear": Op("safe", ("img",), _p_cl_linear),
    "where": Op("safe", ALL, _p_same),
    # block: a rule exists and must refuse the channels
    "ln": Op("block", ("seq",), _p_same),
    "rms": Op("block", ("seq",), _p_same),
    "softmax_c": Op("block", ALL, _p_chanop),
    "cumsum_c": Op("block", ALL, _p_chanop),
    "sum_c": Op("block", ALL, _p_chanop),
    "amax_c": Op("block", ALL, _p_amax),
    "norm_c": Op("block", ALL, _p_chanop),
    "slice_c": Op("block", ALL, _p_slice),
    "perm_c": Op("block", ALL, _p_chanop),
    "split_uneq": Op("block", ALL, _p_split_uneq),
    "fixview": Op("block", ("img",), _p_fixview),
    "lenet_view": Op("block", CONVISH, _p_flatten),
    "cpad": Op("block", CONVISH, _p_cpad),
    "unbatched_pool": Op("block", ("sig", "flat"), _p_unbatched_pool),
    # unknown: no rule at all
    "roll": Op("unknown", ALL, _p_chanop),
    "flip": Op("unknown", ALL, _p_chanop),
    "gather": Op("unknown", ALL, _p_chanop),
    "index_select": Op("unknown", ALL, _p_chanop),
    "opaque": Op("unknown", ALL, _p_chanop),
    "wrapped": Op("unknown", CONVISH + ("flat",), _p_chanop),
    "chshuffle": Op("unknown", ("img",), _p_chshuffle),
    "instnorm": Op("unknown", CONVISH, _p_spatial_same),
    "lrn": Op("unknown", ("img",), _p_same),
    "repeat_c": Op("unknown", CONVISH, _p_repeat),
    "normalize_c": Op("unknown", ALL, _p_same),
}
BINARY = ("add", "mul", "sub", "cat", "maximum")

# Ops and features that trip known bugs -> the xfail test in test_fuzz_regressions.py that pins each
# down. The fuzz runs leave them out so that they stay green; delete an entry with its xfail marker once
# the bug is fixed. Features that are not op names: "bcast_channel" (a binary op broadcasting a
# 1-channel operand), "tuple_slice" (torch.cat of a sliced split result), "hardcoded_unsplit_view"
# (heads of size 1 viewed with a literal head count), "hardcoded_split" (a packed qkv split with a
# literal size), "modulelist_branch" (residual branches called in a loop over a ModuleList),
# "empty_producer" (a zero pattern removing every unit of one producer of a group: tolerated by the
# checker), "layer_unit_collision" (the checker then leaves layer rules out of the policy),
# "export_literal_view" (a literal head / group count in a view of a model captured by torch.export),
# "export_vector_norm" (F.normalize in a model captured by torch.export).
KNOWN_BUG_TESTS: dict[str, str] = {}  # all fixed; a new bug adds 'construct': 'its regression test'
KNOWN_BUGS: frozenset[str] = frozenset(KNOWN_BUG_TESTS)


def _trips_known_bug(name: str, arg: tuple, exclude: frozenset[str], capture: str = "fx") -> bool:
    if "export_literal_view" in exclude and capture == "export" and (
            name == "fixview" or (name == "attn" and arg[3] == "fixed")):
        return True
    if name == "normalize_c":
        return "export_vector_norm" in exclude and capture == "export"
    if name == "attn":
        return ("hardcoded_unsplit_view" in exclude and arg[3] == "fixed" and arg[1] == 1) or (
            "hardcoded_split" in exclude and arg[5] == "split")
    if name == "resblock":
        return "modulelist_branch" in exclude and arg[1] == "list"
    if name == "revcat":
        return "tuple_slice" in exclude and arg[1] == "slice"
    return False


@dataclass
class _Gen:
    rng: random.Random
    exclude: frozenset[str]
    capture: str
    kinds: list[str] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    pool: list[int] = field(default_factory=list)  # values usable as inputs (tuple values are not)

    def add(self, node: Node, usable: bool = True) -> int:
        self.nodes.append(node)
        self.kinds.append(node.kind)
        self.shapes.append(node.shape)
        if usable:
            self.pool.append(len(self.shapes) - 1)
        return len(self.shapes) - 1

    def pick(self) -> int:
        return self.pool[-1] if self.rng.random() < 0.6 else self.rng.choice(self.pool)

    def unary(self, unknown_rate: float) -> bool:
        v = self.pick()
        kind, shape = self.kinds[v], self.shapes[v]
        cats = ["safe"] * 3 + ["block", "unknown"] if self.rng.random() < unknown_rate else ["safe"]
        cat = self.rng.choice(cats)
        names = [n for n, op in OPS.items() if op.category == cat and kind in op.kinds and n not in self.exclude]
        if not names:
            return False
        name = self.rng.choices(names, weights=[OPS[n].weight for n in names])[0]
        got = OPS[name].propose(self.rng, shape, kind)
        if got is None or _trips_known_bug(name, got[2], self.exclude, self.capture):
            return False
        out_kind, out_shape, arg = got
        if name == "chunk":
            whole = self.add(Node("chunk", (v,), kind, shape, arg), usable=False)
            for i in range(arg[0]):
                self.add(Node("item", (whole,), out_kind, out_shape, (i,)))
            return True
        self.add(Node(name, (v,), out_kind, out_shape, arg))
        return True

    def weighted(self, v: int) -> None:
        name = "conv" if self.kinds[v] in ("img", "sig") else "linear"
        out_kind, out_shape, arg = OPS[name].propose(self.rng, self.shapes[v], self.kinds[v])
        self.add(Node(name, (v,), out_kind, out_shape, arg))

    def binary(self) -> bool:
        a = self.pick()
        kind, sa = self.kinds[a], self.shapes[a]
        cd = CDIM[kind]
        op = self.rng.choice(BINARY)
        if op == "cat":
            mates = [v for v in self.pool if self.kinds[v] == kind
                     and _with_c(self.shapes[v], kind, 0) == _with_c(sa, kind, 0)]
            chosen = [a] + [self.rng.choice(mates) for _ in range(self.rng.choice([1, 1, 2]))]
            c = sum(self.shapes[v][cd] for v in chosen)
            self.add(Node("cat", tuple(chosen), kind, _with_c(sa, kind, c)))
            return True
        mates = [v for v in self.pool if self.kinds[v] == kind and v != a and self._broadcasts(sa, self.shapes[v], cd)]
        if not mates:
            return False
        b = self.rng.choice(mates)
        out = tuple(max(x, y) for x, y in zip(sa, self.shapes[b]))
        self.add(Node(op, (a, b), kind, out))
        return True

    def _broadcasts(self, sa, sb, cd) -> bool:
        if len(sa) != len(sb):
            return False
        for d, (x, y) in enumerate(zip(sa, sb)):
            if x != y and 1 not in (x, y):
                return False
            if d == cd and x != y and "bcast_channel" in self.exclude:
                return False
        return True


def generate(seed: int, *, exclude: frozenset[str] = KNOWN_BUGS, unknown_rate: float = 0.35,
             max_nodes: int = 14, export_rate: float = 0.2) -> Spec:
    """A random, deterministic architecture for ``seed``."""
    rng = random.Random(seed)
    capture = "export" if random.Random(seed + 1).random() < export_rate else "fx"
    kind = rng.choice(["img", "img", "img", "sig", "seq", "seq", "flat"])
    shape = {"img": (B, rng.choice([2, 3, 4]), rng.choice([4, 6, 8]), rng.choice([4, 8])),
             "sig": (B, rng.choice([2, 3, 4]), rng.choice([4, 6, 8])),
             "seq": (B, rng.choice([3, 4, 5]), rng.choice([4, 6, 8, 12])),
             "flat": (B, rng.choice([3, 4, 8]))}[kind]
    gen = _Gen(rng, exclude, capture, [kind], [shape], [], [0])
    if rng.random() < 0.8:
        gen.weighted(0)  # a stem: most real models start with a weight
    target = rng.randint(3, max_nodes)
    tries = 0
    while len(gen.nodes) < target and tries < 200:
        tries += 1
        if rng.random() < 0.25 and len(gen.pool) > 1:
            gen.binary()
        else:
            gen.unary(unknown_rate)
    if rng.random() < 0.8:
        gen.weighted(gen.pool[-1])  # a head, so that the last hidden channels have a consumer
    outputs = [gen.pool[-1]]
    extra = [v for v in gen.pool[1:-1] if rng.random() < 0.1]
    return Spec(seed, kind, shape, tuple(gen.nodes), tuple(outputs + extra[:1]), capture)


# ----------------------------------------------------------------------------- shrinking a failure
def _drop(spec: Spec, k: int, replacement: int) -> Spec:
    """``spec`` without node ``k`` (value ``k``); its users read value ``replacement`` instead."""
    new_index, nodes = {0: 0}, []
    for i, node in enumerate(spec.nodes, 1):
        if i == k:
            new_index[i] = new_index[replacement]
            continue
        nodes.append(dataclasses.replace(node, inputs=tuple(new_index[j] for j in node.inputs)))
        new_index[i] = len(nodes)
    outputs = tuple(dict.fromkeys(new_index[j] for j in spec.outputs))
    return dataclasses.replace(spec, nodes=tuple(nodes), outputs=outputs)


def _live(spec: Spec) -> set[int]:
    live, stack = set(), list(spec.outputs)
    while stack:
        v = stack.pop()
        if v and v not in live:
            live.add(v)
            stack.extend(spec.nodes[v - 1].inputs)
    return live


def shrink(spec: Spec, fails: Callable[[Spec], bool], budget: int = 300) -> Spec:
    """A smaller spec that still ``fails``: fewer outputs, dead nodes dropped, nodes bypassed.

    Example:
        >>> small = shrink(generate(1706), lambda s: not _passes(s))  # doctest: +SKIP
        >>> print(small.code())
    """

    def shape_of(s: Spec, v: int) -> tuple:
        return (s.in_kind, s.in_shape) if v == 0 else (s.nodes[v - 1].kind, s.nodes[v - 1].shape)

    changed = True
    while changed and budget > 0:
        changed = False
        candidates = [dataclasses.replace(spec, outputs=(o,)) for o in spec.outputs if len(spec.outputs) > 1]
        dead = [i for i in range(len(spec.nodes), 0, -1) if i not in _live(spec)]
        if dead:
            pruned = spec
            for i in dead:
                pruned = _drop(pruned, i, 0)
            candidates.insert(0, pruned)
        for k in range(len(spec.nodes), 0, -1):
            node = spec.nodes[k - 1]
            if node.op == "chunk":
                continue
            for j in dict.fromkeys(node.inputs + tuple(range(k))):
                if shape_of(spec, j) == shape_of(spec, k) and spec.nodes[j - 1].op != "chunk" if j else \
                        shape_of(spec, j) == shape_of(spec, k):
                    candidates.append(_drop(spec, k, j))
        for candidate in candidates:
            budget -= 1
            if budget <= 0:
                break
            if fails(candidate):
                spec, changed = candidate, True
                break
    return spec
