"""Measurement utilities: parameters, FLOPs, latency, size and memory of a model.

Independent of the rest of autosparse, so they measure dense, gated and compacted models alike.
Functions that run the model take its positional arguments as a tuple ``example_inputs`` (else
:class:`~autosparse.errors.ExampleInputsError`) and run it in eval mode, restoring each submodule's
own ``training`` flag afterwards, also when the run raises.

Example:
    >>> import torch
    >>> summarize(torch.nn.Linear(10, 20), (torch.randn(4, 10),)).flops
    1600
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autosparse.errors import ExampleInputsError


def count_params(model: nn.Module) -> int:
    """Count the model's scalar parameters, each shared (tied) parameter once.

    Frozen parameters (``requires_grad=False``) are counted too; buffers are not.

    Args:
        model: Any module.

    Example:
        >>> count_params(torch.nn.Linear(10, 20))
        220
    """
    # Module.parameters() already yields a Parameter reachable by two names only once.
    return sum(p.numel() for p in model.parameters())


def model_size_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (persistent or not), each shared one once.

    Args:
        model: Any module.

    Example:
        >>> model_size_bytes(torch.nn.Linear(10, 20))  # 220 float32 values
        880
    """
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _check_inputs(example_inputs: Any) -> tuple:
    if not isinstance(example_inputs, tuple):
        raise ExampleInputsError(
            f"example_inputs must be a tuple of positional arguments, got {type(example_inputs).__name__}; "
            "wrap a single tensor as (x,)"
        )
    return example_inputs


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode, then restore every submodule's own training flag.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Dropout()).train()
        >>> with eval_mode(net):
        ...     net[0].training
        False
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        # Set the attribute, not .train(flag): .train() would overwrite the children's own flags.
        for module, training in flags:
            module.training = training


def _flop_counter(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None) -> FlopCounterMode:
    inputs = _check_inputs(example_inputs)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(*inputs, **(example_kwargs or {}))
    return counter


