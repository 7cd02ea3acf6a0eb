"""A model that only just fits: sparsify and compact a Llama-2-7B-shaped model in place, in bfloat16.

The model (hidden 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32000: 6.7e9 parameters, 13.5 GB in
bfloat16, random weights) is built for real, then ``sparsify(..., inplace=True)`` (heads and MLP
channels, configs/transformer.yaml), 30 % of every gate's units are zeroed, and
``compact(net, inplace=True)`` removes them. A sampler thread records the process's peak RSS; the
figure that matters is the peak over the weights' own size (target: 1.3x) and the seconds of
sparsify + compact (target: 60 s). ``--layers N`` builds fewer layers (the smoke run uses 2 and a
narrow config).

    PYTHONPATH=. python -m benchmarks.bench_inplace [--layers 32] [--verify]

Writes ``benchmarks/results/inplace.json``.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

import autosparse
from autosparse.measure import count_params, track_peak_rss
from benchmarks import common

CONFIG = dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=32, intermediate_size=11008)
POLICY = Path(__file__).resolve().parent.parent / "configs" / "transformer.yaml"
TARGET_SECONDS, TARGET_PEAK_RATIO = 60.0, 1.3


def run(config: dict, verify: bool) -> dict:
    """Build, sparsify in place, zero 30 % of every gate, compact in place; seconds and peak RSS."""
    warnings.simplefilter("ignore")
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = common.hf_model("LlamaForCausalLM", config)
    finally:
        torch.set_default_dtype(torch.float32)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    ids = torch.randint(0, config["vocab_size"], (1, 8))
    before_mb = common.current_rss_mb()
    with track_peak_rss(interval_s=0.002) as peak:
        start = time.perf_counter()
        net = autosparse.sparsify(model, POLICY, example_inputs=(ids,), inplace=True, verify=verify)
        sparsified = time.perf_counter()
        common.zero_fraction(net, keep=0.7)
        small = autosparse.compact(net, inplace=True, verify=verify)
        done = time.perf_counter()
    return {"config": config, "verify": verify, "params_after": count_params(small),
            "weights_mb": round(weights_mb, 1), "rss_before_mb": round(before_mb, 1),
            "peak_rss_mb": round(peak.peak_mb, 1), "peak_over_weights": round(peak.peak_mb / weights_mb, 3),
            "sparsify_s": round(sparsified - start, 2), "compact_s": round(done - sparsified, 2),
            "total_s": round(done - start, 2),
            "within_targets": done - start <= TARGET_SECONDS and peak.peak_mb / weights_mb <= TARGET_PEAK_RATIO}


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32)")
    parser.add_argument("--verify", action="store_true", help="also run sparsify's dry run and compact's check")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = dict(common.TINY["llama"]) if args.smoke else dict(CONFIG)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    result = run(config, args.verify)
    payload = {"benchmark": "inplace", "smoke": args.smoke, "stamp": common.stamp(args.threads),
               "target_seconds": TARGET_SECONDS, "target_peak_over_weights": TARGET_PEAK_RATIO, **result}
    path = common.write_result("inplace_smoke" if args.smoke else "inplace", payload, args.out)
    print(f"[inplace] {result['total_s']} s (sparsify {result['sparsify_s']}, compact {result['compact_s']}), "
          f"peak RSS {result['peak_rss_mb']} MB = {result['peak_over_weights']}x the weights -> {path}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
