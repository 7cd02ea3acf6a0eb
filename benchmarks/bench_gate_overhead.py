"""Q2 - gate overhead during training: step time of the gated model vs the same model ungated.

One step = forward, loss (+ ``autosparse.penalty`` for the gated model), backward, SGD update, in
fp32 on CPU with a fixed thread count. Gated and ungated steps alternate, in ABBA order, so that
load on the machine hits both alike. Two statistics: the ratio of the minimum step times, and the median of the
paired ratios (step i gated / step i ungated), which is robust to load that comes and goes.

Two regimes: compute-bound (``resnet50``, ``bert_base`` at batch 8; target <= 1.05) and host-bound
(``resnet18_narrow``: ResNet-18 layout of width 4 at batch 2, 16x16; ``bert_narrow``: BERT with
hidden size 32, 12 layers at batch 2, sequence 8; target <= 1.25), where every op costs its Python
dispatch and the gates' extra ops show. ``--compile`` also times both models under ``torch.compile``
(``--backend``, default inductor) and counts graph breaks.

    PYTHONPATH=. python -m benchmarks.bench_gate_overhead [--models resnet50 bert_base] [--smoke]
    PYTHONPATH=. python -m benchmarks.bench_gate_overhead --models resnet18_narrow bert_narrow [--compile]
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import autosparse
from benchmarks import common

MODELS = ("resnet50", "bert_base")
HOST_BOUND = ("resnet18_narrow", "bert_narrow")
TARGETS = {"compute_bound": 1.05, "host_bound": 1.25, "compiled": 1.10}


@dataclass
class Regime:
    """Defaults of one model: batch size, timed and warm-up steps."""

    batch: int
    repeats: int
    warmup: int
    target: float


def _regime(name: str) -> Regime:
    if name in HOST_BOUND:
        return Regime(batch=2, repeats=60, warmup=10, target=TARGETS["host_bound"])
    return Regime(batch=8, repeats=8, warmup=1, target=TARGETS["compute_bound"])


# ---------------------------------------------------------------- host-bound models
class BasicBlock(nn.Module):
    """ResNet-18's block: two 3x3 convolutions, a 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        project = stride != 1 or cin != cout
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if project else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18_narrow(width: int = 4) -> nn.Module:
    """ResNet-18's layout (2 BasicBlocks per stage, widths w-2w-4w-8w) at a tiny width."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
        layers += [BasicBlock(cin, width * mult, stride), BasicBlock(width * mult, width * mult, 1)]
        cin = width * mult
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


BERT_NARROW = dict(vocab_size=512, hidden_size=32, num_hidden_layers=12, num_attention_heads=4, intermediate_size=128)


def build(name: str, args: Any) -> common.Built:
    """The benchmark model ``name``: a host-bound one defined here, else :func:`common.build`."""
    if name == "resnet18_narrow":
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed
        net = common.bn_stats(resnet18_narrow())
        return common.Built(name, net, "cnn", lambda b: torch.randn(b, 3, 16, 16, generator=gen(b)))
    if name == "bert_narrow":
        net = common.hf_model("BertModel", BERT_NARROW)
        size = BERT_NARROW["vocab_size"]
        return common.Built(name, net, "encoder", lambda b: torch.randint(0, size, (b, 8), generator=torch.Generator().manual_seed(b)))
    return common.build(name, smoke=args.smoke, image=args.image, seq=args.seq)


# ---------------------------------------------------------------- timing
def training_loss(model: nn.Module, gated: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The step's loss of ``x``: mean square of the output, plus ``autosparse.penalty`` when gated."""

    def loss(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        value = (out if isinstance(out, torch.Tensor) else out[0]).float().pow(2).mean()
        return value + autosparse.penalty(model) if gated else value

    if gated:
        autosparse.penalty(model)  # builds the schedule's state once, outside any compiled region
    return loss


def make_step(model: nn.Module, x: torch.Tensor, gated: bool, backend: str | None = None) -> Callable[[], None]:
    """One training step; with ``backend``, the forward and the loss (the penalty included, as a
    user who compiles would write it) run as one ``torch.compile`` region, the optimizer eagerly."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss = training_loss(model, gated)
    loss_fn = loss if backend is None else torch.compile(loss, backend=backend)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(x).backward()
        opt.step()

    return step


def time_pair(steps: dict[str, Callable[[], None]], repeats: int, warmup: int, threads: int) -> dict[str, Any]:
    """Alternate the steps; per step the summary of :func:`common.summarize_ms`, plus both ratios."""
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    with common.num_threads(threads):
        for i in range(warmup + repeats):
            # ABBA: each model runs first in every other pair, so a drift in load, or a cost that
            # one step leaves to the next (allocator, caches), does not favour either
            for key in order if i % 2 == 0 else order[::-1]:
                w, c = common.timed_ms(steps[key])
                if i >= warmup:
                    wall[key].append(w)
                    cpu[key].append(c)
    stats = {k: common.summarize_ms(wall[k], cpu[k]) for k in steps}
    paired = np.asarray(cpu["gated"]) / np.maximum(np.asarray(cpu["ungated"]), 1e-9)
    return {
        "step_ms": stats,
        "overhead": round(stats["gated"]["ms"] / stats["ungated"]["ms"], 4),  # ratio of the minima
        "overhead_median_paired": round(float(np.median(paired)), 4),
        "overhead_wall": round(stats["gated"]["wall_min_ms"] / stats["ungated"]["wall_min_ms"], 4),
    }


def graph_breaks(fn: Callable[..., Any], x: torch.Tensor) -> dict[str, Any]:
    """``torch._dynamo.explain`` of one call: graph and break counts, the first break reasons."""
    torch._dynamo.reset()
    report = torch._dynamo.explain(fn)(x)
    reasons = [str(b.reason).splitlines()[0] for b in report.break_reasons]
    return {"graphs": report.graph_count, "breaks": report.graph_break_count, "reasons": reasons[:5]}


def bench_compiled(plain: nn.Module, gated: nn.Module, x: torch.Tensor, regime: Regime, args: Any) -> dict[str, Any]:
    result: dict[str, Any] = {"backend": args.backend,
                              "graph_breaks": {"ungated": graph_breaks(plain, x), "gated": graph_breaks(gated, x),
                                               "gated_loss_with_penalty": graph_breaks(training_loss(gated, True), x)}}
    if args.backend == "inductor":
        # Inductor turns convolutions channels-last, and on this machine's CPU torch (2.13.0+cpu and
        # 2.14.1, eager too) the backward of a channels-last 1x1 stride-2 convolution (ResNet's
        # projection shortcut) corrupts the heap ("double free or corruption"); kept NCHW it does not.
        import torch._inductor.config as inductor_config

        inductor_config.layout_optimization = False
        result["inductor_layout_optimization"] = False
    torch._dynamo.reset()
    steps = {"ungated": make_step(plain, x, False, args.backend), "gated": make_step(gated, x, True, args.backend)}
    result.update(time_pair(steps, regime.repeats, max(regime.warmup, 3), args.threads))
    return result


def bench_model(name: str, args: Any) -> dict[str, Any]:
    regime = _regime(name)
    if args.smoke:
        regime = Regime(batch=2, repeats=2, warmup=1, target=regime.target)
    regime.batch = args.batch or regime.batch
    regime.repeats = args.repeats or regime.repeats
    regime.warmup = regime.warmup if args.warmup is None else args.warmup
    built = build(name, args)
    x = built.make_input(regime.batch)
    plain = copy.deepcopy(built.model).train()
    gated = autosparse.sparsify(
        built.model, common.policy_for(built.family), example_inputs=built.inputs(1)
    ).train()
    steps = {"ungated": make_step(plain, x, False), "gated": make_step(gated, x, True)}
    n_sites = sum(1 for m in gated.modules() if type(m).__name__ == "GateSite")
    result = {
        "family": built.family,
        "regime": "host_bound" if name in HOST_BOUND else "compute_bound",
        "batch": regime.batch,
        "repeats": regime.repeats,
        "target": regime.target,
        "gates": len(autosparse.gates(gated)),
        "sites": n_sites,
        **time_pair(steps, regime.repeats, regime.warmup, args.threads),
    }
    if args.compile:
        result["compiled"] = bench_compiled(plain, gated, x, regime, args)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=MODELS + HOST_BOUND + ("mobilenet_v2", "llama_small")
    )
    parser.add_argument("--batch", type=int, default=None, help="default: 8 (compute-bound), 2 (host-bound)")
    parser.add_argument("--image", type=int, default=128, help="CNN input resolution (compute-bound models)")
    parser.add_argument("--seq", type=int, default=128, help="transformer sequence length (compute-bound models)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps; default 8 (compute-bound), 60 (host-bound)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first; default 1 / 10")
    parser.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    parser.add_argument("--name", default="gate_overhead", help="result file name (without .json)")
    args = parser.parse_args(argv)
    payload: dict[str, Any] = {
        "benchmark": "gate_overhead",
        "smoke": args.smoke,
        "stamp": common.stamp(args.threads),
        "settings": {
            "image": args.image,
            "seq": args.seq,
            "optimizer": "SGD(momentum)",
            "statistic": "overhead: min gated / min ungated CPU step time; overhead_median_paired: "
                         "median over alternating steps of gated / ungated CPU time",
        },
        "targets": TARGETS,
        "models": {},
    }
    for name in args.models:
        row = payload["models"][name] = bench_model(name, args)
        print(f"[gate_overhead] {name}: min {row['overhead']} median paired {row['overhead_median_paired']}"
              + (f" compiled {row['compiled']['overhead']} / {row['compiled']['overhead_median_paired']}"
                 if "compiled" in row else ""), flush=True)
    payload["stamp"]["loadavg_1m_end"] = common.stamp()["loadavg_1m"]
    common.write_result(args.name, payload, args.out)
    return payload


if __name__ == "__main__":
    main()
