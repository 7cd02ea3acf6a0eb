"""Rules for mixture-of-experts matmuls: every expert's MLP channels, stored as 3-D weights.

Hugging Face (transformers 5) keeps a layer's experts as one ``(experts, out, in)`` parameter and
runs them with a *grouped* matmul: the tokens are sorted by expert, and row ``s`` of
``grouped_mm(x, w, offs)`` is ``x[s] @ w[e]`` for the expert ``e`` whose slice ``offs`` puts it
in. Output channel ``c`` is channel ``c`` of whichever expert a row went to, so removing ``c``
from every expert's slice is exact: a unit here is one intermediate channel *of all the experts
of a layer* (the gate scales ``w[:, :, c]`` of the down projection, every expert alike).

The matmul is ``torch._grouped_mm`` / ``F.grouped_mm`` where the hardware has it and
``transformers::grouped_mm_fallback`` (a custom op, so export keeps it whole) on a CPU. Only the
first is in torch; the fallback is matched by its qualified name, so the core does not import
transformers.
"""

from __future__ import annotations

import torch
from torch import fx

from autosparse.analysis.context import OpContext
from autosparse.analysis.ops_layers import contraction
from autosparse.analysis.registry import Registry

aten = torch.ops.aten

# The grouped-matmul kernels (torch._grouped_mm on CPU and GPU) need 16-byte strides: a width of
# whole 8-element runs in bfloat16 / float16, the dtypes experts are served in (fp32 needs 4).
ALIGN = 8
GROUPED_MM_NAMES = ("transformers::grouped_mm_fallback", "aten::_grouped_mm")
_SWAP = {aten.transpose.int, torch.transpose, "transpose"}


def _expert_weight(ctx: OpContext, w) -> tuple[str, int, int] | None:
    """``(parameter, in dim, out dim)`` of the stored 3-D expert weight that ``w`` reads: the
    parameter itself (``(experts, in, out)``) or its last two dims swapped (HF stores
    ``(experts, out, in)`` and transposes in forward); None for anything computed."""
    name = ctx.tensor_name(w)
    if name is not None:
        return (name, 1, 2) if ctx.ndim(w) == 3 else None
    if not isinstance(w, fx.Node) or w.target not in _SWAP or len(w.args) != 3:
        return None
    source, a, b = w.args
    stored = ctx.tensor_name(source)
    if stored is None or ctx.ndim(source) != 3 or not isinstance(a, int) or not isinstance(b, int):
        return None
    return (stored, 2, 1) if {a % 3, b % 3} == {1, 2} else None


def grouped_mm(ctx: OpContext) -> None:
    """``grouped_mm(x (tokens, in), w (experts, in, out), offs)``: a contraction with every
    expert's matrix at once; its output channels are the experts' shared channel positions."""
    x, w = ctx.arg(0), ctx.arg(1)
    stored = _expert_weight(ctx, w)
    if stored is None or ctx.ndim(x) != 2:
        ctx.block_inputs("a grouped (per-expert) matmul whose expert weights are computed in forward")
        return ctx.output(None)
    name, in_dim, out_dim = stored
    contraction(ctx, x, name, None, in_dim=in_dim, out_dim=out_dim, x_dim=-1, y_dim=-1,
                n_out=ctx.tensor_shape()[-1])
    for label in (ctx.label(x), ctx.label(ctx.node)):
        if label is not None:
            ctx.state.multiple_of.append((label.ids, ALIGN))


def is_grouped_mm(target: object) -> bool:
    """Whether an fx target is one of the grouped matmuls :func:`grouped_mm` reads."""
    name = getattr(target, "name", None)
    return isinstance(target, torch._ops.OpOverload) and callable(name) and name() in GROUPED_MM_NAMES


def register(rules: Registry) -> None:
    rules.register_matcher(is_grouped_mm, grouped_mm)
