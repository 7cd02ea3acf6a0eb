"""One-shot pruning at a FLOPs budget: autosparse.pruning.prune against Torch-Pruning's magnitude pruner.

One question: starting from the same trained dense model, at 50 / 30 / 15 / 5 % of its FLOPs, which
one-shot pruning keeps the most accuracy, before and after the same fine-tuning?

* the model and data are those of ``benchmarks/quality.py``: the Conv1d (64, 64, 64) CNN on MNIST-1D
  (4,000 / 1,000 signals), trained dense with Adam and a cosine learning rate (``demo.fit``);
* ``l1``, ``l2``, ``taylor``, ``random``: :func:`autosparse.pruning.prune` with that importance, one
  global cost-aware ranking over every channel group (``min_keep: 2``, as quality.py's policy);
  ``taylor`` takes its gradients on 16 training batches of 64;
* ``torch_pruning``: Torch-Pruning's ``MetaPruner`` with L2 ``MagnitudeImportance``, the same ratio
  in every layer (its default, as in quality.py), the ratio raised step by step until the FLOPs fit;
* every pruned model is then fine-tuned for the same epochs with the same optimiser and seed.

Run (about 10 minutes on 2 busy cores; ``--quick``: 1 seed, short training, about 2 minutes)::

    PYTHONPATH=. python -m benchmarks.bench_prune [--quick]

Writes ``benchmarks/results/prune.json`` (stamped with versions and commit; ``--out`` elsewhere).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
import warnings

import torch
from torch import nn

from autosparse.demo import accuracy, fit
from autosparse.demo.data import Dataset, load
from autosparse.measure import count_flops, count_params
from autosparse.pruning import prune
from benchmarks.common import base_parser, stamp, write_result
from benchmarks.quality import model_for, widths_of

METHODS = ("l1", "l2", "taylor", "random", "torch_pruning")
BUDGETS = (0.5, 0.3, 0.15, 0.05)
MIN_KEEP = 2  # quality.py's budget_policy keeps 2 channels per group; Torch-Pruning can go lower
TAYLOR_BATCHES, BATCH = 16, 64


def policy_for(budget: float) -> dict:
    return {"rules": [{"name": "channels", "granularity": "channel", "min_keep": MIN_KEEP}],
            "target": {"flops": budget}}


def taylor_batches(data: Dataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first training batches (fixed, so every run scores on the same data)."""
    return [(data.x_train[i : i + BATCH], data.y_train[i : i + BATCH])
            for i in range(0, TAYLOR_BATCHES * BATCH, BATCH)]


def prune_with(method: str, dense: nn.Module, data: Dataset, budget: float, seed: int) -> nn.Module:
    """A pruned copy of ``dense`` (never modified) by one of ``METHODS``."""
    example = (data.x_test[:64],)
    if method == "torch_pruning":
        return torch_pruning_magnitude(copy.deepcopy(dense), example, budget)
    return prune(dense, policy_for(budget), example_inputs=example, importance=method,
                 data=taylor_batches(data) if method == "taylor" else None, seed=seed)


def torch_pruning_magnitude(model: nn.Module, example: tuple, budget: float) -> nn.Module:
    """Torch-Pruning's L2 magnitude pruner, the same ratio in every layer, stepped until the FLOPs fit."""
    import torch_pruning as tp

    dense_flops = count_flops(model, example)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)]
    pruner = tp.pruner.MetaPruner(model, example[0], importance=tp.importance.MagnitudeImportance(p=2),
                                  global_pruning=False, pruning_ratio=0.98, iterative_steps=400,
                                  ignored_layers=head)
    model.eval()
    for _ in range(400):
        if count_flops(model, example) <= budget * dense_flops:
            break
        pruner.step()
    return model


def run_seed(data: Dataset, seed: int, pre: int, ft: int, budgets: tuple[float, ...],
             methods: tuple[str, ...]) -> list[dict]:
    """Train one dense model, then prune and fine-tune it with every method at every budget."""
    torch.manual_seed(seed)
    dense = fit(model_for(data), data, epochs=pre, seed=seed)
    example = (data.x_test[:64],)
    dense_flops = count_flops(dense, example)
    rows = [{"method": "dense", "budget": 1.0, "seed": seed, "accuracy": accuracy(dense, data.x_test, data.y_test),
             "flops_fraction": 1.0, "params": count_params(dense), "widths": widths_of(dense)}]
    for budget in budgets:
        for method in methods:
            start = time.perf_counter()
            pruned = prune_with(method, dense, data, budget, seed)
            seconds = time.perf_counter() - start
            before = accuracy(pruned, data.x_test, data.y_test)
            fit(pruned, data, epochs=ft, seed=seed + 1)
            rows.append({"method": method, "budget": budget, "seed": seed,
                         "accuracy_pruned": before, "accuracy": accuracy(pruned, data.x_test, data.y_test),
                         "flops_fraction": count_flops(pruned, example) / dense_flops,
                         "params": count_params(pruned), "widths": widths_of(pruned),
                         "prune_seconds": round(seconds, 3)})
            print(f"seed {seed} budget {budget:.2f} {method:>13}: pruned {before:.4f} -> fine-tuned "
                  f"{rows[-1]['accuracy']:.4f} at {rows[-1]['flops_fraction']:.3f} FLOPs {rows[-1]['widths']}",
                  file=sys.stderr)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds, per (budget, method)."""
    keys = sorted({(r["budget"], r["method"]) for r in rows}, key=lambda k: (-k[0], k[1]))
    out = []
    for budget, method in keys:
        runs = [r for r in rows if r["budget"] == budget and r["method"] == method]
        acc = [100 * r["accuracy"] for r in runs]
        pruned = [100 * r["accuracy_pruned"] for r in runs if "accuracy_pruned" in r]
        out.append({"budget": budget, "method": method, "seeds": len(runs),
                    "accuracy_mean": round(statistics.mean(acc), 2),
                    "accuracy_sd": round(statistics.stdev(acc), 2) if len(acc) > 1 else 0.0,
                    "accuracy_pruned_mean": round(statistics.mean(pruned), 2) if pruned else None,
                    "flops_fraction_mean": round(statistics.mean(r["flops_fraction"] for r in runs), 4)})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 8 + 4 epochs (about 2 minutes)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20, help="dense training epochs")
    parser.add_argument("--finetune", type=int, default=10, help="fine-tuning epochs after pruning")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    seeds, pre, ft, budgets = args.seeds, args.epochs, args.finetune, BUDGETS
    if args.quick:
        seeds, pre, ft = 1, 8, 4
    if args.smoke:
        seeds, pre, ft, budgets = 1, 1, 1, (0.3,)
    data = load("mnist1d")
    rows = [r for seed in range(seeds) for r in run_seed(data, seed, pre, ft, budgets, METHODS)]
    payload = {"benchmark": "prune", "smoke": args.smoke, "quick": args.quick, "stamp": stamp(args.threads),
               "setup": {"dataset": "mnist1d", "model": "Conv1d 64-64-64", "seeds": seeds, "dense_epochs": pre,
                         "finetune_epochs": ft, "budgets": list(budgets), "min_keep": MIN_KEEP,
                         "taylor_batches": TAYLOR_BATCHES},
               "summary": summarize(rows), "runs": rows}
    path = write_result("prune_quick" if args.quick else "prune_smoke" if args.smoke else "prune",
                        payload, args.out)
    for line in payload["summary"]:
        print(line, file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
