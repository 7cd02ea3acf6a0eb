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

Example:
    >>> net = autosparse.sparsify(model, {"rules": [{"granularity": "channel"}]}, example_inputs=(x,))
    >>> table = latency_table(net)  # doctest: +SKIP
    >>> table.dense_ms, table.entries[0].curve(torch.tensor(0.5))  # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autosparse.compaction.compact import compact_model, fold_gates
from autosparse.errors import ExampleInputsError
from autosparse.measure import eval_mode
from autosparse.state import STATE_ATTR, SparsityState, get_state
from autosparse.training.latency_cache import (
    CACHE_VERSION,
    cache_path,
    device_key,
    load_entries,
    save_entries,
)

try:  # optional: a progress bar when measuring takes long
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is not a core dependency
    tqdm = None

WIDTHS: tuple[float, ...] = (0.8, 0.6, 0.4, 0.2)  # kept fraction of every gated group, besides 1
BUDGET_MS = 1500.0  # timed forward passes per width: about this long, at least MIN_REPEATS of them
MIN_REPEATS, MAX_REPEATS = 2, 12
PLAIN_BELOW_MS = 50.0  # whole forwards faster than this are also timed without hooks


@dataclass(frozen=True)
class Curve:
    """Relative latency of a module against ``p`` (kept fraction, product over its sliced dims).

    Piecewise-linear through ``(xs[i], ys[i])``, increasing ``xs`` ending at 1 with ``ys[-1] == 1``;
    below ``xs[0]`` the first segment is extended (towards 0, never below it).

    Example:
        >>> Curve((0.25, 1.0), (0.4, 1.0))(torch.tensor(0.5))
        tensor(0.6000)
    """

    xs: tuple[float, ...]
    ys: tuple[float, ...]

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        xs = (0.0, *self.xs) if len(self.xs) == 1 else self.xs
        ys = (0.0, *self.ys) if len(self.ys) == 1 else self.ys
        i = min(max(bisect.bisect_left(xs, float(p.detach())), 1), len(xs) - 1)
        slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
        return (ys[i - 1] + slope * (p - xs[i - 1])).clamp(min=0.0)

    @classmethod
    def measured(cls, ps: list[float], ms: list[float]) -> Curve:
        """From latencies ``ms`` at fractions ``ps`` (one of them 1): relative, made non-decreasing.

        Where a narrower width measured slower than a wider one (noise, or an odd width the kernels
        handle badly), the points are pooled to their mean (isotonic regression, with the full
        width held at 1), so removing units never looks like a cost and a single noisy point does
        not drag its neighbours down (taking the minimum instead would bias every curve low).
        """
        full = ms[ps.index(1.0)]
        points = sorted({**{p: t / full for p, t in zip(ps, ms) if p < 1.0}, 1.0: 1.0}.items())
        blocks: list[list[float]] = []  # [mean, weight, points pooled]
        for i, (_, y) in enumerate(points):
            blocks.append([y, 1e9 if i == len(points) - 1 else 1.0, 1])
            while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
                (y2, w2, n2), (y1, w1, n1) = blocks.pop(), blocks.pop()
                blocks.append([(y1 * w1 + y2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
        ys = [min(1.0, mean) for mean, _, n in blocks for _ in range(int(n))]
        ys[-1] = 1.0
        return cls(tuple(p for p, _ in points), tuple(ys))


LINEAR = Curve((1.0,), (1.0,))  # latency proportional to p: what FLOPs assume


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


def plain_copy(model: nn.Module) -> nn.Module:
    """A plain copy of a sparsified model at its dense widths (gates folded into the weights).

    Example:
        >>> dense = plain_copy(net)  # doctest: +SKIP
    """
    dense = copy.deepcopy(model)
    fold_gates(dense)
    dense.__dict__.pop(STATE_ATTR, None)
    return dense


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
    entry = _measure(net, state, widths, device)
    if cache:
        save_entries(path, {key: entry})
    return _table(entry)


def _measure(net: nn.Module, state: SparsityState, widths: tuple[float, ...], device: torch.device) -> dict[str, Any]:
    """The cache entry of ``net``: per call its dense ms and curve, the whole model, the rest.

    The dense model and its narrowed copies are timed round-robin, so that load from other
    processes drifting during the measurement slows every width alike instead of bending the curves.
    """
    inputs, kwargs = state.example_inputs or (), state.example_kwargs or {}
    now = clock(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else _no_sync
    models = [plain_copy(net), *(_narrowed(net, state, s) for s in widths)]
    with contextlib.ExitStack() as stack, torch.inference_mode():
        for model in models:
            stack.enter_context(eval_mode(model))
            model(*inputs, **kwargs)  # the first forward at new shapes pays allocation and kernel choice
        first = _once(lambda: models[0](*inputs, **kwargs), sync, now)
        repeats = min(MAX_REPEATS, max(MIN_REPEATS, int(BUDGET_MS / max(first, 1e-3))))
        overhead = _hook_overhead(now, sync)
        timings = [_Timing(model) for model in models]
        with _progress(repeats) as advance:
            for _ in range(repeats):
                for timing in timings:
                    timing.run(inputs, kwargs, (now, sync, first < PLAIN_BELOW_MS))
                advance()
    base, order = timings[0].calls(overhead), timings[0].order
    follows = _leaders(models[0], order)
    modules = [dict(model.named_modules()) for model in models]
    points: dict[tuple[str, int], list[tuple[float, float]]] = {key: [(1.0, ms)] for key, ms in base.items()}
    rest = [(1.0, timings[0].total - sum(base.values()))]
    for s, timing, small in zip(widths, timings[1:], modules[1:]):
        times = timing.calls(overhead)
        for key, ms in times.items():
            p = _kept(modules[0], small, follows.get(key) or key[0])
            if key in points and p is not None and p < 1.0:
                points[key].append((p, ms))
        rest.append((_mean_kept(state, s), timing.total - sum(times.values())))
    calls = [[key[0], base[key], *_points(points[key]), follows.get(key)] for key in order]
    return {"ms": timings[0].total, "calls": calls, "rest": _line(rest)}


def _line(points: list[tuple[float, float]]) -> dict[str, Any]:
    """The rest as ``a + b * q`` (``a, b >= 0``), fitted by least squares to ``(q, ms)`` points.

    The rest is a difference of two noisy sums, and what it holds (Python overhead, residual adds)
    is either constant or proportional to the width: a line fits it, a curve through the points
    would fit the noise.
    """
    qs, ms = [q for q, _ in points], [m for _, m in points]
    n, mq, mm = len(qs), sum(qs) / len(qs), sum(ms) / len(ms)
    var = sum((q - mq) ** 2 for q in qs)
    slope = sum((q - mq) * (m - mm) for q, m in zip(qs, ms)) / var if var > 0 else 0.0
    a, b = mm - slope * mq, slope
    if b < 0:
        a, b = max(0.0, mm), 0.0
    elif a < 0:
        a, b = 0.0, max(0.0, sum(q * m for q, m in zip(qs, ms)) / max(sum(q * q for q in qs), 1e-12))
    if a + b <= 0 or n < 2:
        return {"ms": max(0.0, a + b), "xs": list(LINEAR.xs), "ys": list(LINEAR.ys)}
    return {"ms": a + b, "xs": [0.0, 1.0], "ys": [a / (a + b), 1.0]}


def _points(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """``(xs, ys)`` of the curve through ``(p, ms)`` points, the first of them at full width."""
    full = points[0][1]
    if full <= 0 or len(points) == 1:
        return list(LINEAR.xs), list(LINEAR.ys)
    curve = Curve.measured([p for p, _ in points], [ms for _, ms in points])
    return list(curve.xs), list(curve.ys)


class _Timing:
    """The fastest times seen for one model: of every leaf-module call (``(name, occurrence)``),
    timed by hooks in context, in the order of the first run, and of the whole forward."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.leaves = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
        self.best: dict[tuple[str, int], float] = {}
        self.order: list[tuple[str, int]] = []
        self.total = math.inf

    def run(self, inputs: tuple, kwargs: dict, timing: tuple[Callable[[], float], Callable[[], Any], bool]) -> None:
        """One hooked forward; the whole forward is timed without hooks in a run of its own when
        ``timing[2]`` (hooks cost microseconds per call: much of a fast forward), else the hooked one."""
        now, sync, plain = timing
        starts: dict[str, float] = {}
        seen: dict[str, int] = {}

        def pre(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any) -> None:
                sync()
                starts[name] = now()
            return hook

        def post(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                sync()
                ms = (now() - starts[name]) * 1e3
                key = (name, seen.get(name, 0))
                seen[name] = key[1] + 1
                if key not in self.best:
                    self.order.append(key)
                self.best[key] = min(self.best.get(key, math.inf), ms)
            return hook

        run = lambda: self.model(*inputs, **kwargs)  # noqa: E731
        handles = [h for n, m in self.leaves for h in (m.register_forward_pre_hook(pre(n)),
                                                       m.register_forward_hook(post(n)))]
        try:
            hooked = _once(run, sync, now)
        finally:
            for handle in handles:
                handle.remove()
        self.total = min(self.total, _once(run, sync, now) if plain else hooked)

    def calls(self, overhead: float) -> dict[tuple[str, int], float]:
        """Per call, the fastest time less what the hooks themselves add to it (at least 0)."""
        return {key: max(0.0, ms - overhead) for key, ms in self.best.items()}


def _hook_overhead(now: Callable[[], float], sync: Callable[[], Any]) -> float:
    """What the timing hooks add to a call, in ms: the time they measure around a module that does
    nothing. It would otherwise be charged to every call (at batch 1, to the width-dependent part)."""
    probe = nn.Sequential(*[nn.Identity() for _ in range(32)])
    timing = _Timing(probe)
    for _ in range(5):
        timing.run((torch.zeros(1),), {}, (now, sync, False))
    return sorted(timing.best.values())[len(timing.best) // 2]


def _leaders(model: nn.Module, order: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """For each call of a module without weights, the weighted module that ran last before it."""
    modules = dict(model.named_modules())
    leaders, last = {}, None
    for key in order:
        if isinstance(getattr(modules[key[0]], "weight", None), torch.Tensor):
            last = key[0]
        elif last is not None:
            leaders[key] = last
    return leaders


def _kept(dense: dict[str, nn.Module], small: dict[str, nn.Module], name: str) -> float | None:
    """The kept fraction of module ``name``'s weight in the narrowed model (``None``: not comparable)."""
    full, narrow = getattr(dense.get(name), "weight", None), getattr(small.get(name), "weight", None)
    if not isinstance(full, torch.Tensor) or not isinstance(narrow, torch.Tensor) or not full.numel():
        return None
    return narrow.numel() / full.numel()


def _narrowed(net: nn.Module, state: SparsityState, s: float) -> nn.Module:
    """A compacted copy of ``net`` with ``ceil(s * n)`` units of every channel or head group.

    Residual branches (layer groups) stay: the cost model removes a whole branch's terms itself.
    The gates' ``forced_off`` flags are restored afterwards, so ``net`` is left as it was.
    """
    gates = state.gate_list()
    saved = [gate.forced_off.clone() for gate in gates]
    try:
        for gg, gate in zip(state.plan.gated, gates):
            if not gg.branches:
                gate.zero_(range(max(1, math.ceil(s * gate.size - 1e-9)), gate.size))
        return compact_model(net, inplace=False, verify=False, rtol=0.0)
    finally:
        with torch.no_grad():
            for gate, off in zip(gates, saved):
                gate.forced_off.copy_(off)


def _mean_kept(state: SparsityState, s: float) -> float:
    """The mean kept fraction over all units when every channel or head group keeps ``ceil(s * n)``."""
    sizes = [(len(gg.units), bool(gg.branches)) for gg in state.plan.gated]
    kept = sum(n if branch else max(1, math.ceil(s * n - 1e-9)) for n, branch in sizes)
    return kept / max(1, sum(n for n, _ in sizes))


def _placement(model: nn.Module, inputs: tuple) -> tuple[torch.device, torch.dtype]:
    floats: list[torch.Tensor] = [p for p in model.parameters() if p.is_floating_point()]
    floats += [x for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    return (floats[0].device, floats[0].dtype) if floats else (torch.device("cpu"), torch.get_default_dtype())


def _signature(net: nn.Module, state: SparsityState, widths: tuple[float, ...]) -> str:
    """A hash of what the table depends on in the model: modules, shapes, gated groups, inputs."""
    def shape(x: Any) -> Any:
        return (tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor) else repr(x)

    parts = [type(net).__name__, repr(widths), f"v{CACHE_VERSION}"]
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

def _no_sync() -> None:
    return None


def clock(device: torch.device) -> Callable[[], float]:
    """The timer latencies are measured with: on a CPU with one intra-op thread, the calling thread's
    CPU time (all the work runs on it, and time the OS gives to other processes is not the model's);
    else wall-clock time.

    Example:
        >>> clock(torch.device("cuda")) is time.perf_counter
        True
    """
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def _once(run: Callable[[], Any], sync: Callable[[], Any], now: Callable[[], float]) -> float:
    sync()
    start = now()
    run()
    sync()
    return (now() - start) * 1e3


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[[], None]]:
    """A tqdm bar shown only when measuring takes more than 2 s (and tqdm is installed)."""
    if tqdm is None or total == 0:
        yield _no_sync
        return
    bar = tqdm(total=total, desc="autosparse: timing the model at reduced widths", unit="width", delay=2.0, leave=False)
    try:
        yield lambda: bar.update(1)
    finally:
        bar.close()
