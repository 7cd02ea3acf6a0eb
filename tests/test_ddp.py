"""DistributedDataParallel: gated training on 2 CPU processes (gloo) equals one process on the same
global batch, compaction works on rank 0, and the saved result loads on every rank.

Each rank trains on half of the global batch; DDP averages gradients, and the penalty is the same
on every rank, so the update equals the single-process one on the whole batch. The model has no
BatchNorm (per-rank batch statistics would legitimately differ; see docs/reliability.md).
Users of other pruning tools also find DDP-wrapped models rejected: gates, penalty, explain and
compact must see through the wrapper (checked in one process, last section).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import autosparse
from autosparse.io import load, save
from autosparse.measure import count_params
from tests.processes import process_group, rank_slice, run_on_processes
from tests.zoo import CHANNEL, get_case, rel_diff, run_no_grad, sparsify_quietly

WORLD, STEPS, GLOBAL_BATCH = 2, 4, 8
POLICY = {"rules": [{"granularity": "channel"}], "penalty": {"lambda": 0.05}}


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=gen), torch.randint(0, 4, (GLOBAL_BATCH,), generator=gen)


def gated() -> nn.Module:
    x, _ = data()
    net = sparsify_quietly(build(), POLICY, (x[:2],))
    for i, gate in enumerate(autosparse.gates(net).values()):  # a non-uniform start, so gates move apart
        with torch.no_grad():
            gate.gamma.copy_(torch.linspace(-1, 1, gate.size) * (i + 1))
    return net


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + autosparse.penalty(model)
        loss.backward()
        opt.step()


def _worker(rank: int, tmp: str) -> None:
    with process_group(rank, tmp, WORLD):
        x, y = data()
        net = gated()
        part = rank_slice(rank, GLOBAL_BATCH, WORLD)
        train(DistributedDataParallel(net), x[part], y[part])
        torch.save(net.state_dict(), f"{tmp}/trained{rank}.pt")
        if rank == 0:
            for gate in autosparse.gates(net).values():
                gate.zero_([0, 1])  # force some units off: compaction must really remove something
            save(autosparse.compact(net.eval()), f"{tmp}/small")
        dist.barrier()
        small = load(f"{tmp}/small", build())
        with torch.no_grad():
            torch.save(small(x), f"{tmp}/out{rank}.pt")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_on_processes(_worker, tmp_path_factory.mktemp("ddp"), WORLD)


def test_ddp_training_equals_single_process(ddp_run: Path) -> None:
    x, y = data()
    single = gated()
    train(single, x, y)
    expected = single.state_dict()
    for rank in range(WORLD):
        got = torch.load(ddp_run / f"trained{rank}.pt")
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-4, msg=f"rank {rank}: {key}")
    gammas = [v for k, v in expected.items() if k.endswith(".gamma")]
    assert gammas and any(not torch.allclose(g, torch.linspace(-1, 1, g.numel()) * (i + 1))
                          for i, g in enumerate(gammas)), "the gates did not train"


def test_compacted_on_rank0_loads_on_every_rank(ddp_run: Path) -> None:
    x, _ = data()
    outs = [torch.load(ddp_run / f"out{rank}.pt") for rank in range(WORLD)]
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    small = load(ddp_run / "small", build())
    assert small[0].out_channels < 8, "nothing was compacted"
    trained = gated()
    trained.load_state_dict(torch.load(ddp_run / "trained0.pt"))
    for gate in autosparse.gates(trained).values():
        gate.zero_([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(outs[0], trained.eval()(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- SyncBatchNorm
def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def test_sync_batchnorm_converted_after_sparsify_compacts() -> None:
    """The documented order: sparsify, then convert_sync_batchnorm, then wrap in DDP."""
    x, _ = data()
    net = sparsify_quietly(_bn_net(), CHANNEL, (x,))
    net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    for gate in autosparse.gates(net).values():
        gate.zero_([0, 1])
    small = autosparse.compact(net.eval())
    assert isinstance(small[1], nn.SyncBatchNorm) and small[1].num_features == 6 and small[0].out_channels == 6


def test_sync_batchnorm_converted_before_sparsify_is_understood() -> None:
    x, _ = data()
    model = nn.SyncBatchNorm.convert_sync_batchnorm(_bn_net())
    report = autosparse.explain(model, example_inputs=(x,))
    assert not report.unknown_ops, report.unknown_ops


# ----------------------------------------------------------------------------- the DDP wrapper, one process
@pytest.fixture()
def single_process_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _ddp_gated() -> tuple[nn.Module, nn.Module, tuple]:
    model, inputs = get_case("plain").build()
    net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    return net, DistributedDataParallel(net), inputs


def test_ddp_wrapper_gives_the_same_gates_and_penalty(single_process_group):
    # DDP wrappers (OTO #44)
    net, ddp, inputs = _ddp_gated()
    assert autosparse.gates(ddp) == autosparse.gates(net) and len(autosparse.gates(net)) == 3
    assert autosparse.penalty(ddp).item() == autosparse.penalty(net).item() > 0


def test_explain_accepts_the_ddp_wrapper(single_process_group):
    # DDP wrappers (OTO #44)
    net, ddp, _ = _ddp_gated()
    assert [g.name for g in autosparse.explain(ddp).groups] == [g.name for g in autosparse.explain(net).groups]


def test_compact_accepts_the_ddp_wrapper(single_process_group):
    # DDP wrappers (OTO #44)
    net, ddp, inputs = _ddp_gated()
    for gate in autosparse.gates(ddp).values():
        gate.zero_([0, 1])
    small = autosparse.compact(ddp)
    assert count_params(small) < count_params(net)
    assert rel_diff(run_no_grad(net, *inputs), run_no_grad(small, *inputs)) <= 1e-5
