"""``FuzzNet``: the ``nn.Module`` a fuzz :class:`~tests.fuzz.Spec` describes.

``forward`` loops over the spec's nodes; ``torch.fx.symbolic_trace`` unrolls the loop, so the
captured graph has one op (or a few, for composite blocks such as attention) per node. Shapes
that views need come from the spec as Python ints, exactly as hand-written models hard-code them
(``fixview`` and ``lenet_view`` hard-code a channel count on purpose; everything else uses -1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from tests.fuzz import CDIM, OPS, B, Node, Spec, opaque


@fx.wrap  # must be called in the module whose code calls the function
def wrapped_mix(x: torch.Tensor) -> torch.Tensor:
    """A plain Python function fx keeps as one opaque call: no rule, and it mixes channels."""
    return x.flip(1) * 0.5 + x

_ACT_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
                "leaky": nn.LeakyReLU, "hardswish": nn.Hardswish, "relu6": nn.ReLU6}
_ACT_FUNCS = {"F.relu": F.relu, "F.gelu": F.gelu, "torch.tanh": torch.tanh, "sigmoid_": lambda x: x.sigmoid()}


class Scale(nn.Module):
    """A bare per-channel parameter (layer scale / bias), traced through as ``get_attr``."""

    def __init__(self, shape: tuple[int, ...], mode: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(shape) * 0.5 + (1.0 if mode == "mul" else 0.0))
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight if self.mode == "mul" else x + self.weight


class Index(nn.Module):
    """Holds a constant index buffer for ``gather`` / ``index_select`` along the channel dim."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index)


