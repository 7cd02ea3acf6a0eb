"""``torch.compile`` of a gated model: autosparse causes no graph break.

``torch._dynamo.explain`` traces the gated forward (train mode: the batched gate computation, the
lean weight getters and the input-or-weight gating of :class:`_GatedForward` all run) and counts
the graphs. One graph and no break for a residual conv net and for an attention block with head
gates, like the ungated models; and no recompile of the penalty while lambda ramps up. Timing compiled steps is the benchmark's job
(``benchmarks/bench_gate_overhead.py --compile``), not a test's.
"""

from __future__ import annotations

import pytest
import torch

import autosparse
from tests.zoo import CHANNEL, HEAD_CHANNEL, get_case, output_tensors

dynamo = pytest.importorskip("torch._dynamo", reason="torch._dynamo is unavailable in this torch build")

POLICIES = {"resnet_basic": CHANNEL, "attention_block": HEAD_CHANNEL}


def _breaks(fn, *inputs) -> tuple[int, int, list[str]]:
    dynamo.reset()
    report = dynamo.explain(fn)(*inputs)
    return report.graph_count, report.graph_break_count, [str(b.reason).splitlines()[0] for b in report.break_reasons]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_gated_forward_compiles_without_graph_breaks(name):
    model, inputs = get_case(name).build()
    net = autosparse.sparsify(model, POLICIES[name], example_inputs=inputs).train()
    assert autosparse.gates(net), "the case has gates"
    graphs, breaks, reasons = _breaks(net, *inputs)
    assert breaks == 0 and graphs == 1, reasons


def test_gated_loss_with_penalty_compiles_without_graph_breaks():
    model, inputs = get_case("resnet_basic").build()
    net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs).train()
    autosparse.penalty(net)  # the first call builds the schedule's state outside the traced region

    def loss(*xs: torch.Tensor) -> torch.Tensor:
        return output_tensors(net(*xs))[0].square().mean() + autosparse.penalty(net)

    graphs, breaks, reasons = _breaks(loss, *inputs)
    assert breaks == 0, reasons
    dynamo.reset()


def test_compiled_penalty_does_not_recompile_during_warm_up():
    """Lambda ramps every warm-up step; the compiled penalty reads it as a tensor, not a constant."""
    model, inputs = get_case("resnet_basic").build()
    policy = {**CHANNEL, "penalty": {"lambda": 0.5}, "schedule": {"warmup_steps": 4}}
    net = autosparse.sparsify(model, policy, example_inputs=inputs).train()
    autosparse.penalty(net)  # builds the schedule's state outside the traced region
    dynamo.reset()
    counters = dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(lambda: autosparse.penalty(net), backend="eager", fullgraph=True)
    seen = []
    for _ in range(4):
        autosparse.training.step(net)
        value = compiled()
        assert torch.allclose(value, autosparse.penalty(net)), "the compiled penalty uses the current lambda"
        seen.append(float(value.detach()))
    assert seen == sorted(seen) and seen[0] < seen[-1], f"lambda ramps up during warm-up: {seen}"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["recompiles"]) or dict(counters["stats"])
    dynamo.reset()