def count_flops(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> int:
    """Count the FLOPs of one forward pass in eval mode, without gradients.

    Uses :class:`torch.utils.flop_counter.FlopCounterMode`, so a multiply-add counts as 2 FLOPs and
    only ops it knows (matmuls, convolutions, attention) are counted; element-wise ops and bias
    additions are not.

    Args:
        model: The module to run.
        example_inputs: Positional arguments of ``model``, as a tuple.
        example_kwargs: Keyword arguments of ``model``, if any.

    Returns:
        The total FLOPs of the forward pass.

    Example:
        >>> count_flops(torch.nn.Linear(10, 20), (torch.randn(4, 10),))  # 2 * 4 * 10 * 20
        1600
    """
    return int(_flop_counter(model, example_inputs, example_kwargs).get_total_flops())


def flops_by_module(
    model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None
) -> dict[str, int]:
    """FLOPs of one forward pass attributed to each module that performed counted ops.

    Keys are the names of :meth:`torch.nn.Module.named_modules` (``"layer1.0.conv1"``), with ``""``
    for the whole model. Counts are inclusive: a parent's count includes its children's. Modules
    without counted ops are absent.

    Args:
        model, example_inputs, example_kwargs: As for :func:`count_flops`.

    Returns:
        A dict from module name to FLOPs, in ``named_modules`` order.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 20))
        >>> flops_by_module(model, (torch.randn(4, 10),))
        {'': 1600, '0': 1600}
    """
    counts = _flop_counter(model, example_inputs, example_kwargs).get_flop_counts()
    # FlopCounterMode names the root by its class name and children "Root.child"; "Global" is the total.
    root = type(model).__name__
    result: dict[str, int] = {}
    for key, per_op in counts.items():
        if key == root or key.startswith(root + "."):
            result[key[len(root) + 1 :]] = int(sum(per_op.values()))  # "Root" -> "", "Root.a.b" -> "a.b"
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(result.items(), key=lambda item: order.get(item[0], len(order))))


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of repeated forward passes, in milliseconds.

    Attributes:
        median_ms: The median over the timed runs.
        p90_ms: The 90th percentile (linear interpolation between the closest runs).
        min_ms: The fastest run.
        repeats: How many runs were timed (warm-up runs excluded).
    """

    median_ms: float
    p90_ms: float
    min_ms: float
    repeats: int


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    saved = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(saved)


def measure_latency(
    model: nn.Module,
    example_inputs: tuple,
    *,
    repeats: int = 30,
    warmup: int = 5,
    threads: int | None = None,
    example_kwargs: dict | None = None,
) -> LatencyStats:
    """Time forward passes of ``model`` under :func:`torch.inference_mode` in eval mode.

    Args:
        model: The module to time.
        example_inputs: Positional arguments of ``model``, as a tuple.
        repeats: Timed runs (at least 1).
        warmup: Untimed runs before timing, to fill caches and allocators (at least 0).
        threads: If given, ``torch.set_num_threads(threads)`` for the measurement only.
        example_kwargs: Keyword arguments of ``model``, if any.

    Returns:
        The median, 90th percentile and minimum latency.

    Raises:
        ValueError: If ``repeats``, ``warmup`` or ``threads`` is out of range.

    Example:
        >>> stats = measure_latency(torch.nn.Linear(10, 20), (torch.randn(4, 10),), repeats=5)
        >>> stats.min_ms <= stats.median_ms <= stats.p90_ms
        True
    """
    inputs = _check_inputs(example_inputs)
    if repeats < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise ValueError(
            f"need repeats >= 1, warmup >= 0, threads >= 1 or None; got {repeats=}, {warmup=}, {threads=}"
        )
    # CUDA kernels run asynchronously: without a sync the timer would measure the launch only.
    tensors = [*model.parameters(), *(x for x in inputs if isinstance(x, torch.Tensor))]
    sync = torch.cuda.synchronize if any(t.is_cuda for t in tensors) else lambda: None
    times_ms: list[float] = []
    with _num_threads(threads), eval_mode(model), torch.inference_mode():
        for run in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            model(*inputs, **(example_kwargs or {}))
            sync()
            if run >= warmup:  # warm-up runs fill caches and allocators; they are not timed
                times_ms.append((time.perf_counter() - start) * 1e3)
    # "inclusive" interpolates between the runs like numpy.percentile's default.
    p90 = statistics.quantiles(times_ms, n=10, method="inclusive")[-1] if repeats > 1 else times_ms[0]
    return LatencyStats(statistics.median(times_ms), p90, min(times_ms), repeats)


@dataclasses.dataclass(frozen=True)
class LatencyReport:
    """Latency of a compacted model against its dense model, timed alternately (:func:`latency_report`).

    Attributes:
        dense_ms: Median wall-clock latency of the dense model, in milliseconds.
        compacted_ms: The same for the compacted model.
        ratio: Median over the pairs of compacted / dense wall-clock time: robust to load that
            drifts during the measurement, since both runs of a pair see about the same load.
        ratio_min: Fastest compacted run / fastest dense run (wall-clock).
        cpu_ratio: Median over the pairs of the ratio of the calling thread's CPU times; ``None``
            unless the model runs on a CPU with one intra-op thread (then all its work is on that
            thread, and time the OS gives to other processes does not count).
        predicted: The latency fraction a cost model predicted, if given.
        pairs: How many (dense, compacted) pairs were timed.
    """

    dense_ms: float
    compacted_ms: float
    ratio: float
    ratio_min: float
    cpu_ratio: float | None
    predicted: float | None
    pairs: int

    def to_dict(self) -> dict[str, float | int | None]:
        """The fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