class Attn(nn.Module):
    """Multi-head (or grouped-query) self-attention over (B, T, D) with a few ways to write it."""

    def __init__(self, d: int, t: int, heads: int, hd: int, kv: int, view: str, core: str, packed: str):
        super().__init__()
        self.t, self.heads, self.hd, self.kv, self.view_mode, self.core = t, heads, hd, kv, view, core
        self.packed = packed
        if packed:
            self.qkv = nn.Linear(d, 3 * heads * hd)
        else:
            self.q, self.k, self.v = nn.Linear(d, heads * hd), nn.Linear(d, kv * hd), nn.Linear(d, kv * hd)
        self.o = nn.Linear(heads * hd, d)

    def _split_heads(self, y: torch.Tensor, n: int, b, t) -> torch.Tensor:
        if self.view_mode == "fixed":  # hard-coded head count: must be refused, not guessed
            return y.view(b, t, n, self.hd).transpose(1, 2)
        return y.view(b, t, -1, self.hd).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = (x.size(0), x.size(1)) if self.view_mode == "size" else (B, self.t)
        if self.packed:
            qkv = self.qkv(x)
            q, k, v = qkv.chunk(3, dim=-1) if self.packed == "chunk" else qkv.split(self.heads * self.hd, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = (self._split_heads(y, n, b, t) for y, n in ((q, self.heads), (k, self.kv), (v, self.kv)))
        if self.core == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.kv != self.heads)
        else:
            out = torch.softmax((q @ k.transpose(-2, -1)) * self.hd**-0.5, dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class MlpBranch(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ConvBranch(nn.Module):
    def __init__(self, c: int, hidden: int, nd: int) -> None:
        super().__init__()
        conv = nn.Conv1d if nd == 1 else nn.Conv2d
        self.conv1, self.conv2 = conv(c, hidden, 1), conv(hidden, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


class Residual(nn.Module):
    """``x + f(x)`` with ``f`` a child module: what layer gates act on (branches of one class compete)."""

    def __init__(self, shape: tuple[int, ...], kind: str, hidden: int, style: str) -> None:
        super().__init__()
        c = shape[CDIM[kind]]

        def branch() -> nn.Module:
            return MlpBranch(c, hidden) if kind in ("seq", "flat") else ConvBranch(c, hidden, len(shape) - 2)

        self.style = style
        if style == "list":
            self.branches = nn.ModuleList([branch(), branch()])
        else:
            self.branch = branch()
        if style == "prenorm":
            self.norm = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "list":
            for branch in self.branches:
                x = x + branch(x)
            return x
        return x + self.branch(self.norm(x) if self.style == "prenorm" else x)


def _nd(cls_name: str, shape: tuple[int, ...]):
    return getattr(nn, f"{cls_name}{len(shape) - 2}d")


def _build(node: Node, shape: tuple[int, ...], kind: str) -> nn.Module | None:
    """The module a node owns, built from its input shape (``None`` for parameter-free ops)."""
    op, a, c = node.op, node.arg, shape[CDIM[kind]]
    if op == "conv":
        cout, k, stride, bias = a
        return _nd("Conv", shape)(c, cout, k, stride=stride, padding=k // 2, bias=bias)
    if op == "gconv":
        return _nd("Conv", shape)(c, a[0], 3, padding=1, groups=a[1])
    if op == "dwconv":
        return _nd("Conv", shape)(c, c * a[0], 3, padding=1, groups=c)
    if op == "convT":
        return _nd("ConvTranspose", shape)(c, a[0], a[1], stride=a[1])
    if op == "bn":
        return (nn.BatchNorm1d if kind in ("sig", "flat") else nn.BatchNorm2d)(c)
    if op == "gn":
        return nn.GroupNorm(a[0], c)
    if op == "act" and a[0] in _ACT_MODULES:
        return _ACT_MODULES[a[0]]()
    if op == "scale":
        return Scale((c,) + (1,) * (len(shape) - 1 - CDIM[kind]), a[0])
    if op == "pool" and a[0] in ("max", "avg", "adaptive"):
        name = {"max": "MaxPool", "avg": "AvgPool", "adaptive": "AdaptiveAvgPool"}[a[0]]
        return _nd(name, shape)(1 if a[0] == "adaptive" else 2)
    if op == "up" and a[0] == "module":
        return nn.Upsample(scale_factor=2.0, mode="nearest")
    if op == "pshuffle":
        return nn.PixelShuffle(2)
    if op == "linear":
        return nn.Linear(c, a[0], bias=a[1])
    if op == "attn":
        return Attn(c, shape[1], *a)
    if op == "cl_linear":
        return nn.Linear(c, a[0])
    if op == "resblock":
        return Residual(shape, kind, *a)
    if op in ("ln", "rms"):
        return (nn.LayerNorm if op == "ln" else nn.RMSNorm)(c)
    if op in ("gather", "index_select"):
        perm = torch.randperm(c)
        if op == "index_select":
            return Index(perm)
        view = [1] * len(shape)
        view[CDIM[kind]] = c
        return Index(perm.view(view).expand(shape).contiguous())
    if op == "chshuffle":
        return nn.ChannelShuffle(a[0])
    if op == "instnorm":
        return _nd("InstanceNorm", shape)(c, affine=True)
    if op == "lrn":
        return nn.LocalResponseNorm(2)
    return None


def _revcat(x: torch.Tensor, n: int, dim: int, style: str) -> torch.Tensor:
    parts = x.chunk(n, dim=dim)
    if style == "slice":  # traced as one getitem(parts, slice) node, not a list of parts
        return torch.cat(parts[::-1], dim=dim)
    return torch.cat([parts[i] for i in reversed(range(n))], dim=dim)


def _call(net: FuzzNet, i: int, node: Node, xs: list, in_shape: tuple[int, ...], kind: str):
    op, a, cd = node.op, node.arg, CDIM[kind]
    key = f"n{i}"
    if op == "cl_linear":  # ConvNeXt style: channels-last Linear between two permutes
        return net.layers[key](xs[0].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    if key in net.layers and op not in ("gather", "index_select"):
        return net.layers[key](xs[0])
    x = xs[0]
    nsp = len(in_shape) - 2
    simple = {
        "act": lambda: _ACT_FUNCS[a[0]](x),
        "scalar": lambda: x * 0.5 + 1.0,
        "pool": lambda: (F.max_pool1d if nsp == 1 else F.max_pool2d)(x, 2),
        "up": lambda: F.interpolate(x, scale_factor=2.0, mode="nearest"),
        "spad": lambda: F.pad(x, (1, 1) * nsp),
        "punshuffle": lambda: F.pixel_unshuffle(x, 2),
        "chunk": lambda: x.chunk(a[0], dim=cd),
        "item": lambda: x[a[0]],
        "revcat": lambda: _revcat(x, a[0], cd, a[1]),
        "flatten": lambda: x.flatten(1),
        "gap": lambda: x.mean(dim=tuple(range(2, len(in_shape)))),
        "to_seq": lambda: (x.flatten(2) if nsp == 2 else x).transpose(1, 2),
        "to_sig": lambda: x.transpose(1, 2),
        "tokpool": lambda: x.mean(1) if a[0] == "mean" else x[:, 0],
        "softmax_c": lambda: x.softmax(cd),
        "cumsum_c": lambda: x.cumsum(cd),
        "sum_c": lambda: x * x.sum(cd, keepdim=True),
        "amax_c": lambda: torch.amax(x, cd, keepdim=True),
        "norm_c": lambda: x / (x.norm(2, cd, True) + 1.0),  # p given positionally, as torch allows
        "slice_c": lambda: x[..., 1:] if kind == "seq" else x[:, 1:],
        "perm_c": lambda: x[..., list(range(in_shape[cd]))[::-1]] if kind == "seq"
        else x[:, list(range(in_shape[cd]))[::-1]],
        "lenet_view": lambda: x.contiguous().view(-1, math.prod(in_shape[1:])),  # cl_linear leaves x permuted
        "cpad": lambda: F.pad(x, (0, 0) * nsp + (1, 1)),
        "unbatched_pool": lambda: F.adaptive_avg_pool1d(x, in_shape[1] // 2) if kind == "flat"
        else F.max_pool2d(x, 2),
        "roll": lambda: torch.roll(x, 1, cd),
        "flip": lambda: torch.flip(x, [cd]),
        "gather": lambda: torch.gather(x, cd, net.layers[key].index),
        "index_select": lambda: torch.index_select(x, cd, net.layers[key].index),
        "opaque": lambda: opaque(x),
        "wrapped": lambda: wrapped_mix(x),
        "add": lambda: x + xs[1],
        "mul": lambda: x * xs[1],
        "sub": lambda: torch.sub(x, xs[1]),
        "maximum": lambda: torch.maximum(x, xs[1]),
        "where": lambda: torch.where(x > 0, x, x * 0.1),
        "repeat_c": lambda: x.repeat(1, 2, *([1] * nsp)),
        "normalize_c": lambda: F.normalize(x, dim=cd),
        "cat": lambda: torch.cat(xs, dim=cd),
    }
    if op in simple:
        return simple[op]()
    if op == "glu":
        p, q = x.chunk(2, dim=cd)
        return p * torch.sigmoid(q)
    if op == "shuffle":
        _, c, h, w = in_shape
        return x.view(B, -1, a[0], h, w).transpose(1, 2).reshape(B, -1, h, w)
    if op == "fixview":
        _, c, h, w = in_shape
        return x.view(B, a[0], c // a[0], h, w).transpose(1, 2).reshape(B, c, h, w)
    if op == "split_uneq":
        p, q = x.split([a[0], in_shape[cd] - a[0]], dim=cd)
        return torch.cat([q, p], dim=cd)
    raise KeyError(f"fuzz op {op!r} has no implementation")


class FuzzNet(nn.Module):
    """The model of one spec; ``seen[i]`` is the input shape of live refused node ``i`` at the last eager run."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        torch.manual_seed(spec.seed)
        self.spec = spec
        self.layers = nn.ModuleDict()
        self._in = [(spec.in_shape, spec.in_kind)]
        for node in spec.nodes:
            self._in.append((node.shape, node.kind))
        for i, node in enumerate(spec.nodes, 1):
            module = _build(node, *self._in[node.inputs[0]])
            if module is not None:
                self.layers[f"n{i}"] = module
        _randomize(self)
        self.seen: dict[int, tuple[int, ...]] = {}
        self.live = _live(spec)
        self.eval()

    def forward(self, x: torch.Tensor):
        if self.spec.capture == "export" and x.dim() < 0:  # control flow on a size: fx cannot trace it
            x = -x
        vals = [x]
        for i, node in enumerate(self.spec.nodes, 1):
            xs = [vals[j] for j in node.inputs]
            in_shape, kind = self._in[node.inputs[0]]
            # A refused op whose result is dropped runs on whatever it gets: only live ones must not change
            if (node.op in OPS and OPS[node.op].category != "safe" and i in self.live
                    and not isinstance(xs[0], fx.Proxy)):
                self.seen[i] = tuple(xs[0].shape)
            vals.append(_call(self, i, node, xs, in_shape, kind))
        outs = tuple(vals[j] for j in self.spec.outputs)
        return outs[0] if len(outs) == 1 else outs


def _live(spec: Spec) -> set[int]:
    """Indices of the values some output depends on (0 is the input)."""
    live, todo = set(), list(spec.outputs)
    while todo:
        j = todo.pop()
        if j not in live:
            live.add(j)
            if j > 0:
                todo.extend(spec.nodes[j - 1].inputs)
    return live


def _randomize(net: nn.Module) -> None:
    """Non-trivial norm statistics and affines, so folding and slicing them is really exercised."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0, 0.2)


def make_input(spec: Spec, salt: int = 0) -> torch.Tensor:
    """The example input of a spec (``salt`` gives another draw of the same shape)."""
    gen = torch.Generator().manual_seed(spec.seed * 7919 + salt)
    return torch.randn(spec.in_shape, generator=gen)
