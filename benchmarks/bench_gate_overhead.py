"""Q2 - gate overhead during training: step time of the gated model vs the same model ungated.

One step = forward, loss (+ ``autosparse.penalty`` for the gated model), backward, SGD update, in
fp32 on CPU with a fixed thread count. Gated and ungated steps alternate so that load on the
machine hits both alike; the ratio of the minimum step times is the overhead. Target <= 1.05.

    PYTHONPATH=. python -m benchmarks.bench_gate_overhead [--models resnet50 bert_base] [--smoke]
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import autosparse
from benchmarks import common

MODELS = ("resnet50", "bert_base")


def make_step(model: nn.Module, x: torch.Tensor, gated: bool) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def loss_of(out: Any) -> torch.Tensor:
        tensor = out if isinstance(out, torch.Tensor) else out[0]
        return tensor.float().pow(2).mean()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model(x))
        if gated:
            loss = loss + autosparse.penalty(model)
        loss.backward()
        opt.step()

    return step


def bench_model(name: str, args: Any) -> dict[str, Any]:
    built = common.build(name, smoke=args.smoke, image=args.image, seq=args.seq)
    x = built.make_input(args.batch)
    plain = copy.deepcopy(built.model).train()
    gated = autosparse.sparsify(
        built.model, common.policy_for(built.family), example_inputs=built.inputs(1)
    ).train()
    steps = {"ungated": make_step(plain, x, False), "gated": make_step(gated, x, True)}
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    with common.num_threads(args.threads):
        for i in range(args.warmup + args.repeats):
            for key, step in steps.items():
                w, c = common.timed_ms(step)
                if i >= args.warmup:
                    wall[key].append(w)
                    cpu[key].append(c)
    stats = {k: common.summarize_ms(wall[k], cpu[k]) for k in steps}
    n_sites = sum(1 for m in gated.modules() if type(m).__name__ == "GateSite")
    return {
        "family": built.family,
        "batch": args.batch,
        "gates": len(autosparse.gates(gated)),
        "sites": n_sites,
        "step_ms": stats,
        "overhead": round(stats["gated"]["ms"] / stats["ungated"]["ms"], 4),
        "overhead_wall": round(stats["gated"]["wall_min_ms"] / stats["ungated"]["wall_min_ms"], 4),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=MODELS + ("mobilenet_v2", "llama_small")
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image", type=int, default=128, help="CNN input resolution")
    parser.add_argument("--seq", type=int, default=128, help="transformer sequence length")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.repeats, args.warmup = 2, 2, 1
    payload: dict[str, Any] = {
        "benchmark": "gate_overhead",
        "smoke": args.smoke,
        "stamp": common.stamp(args.threads),
        "settings": {
            "batch": args.batch,
            "image": args.image,
            "seq": args.seq,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "optimizer": "SGD(momentum)",
            "statistic": "min CPU time over alternating steps",
        },
        "target": 1.05,
        "models": {},
    }
    for name in args.models:
        payload["models"][name] = bench_model(name, args)
        print(f"[gate_overhead] {name}: {payload['models'][name]['overhead']}", flush=True)
    payload["stamp"]["loadavg_1m_end"] = common.stamp()["loadavg_1m"]
    common.write_result("gate_overhead", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