def latency_report(
    dense: nn.Module,
    compacted: nn.Module,
    example_inputs: tuple,
    *,
    predicted: float | None = None,
    repeats: int = 20,
    warmup: int = 3,
    example_kwargs: dict | None = None,
) -> LatencyReport:
    """Measure how much faster ``compacted`` is than ``dense``, alternating the two to share the noise.

    Both run in eval mode under :func:`torch.inference_mode`; each pair runs the two models in turn,
    the order swapped every other pair so neither always runs first (warm caches, CPU frequency).

    Args:
        dense: The original model.
        compacted: The compacted (or any other) model taking the same inputs.
        example_inputs: Positional inputs, as a tuple, at the batch size of interest.
        predicted: A predicted latency fraction to report next to the measured one
            (e.g. ``autosparse.pruning.selection_of(small).predicted``).
        repeats: Timed pairs (at least 1).
        warmup: Untimed runs of each model first (at least 0).
        example_kwargs: Keyword inputs, if any.

    Returns:
        A :class:`LatencyReport`.

    Raises:
        ValueError: If ``repeats`` or ``warmup`` is out of range.

    Example:
        >>> r = latency_report(torch.nn.Linear(64, 64), torch.nn.Linear(64, 16), (torch.randn(8, 64),), repeats=3)
        >>> r.pairs
        3
    """
    inputs = _check_inputs(example_inputs)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0; got {repeats=}, {warmup=}")
    tensors = [*dense.parameters(), *(x for x in inputs if isinstance(x, torch.Tensor))]
    sync = torch.cuda.synchronize if any(t.is_cuda for t in tensors) else lambda: None
    thread_cpu = not any(t.is_cuda for t in tensors) and torch.get_num_threads() == 1
    wall: dict[int, list[float]] = {0: [], 1: []}
    cpu: dict[int, list[float]] = {0: [], 1: []}
    models = (dense, compacted)
    with eval_mode(dense), eval_mode(compacted), torch.inference_mode():
        for _ in range(warmup):
            for model in models:
                model(*inputs, **(example_kwargs or {}))
        for pair in range(repeats):
            for side in (0, 1) if pair % 2 == 0 else (1, 0):
                sync()
                start, start_cpu = time.perf_counter(), time.thread_time()
                models[side](*inputs, **(example_kwargs or {}))
                sync()
                wall[side].append((time.perf_counter() - start) * 1e3)
                cpu[side].append((time.thread_time() - start_cpu) * 1e3)
    return LatencyReport(
        dense_ms=statistics.median(wall[0]),
        compacted_ms=statistics.median(wall[1]),
        ratio=statistics.median(c / d for d, c in zip(wall[0], wall[1])),
        ratio_min=min(wall[1]) / min(wall[0]),
        cpu_ratio=statistics.median(c / d for d, c in zip(cpu[0], cpu[1])) if thread_cpu else None,
        predicted=predicted,
        pairs=repeats,
    )


