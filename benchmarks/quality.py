"""Quality at a FLOPs budget on real data: autosparse against the pruning methods people use instead.

One question: at 50 %, 30 % and 15 % of the dense FLOPs, how much accuracy is left? Same model, same
data split, same total epochs, same optimiser (Adam, cosine learning rate) for every method:

* ``dense``: the unpruned baseline, E epochs.
* ``autosparse``: gates on every channel group, the budget target (``target: {flops: B}``) steering
  lambda; gates freeze at 60 % of the E epochs, the rest fine-tunes the fixed structure (the cosine
  learning rate restarts there, as it does for the fine-tuning of the two methods below).
* ``autosparse_uniform``: the same with ``uniform: true`` on the channel rule: every gated layer keeps
  one common width (what a standard Hugging Face config can state), chosen jointly by the gates.
* ``autosparse_kd``: the same gates plus :func:`autosparse.training.distill` (logits, T = 4) from a
  dense twin trained first for E epochs (the teacher a from-scratch user has to train; counted in
  its time): does distillation help in the from-scratch regime?
* ``torch_pruning``: Torch-Pruning's ``MagnitudePruner`` (L2 filter magnitude, the same ratio in
  every layer), pruned after 2/3 of the epochs to the budget, then fine-tuned for the last 1/3.
* ``slimming``: network slimming (Liu et al. 2017): L1 on BatchNorm scales for 2/3 of the epochs,
  prune the smallest scales globally (Torch-Pruning's ``BNScaleImportance``) to the budget, fine-tune 1/3.

Data ships with installed packages: scikit-learn's 8x8 digits and MNIST-1D (generated locally).
Results (JSON with version and git commit, a Markdown table, a PNG per dataset) go to
``benchmarks/results/``. Full run (about 40 minutes on 2 busy cores)::

    PYTHONPATH=. python -m benchmarks.quality --jobs 2

``--smoke`` is the tiny version the tests run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn

import autosparse
from autosparse.demo import accuracy, budget_policy, fit, wide_cnn
from autosparse.demo.data import Dataset, load
from autosparse.measure import count_flops, count_params, measure_latency
from autosparse.training.distill import distill
from benchmarks.common import stamp

METHODS = ("dense", "autosparse", "autosparse_uniform", "autosparse_kd", "torch_pruning", "slimming")
RESULTS = Path(__file__).resolve().parent / "results"
PRETRAIN = 2 / 3  # share of the epochs the prune-then-fine-tune baselines train before pruning
SLIMMING_L1 = 1e-4  # network slimming's sparsity strength on |BN scale| (the paper's 1e-4)


def model_for(data: Dataset, widths: list[int] | None = None) -> nn.Module:
    """The over-wide CNN every method starts from (or, with ``widths``, a pruned twin of it):
    Conv2d (32, 64, 64) for digits, Conv1d (64, 64, 64) for MNIST-1D."""
    if data.name == "digits":
        return wide_cnn(data.in_channels, data.num_classes, widths or (32, 64, 64), dims=2, pool_after=(1,))
    return wide_cnn(data.in_channels, data.num_classes, widths or (64, 64, 64), dims=1, pool_after=(0, 1))


def run_one(dataset: str, method: str, budget: float | None, seed: int, epochs: int) -> dict:
    """Train one method once; returns accuracy, params, FLOPs and latency of the final (compact) model."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    data = load(dataset)
    torch.manual_seed(seed)
    model = model_for(data)
    example = (data.x_test[:64],)
    dense_flops = count_flops(model, example)
    start = time.perf_counter()
    if method == "dense":
        final = fit(model, data, epochs=epochs, seed=seed)
    elif method in ("autosparse", "autosparse_uniform", "autosparse_kd"):
        final = _gates(model, data, method, budget, seed, epochs, example)
    else:
        final = _prune_then_finetune(model, data, method, budget, seed, epochs, example, dense_flops)
    seconds = time.perf_counter() - start
    flops = count_flops(final, example)
    return {
        "dataset": dataset,
        "method": method,
        "budget": budget,
        "seed": seed,
        "epochs": epochs,
        "accuracy": accuracy(final, data.x_test, data.y_test),
        "params": count_params(final),
        "flops": flops,
        "flops_fraction": flops / dense_flops,
        "widths": widths_of(final),
        "train_seconds": seconds,
    }


