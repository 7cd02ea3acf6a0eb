"""Timing: wall-clock latency of a model, alone or against another one (dense vs compacted).

Both run the model in eval mode under :func:`torch.inference_mode`, synchronising CUDA around
every timed run (kernels run asynchronously: without it the timer would see the launch only).

Example:
    >>> measure_latency(torch.nn.Linear(10, 20), (torch.randn(4, 10),), repeats=3).repeats
    3
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from autosparse.measure.counting import check_inputs, eval_mode


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
    inputs = check_inputs(example_inputs)
    if repeats < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise ValueError(
            f"need repeats >= 1, warmup >= 0, threads >= 1 or None; got {repeats=}, {warmup=}, {threads=}"
        )
    sync = _synchronizer(model, inputs)
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
    inputs = check_inputs(example_inputs)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0; got {repeats=}, {warmup=}")
    on_cuda = _on_cuda(dense, inputs)
    thread_cpu = not on_cuda and torch.get_num_threads() == 1
    with eval_mode(dense), eval_mode(compacted), torch.inference_mode():
        wall, cpu = _paired_times((dense, compacted), inputs, example_kwargs or {}, repeats, warmup)
    return LatencyReport(
        dense_ms=statistics.median(wall[0]),
        compacted_ms=statistics.median(wall[1]),
        ratio=statistics.median(c / d for d, c in zip(wall[0], wall[1])),
        ratio_min=min(wall[1]) / min(wall[0]),
        cpu_ratio=statistics.median(c / d for d, c in zip(cpu[0], cpu[1])) if thread_cpu else None,
        predicted=predicted,
        pairs=repeats,
    )


def _on_cuda(model: nn.Module, inputs: tuple) -> bool:
    return any(t.is_cuda for t in [*model.parameters(), *(x for x in inputs if isinstance(x, torch.Tensor))])


def _synchronizer(model: nn.Module, inputs: tuple) -> Callable[[], None]:
    """``torch.cuda.synchronize`` where the model runs on CUDA, else a no-op.

    CUDA kernels run asynchronously: without a sync the timer would measure the launch only.
    """
    return torch.cuda.synchronize if _on_cuda(model, inputs) else lambda: None


def _paired_times(
    models: tuple[nn.Module, nn.Module], inputs: tuple, kwargs: dict, repeats: int, warmup: int
) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
    """Wall-clock and thread CPU ms of each side's runs, the order swapped every other pair."""
    sync = _synchronizer(models[0], inputs)
    wall: dict[int, list[float]] = {0: [], 1: []}
    cpu: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(warmup):
        for model in models:
            model(*inputs, **kwargs)
    for pair in range(repeats):
        for side in (0, 1) if pair % 2 == 0 else (1, 0):
            sync()
            start, start_cpu = time.perf_counter(), time.thread_time()
            models[side](*inputs, **kwargs)
            sync()
            wall[side].append((time.perf_counter() - start) * 1e3)
            cpu[side].append((time.thread_time() - start_cpu) * 1e3)
    return wall, cpu
