"""Q4 - memory of compaction: peak RSS during ``compact`` relative to the model's size.

Each (model, inplace) pair runs in a fresh process: build with random weights, ``sparsify`` in
place, zero half of every gate's units, then ``compact(net)`` (a verified copy, the default) or
``compact(net, inplace=True)`` while a sampler thread records the peak RSS. Reported:

- ``peak_over_model``: (peak RSS during compact - RSS before the model was built) / model size,
  the baseline taken after a tiny warm-up run so that lazily imported code is not counted.
  The gated model itself counts 1x, so "at most one extra copy" is ``<= 2.2`` (the target).
- ``extra_over_model``: (peak - RSS just before compact) / model size: what compaction added.

    PYTHONPATH=. python -m benchmarks.bench_memory [--models resnet50 bert_base llama_1b] [--smoke]
"""

from __future__ import annotations

import gc
import json
import time
from typing import Any

from benchmarks import common

MODELS = ("resnet50", "bert_base", "llama_1b")


def worker(model: str, inplace: bool, smoke: bool) -> dict[str, Any]:
    import autosparse
    from autosparse.measure import model_size_bytes, track_peak_rss

    for inplace_warm in (False, True):  # load lazily imported code (fx, export, ...) before the baseline
        tiny = common.build(model, smoke=True)
        warm = autosparse.sparsify(tiny.model, common.policy_for(tiny.family), example_inputs=tiny.inputs(1))
        common.zero_fraction(warm, 0.5)
        autosparse.compact(warm, inplace=inplace_warm)
    del tiny, warm
    gc.collect()
    rss0 = common.current_rss_mb()
    built = common.build(model, smoke=smoke, image=64, seq=32)
    net = autosparse.sparsify(
        built.model, common.policy_for(built.family), example_inputs=built.inputs(1), inplace=True
    )
    common.zero_fraction(net, 0.5)
    model_mb = model_size_bytes(net) / 2**20
    gc.collect()
    before = common.current_rss_mb()
    with track_peak_rss(interval_s=0.002) as rss:
        start = time.perf_counter()
        small = autosparse.compact(net, inplace=inplace)
        seconds = time.perf_counter() - start
    return {
        "model_mb": round(model_mb, 2),
        "compacted_mb": round(model_size_bytes(small) / 2**20, 2),
        "rss_before_build_mb": round(rss0, 1),
        "rss_before_compact_mb": round(before, 1),
        "peak_rss_mb": round(rss.peak_mb, 1),
        "compact_s": round(seconds, 2),
        "peak_over_model": round((rss.peak_mb - rss0) / model_mb, 3),
        "extra_over_model": round((rss.peak_mb - before) / model_mb, 3),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=common.MODEL_NAMES)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--worker", help=common.hidden())
    parser.add_argument("--inplace", action="store_true", help=common.hidden())
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        result = worker(args.worker, args.inplace, args.smoke)
        print(json.dumps(result), flush=True)
        return result
    if args.smoke:
        args.models = ["resnet50", "llama_1b"]
    rows: dict[str, Any] = {}
    for name in args.models:
        rows[name] = {}
        for inplace in (False, True):
            key = "inplace" if inplace else "copy"
            if args.smoke:  # in this process: the ratios are meaningless but the code path runs
                rows[name][key] = {**worker(name, inplace, True), "status": "ok"}
            else:
                rows[name][key] = common.run_worker(
                    "benchmarks.bench_memory",
                    ["--worker", name, "--threads", str(args.threads)] + (["--inplace"] if inplace else []),
                    timeout=args.timeout,
                )
            print(f"[memory] {name} {key}: {rows[name][key].get('peak_over_model')}", flush=True)
    payload = {
        "benchmark": "memory",
        "smoke": args.smoke,
        "stamp": common.stamp(args.threads),
        "target_peak_over_model": 2.2,
        "models": rows,
    }
    common.write_result("memory", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
