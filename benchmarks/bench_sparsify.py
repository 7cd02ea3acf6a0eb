"""Q7 - what the fail-fast dry run costs: ``sparsify`` time with it (``verify=True``) and without.

For each model (the ResNet-50-like CNN of ``benchmarks.models`` at 64x64, Hugging Face BERT-base
built from its config with random weights, sequence 32; batch 1, the example input a user passes),
``sparsify`` runs with and without the dry-run compaction in alternation (the order swaps every
round), so load on the machine hits both alike. Reported per mode: CPU seconds (minimum, median)
and wall seconds; and two ratios: the minimum with over the minimum without, and the median of the
paired ratios (round i with / round i without), robust to load that comes and goes.

Target (issue #11): sparsify with the dry run at most 1.5x the time without it.

``--split`` also times the dry run's own steps once (copy, slicing, the two forwards) on a gated model.

    PYTHONPATH=. python -m benchmarks.bench_sparsify [--models resnet50 bert_base] [--repeats 9] [--smoke]
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any

import autosparse
from benchmarks import common

MODELS = ("resnet50", "bert_base")
TARGET = 1.5
IMAGE, SEQ = 64, 32


def _timed(fn: Any) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one call, garbage collected before."""
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def measure(name: str, repeats: int, smoke: bool) -> dict[str, Any]:
    """Alternate sparsify with and without the dry run on one model; seconds and ratios."""
    built = common.build(name, smoke=smoke, image=IMAGE, seq=SEQ)
    policy = common.policy_for(built.family)
    inputs = built.inputs(1)

    def run(verify: bool) -> None:
        autosparse.sparsify(built.model, policy, example_inputs=inputs, verify=verify)

    run(True)  # warm-up: lazy imports, first-call caches of fx and export
    run(False)
    cpu: dict[bool, list[float]] = {True: [], False: []}
    wall: dict[bool, list[float]] = {True: [], False: []}
    for i in range(repeats):
        for verify in ((True, False) if i % 2 == 0 else (False, True)):
            c, w = _timed(lambda v=verify: run(v))
            cpu[verify].append(c)
            wall[verify].append(w)
    paired = [a / b for a, b in zip(cpu[True], cpu[False])]
    out: dict[str, Any] = {
        "params": sum(p.numel() for p in built.model.parameters()),
        "gates": len(autosparse.gates(autosparse.sparsify(built.model, policy, example_inputs=inputs,
                                                          verify=False))),
        "repeats": repeats,
    }
    for verify, key in ((True, "with_dry_run"), (False, "without_dry_run")):
        out[key] = {"cpu_min_s": round(min(cpu[verify]), 4), "cpu_median_s": round(statistics.median(cpu[verify]), 4),
                    "wall_min_s": round(min(wall[verify]), 4), "cpu_s": [round(t, 4) for t in cpu[verify]]}
    out["ratio_of_minima"] = round(min(cpu[True]) / min(cpu[False]), 3)
    out["median_paired_ratio"] = round(statistics.median(paired), 3)
    out["meets_target"] = out["median_paired_ratio"] <= TARGET and out["ratio_of_minima"] <= TARGET
    return out


def split(name: str, smoke: bool) -> dict[str, float]:
    """CPU seconds of the dry run's steps on one gated model (each timed once, after a warm-up)."""
    from autosparse.compaction import compact
    from autosparse.compaction.copying import throwaway_copy
    from autosparse.state import get_state, run_model

    built = common.build(name, smoke=smoke, image=IMAGE, seq=SEQ)
    net = autosparse.sparsify(built.model, common.policy_for(built.family), example_inputs=built.inputs(1),
                              verify=False)
    state = get_state(net)
    common.zero_fraction(net, 0.25)
    removed, _ = compact.removed_units(state)
    compact.dry_run(net)
    small = autosparse.compact(net, verify=False)
    return {
        "dry_run_s": round(_timed(lambda: compact.dry_run(net))[0], 4),
        "throwaway_copy_s": round(_timed(lambda: throwaway_copy(net))[0], 4),
        "gated_forward_s": round(_timed(lambda: run_model(net, state))[0], 4),
        "compacted_forward_s": round(_timed(lambda: run_model(small, state))[0], 4),
        "removed_units": len(removed),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=9, help="alternating rounds per model")
    parser.add_argument("--split", action="store_true", help="also time the dry run's steps")
    args = parser.parse_args(argv)
    repeats = 2 if args.smoke else args.repeats
    payload: dict[str, Any] = {"target": TARGET, "image": IMAGE, "seq": SEQ, "models": {}}
    for name in args.models:
        with common.num_threads(args.threads):
            payload["models"][name] = measure(name, repeats, args.smoke)
            if args.split:
                payload["models"][name]["split"] = split(name, args.smoke)
        row = payload["models"][name]
        print(f"{name}: with {row['with_dry_run']['cpu_min_s']:.3f} s, without "
              f"{row['without_dry_run']['cpu_min_s']:.3f} s (min CPU); ratio of minima "
              f"{row['ratio_of_minima']}, median paired {row['median_paired_ratio']}", flush=True)
    payload["stamp"] = common.stamp(args.threads)
    path = common.write_result("sparsify" + ("_smoke" if args.smoke else ""), payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
