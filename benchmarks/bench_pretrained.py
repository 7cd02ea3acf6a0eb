"""From a trained model with a short fine-tune: gates (pretrained recipe, with and without distillation)
against one-shot pruning and Torch-Pruning, at 50 / 30 / 15 / 5 / 2 % of the dense FLOPs.

One question: a user has a trained model and half its training budget to spend; which method keeps
the most accuracy at a FLOPs budget?

* the model and data are those of ``benchmarks/quality.py``: the Conv1d (64, 64, 64) CNN on MNIST-1D
  (4,000 / 1,000 signals), trained dense for 30 epochs with Adam and a cosine learning rate
  (``demo.fit``), one dense model per seed, shared by every method;
* every method then gets the same 15 epochs (same optimiser, learning rate, batches and seed):

  - ``gates``: ``sparsify`` with ``schedule: {regime: pretrained}`` (``demo.budget_policy(...,
    regime="pretrained")``: gates from l2 magnitude, progressive closing to the budget by about 23 %
    of the steps, freeze at 30 %, the cosine restarts there), trained with the penalty, compacted;
  - ``gates_kd``: the same plus ``autosparse.training.distill`` (logits, T = 1, weight 1) from the
    dense model;
  - ``prune_l2``: ``autosparse.prune(..., importance="l2")`` (global ranking), then fine-tuned;
  - ``torch_pruning``: Torch-Pruning's ``MetaPruner`` with L2 ``MagnitudeImportance``, the same
    ratio in every layer, stepped until the FLOPs fit (as ``bench_prune.py``), then fine-tuned.

Run (full: 3 seeds, about 35 minutes on 2 busy cores with ``--jobs 2``; ``--quick``: 1 seed, dense
15 + fine-tune 8 epochs)::

    PYTHONPATH=. python -m benchmarks.bench_pretrained [--quick] [--jobs 2]

Writes ``benchmarks/results/pretrained.json`` (stamped) and ``pretrained.md`` (``pretrained_quick.*``
with ``--quick``), and a plot of accuracy against FLOPs per method when matplotlib is installed.
"""

from __future__ import annotations

import copy
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
from autosparse.demo import accuracy, budget_policy, fit
from autosparse.demo.data import Dataset, load
from autosparse.measure import count_flops, count_params
from autosparse.training.distill import distill
from benchmarks.bench_prune import policy_for, torch_pruning_magnitude
from benchmarks.common import base_parser, stamp, write_result
from benchmarks.quality import model_for, widths_of

METHODS = ("gates", "gates_kd", "prune_l2", "torch_pruning")
BUDGETS = (0.5, 0.3, 0.15, 0.05, 0.02)
KD = {"temperature": 1.0, "weight": 1.0}
BATCH = 64


def train_dense(seed: int, epochs: int) -> dict[str, torch.Tensor]:
    """The dense model of one seed, trained; returned as a state dict (it travels to the workers)."""
    torch.set_num_threads(1)
    data = load("mnist1d")
    torch.manual_seed(seed)
    return fit(model_for(data), data, epochs=epochs, seed=seed).state_dict()


def run_one(method: str, budget: float, seed: int, dense_state: dict, ft: int) -> dict:
    """Prune / gate one copy of the dense model with ``method`` and fine-tune it for ``ft`` epochs."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    data = load("mnist1d")
    dense = model_for(data)
    dense.load_state_dict(dense_state)
    example = (data.x_test[:BATCH],)
    dense_flops = count_flops(dense, example)
    start = time.perf_counter()
    if method in ("gates", "gates_kd"):
        final = _gates(dense, data, budget, seed, ft, kd=method == "gates_kd")
    else:
        pruned = (torch_pruning_magnitude(copy.deepcopy(dense), example, budget) if method == "torch_pruning"
                  else autosparse.prune(dense, policy_for(budget), example_inputs=example, importance="l2"))
        final = fit(pruned, data, epochs=ft, seed=seed + 1)
    return {"method": method, "budget": budget, "seed": seed, "accuracy": accuracy(final, data.x_test, data.y_test),
            "flops_fraction": count_flops(final, example) / dense_flops, "params": count_params(final),
            "widths": widths_of(final), "seconds": round(time.perf_counter() - start, 1)}


def _gates(dense: nn.Module, data: Dataset, budget: float, seed: int, ft: int, kd: bool) -> nn.Module:
    steps = ft * math.ceil(len(data.x_train) / BATCH)
    net = autosparse.sparsify(dense, budget_policy(budget, steps, regime="pretrained"),
                              example_inputs=(data.x_test[:BATCH],))
    term = distill(net, **KD) if kd else None
    fit(net, data, epochs=ft, seed=seed + 1, extra_loss=(lambda m: term()) if term is not None else None)
    if term is not None:
        term.remove()
    return autosparse.compact(net)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds, per (budget, method)."""
    keys = sorted({(r["budget"], r["method"]) for r in rows}, key=lambda k: (-k[0], _order(k[1])))
    out = []
    for budget, method in keys:
        runs = [r for r in rows if r["budget"] == budget and r["method"] == method]
        acc = [100 * r["accuracy"] for r in runs]
        out.append({"budget": budget, "method": method, "seeds": len(runs),
                    "accuracy_mean": round(statistics.mean(acc), 2),
                    "accuracy_sd": round(statistics.stdev(acc), 2) if len(acc) > 1 else 0.0,
                    "flops_fraction_mean": round(statistics.mean(r["flops_fraction"] for r in runs), 4),
                    "seconds_mean": round(statistics.mean(r["seconds"] for r in runs), 1)})
    return out


