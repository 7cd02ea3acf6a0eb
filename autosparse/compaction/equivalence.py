"""Proof that compaction changed nothing: the compacted model against the gated one, on the example inputs.

Both run in full fp32 precision (no TF32), and the worst difference of any output, relative to that
output's scale, must stay within ``rtol``; otherwise :class:`~autosparse.errors.EquivalenceError`
says what differed (a failing forward, the number or shapes of outputs, or the values).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from autosparse.errors import EquivalenceError
from autosparse.state import SparsityState, flatten_outputs, run_model


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """No TF32 while verifying: CUDA convs use it by default, and its ~1e-3 rounding differs between
    two convs of different widths, so it would hide (or fake) a difference the check is about."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def check_equivalence(gated: nn.Module, compact: nn.Module, state: SparsityState, rtol: float) -> float:
    """Max abs difference of all outputs relative to the output scale; raises over ``rtol``."""
    with full_fp32():
        ref = flatten_outputs(run_model(gated, state))
    try:
        with full_fp32():
            out = flatten_outputs(run_model(compact, state))
    except Exception as exc:  # the compacted forward itself failed: stale attributes or an unknown layout
        raise EquivalenceError(
            f"the compacted model fails on the example inputs ({type(exc).__name__}: {exc}). A module "
            "probably keeps a size attribute autosparse does not know; register a fixer in "
            "autosparse.modules.surgery.FIXERS for it, or exclude its group in the policy."
        ) from exc
    if len(ref) != len(out):
        raise EquivalenceError(f"compacted model returns {len(out)} tensors, gated model {len(ref)}")
    worst = 0.0
    for a, b in zip(ref, out):
        if a.shape != b.shape:
            raise EquivalenceError(f"output shape changed: {tuple(a.shape)} -> {tuple(b.shape)}")
        scale = max(float(a.abs().max()), 1e-6) if a.numel() else 1.0
        worst = max(worst, float((a.float() - b.float()).abs().max()) / scale if a.numel() else 0.0)
    if worst > rtol:
        raise EquivalenceError(
            f"compacted model differs from the gated model by {worst:.3g} (relative, allowed {rtol:g}). "
            "This is a bug in autosparse's analysis for this architecture (or a custom op rule); please "
            "report it with autosparse.explain(model)."
        )
    return worst