def _gates(model: nn.Module, data: Dataset, method: str, budget: float | None, seed: int, epochs: int,
           example: tuple) -> nn.Module:
    """The from-scratch gates; ``autosparse_kd`` also distils from a dense twin trained first (same
    init, seed and epochs: the teacher a from-scratch user would have to train; its time is counted)."""
    steps = epochs * math.ceil(len(data.x_train) / 64)
    policy = budget_policy(budget, steps)
    policy["rules"][0]["uniform"] = method == "autosparse_uniform"
    teacher = fit(copy.deepcopy(model), data, epochs=epochs, seed=seed) if method == "autosparse_kd" else None
    net = autosparse.sparsify(model, policy, example_inputs=example)
    term = distill(net, teacher=teacher) if teacher is not None else None
    fit(net, data, epochs=epochs, seed=seed, extra_loss=(lambda m: term()) if term is not None else None)
    if term is not None:
        term.remove()
    return autosparse.compact(net)


def widths_of(model: nn.Module) -> list[int]:
    """The output width of every convolution: the architecture, which is all latency depends on."""
    return [m.out_channels for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]


def measure_latencies(runs: list[dict], repeats: int = 200) -> None:
    """Time every final architecture one after the other, after all training has finished.

    Latency depends on the architecture only, so each is rebuilt from its widths (random weights)
    and timed alone, in one thread: timing while other runs train would measure the contention.
    """
    torch.set_num_threads(1)
    for run in runs:
        data = load(run["dataset"])
        model = model_for(data, run["widths"]).eval()
        if count_params(model) != run["params"]:  # the rebuilt twin must be the same architecture
            raise RuntimeError(
                f"rebuilt {run['method']} model has {count_params(model)} params, not {run['params']}"
            )
        stats = measure_latency(model, (data.x_test[:64],), repeats=repeats, warmup=20, threads=1)
        run["latency_ms"] = stats.median_ms


def _prune_then_finetune(
    model: nn.Module,
    data: Dataset,
    method: str,
    budget: float,
    seed: int,
    epochs: int,
    example: tuple,
    dense_flops: int,
) -> nn.Module:
    import torch_pruning as tp

    pre = max(1, round(PRETRAIN * epochs))
    l1 = (
        (lambda m: SLIMMING_L1 * sum(b.weight.abs().sum() for b in _norms(m)))
        if method == "slimming"
        else None
    )
    fit(model, data, epochs=pre, seed=seed, extra_loss=l1)
    if method == "slimming":
        importance, global_pruning = tp.importance.BNScaleImportance(), True
    else:
        importance, global_pruning = tp.importance.MagnitudeImportance(p=2), False
    head = [m for m in model.modules() if isinstance(m, nn.Linear)]
    pruner = tp.pruner.MetaPruner(
        model,
        example[0],
        importance=importance,
        global_pruning=global_pruning,
        pruning_ratio=0.98,
        iterative_steps=400,
        ignored_layers=head,
    )
    model.eval()
    for _ in range(400):  # raise the ratio step by step until the FLOPs fit the budget
        if count_flops(model, example) <= budget * dense_flops:
            break
        pruner.step()
    return fit(model, data, epochs=max(1, epochs - pre), seed=seed + 1)


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]


