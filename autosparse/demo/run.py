"""``autosparse demo``: learn the widths of an over-wide CNN under a FLOPs budget, on real data.

It builds a CNN far wider than scikit-learn's 8x8 digits need, gates every channel group, trains
weights and gates together with Adam while the budget controller steers lambda towards the target
FLOPs, freezes the structure for the last quarter of training, compacts, and prints the learned
widths and a before/after table. Nothing is downloaded. About a minute on a 2-core CPU.

Run it with ``autosparse demo`` or ``python -m autosparse.demo [--budget 0.3] [--epochs 30]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import autosparse
from autosparse import training
from autosparse.compaction.record import record_of
from autosparse.demo.data import Dataset, load_digits
from autosparse.measure import Summary, compare, count_flops, count_params, measure_latency, model_size_bytes
from autosparse.state import get_state, is_sparsified

WIDTHS = (32, 64, 64)


def wide_cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    widths: Sequence[int] = WIDTHS,
    dims: int = 2,
    pool_after: Sequence[int] = (1,),
) -> nn.Sequential:
    """Conv-BN-ReLU blocks of the given widths, max-pooling after the listed blocks, then a linear head.

    Args:
        dims: 2 for images (``Conv2d``), 1 for signals (``Conv1d``).
        pool_after: Indices of the blocks followed by a 2x max-pool.
    """
    conv, norm, pool, gap = {
        2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d),
        1: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d),
    }[dims]
    layers: list[nn.Module] = []
    cin = in_channels
    for i, width in enumerate(widths):
        layers.append(nn.Sequential(conv(cin, width, 3, padding=1, bias=False), norm(width), nn.ReLU()))
        if i in pool_after:
            layers.append(pool(2))
        cin = width
    return nn.Sequential(*layers, gap(1), nn.Flatten(), nn.Linear(cin, num_classes))


def budget_policy(budget: float, steps: int, metric: str = "flops", min_keep: int = 2) -> dict:
    """The policy the demo and the benchmark use: every channel group, a budget, the default recipe.

    Lambda warms up over the first 10 % of the steps, the controller's reference reaches the budget
    at about 48 %, and the gates freeze at 60 %, so the last 40 % fine-tune a fixed structure.
    """
    return {
        "rules": [{"name": "channels", "granularity": "channel", "min_keep": min_keep}],
        "penalty": {"lambda": 1e-3, "p": 0.5},
        "schedule": {"warmup_steps": max(1, steps // 10), "freeze_step": max(2, int(0.6 * steps))},
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
) -> nn.Module:
    """Train a classifier with Adam and a cosine learning rate; gated models get the penalty too.

    A sparsified model adds :func:`autosparse.penalty` to the loss and calls
    :func:`autosparse.training.step` after every optimizer step (the explicit way; see
    :func:`autosparse.training.attach` for the hook-based one). Its gates get ``gate_lr``, and with
    ``restart_at_freeze`` the cosine restarts at the policy's freeze step, so the fixed structure is
    fine-tuned from the full learning rate, as prune-then-fine-tune methods do.

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
    freeze = get_state(model).policy.schedule.freeze_step if gated and restart_at_freeze else None
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(total, freeze))
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
    """The learned width of each gated group as text: group (its first layer's class), before, after."""
    rows = [("group", "before", "after", "kept")]
    for name, counts in record_groups.items():
        before, after = counts["before"], counts["after"]
        label = name
        if model is not None:
            try:
                label = f"{name} ({type(model.get_submodule(name)).__name__})"
            except AttributeError:
                pass
        rows.append((label, str(before), str(after), f"{after / before:.0%}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join([r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in (1, 2, 3)]) for r in rows
    )


def run(
    budget: float = 0.3,
    epochs: int = 30,
    seed: int = 0,
    widths: Sequence[int] = WIDTHS,
    progress: bool = True,
    out: Callable[[str], None] = print,
) -> dict:
    """Train, compact and report; returns the numbers it printed (for tests and scripts)."""
    data = load_digits()
    torch.manual_seed(seed)
    dense = wide_cnn(data.in_channels, data.num_classes, widths)
    example = (data.x_test[:64],)
    steps = epochs * math.ceil(len(data.x_train) / 64)
    out(
        f"autosparse demo: CNN {list(widths)} on scikit-learn digits ({len(data.x_train)} train / "
        f"{len(data.x_test)} test images), FLOPs budget {budget:.0%} of dense, {epochs} epochs"
    )
    net = autosparse.sparsify(dense, budget_policy(budget, steps), example_inputs=example)
    start, threads = time.perf_counter(), torch.get_num_threads()
    try:
        # Batches of 64 8x8 images are too small to split: a second thread costs more than it saves.
        torch.set_num_threads(1)
        fit(net, data, epochs=epochs, seed=seed, progress=progress, desc="training with gates")
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    small = autosparse.compact(net)
    acc_before, acc_after = accuracy(net, data.x_test, data.y_test), accuracy(small, data.x_test, data.y_test)
    before, after = _summary(dense, example), _summary(small, example)
    target = net._autosparse.policy.target
    landed = after.flops / before.flops
    out(f"trained in {seconds:.1f} s\n\nlearned widths:")
    out(widths_table(record_of(small).groups, dense))
    out("\n" + compare(before, after))
    out(f"accuracy  {acc_before:.2%}  {acc_after:.2%}  ({(acc_after - acc_before) * 100:+.2f} pt)")
    status = "within" if abs(landed - budget) <= target.tolerance else "OUTSIDE"
    out(
        f"\nFLOPs landed at {landed:.3f} of dense: target {budget:g} +- {target.tolerance:g}, {status} tolerance"
    )
    out(
        "(before: the over-wide model as trained with gates; after: compacted, verified equal; "
        f"latency: batch of {len(example[0])}, 1 thread)"
    )
    return {
        "budget": budget,
        "flops_fraction": landed,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "widths": record_of(small).groups,
        "train_seconds": seconds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``autosparse demo``; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="autosparse demo", description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.3, help="target FLOPs as a fraction of dense (0-1)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quick", action="store_true", help="a narrower model and 8 epochs (a smoke run)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    widths = (16, 32, 32) if args.quick else WIDTHS
    epochs = min(args.epochs, 8) if args.quick else args.epochs
    try:
        run(args.budget, epochs, args.seed, widths, progress=not args.no_progress)
    except autosparse.PolicyError as exc:
        print(f"autosparse demo: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
