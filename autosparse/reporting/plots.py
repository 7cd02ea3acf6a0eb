"""Plots of what sparsification did: kept widths, kept fraction over training, accuracy vs FLOPs.

matplotlib is an optional dependency (``pip install 'autosparse[plots]'``), imported only when a
plot is drawn. Figures are drawn with :class:`matplotlib.figure.Figure` directly rather than
through ``pyplot``: that renders headless with Agg without switching the backend of the caller's
session (a notebook keeps its own) and leaves no figure open in pyplot's global registry. Files are
written atomically: to a temporary file in the target's directory, then moved over the target.

Example:
    >>> from autosparse.reporting.plots import plot_widths
    >>> plot_widths({"conv1": 64, "conv2": 128}, {"conv1": 20, "conv2": 77}, "widths.png")  # doctest: +SKIP
    PosixPath('widths.png')
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_MAX_LEGEND = 12
_MARKERS = "osD^vPX*<>"


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "autosparse's plots need matplotlib, which is not installed: pip install 'autosparse[plots]'"
        ) from error
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Save ``fig`` to ``path`` atomically; the format follows the suffix (PNG without one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format=path.suffix.lstrip(".").lower() or "png", dpi=120)
        os.chmod(tmp, 0o644)  # mkstemp creates the file private to its owner; a plot need not be
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _short(label: str, limit: int = 32) -> str:
    # Keep the end of long dotted names: "...layer4.1.conv2" tells more than "backbone.encoder...".
    return label if len(label) <= limit else "…" + label[-(limit - 1) :]


def plot_widths(before: Mapping[str, int], after: Mapping[str, int], path: str | os.PathLike[str]) -> Path:
    """Grouped bar chart of the width (units kept) of each layer or group, before vs after.

    Args:
        before: Width per name before sparsification (e.g. output channels per layer).
        after: Width per name after; a name missing here is drawn as 0 (removed entirely).
        path: Where to write the image (PNG, or the format of the suffix).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If both mappings are empty.
        ImportError: If matplotlib is not installed.

    Example:
        >>> plot_widths({"conv1": 64}, {"conv1": 20}, "widths.png")  # doctest: +SKIP
        PosixPath('widths.png')
    """
    names = [*before, *(name for name in after if name not in before)]
    if not names:
        raise ValueError("plot_widths needs at least one layer or group; before and after are both empty")
    old = [before.get(name, 0) for name in names]
    new = [after.get(name, 0) for name in names]
    fig = _figure(min(max(6.0, 0.35 * len(names) + 2.0), 40.0), 4.8)
    ax = fig.add_subplot()
    positions = range(len(names))
    ax.bar([x - 0.2 for x in positions], old, width=0.4, label="before", color="#b0b0b0")
    ax.bar([x + 0.2 for x in positions], new, width=0.4, label="after", color="#1f77b4")
    ax.set_xticks(
        list(positions), [_short(name) for name in names], rotation=60, ha="right", rotation_mode="anchor"
    )
    ax.tick_params(axis="x", labelsize=8 if len(names) > 20 else 9)
    ax.set_ylabel("width (units kept)")
    ax.set_xlim(-0.6, len(names) - 0.4)
    kept = f" ({sum(new) / sum(old):.0%} kept)" if sum(old) else ""
    ax.set_title(f"Width per group: {sum(old)} -> {sum(new)} units{kept}")
    fig.legend(loc="outside right upper")  # outside: inside the axes it would hide tall bars
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_kept_fraction(
    history: Mapping[str, Sequence[tuple[int, float]]], path: str | os.PathLike[str]
) -> Path:
    """Line plot of the kept fraction of units of each group over training steps.

    The 12 groups that end with the lowest kept fraction (the most pruned) get a colour and a
    legend entry; the others are drawn as thin grey lines under one "N other groups" entry.

    Args:
        history: Per group, ``(step, kept_fraction)`` points in any order; fractions in [0, 1].
        path: Where to write the image (PNG, or the format of the suffix).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If no group has any point.
        ImportError: If matplotlib is not installed.

    Example:
        >>> plot_kept_fraction({"layer1": [(0, 1.0), (100, 0.6)]}, "kept.png")  # doctest: +SKIP
        PosixPath('kept.png')
    """
    series = {name: sorted(points) for name, points in history.items() if points}
    if not series:
        raise ValueError("plot_kept_fraction needs at least one group with (step, fraction) points")
    ranked = sorted(series, key=lambda name: series[name][-1][1])
    highlighted = set(ranked[:_MAX_LEGEND])
    fig = _figure(8.0, 4.8)
    ax = fig.add_subplot()
    for index, name in enumerate(ranked[:_MAX_LEGEND]):
        steps, fractions = zip(*series[name], strict=True)
        # The colour cycle has 10 colours: lines 11 and 12 reuse them, told apart by dashes.
        style = "-" if index < 10 else "--"
        ax.plot(steps, fractions, style, linewidth=1.6, label=_short(name), zorder=2)
    others = [name for name in series if name not in highlighted]
    for index, name in enumerate(others):
        steps, fractions = zip(*series[name], strict=True)
        label = f"{len(others)} other groups" if index == 0 else None
        ax.plot(steps, fractions, color="#b0b0b0", linewidth=0.8, alpha=0.7, label=label, zorder=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("kept fraction of units")
    ax.set_ylim(0.0, 1.05)
    ax.set_title("Kept fraction of units per group")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize="small")
    return _save(fig, path)


def _check_result(index: int, result: Any) -> tuple[str, float, float]:
    required = ("method", "flops_fraction", "accuracy")
    if not isinstance(result, Mapping) or any(key not in result for key in required):
        raise ValueError(f"results[{index}] must be a dict with keys {', '.join(required)}; got {result!r}")
    return str(result["method"]), float(result["flops_fraction"]), float(result["accuracy"])


def plot_accuracy_vs_flops(results: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Accuracy against FLOPs (as a fraction of the dense model), one line per method.

    Args:
        results: Dicts ``{"method": str, "flops_fraction": float, "accuracy": float}``; the points
            of a method are joined in order of ``flops_fraction``.
        path: Where to write the image (PNG, or the format of the suffix).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``results`` is empty or an entry lacks one of the keys.
        ImportError: If matplotlib is not installed.

    Example:
        >>> rows = [{"method": "autosparse", "flops_fraction": 0.5, "accuracy": 0.91}]
        >>> plot_accuracy_vs_flops(rows, "acc.png")  # doctest: +SKIP
        PosixPath('acc.png')
    """
    if not results:
        raise ValueError("plot_accuracy_vs_flops needs at least one result")
    by_method: dict[str, list[tuple[float, float]]] = {}
    for index, result in enumerate(results):
        method, flops_fraction, accuracy = _check_result(index, result)
        by_method.setdefault(method, []).append((flops_fraction, accuracy))
    fig = _figure(6.4, 4.8)
    ax = fig.add_subplot()
    for index, (method, points) in enumerate(by_method.items()):
        fractions, accuracies = zip(*sorted(points), strict=True)
        ax.plot(fractions, accuracies, marker=_MARKERS[index % len(_MARKERS)], label=method)
    ax.set_xlabel("FLOPs (fraction of dense)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