def summarize(runs: list[dict]) -> list[dict]:
    """Mean (and spread) over seeds per dataset, method and budget."""
    keys = sorted(
        {(r["dataset"], r["method"], r["budget"] or 1.0) for r in runs},
        key=lambda k: (k[0], -k[2], METHODS.index(k[1])),
    )
    rows = []
    for dataset, method, budget in keys:
        same = [
            r for r in runs if (r["dataset"], r["method"], r["budget"] or 1.0) == (dataset, method, budget)
        ]
        accs = [r["accuracy"] for r in same]
        rows.append(
            {
                "dataset": dataset,
                "method": method,
                "budget": budget,
                "seeds": len(same),
                "accuracy": statistics.mean(accs),
                "accuracy_std": statistics.pstdev(accs),
                **{
                    k: statistics.mean(r[k] for r in same)
                    for k in ("params", "flops", "flops_fraction", "latency_ms")
                },
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    """The summary as a Markdown table; delta is against the dense baseline of the same dataset."""
    dense = {r["dataset"]: r["accuracy"] for r in rows if r["method"] == "dense"}
    lines = [
        "| dataset | budget | method | accuracy % (mean ± sd) | Δ vs dense (pt) | params | FLOPs "
        "(fraction) | latency ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = (r["accuracy"] - dense[r["dataset"]]) * 100 if r["dataset"] in dense else float("nan")
        lines.append(
            f"| {r['dataset']} | {r['budget']:.0%} | {r['method']} | {r['accuracy'] * 100:.2f} ± "
            f"{r['accuracy_std'] * 100:.2f} | {delta:+.2f} | {r['params']:,.0f} | {r['flops']:,.0f} "
            f"({r['flops_fraction']:.3f}) | {r['latency_ms']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"], choices=["digits", "mnist1d"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3, 0.15])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--jobs", type=int, default=1, help="parallel worker processes (1 thread each)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="quality", help="file stem of the results (JSON, Markdown, PNG)")
    parser.add_argument("--smoke", action="store_true", help="digits, one seed, 30%% budget, 2 epochs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.datasets, args.budgets, args.seeds, args.epochs = ["digits"], [0.3], [0], 2
    jobs = [
        (d, m, None if m == "dense" else b, s, args.epochs)
        for d in args.datasets
        for s in args.seeds
        for m in args.methods
        for b in ([1.0] if m == "dense" else args.budgets)
    ]
    runs = _run_all(jobs, args.jobs)
    measure_latencies(runs, repeats=20 if args.smoke else 200)
    rows = summarize(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.name}_smoke" if args.smoke else args.name
    config = {k: v for k, v in vars(args).items() if k not in ("out", "name")} | {
        "pretrain": PRETRAIN,
        "slimming_l1": SLIMMING_L1,
    }
    report = {"stamp": stamp(threads=1), "smoke": args.smoke, "config": config, "summary": rows, "runs": runs}
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    text = table(rows)
    (args.out / f"{stem}.md").write_text(f"{_header(report)}\n\n{text}\n")
    from autosparse.reporting.plots import plot_accuracy_vs_flops

    for dataset in args.datasets:
        points = [
            {"method": r["method"], "flops_fraction": r["flops_fraction"], "accuracy": r["accuracy"]}
            for r in rows
            if r["dataset"] == dataset
        ]
        plot_accuracy_vs_flops(points, args.out / f"{stem}_{dataset}.png")
    print(text)
    return 0


def _header(report: dict) -> str:
    c, s = report["config"], report["stamp"]
    dirty = " (autosparse/ had uncommitted changes)" if s["autosparse_dirty"] else ""
    return (
        f"autosparse {s['autosparse']} @ {s['git_commit'][:12]}{dirty}, torch {s['torch']}, {s['date']}; "
        f"{c['epochs']} epochs, seeds {c['seeds']}; CPU latency: batch of 64, 1 thread"
    )


def _run_all(jobs: list[tuple], workers: int) -> list[dict]:
    if workers <= 1:
        return [_report(run_one(*job)) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return [_report(r) for r in pool.map(_star, jobs)]


def _star(job: tuple) -> dict:
    return run_one(*job)


def _report(run: dict) -> dict:
    print(
        f"{run['dataset']:8s} {run['method']:14s} budget {run['budget'] or 1.0:.2f} seed {run['seed']}: "
        f"acc {run['accuracy']:.4f} flops {run['flops_fraction']:.3f} ({run['train_seconds']:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return run


if __name__ == "__main__":
    sys.exit(main())
