"""Q1 - compacted-model latency: dense vs compacted (50 % / 25 % of dense FLOPs) vs hand-built.

For each model the gates of a fresh ``sparsify`` are zeroed uniformly (the same random fraction of
units in every gate, found by bisection on the *measured* FLOPs of the compacted model), compacted
with verification, and timed on CPU under ``torch.inference_mode`` with a fixed thread count. The
hand-built twin is the model class constructed directly with the compacted widths (no weights
loaded), i.e. the best a compacted model can do. Each target is compacted twice, with the policy's
``round_to`` at 1 and at 8, to show what rounding kept widths to multiples of 8 buys.

Targets: compacted / hand-built <= 1.02; speedup >= 0.8 x FLOPs reduction (CNNs, batch 32).

    PYTHONPATH=. python -m benchmarks.bench_latency [--models resnet50 bert_base] [--smoke]
"""

from __future__ import annotations

import gc
import time
from typing import Any

import autosparse
from autosparse.measure import count_flops, count_params
from benchmarks import common, models

MODELS = ("resnet50", "mobilenet_v2", "bert_base", "llama_small")
TARGETS = (0.5, 0.25)
ROUND_TO = (1, 8)


def variants(built: common.Built, dense_flops: int, targets: list[float], iters: int) -> dict[str, Any]:
    """Compacted models (and hand-built twins for round_to=1) at each FLOPs target."""
    out: dict[str, Any] = {}
    x1 = built.inputs(1)
    exponent = 2.0 if built.family == "cnn" else 1.0  # conv chains: FLOPs ~ keep^2
    for round_to in ROUND_TO:
        gated = autosparse.sparsify(built.model, common.policy_for(built.family, round_to), example_inputs=x1)
        for target in targets:
            keep, frac = common.search_keep(gated, x1, dense_flops, target, exponent=exponent, iters=iters)
            small = common.compact_at(gated, keep, verify=True)  # the public path: copy + equivalence check
            tag = f"{int(target * 100)}%/r{round_to}"
            out[tag] = {
                "model": small,
                "keep": round(keep, 4),
                "flops_frac": round(frac, 4),
                "params": count_params(small),
            }
            if round_to == 1:
                out[f"{int(target * 100)}%/hand"] = {
                    "model": models.hand_built(built.model, small),
                    "flops_frac": round(frac, 4),
                    "params": count_params(small),
                }
        del gated
        gc.collect()
    return out


def bench_model(name: str, args: Any) -> dict[str, Any]:
    start = time.perf_counter()
    built = common.build(name, smoke=args.smoke, image=args.image, seq=args.seq)
    x1 = built.inputs(1)
    dense_flops = count_flops(built.model, x1)
    found = variants(built, dense_flops, args.targets, args.search_iters)
    models = {"dense": built.model, **{k: v["model"] for k, v in found.items()}}
    for key, v in found.items():  # the twin's FLOPs must match its compacted model's
        if key.endswith("/hand"):
            v["flops_frac"] = round(count_flops(v["model"], x1) / dense_flops, 4)
    result: dict[str, Any] = {
        "family": built.family,
        "dense_flops_b1": dense_flops,
        "dense_params": count_params(built.model),
        "variants": {
            k: {f: v[f] for f in ("keep", "flops_frac", "params") if f in v} for k, v in found.items()
        },
        "latency": {},
    }
    for batch in args.batches:
        reps, warm = (args.repeats_b1, 2) if batch == 1 else (args.repeats_bn, 1)
        timed = common.interleaved_latency(
            models, built.inputs(batch), repeats=reps, warmup=warm, threads=args.threads
        )
        result["latency"][str(batch)] = timed
        result.setdefault("ratios", {})[str(batch)] = ratios(timed, found)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def ratios(timed: dict[str, dict[str, float]], found: dict[str, Any]) -> dict[str, Any]:
    """speedup = dense / compacted; vs_flops = speedup / (dense FLOPs / compacted FLOPs);
    vs_hand = compacted / hand-built (headline ``ms``: min CPU time)."""
    dense = timed["dense"]["ms"]
    out = {}
    for key, v in found.items():
        if key.endswith("/hand"):
            continue
        ms = timed[key]["ms"]
        row = {"speedup": round(dense / ms, 3), "flops_reduction": round(1 / v["flops_frac"], 3)}
        row["speedup_over_flops_reduction"] = round(row["speedup"] / row["flops_reduction"], 3)
        hand = key.split("/")[0] + "/hand"
        if key.endswith("/r1") and hand in timed:
            row["compacted_over_hand"] = round(ms / timed[hand]["ms"], 3)
        out[key] = row
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--image", type=int, default=128, help="CNN input resolution")
    parser.add_argument("--seq", type=int, default=32, help="transformer sequence length")
    parser.add_argument("--repeats-b1", type=int, default=20)
    parser.add_argument("--repeats-bn", type=int, default=5)
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS), help="FLOPs fractions")
    parser.add_argument("--search-iters", type=int, default=8, help="bisection steps per target")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.targets, args.search_iters = [1, 2], [0.5], 2
        args.repeats_b1 = args.repeats_bn = 1
    import torch

    torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {
        "benchmark": "latency",
        "smoke": args.smoke,
        "stamp": common.stamp(args.threads),
        "settings": {
            "image": args.image,
            "seq": args.seq,
            "batches": args.batches,
            "targets": args.targets,
            "round_to": list(ROUND_TO),
            "statistic": "min CPU time over round-robin repeats",
        },
        "models": {},
    }
    for name in args.models:
        payload["models"][name] = bench_model(name, args)
        print(f"[latency] {name}: {payload['models'][name]['ratios']}", flush=True)
        gc.collect()
    payload["stamp"]["loadavg_1m_end"] = common.stamp()["loadavg_1m"]
    common.write_result("latency", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
