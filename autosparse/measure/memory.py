"""Memory: the resident set size of this process, its lifetime peak and the peak inside a block.

Example:
    >>> peak_rss_mb() > 0
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from collections.abc import Callable, Iterator


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
        >>> import torch
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
