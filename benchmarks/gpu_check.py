"""Optional CUDA check (run it where a GPU is available; nothing else depends on it).

1. Exactness on the GPU: zoo models sparsified on CUDA, half of every gate zeroed, compacted;
   compacted vs gated output (relative to the output scale), fp32.
2. Gate overhead on the GPU: one SGD step of ResNet-50 (batch 32, 224 px) and BERT-base (batch 32,
   128 tokens), gated vs ungated, timed with CUDA events, alternating, median of 20.

    PYTHONPATH=. python -m benchmarks.gpu_check --out benchmarks/results
"""

from __future__ import annotations

import statistics
import time

import torch

import autosparse
from benchmarks.bench_gate_overhead import make_step
from benchmarks.common import base_parser, build, policy_for, stamp, write_result
from tests.zoo import get_case, rel_diff

ZOO = ["resnet_bottleneck", "mobilenetv2", "densenet", "hf_resnet_basic", "hf_bert", "hf_llama", "hf_gpt2",
       "mha_block", "torch_encoder", "gqa_block", "hf_swin"]



def exactness(device: str, names: list[str]) -> dict[str, float]:
    out = {}
    for name in names:
        model, inputs = get_case(name).build()
        model, inputs = model.to(device), tuple(t.to(device) for t in inputs)
        net = autosparse.sparsify(model, {"rules": [{"granularity": "channel"}, {"granularity": "head"}]},
                                  example_inputs=inputs)
        g = torch.Generator().manual_seed(0)
        for gate in autosparse.gates(net).values():
            gate.zero_(torch.randperm(gate.size, generator=g)[: gate.size // 2])
        small = autosparse.compact(net)  # verifies in full fp32 (TF32 off)
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            out[name] = rel_diff(net(*inputs), small(*inputs))
        print(f"{name:20s} compacted vs gated on {device}: {out[name]:.2e}", flush=True)
    return out


def _timed_ms(step, device: str) -> float:
    """One call of ``step`` in ms: CUDA events on a GPU, the wall clock on the --smoke CPU path."""
    if device != "cuda":
        begin = time.perf_counter()
        step()
        return (time.perf_counter() - begin) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def overhead(name: str, batch_size: int, device: str, smoke: bool, steps: int = 20,
             compile_models: bool = False) -> dict[str, float]:
    built = build(name, smoke=smoke, image=224, seq=128)
    dense = built.model.to(device).train()
    example = built.make_input(1).to(device)
    gated = autosparse.sparsify(dense, policy_for(built.family), example_inputs=(example,)).train()
    batch = built.make_input(batch_size).to(device)
    if compile_models:  # one graph per step: the gates' small ops no longer cost a launch each
        dense, gated = torch.compile(dense), torch.compile(gated)

    steps_of = {"dense": make_step(dense, batch, gated=False), "gated": make_step(gated, batch, gated=True)}
    times = {"dense": [], "gated": []}
    warmup = 3 if steps > 2 else 0
    for i in range(steps + warmup):
        for key, step in steps_of.items():
            ms = _timed_ms(step, device)
            if i >= warmup:
                times[key].append(ms)
    result = {k: statistics.median(v) for k, v in times.items()}
    result["overhead"] = result["gated"] / result["dense"]
    tag = " (torch.compile)" if compile_models else ""
    print(f"{name}{tag}: dense {result['dense']:.1f} ms, gated {result['gated']:.1f} ms, x{result['overhead']:.3f}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    parser.add_argument("--skip-exactness", action="store_true", help="only the overhead part")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    names, batch, steps = (ZOO[:2], 2, 2) if args.smoke else (ZOO, 32, 20)
    payload = {"stamp": stamp(), "smoke": args.smoke, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "exactness": {} if args.skip_exactness else exactness(device, names),
               "overhead": {m: overhead(m, batch, device, args.smoke, steps) for m in ("resnet50", "bert_base")}}
    if args.compile:
        payload["overhead_compiled"] = {m: overhead(m, batch, device, args.smoke, steps, compile_models=True)
                                        for m in ("resnet50", "bert_base")}
    write_result("gpu_check", payload, args.out)


if __name__ == "__main__":
    main()
