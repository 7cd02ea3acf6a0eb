"""Latency curves: a module's relative latency against the kept fraction of its weight.

:class:`Curve` is the piecewise-linear function the latency cost model evaluates (differentiable in
the gates, as the FLOPs cost is); :func:`curve_points` and :func:`rest_line` turn the timings of
:mod:`autosparse.training.latency_timing` into the points of the curves the cache stores.

Example:
    >>> Curve.measured([1.0, 0.5], [10.0, 6.0]).ys
    (0.6, 1.0)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch


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


def curve_points(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """``(xs, ys)`` of the curve through ``(p, ms)`` points, the first of them at full width.

    Example:
        >>> curve_points([(1.0, 4.0), (0.5, 3.0)])
        ([0.5, 1.0], [0.75, 1.0])
    """
    full = points[0][1]
    if full <= 0 or len(points) == 1:
        return list(LINEAR.xs), list(LINEAR.ys)
    curve = Curve.measured([p for p, _ in points], [ms for _, ms in points])
    return list(curve.xs), list(curve.ys)


def rest_line(points: list[tuple[float, float]]) -> dict[str, Any]:
    """The rest as ``a + b * q`` (``a, b >= 0``), fitted by least squares to ``(q, ms)`` points.

    The rest is a difference of two noisy sums, and what it holds (Python overhead, residual adds)
    is either constant or proportional to the width: a line fits it, a curve through the points
    would fit the noise.

    Returns:
        The cache's form: ``{"ms": a + b, "xs": [...], "ys": [...]}``.

    Example:
        >>> rest_line([(1.0, 2.0), (0.5, 1.5)])
        {'ms': 2.0, 'xs': [0.0, 1.0], 'ys': [0.5, 1.0]}
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
