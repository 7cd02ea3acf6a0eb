"""Timing a sparsified model's leaf-module calls at full and reduced widths (the latency table's data).

:func:`measure_widths` runs the dense model and uniformly narrowed, compacted copies round-robin,
with hooks that time every leaf-module call in context, and returns the cache entry that
:func:`autosparse.training.latency.latency_table` turns into a table. How many forward passes are
timed per width is set here: about :data:`BUDGET_MS` of them, at least :data:`MIN_REPEATS` (three:
with two, a batch-32 ResNet-50 varied by about 15 % between tables) and at most :data:`MAX_REPEATS`.

Example:
    >>> entry = measure_widths(net, get_state(net), (0.5,), torch.device("cpu"))  # doctest: +SKIP
    >>> sorted(entry)  # doctest: +SKIP
    ['calls', 'ms', 'rest']
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from autosparse.compaction.compact import compact_model, fold_gates
from autosparse.measure import eval_mode
from autosparse.state import STATE_ATTR, SparsityState
from autosparse.training.latency_curves import curve_points, rest_line

try:  # optional: a progress bar when measuring takes long
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is not a core dependency
    tqdm = None

BUDGET_MS = 1500.0  # timed forward passes per width: about this long, at least MIN_REPEATS of them
MIN_REPEATS, MAX_REPEATS = 3, 12  # 3: at large batches (one forward > BUDGET_MS / 2) 2 runs were too noisy
PLAIN_BELOW_MS = 50.0  # whole forwards faster than this are also timed without hooks

Timer = tuple[Callable[[], float], Callable[[], Any], bool]  # (clock, sync, time the forward without hooks)


def plain_copy(model: nn.Module) -> nn.Module:
    """A plain copy of a sparsified model at its dense widths (gates folded into the weights).

    Example:
        >>> dense = plain_copy(net)  # doctest: +SKIP
    """
    dense = copy.deepcopy(model)
    fold_gates(dense)
    dense.__dict__.pop(STATE_ATTR, None)
    return dense


def measure_widths(net: nn.Module, state: SparsityState, widths: tuple[float, ...],
                   device: torch.device) -> dict[str, Any]:
    """The cache entry of ``net``: per call its dense ms and curve, the whole model, the rest.

    The dense model and its narrowed copies are timed round-robin, so that load from other
    processes drifting during the measurement slows every width alike instead of bending the curves.
    """
    timings, overhead = _time_models(net, state, widths, device)
    base, order = timings[0].calls(overhead), timings[0].order
    follows = _leaders(timings[0].model, order)
    modules = [dict(t.model.named_modules()) for t in timings]
    points: dict[tuple[str, int], list[tuple[float, float]]] = {key: [(1.0, ms)] for key, ms in base.items()}
    rest = [(1.0, timings[0].total - sum(base.values()))]
    for s, timing, small in zip(widths, timings[1:], modules[1:]):
        times = timing.calls(overhead)
        for key, ms in times.items():
            p = _kept(modules[0], small, follows.get(key) or key[0])
            if key in points and p is not None and p < 1.0:
                points[key].append((p, ms))
        rest.append((_mean_kept(state, s), timing.total - sum(times.values())))
    calls = [[key[0], base[key], *curve_points(points[key]), follows.get(key)] for key in order]
    return {"ms": timings[0].total, "calls": calls, "rest": rest_line(rest)}


def _time_models(net: nn.Module, state: SparsityState, widths: tuple[float, ...],
                 device: torch.device) -> tuple[list[_Timing], float]:
    """The timings of the dense copy, then of one narrowed copy per width; and the hooks' overhead in ms."""
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
    return timings, overhead


class _Timing:
    """The fastest times seen for one model: of every leaf-module call (``(name, occurrence)``),
    timed by hooks in context, in the order of the first run, and of the whole forward."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.leaves = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
        self.best: dict[tuple[str, int], float] = {}
        self.order: list[tuple[str, int]] = []
        self.total = math.inf

    def run(self, inputs: tuple, kwargs: dict, timing: Timer) -> None:
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
