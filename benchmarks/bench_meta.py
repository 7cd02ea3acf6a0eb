"""Q7 - planning a model larger than the machine: sparsify a Llama built on the meta device.

Llama-2-70B shapes (hidden 8192, 80 layers, 64 heads, 8 KV heads, intermediate 28672, vocabulary
32000; about 69e9 parameters, 276 GB in fp32) or ``--size 7b`` (hidden 4096, 32 layers, 32 heads,
intermediate 11008) are built under ``torch.device("meta")`` (no memory), then
``sparsify(model, configs/transformer.yaml, inplace=True, verify=False)`` captures (torch.export on
fake tensors), analyses and gates it on meta. Each size runs in a fresh process; reported: the
seconds of the build and of sparsify (wall and CPU, with sparsify's phases), the peak RSS of the
whole process and its rise inside sparsify, and the gates made. Targets: sparsify within 120 s
and a process peak within 2 GB.

    PYTHONPATH=. python -m benchmarks.bench_meta [--size 70b 7b] [--layers N] [--smoke]
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks import common

SIZES = {
    "70b": dict(vocab_size=32000, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, intermediate_size=28672),
    "7b": dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, intermediate_size=11008),
    "tiny": dict(common.TINY["llama"]),  # --smoke
}
POLICY = Path(__file__).resolve().parent.parent / "configs" / "transformer.yaml"
PHASES = ["capture", "find_branches", "analyze", "make_plan", "_gate"]
TARGET_SECONDS, TARGET_PEAK_MB = 120.0, 2048.0


def worker(size: str, layers: int | None) -> dict[str, Any]:
    import warnings

    import torch
    import transformers
    from transformers.initialization import no_init_weights

    import autosparse
    from autosparse import api
    from autosparse.measure import track_peak_rss

    config = dict(SIZES[size])
    if layers:
        config["num_hidden_layers"] = layers
    rss0 = common.current_rss_mb()
    with track_peak_rss(interval_s=0.01) as rss:
        start = time.perf_counter()
        with torch.device("meta"), no_init_weights():  # skips transformers' per-module initialisers
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
        build_s = time.perf_counter() - start
        ids = torch.randint(0, config["vocab_size"], (1, 8))
        with common.phase_timer(api, PHASES) as phases, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the policy's globs for other families match nothing here
            wall, cpu = time.perf_counter(), time.process_time()
            net = autosparse.sparsify(model, POLICY, example_inputs=(ids,), inplace=True, verify=False)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    gates = autosparse.gates(net)
    return {
        "config": config,
        "params": sum(p.numel() for p in model.parameters()),
        "all_on_meta": all(t.is_meta for t in [*net.parameters(), *net.buffers()]),
        "build_s": round(build_s, 2),
        "sparsify_s": round(wall, 2),
        "sparsify_cpu_s": round(cpu, 2),
        "phases_s": {k: round(v, 2) for k, v in phases.items() if not k.endswith("_result")},
        "rss_before_build_mb": round(rss0, 1),
        "peak_rss_mb": round(rss.peak_mb, 1),
        "rise_mb": round(rss.peak_mb - rss0, 1),
        "gates": len(gates),
        "gated_units": sum(g.size for g in gates.values()),
        "by_granularity": {k: sum(g.granularity == k for g in gates.values()) for k in ("head", "channel", "layer")},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", default=["70b"], choices=["70b", "7b"])
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--worker", help=common.hidden())
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        result = worker(args.worker, args.layers)
        print(json.dumps(result), flush=True)
        return result
    rows: dict[str, Any] = {}
    for size in ["tiny"] if args.smoke else args.size:
        if args.smoke:  # in this process: the numbers are meaningless but the code path runs
            rows[size] = {**worker(size, args.layers), "status": "ok"}
        else:
            extra = ["--layers", str(args.layers)] if args.layers else []
            rows[size] = common.run_worker("benchmarks.bench_meta",
                                           ["--worker", size, "--threads", str(args.threads), *extra],
                                           timeout=args.timeout)
        row = rows[size]
        row["within_targets"] = (row.get("sparsify_s", 1e9) <= TARGET_SECONDS
                                 and row.get("peak_rss_mb", 1e9) <= TARGET_PEAK_MB)
        print(f"[meta] {size}: sparsify {row.get('sparsify_s')} s, peak RSS {row.get('peak_rss_mb')} MB", flush=True)
    payload = {
        "benchmark": "meta",
        "smoke": args.smoke,
        "stamp": common.stamp(args.threads),
        "policy": str(POLICY.relative_to(common.ROOT)),
        "target_sparsify_s": TARGET_SECONDS,
        "target_peak_rss_mb": TARGET_PEAK_MB,
        "sizes": rows,
    }
    common.write_result("meta", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