def peak_rss_mb() -> float:
    """The peak resident set size of this process since it started, in MiB.

    This is ``getrusage(RUSAGE_SELF).ru_maxrss`` (kB on Linux, bytes on macOS): a lifetime maximum
    that never goes down, so it cannot tell the peak of one block of code; use
    :func:`track_peak_rss` for that. Not available on Windows (no ``resource`` module).

    Example:
        >>> peak_rss_mb() > 0
        True
    """
    import resource  # POSIX only: imported here so that importing this module works everywhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _current_rss_mb() -> float | None:
    """The current RSS from /proc/self/status in MiB, or None where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            lines = [line for line in status if line.startswith("VmRSS:")]
    except OSError:
        return None
    return int(lines[0].split()[1]) / 2**10 if lines else None  # the value is in kB


@dataclasses.dataclass
class RssPeak:
    """What :func:`track_peak_rss` saw, in MiB; ``delta_mb`` is None until the block exits.

    Attributes:
        start_mb: RSS when the block was entered.
        peak_mb: The highest RSS sampled inside the block.
        delta_mb: ``peak_mb - start_mb`` (at least 0): extra memory the block needed at its peak.
        sampled: False for the ``ru_maxrss`` fallback where /proc is missing (see track_peak_rss).
    """

    start_mb: float
    peak_mb: float
    delta_mb: float | None = None
    sampled: bool = True


@contextlib.contextmanager
def track_peak_rss(interval_s: float = 0.005) -> Iterator[RssPeak]:
    """Measure how much the resident memory rises inside a ``with`` block.

    A daemon thread reads ``VmRSS`` from ``/proc/self/status`` every ``interval_s`` seconds (plus
    once on entry and once on exit), because ``ru_maxrss`` is a lifetime maximum. Peaks shorter
    than the interval can be missed. Without /proc (macOS), it falls back to the rise of
    :func:`peak_rss_mb`, which underestimates and is 0 when the process peaked earlier.

    Args:
        interval_s: Seconds between samples.

    Yields:
        An :class:`RssPeak` whose ``peak_mb`` and ``delta_mb`` are set when the block exits.

    Example:
        >>> with track_peak_rss() as rss:
        ...     x = torch.ones(2**24)  # 64 MiB
        >>> rss.delta_mb > 0  # doctest: +SKIP
        True
    """
    current = _current_rss_mb()
    read: Callable[[], float | None]
    if current is None:  # no /proc: fall back to the lifetime peak
        read, start = peak_rss_mb, peak_rss_mb()
    else:
        read, start = _current_rss_mb, current
    result = RssPeak(start_mb=start, peak_mb=start, sampled=read is _current_rss_mb)
    stop = threading.Event()

    def sample() -> None:
        result.peak_mb = max(result.peak_mb, read() or 0.0)

    def loop() -> None:
        while not stop.wait(interval_s):
            sample()

    thread = threading.Thread(target=loop, name="autosparse-rss-sampler", daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        sample()
        result.delta_mb = max(0.0, result.peak_mb - result.start_mb)


@dataclasses.dataclass(frozen=True)
class Summary:
    """The size and cost of a model, as :func:`summarize` measures them.

    Attributes:
        params: Unique parameters (:func:`count_params`).
        flops: FLOPs of one forward pass (:func:`count_flops`).
        size_bytes: Bytes of parameters and buffers (:func:`model_size_bytes`).
        latency_ms: Median latency (:func:`measure_latency`), or None if not measured.
    """

    params: int
    flops: int
    size_bytes: int
    latency_ms: float | None = None

    def to_dict(self) -> dict[str, int | float | None]:
        """The fields as a JSON-serialisable dict, e.g. for ``json.dumps(summary.to_dict())``."""
        return dataclasses.asdict(self)


def summarize(model: nn.Module, example_inputs: tuple, latency: bool = False) -> Summary:
    """Measure parameters, FLOPs, size and optionally median latency of ``model``.

    Args:
        model: The module to measure.
        example_inputs: Positional arguments of ``model``, as a tuple.
        latency: Also time it with :func:`measure_latency`'s defaults (slower, noisy).

    Returns:
        A :class:`Summary`.

    Example:
        >>> summarize(torch.nn.Linear(10, 20), (torch.randn(4, 10),))
        Summary(params=220, flops=1600, size_bytes=880, latency_ms=None)
    """
    return Summary(
        params=count_params(model),
        flops=count_flops(model, example_inputs),
        size_bytes=model_size_bytes(model),
        latency_ms=measure_latency(model, example_inputs).median_ms if latency else None,
    )


SI_UNITS = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3), ("", 1))
BINARY_UNITS = ((" GiB", 2**30), (" MiB", 2**20), (" KiB", 2**10), (" B", 1))


def human(value: float, units: tuple[tuple[str, float], ...]) -> str:
    unit, scale = next((u, s) for u, s in units if abs(value) >= s or s == 1)
    return f"{value:g}{unit}" if scale == 1 else f"{value / scale:.2f}{unit}"


def compare(before: Summary, after: Summary) -> str:
    """Render two summaries side by side as an aligned text table; ratio is after / before.

    Args:
        before: The summary of the original model.
        after: The summary of the changed (e.g. compacted) model.

    Returns:
        Rows params, FLOPs, size, latency; columns before, after, ratio (``-`` where undefined).

    Example:
        >>> print(compare(Summary(100, 2000, 400), Summary(50, 500, 200)))
                 before  after  ratio
        params      100     50  0.50x
        FLOPs     2.00K    500  0.25x
        size      400 B  200 B  0.50x
        latency       -      -      -
    """
    rows: list[tuple[str, float | None, float | None, Callable[[float], str]]] = [
        ("params", before.params, after.params, lambda n: human(n, SI_UNITS)),
        ("FLOPs", before.flops, after.flops, lambda n: human(n, SI_UNITS)),
        ("size", before.size_bytes, after.size_bytes, lambda n: human(n, BINARY_UNITS)),
        ("latency", before.latency_ms, after.latency_ms, lambda ms: f"{ms:.2f} ms"),
    ]
    table: list[tuple[str, ...]] = [("", "before", "after", "ratio")]
    for label, old, new, fmt in rows:
        cells = [fmt(value) if value is not None else "-" for value in (old, new)]
        table.append((label, *cells, f"{new / old:.2f}x" if old and new is not None else "-"))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = [
        "  ".join([row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in (1, 2, 3)]) for row in table
    ]
    return "\n".join(line.rstrip() for line in lines)