def _order(method: str) -> int:
    return 1 + METHODS.index(method) if method in METHODS else 0  # dense first


def table(summary: list[dict]) -> str:
    """Accuracy % (mean ± sd over seeds) per budget (rows) and method (columns), FLOPs landed in brackets."""
    budgets = sorted({r["budget"] for r in summary if r["method"] != "dense"}, reverse=True)
    methods = [m for m in METHODS if any(r["method"] == m for r in summary)]
    cell = {(r["budget"], r["method"]): r for r in summary}
    lines = ["| FLOPs budget | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for b in budgets:
        cells = [f"{cell[b, m]['accuracy_mean']:.2f} ± {cell[b, m]['accuracy_sd']:.2f} "
                 f"({cell[b, m]['flops_fraction_mean']:.3f})" if (b, m) in cell else "" for m in methods]
        lines.append(f"| {b:.0%} | " + " | ".join(cells) + " |")
    dense = [r for r in summary if r["method"] == "dense"]
    if dense:
        lines.append(f"\nDense: {dense[0]['accuracy_mean']:.2f} ± {dense[0]['accuracy_sd']:.2f} %.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, dense 15 + fine-tune 8 epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--name", default=None, help="result file stem (default pretrained / pretrained_quick)")
    parser.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    parser.add_argument("--finetune", type=int, default=15, help="fine-tuning epochs per method")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--jobs", type=int, default=1, help="parallel worker processes (1 thread each)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    seeds, pre, ft, budgets = args.seeds, args.epochs, args.finetune, tuple(args.budgets)
    if args.quick:
        seeds, pre, ft = 1, 15, 8
    if args.smoke:
        seeds, pre, ft, budgets = 1, 1, 1, (0.3,)
    data = load("mnist1d")
    seed_list = list(range(args.first_seed, args.first_seed + seeds))
    states = dict(zip(seed_list, _map(train_dense, [(s, pre) for s in seed_list], args.jobs)))
    rows = [_dense_row(data, s, state) for s, state in states.items()]
    jobs = [(m, b, s, states[s], ft) for s in seed_list for b in budgets for m in args.methods]
    rows += _map(run_one, jobs, args.jobs, report=True)
    name = args.name or ("pretrained_smoke" if args.smoke else "pretrained_quick" if args.quick else "pretrained")
    summary = summarize(rows)
    payload = {"benchmark": "pretrained", "smoke": args.smoke, "quick": args.quick, "stamp": stamp(args.threads),
               "setup": {"dataset": "mnist1d", "model": "Conv1d 64-64-64", "seeds": seed_list, "dense_epochs": pre,
                         "finetune_epochs": ft, "budgets": list(budgets), "methods": list(args.methods),
                         "distill": KD, "min_keep": 2},
               "summary": summary, "runs": rows}
    path = write_result(name, payload, args.out)
    text = table(summary)
    path.with_suffix(".md").write_text(f"{_header(payload)}\n\n{text}\n")
    _plot(summary, path.with_name(f"{name}.png"))
    print(text, file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)
    return payload


def _dense_row(data: Dataset, seed: int, state: dict) -> dict:
    dense = model_for(data)
    dense.load_state_dict(state)
    return {"method": "dense", "budget": 1.0, "seed": seed, "accuracy": accuracy(dense, data.x_test, data.y_test),
            "flops_fraction": 1.0, "params": count_params(dense), "widths": widths_of(dense), "seconds": 0.0}


def _map(fn, jobs: list[tuple], workers: int, report: bool = False) -> list:
    """``fn(*job)`` for every job, in order; in ``workers`` processes when more than one."""
    if workers <= 1:
        return [_report(fn(*job), report) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [_report(f.result(), report) for f in futures]


def _report(result, report: bool):
    if report:
        print(f"seed {result['seed']} budget {result['budget']:.2f} {result['method']:>13}: "
              f"acc {result['accuracy']:.4f} at {result['flops_fraction']:.3f} FLOPs {result['widths']} "
              f"({result['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return result


def _header(payload: dict) -> str:
    s, c = payload["stamp"], payload["setup"]
    dirty = " (autosparse/ had uncommitted changes)" if s.get("autosparse_dirty") else ""
    return (f"autosparse {s['autosparse']} @ {str(s.get('git_commit'))[:12]}{dirty}, torch {s['torch']}, "
            f"{s.get('date')}; MNIST-1D Conv1d 64-64-64, dense {c['dense_epochs']} epochs, then "
            f"{c['finetune_epochs']} epochs per method; seeds {c['seeds']}; accuracy % (mean ± sd), FLOPs landed")


def _plot(summary: list[dict], path: Path) -> None:
    try:
        from autosparse.reporting.plots import plot_accuracy_vs_flops

        plot_accuracy_vs_flops([{"method": r["method"], "flops_fraction": r["flops_fraction_mean"],
                                 "accuracy": r["accuracy_mean"] / 100} for r in summary], path)
    except ImportError as exc:
        print(f"no plot: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
