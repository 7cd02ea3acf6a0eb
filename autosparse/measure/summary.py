"""Summary: parameters, FLOPs, size and latency of a model in one record, and two side by side.

Example:
    >>> import torch
    >>> summarize(torch.nn.Linear(10, 20), (torch.randn(4, 10),))
    Summary(params=220, flops=1600, size_bytes=880, latency_ms=None)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from autosparse.measure.counting import count_flops, count_params, model_size_bytes
from autosparse.measure.timing import measure_latency


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
        >>> import torch
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
