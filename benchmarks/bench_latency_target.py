"""Q - latency budgets: does ``target: {latency: T}`` land the compacted model's measured latency on T?

For each CNN (the ResNet-50 layout and MobileNetV2 of benchmarks/models.py, random weights) and
batch size, ``autosparse.prune(model, {..., "target": {"latency": T}}, importance="l2")`` prunes in
one shot (no training), building the per-module latency table on this machine (timed, then cached:
the table's seconds are reported, and a second build from the cache). The compacted model is then
timed against the dense one, alternating the two (:func:`autosparse.measure.latency_report`): the
median of the paired ratios, the ratio of the minima, and the median paired ratio of thread CPU
times (with one thread, what the model itself costs on a machine shared with other processes).

For comparison the same model is pruned with ``target: {flops: T}``, the usual proxy: at the same
number it lands far from T in latency where layers are memory-bound (MobileNetV2's depthwise
convolutions); and the FLOPs fraction the latency-pruned model ended with is reported.

The table times each width at least ``autosparse.training.latency.MIN_REPEATS`` (3) times: at batch 32
one forward takes longer than half the table's time budget, and with 2 runs the tables varied by about
15 %. ``--smoke`` runs the tiny models at batch 1 only (seconds, for the tests).

Target: measured latency within 10 % of T (``|ratio / T - 1| <= 0.10``) on both models at batch
1 and 32.

    PYTHONPATH=. python -m benchmarks.bench_latency_target [--quick] [--models resnet50] [--batches 1 32]
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import torch

import autosparse
from autosparse.measure import count_flops, latency_report
from autosparse.pruning import prune, selection_of
from autosparse.training import latency
from benchmarks import common

MODELS = ("resnet50", "mobilenet_v2")
TARGETS = {"resnet50": 0.5, "mobilenet_v2": 0.6}  # MobileNetV2 at batch 1 cannot go much below ~0.55
TOLERANCE = 0.10


def policy(metric: str, target: float) -> dict[str, Any]:
    return {"rules": [{"name": "channels", "granularity": "channel"}], "target": {metric: target}}


def run_case(built: common.Built, batch: int, target: float, repeats: int) -> dict[str, Any]:
    """Prune to the latency target and to the same FLOPs target; time both against the dense model."""
    x = built.inputs(batch)
    dense_flops = count_flops(built.model, x)
    start = time.perf_counter()
    small = prune(built.model, policy("latency", target), example_inputs=x)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    prune(built.model, policy("latency", target), example_inputs=x)  # the table now comes from the cache
    cached_s = time.perf_counter() - start
    by_flops = prune(built.model, policy("flops", target), example_inputs=x)
    selection = selection_of(small)
    row: dict[str, Any] = {"target": target, "prune_s": round(first_s, 2), "prune_cached_s": round(cached_s, 2)}
    for name, model, predicted in (("latency_target", small, selection.predicted if selection else None),
                                   ("flops_target", by_flops, None)):
        report = latency_report(built.model, model, x, predicted=predicted, repeats=repeats)
        row[name] = {**{k: round(v, 4) if isinstance(v, float) else v for k, v in report.to_dict().items()},
                     "flops_frac": round(count_flops(model, x) / dense_flops, 4),
                     "params": autosparse.measure.count_params(model)}
    measured = row["latency_target"]
    row["error"] = round(measured["ratio"] / target - 1, 4)
    row["error_cpu"] = round(measured["cpu_ratio"] / target - 1, 4) if measured["cpu_ratio"] else None
    row["within_tolerance"] = abs(row["error"]) <= TOLERANCE or abs(row["error_cpu"] or 1.0) <= TOLERANCE
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 px images, batches 1 and 8, fewer repeats")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default 1 32 (quick: 1 8, smoke: 1)")
    parser.add_argument("--image", type=int, default=128, help="CNN input resolution")
    parser.add_argument("--target", type=float, default=None, help="one latency fraction for every model")
    parser.add_argument("--repeats", type=int, default=None, help="timed pairs (default 20 at batch 1, 6 above)")
    args = parser.parse_args(argv)
    if args.quick:
        args.image = 64
    args.batches = args.batches or ([1] if args.smoke else [1, 8] if args.quick else [1, 32])
    torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {
        "benchmark": "latency_target",
        "smoke": args.smoke,
        "quick": args.quick,
        "stamp": common.stamp(args.threads),
        "settings": {"image": args.image, "batches": args.batches, "tolerance": TOLERANCE,
                     "importance": "l2", "policy": "channels, round_to 1",
                     # timed forwards per width in the table: at large batches the minimum binds
                     "table_repeats": {"min": latency.MIN_REPEATS, "max": latency.MAX_REPEATS,
                                       "budget_ms": latency.BUDGET_MS},
                     "cache": os.environ.get("AUTOSPARSE_CACHE") or "~/.cache/autosparse",
                     "ratio": "median over alternating (dense, compacted) pairs of wall-clock time",
                     "cpu_ratio": "the same with the calling thread's CPU time (1 thread)"},
        "models": {},
    }
    for name in args.models:
        built = common.build(name, smoke=args.smoke, image=args.image)
        target = args.target or (0.9 if args.smoke else TARGETS[name])  # tiny models: overhead-bound
        rows = {}
        for batch in args.batches:
            repeats = args.repeats or (3 if args.smoke else 20 if batch == 1 else 6)
            rows[str(batch)] = run_case(built, batch, target, repeats)
            r = rows[str(batch)]
            print(f"[latency_target] {name} b{batch}: target {target} predicted "
                  f"{r['latency_target']['predicted']:.3f} measured {r['latency_target']['ratio']:.3f} "
                  f"(cpu {r['latency_target']['cpu_ratio']}) | flops-target latency {r['flops_target']['ratio']:.3f} "
                  f"| prune {r['prune_s']}s, cached {r['prune_cached_s']}s", flush=True)
        payload["models"][name] = rows
        del built
        gc.collect()
    payload["stamp"]["loadavg_1m_end"] = common.stamp()["loadavg_1m"]
    name = "latency_target_quick" if args.quick and not args.smoke else "latency_target"
    common.write_result(name, payload, args.out)
    return payload


if __name__ == "__main__":
    main()
