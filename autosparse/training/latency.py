"""Latency as a cost: each module's measured latency over kept widths, cached per device.

FLOPs are a poor proxy for speed where layers are small or memory-bound (depthwise convolutions,
norms, activations): on a 2-core CPU MobileNetV2's speedup is about 0.6x its FLOPs reduction. The
latency cost model (``target: {latency: 0.5}``) prices each module by its *measured* latency as a
function of how much of it is kept, a lookup table over widths in the spirit of latency-aware
(knapsack) pruning:

* the dense model and a few uniformly narrowed copies (every gated group cut to 80, 60, 40, 20 %
  of its units, then compacted without verification: real width-sliced models) are run with hooks
  that time every leaf-module call *in context*, i.e. with the caches as the model leaves them
  (timed alone, a layer finds its weights in cache, and at batch 1 that hides most of its cost);
* per call, the latencies at the narrowed widths against ``p``, the fraction of its weight kept
  (the product of the kept fractions of its sliced dims: the quantity the FLOPs model multiplies by),
  give a piecewise-linear :class:`Curve`; the cost model evaluates it at the expected kept fractions,
  so the latency cost is differentiable in the gates as the FLOPs cost is;
* a module without weights (activation, pooling) follows the output width of the weighted module
  that ran just before it;
* the rest (residual adds, Python overhead, attention products outside leaf modules) is the
  whole model's latency minus the calls' sum, a curve over the mean kept fraction of all units.

Tables are cached in ``$AUTOSPARSE_CACHE/latency.json`` (default ``~/.cache/autosparse``), keyed by
device, dtype, thread count, torch version and the model's signature (its modules, parameter shapes,
gated groups and input shapes). The file is replaced atomically; an unreadable one is ignored with a
warning and rewritten.

Here the table and its cache key; the curves in :mod:`~autosparse.training.latency_curves`, the
timing (and how many runs per width) in :mod:`~autosparse.training.latency_timing`, the cache file
in :mod:`~autosparse.training.latency_cache`.

Example:
    >>> net = autosparse.sparsify(model, {"rules": [{"granularity": "channel"}]}, example_inputs=(x,))
    >>> table = latency_table(net)  # doctest: +SKIP
    >>> table.dense_ms, table.entries[0].curve(torch.tensor(0.5))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autosparse.errors import ExampleInputsError
from autosparse.state import SparsityState, get_state
from autosparse.training.latency_cache import (
    CACHE_VERSION,
    cache_path,
    device_key,
    load_entries,
    save_entries,
)
from autosparse.training.latency_curves import LINEAR, Curve
from autosparse.training.latency_timing import (
    BUDGET_MS,
    MAX_REPEATS,
    MIN_REPEATS,
    PLAIN_BELOW_MS,
    clock,
    measure_widths,
    plain_copy,
)

__all__ = [
    "BUDGET_MS",
    "CACHE_VERSION",
    "LINEAR",
    "MAX_REPEATS",
    "MIN_REPEATS",
    "PLAIN_BELOW_MS",
    "WIDTHS",
    "Curve",
    "LatencyTable",
    "ModuleLatency",
    "cache_path",
    "clock",
    "device_key",
    "latency_table",
    "load_entries",
    "measure_widths",
    "plain_copy",
    "save_entries",
]

WIDTHS: tuple[float, ...] = (0.8, 0.6, 0.4, 0.2)  # kept fraction of every gated group, besides 1


@dataclass(frozen=True)
class ModuleLatency:
    """One call of a leaf module: its latency in the dense model and how it scales.

    Attributes:
        name: The module's name in ``named_modules``.
        ms: Its latency in the dense model, in milliseconds.
        curve: Relative latency against ``p``, the kept fraction of its weight (or of its leader's
            output rows for a module that ``follows`` one).
        follows: For a module without weights, the weighted module that ran just before it, whose
            output width it is assumed to share; else ``None``.
    """

    name: str
    ms: float
    curve: Curve
    follows: str | None = None


@dataclass(frozen=True)
class LatencyTable:
    """Measured latency of a model and of its leaf modules (see the module docstring).

    Attributes:
        dense_ms: The whole model's latency for the example inputs, in milliseconds.
        entries: One per leaf-module call, in the order they ran.
        rest: The latency no leaf-module call accounts for, in the dense model, in milliseconds.
        rest_curve: ``rest`` relative to its dense value against the mean kept fraction of all units.
        cached: Whether the table came from the cache (nothing was timed).
    """

    dense_ms: float
    entries: list[ModuleLatency]
    rest: float
    rest_curve: Curve
    cached: bool = False


def latency_table(net: nn.Module, *, widths: tuple[float, ...] = WIDTHS, cache: bool = True) -> LatencyTable:
    """Time a sparsified model's leaf-module calls at full and reduced widths (see the module docstring).

    Args:
        net: A model returned by :func:`autosparse.sparsify`, with its example inputs at the batch
            size the latency is wanted for. Not modified: the gates it zeroes are restored.
        widths: Kept fractions of every gated group to time besides the dense model, in (0, 1).
        cache: Read and write :func:`cache_path`; ``False`` times everything now.

    Returns:
        A :class:`LatencyTable`.

    Raises:
        ExampleInputsError: The model was sparsified without example inputs.

    Example:
        >>> net = autosparse.sparsify(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
        ...                           {"rules": [{"granularity": "channel"}]}, example_inputs=(torch.randn(2, 8),))
        >>> table = latency_table(net, cache=False)  # doctest: +SKIP
        >>> [(e.name, e.follows) for e in table.entries]  # doctest: +SKIP
        [('0', None), ('1', '0'), ('2', None)]
    """
    state = get_state(net)
    if state.example_inputs is None:
        raise ExampleInputsError("a latency budget times the model on its example inputs; pass example_inputs= "
                                 "to autosparse.sparsify (at the batch size you want the latency for)")
    device, dtype = _placement(net, state.example_inputs)
    key = f"{device_key(device, dtype)}|{_signature(net, state, widths)}"
    path = cache_path()
    entry = load_entries(path).get(key) if cache else None
    if entry is not None and _valid(entry):
        return _table(entry, cached=True)
    entry = measure_widths(net, state, widths, device)
    if cache:
        save_entries(path, {key: entry})
    return _table(entry)


def _placement(model: nn.Module, inputs: tuple) -> tuple[torch.device, torch.dtype]:
    floats: list[torch.Tensor] = [p for p in model.parameters() if p.is_floating_point()]
    floats += [x for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    return (floats[0].device, floats[0].dtype) if floats else (torch.device("cpu"), torch.get_default_dtype())


def _signature(net: nn.Module, state: SparsityState, widths: tuple[float, ...]) -> str:
    """A hash of what the table depends on in the model: modules, shapes, gated groups, inputs."""
    def shape(x: Any) -> Any:
        return (tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor) else repr(x)

    # MIN_REPEATS too: a table timed with fewer runs per width than asked for now is measured again
    parts = [type(net).__name__, repr(widths), f"v{CACHE_VERSION}", f"min_repeats={MIN_REPEATS}"]
    parts += [f"{n}:{type(m).__name__}({m.extra_repr()})" for n, m in net.named_modules()]
    parts += [f"{n}:{tuple(t.shape)}" for n, t in [*net.named_parameters(), *net.named_buffers()]]
    parts += [repr([shape(x) for x in state.example_inputs or ()]),
              repr({k: shape(v) for k, v in (state.example_kwargs or {}).items()})]
    parts += [f"{gg.name}:{len(gg.units)}:{bool(gg.branches)}" for gg in state.plan.gated]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def _table(entry: dict[str, Any], cached: bool = False) -> LatencyTable:
    entries = [ModuleLatency(name, float(ms), Curve(tuple(xs), tuple(ys)), follows)
               for name, ms, xs, ys, follows in entry["calls"]]
    rest = entry["rest"]
    return LatencyTable(float(entry["ms"]), entries, float(rest["ms"]), Curve(tuple(rest["xs"]), tuple(rest["ys"])),
                        cached)


def _valid(entry: Any) -> bool:
    """A usable cache entry (a file edited by hand or by an older version is measured again)."""
    try:
        _table(entry)
        return all(_curve_ok(c[2], c[3]) and isinstance(c[4], (str, type(None))) for c in entry["calls"]) and \
            _curve_ok(entry["rest"]["xs"], entry["rest"]["ys"])
    except (TypeError, KeyError, ValueError, IndexError):
        return False


def _curve_ok(xs: Any, ys: Any) -> bool:
    return (isinstance(xs, list) and isinstance(ys, list) and len(xs) == len(ys) >= 1
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in xs + ys)
            and xs == sorted(set(xs)) and xs[-1] == 1.0)
