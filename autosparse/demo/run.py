"""``autosparse demo``: learn the widths of an over-wide CNN under a FLOPs budget, on real data.

It builds a CNN far wider than scikit-learn's 8x8 digits need, gates every channel group, trains
weights and gates together with Adam while the budget controller steers lambda towards the target
FLOPs, freezes the structure for the last 40 % of training, compacts, and prints the learned
widths, a before/after table and the accuracy of a dense baseline trained with the same recipe (in
a second process, at the same time, so two cores take no longer). Nothing is downloaded.

Run it with ``autosparse demo`` or ``python -m autosparse.demo [--budget 0.3] [--epochs 30] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import autosparse
from autosparse import training
from autosparse.compaction.record import require_record
from autosparse.demo.data import Dataset, load_digits
from autosparse.io.format import atomic_dir
from autosparse.measure import Summary, compare, count_flops, count_params, measure_latency, model_size_bytes
from autosparse.policy.document import Schedule
from autosparse.reporting.logger import GateLogger
from autosparse.reporting.plots import plot_widths
from autosparse.state import get_state, is_sparsified

WIDTHS = (32, 64, 64)


def wide_cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    widths: Sequence[int] = WIDTHS,
    dims: int = 2,
    pool_after: Sequence[int] = (1,),
    named: bool = False,
) -> nn.Sequential:
    """Conv-BN-ReLU blocks of the given widths, max-pooling after the listed blocks, then a linear head.

    Args:
        dims: 2 for images (``Conv2d``), 1 for signals (``Conv1d``).
        pool_after: Indices of the blocks followed by a 2x max-pool.
        named: name the modules (``block1.conv``, ``pool2``, ``head``) instead of numbering them
            (``0.0``); the same network, with readable group names.
    """
    conv, norm, pool, gap = {
        2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d),
        1: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d),
    }[dims]
    layers: list[tuple[str, nn.Module]] = []
    cin = in_channels
    for i, width in enumerate(widths, 1):
        parts = [("conv", conv(cin, width, 3, padding=1, bias=False)), ("bn", norm(width)), ("relu", nn.ReLU())]
        layers.append((f"block{i}", _sequential(parts, named)))
        if i - 1 in pool_after:
            layers.append((f"pool{i}", pool(2)))
        cin = width
    layers += [("gap", gap(1)), ("flatten", nn.Flatten()), ("head", nn.Linear(cin, num_classes))]
    return _sequential(layers, named)


def _sequential(parts: list[tuple[str, nn.Module]], named: bool) -> nn.Sequential:
    return nn.Sequential(OrderedDict(parts)) if named else nn.Sequential(*(m for _, m in parts))


def budget_policy(budget: float, steps: int, metric: str = "flops", min_keep: int = 2,
                  regime: str = "scratch") -> dict:
    """The policy the demo and the benchmarks use: every channel group, a budget, the recipe of a regime.

    ``scratch`` (training from initialisation): lambda warms up over the first 10 % of the steps,
    the controller's reference reaches the budget at about 48 %, and the gates freeze at 60 %, so
    the last 40 % fine-tune a fixed structure. ``pretrained`` (a trained model, a short fine-tune):
    gates start from l2 magnitude, a 3 % warm-up, units close progressively so the reference
    reaches the budget at about 23 %, and the gates freeze at 30 %, leaving 70 % to fine-tune.

    Example:
        >>> budget_policy(0.05, 900, regime="pretrained")["schedule"]
        {'warmup_steps': 27, 'freeze_step': 270, 'regime': 'pretrained'}
    """
    warmup, freeze = (0.03, 0.3) if regime == "pretrained" else (0.1, 0.6)
    return {
        "rules": [{"name": "channels", "granularity": "channel", "min_keep": min_keep}],
        "penalty": {"lambda": 1e-3, "p": 0.5},
        "schedule": {"warmup_steps": max(1, int(warmup * steps)), "freeze_step": max(2, int(freeze * steps)),
                     "regime": regime},
        "target": {metric: budget, "tolerance": 0.05},
    }


def fit(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    seed: int = 0,
    lr: float = 3e-3,
    gate_lr: float = 1e-2,
    batch_size: int = 64,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    restart_at_freeze: bool = True,
    progress: bool = False,
    desc: str = "training",
    on_step: Callable[[int], object] | None = None,
) -> nn.Module:
    """Train a classifier with Adam and a cosine learning rate; gated models get the penalty too.

    A sparsified model adds :func:`autosparse.penalty` to the loss and calls
    :func:`autosparse.training.step` after every optimizer step (the explicit way; see
    :func:`autosparse.training.attach` for the hook-based one). Its gates get ``gate_lr``, and with
    ``restart_at_freeze`` the cosine restarts at the policy's freeze step, so the fixed structure is
    fine-tuned from the full learning rate, as prune-then-fine-tune methods do; in the ``pretrained``
    regime the gates' learning rate stays constant until the freeze (:func:`lr_factors`). ``on_step(step)``
    runs after every optimizer step (e.g. :meth:`autosparse.GateLogger.step`).

    Returns:
        ``model``, trained in place and left in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    gated = is_sparsified(model)
    gates = training.gate_parameters(model) if gated else []
    rest = [p for p in model.parameters() if all(p is not g for g in gates)]
    groups = [{"params": rest, "lr": lr}] + ([{"params": gates, "lr": gate_lr}] if gates else [])
    optimizer = torch.optim.Adam(groups)
    n = len(data.x_train)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    policy_schedule = get_state(model).policy.schedule if gated else None
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factors(total, policy_schedule, restart_at_freeze))
    bar = _progress(epochs * steps_per_epoch, desc, progress)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(steps_per_epoch):
            batch = order[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            if gated:
                loss = loss + autosparse.penalty(model)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if gated:
                training.step(model)
            if on_step is not None:
                on_step(schedule.last_epoch - 1)  # the scheduler counts the steps taken
            if bar is not None:
                bar.update(1)
                if gated and bar.n % 10 == 0:
                    bar.set_postfix(flops=f"{training.cost_fraction(model):.2f}", refresh=False)
    if bar is not None:
        bar.close()
    return model.eval()


def _cosine(total: int, freeze: int | None) -> Callable[[int], float]:
    """Cosine decay over the run; with a freeze step, one cosine before it and a fresh one after
    (the fixed structure is fine-tuned from the full learning rate, as prune-then-fine-tune does)."""

    def factor(t: int) -> float:
        if freeze is None or freeze >= total:
            return 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
        if t < freeze:
            return 0.5 * (1 + math.cos(math.pi * t / freeze))
        return 0.5 * (1 + math.cos(math.pi * min(t - freeze, total - freeze) / (total - freeze)))

    return factor


def lr_factors(total: int, schedule: Schedule | None, restart_at_freeze: bool = True) -> list[Callable[[int], float]]:
    """The learning-rate factors of :func:`fit`: one for the weights, and one for the gates if ``schedule``.

    Weights: a cosine over the run, restarted at the freeze step with ``restart_at_freeze``. Gates:
    the same in the ``scratch`` regime; constant until the freeze in the ``pretrained`` regime,
    since a decaying gate learning rate (Adam's step is about the learning rate whatever the
    gradient) leaves the budget controller without a lever late in a short run.

    Example:
        >>> [f(50) for f in lr_factors(100, Schedule(freeze_step=60, regime="pretrained"))]  # doctest: +ELLIPSIS
        [0.0669872981077806..., 1.0]
    """
    freeze = schedule.freeze_step if schedule is not None and restart_at_freeze else None
    weights = _cosine(total, freeze)
    if schedule is None:
        return [weights]
    return [weights, _constant if schedule.regime == "pretrained" else weights]


def _constant(t: int) -> float:
    return 1.0


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr, mininterval=0.5)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``(x, y)``."""
    was = model.training
    model.eval()
    try:
        return float((model(x).argmax(1) == y).float().mean())
    finally:
        model.train(was)


def _summary(model: nn.Module, inputs: tuple) -> Summary:
    stats = measure_latency(model, inputs, repeats=50, warmup=10, threads=1)
    return Summary(count_params(model), count_flops(model, inputs), model_size_bytes(model), stats.median_ms)


def widths_table(record_groups: dict[str, dict[str, int]], model: nn.Module | None = None) -> str:
    """The learned width of each gated group as text: group (its first layer's class and width), before, after."""
    rows = [("group", "before", "after", "kept")]
    for name, counts in record_groups.items():
        before, after = counts["before"], counts["after"]
        rows.append((group_label(name, before, model), str(before), str(after), f"{after / before:.0%}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join([r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in (1, 2, 3)]) for r in rows
    )


def group_label(name: str, units: int, model: nn.Module | None = None) -> str:
    """``block1.conv (Conv2d, 32 ch)``: the group, the class of the module of that name, its width."""
    try:
        module = model.get_submodule(name) if model is not None else None
    except AttributeError:
        module = None
    if module is None:
        return name
    unit = "ch" if isinstance(module, nn.modules.conv._ConvNd) else "units"
    return f"{name} ({type(module).__name__}, {units} {unit})"


def _dense_accuracy(widths: Sequence[int], epochs: int, seed: int) -> float:
    """The dense baseline: the same network, initialisation, batches and schedule, without gates."""
    torch.set_num_threads(1)
    data = load_digits()
    torch.manual_seed(seed)
    dense = fit(wide_cnn(data.in_channels, data.num_classes, widths, named=True), data, epochs=epochs, seed=seed)
    return accuracy(dense, data.x_test, data.y_test)


def _start_baseline(widths: Sequence[int], epochs: int, seed: int) -> concurrent.futures.Future | None:
    """Train the dense baseline in a second process, beside the gated training (1 thread each)."""
    try:
        pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        future = pool.submit(_dense_accuracy, tuple(widths), epochs, seed)
        pool.shutdown(wait=False)  # the worker finishes its one job, then exits
        return future
    except (OSError, RuntimeError):  # no second process here (a sandbox): train it afterwards
        return None


def _baseline_result(future: concurrent.futures.Future | None, widths: Sequence[int], epochs: int,
                     seed: int) -> float:
    if future is not None:
        try:
            return float(future.result())
        except concurrent.futures.process.BrokenProcessPool:
            pass
    return _dense_accuracy(widths, epochs, seed)


def run(
    budget: float = 0.3,
    epochs: int = 30,
    seed: int = 0,
    widths: Sequence[int] = WIDTHS,
    progress: bool = True,
    out: Callable[[str], None] = print,
    out_dir: str | Path | None = None,
    baseline: bool = True,
) -> dict:
    """Train, compact and report; returns the numbers it printed (for tests and scripts).

    With ``out_dir`` it also writes ``report.json`` (these numbers), ``widths.png``, ``kept.png``
    and ``kept.json`` (the kept fraction per group during training) into that new directory, all
    at once at the end. ``baseline=False`` skips the dense baseline (``accuracy_dense`` is None).
    """
    data = load_digits()
    torch.manual_seed(seed)
    dense = wide_cnn(data.in_channels, data.num_classes, widths, named=True)
    example = (data.x_test[:64],)
    steps = epochs * math.ceil(len(data.x_train) / 64)
    out(
        f"autosparse demo: CNN {list(widths)} on scikit-learn digits ({len(data.x_train)} train / "
        f"{len(data.x_test)} test images), FLOPs budget {budget:.0%} of dense, {epochs} epochs"
    )
    net = autosparse.sparsify(dense, budget_policy(budget, steps), example_inputs=example)
    logger = GateLogger(net, every=10) if out_dir is not None else None
    future = _start_baseline(widths, epochs, seed) if baseline else None
    start, threads = time.perf_counter(), torch.get_num_threads()
    try:
        # Batches of 64 8x8 images are too small to split: a second thread costs more than it saves.
        torch.set_num_threads(1)
        fit(net, data, epochs=epochs, seed=seed, progress=progress, desc="training with gates",
            on_step=logger.step if logger is not None else None)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    small = autosparse.compact(net)
    acc_before, acc_after = accuracy(net, data.x_test, data.y_test), accuracy(small, data.x_test, data.y_test)
    acc_dense = _baseline_result(future, widths, epochs, seed) if baseline else None
    before, after = _summary(dense, example), _summary(small, example)
    target = get_state(net).policy.target
    landed = after.flops / before.flops
    out(f"trained in {seconds:.1f} s\n\nlearned widths:")
    out(widths_table(require_record(small).groups, dense))
    out("\n" + compare(before, after))
    out(_accuracy_line(acc_dense, acc_before, acc_after))
    status = "within" if abs(landed - budget) <= target.tolerance else "OUTSIDE"
    out(
        f"\nFLOPs landed at {landed:.3f} of dense: target {budget:g} +- {target.tolerance:g}, {status} tolerance"
    )
    out(
        "(before: the over-wide model as trained with gates; after: compacted, verified equal; "
        f"latency: batch of {len(example[0])}, 1 thread)"
    )
    result = {
        "budget": budget,
        "flops_fraction": landed,
        "accuracy_dense": acc_dense,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "widths": require_record(small).groups,
        "train_seconds": seconds,
    }
    if out_dir is not None:
        out(f"wrote {write_outputs(out_dir, result, dense, logger)}")
    return result


def _accuracy_line(dense: float | None, gated: float, compacted: float) -> str:
    if dense is None:
        return f"accuracy  gated {gated:.2%}  compacted {compacted:.2%}  (no dense baseline)"
    return (f"accuracy  dense baseline {dense:.2%}  gated {gated:.2%}  compacted {compacted:.2%}  "
            f"({(compacted - dense) * 100:+.2f} pt vs dense)")


def write_outputs(directory: str | Path, result: dict, dense: nn.Module, logger: GateLogger | None) -> Path:
    """Write report.json, widths.png, and with a logger kept.json / kept.png, into a new ``directory``.

    Everything goes to a temporary sibling renamed into place at the end: never a partial directory.
    Without matplotlib the plots are left out (with a note); the JSON is always written.
    """
    widths = result["widths"]
    labels = {name: group_label(name, w["before"], dense) for name, w in widths.items()}
    with atomic_dir(directory, overwrite=False) as tmp:
        (tmp / "report.json").write_text(json.dumps(result, indent=1))
        if logger is not None:
            logger.save(tmp / "kept.json")
        try:
            plot_widths({labels[n]: w["before"] for n, w in widths.items()},
                        {labels[n]: w["after"] for n, w in widths.items()}, tmp / "widths.png")
            if logger is not None:
                logger.plot(tmp / "kept.png")
        except ImportError as exc:
            print(f"autosparse demo: no plots: {exc}", file=sys.stderr)
    return Path(directory)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``autosparse demo``; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="autosparse demo", description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.3, help="target FLOPs as a fraction of dense (0-1)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quick", action="store_true", help="a narrower model and 8 epochs (a smoke run)")
    parser.add_argument("--out", metavar="DIR",
                        help="write report.json, widths.png, kept.png, kept.json into DIR (a new directory)")
    parser.add_argument("--no-baseline", action="store_true", help="do not train the dense baseline")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    out = Path(args.out) if args.out is not None else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):  # before training, not after
        parser.error(f"--out {args.out} already exists; choose a new directory (it is written at the end)")
    widths = (16, 32, 32) if args.quick else WIDTHS
    epochs = min(args.epochs, 8) if args.quick else args.epochs
    try:
        run(args.budget, epochs, args.seed, widths, progress=not args.no_progress, out_dir=args.out,
            baseline=not args.no_baseline)
    except autosparse.PolicyError as exc:
        print(f"autosparse demo: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
