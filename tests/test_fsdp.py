"""FSDP2 (``fully_shard``): gated training on 2 CPU processes (gloo) with the penalty hooks, warm-up,
budget controller and freeze equals one process on the same global batch; the full state is
gathered and compacted on rank 0.

The gates are kept out of the shards (``fsdp_ignored_params``) and ``attach`` averages their
gradients before every optimizer step, as FSDP does for the weights it shards.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import autosparse
from autosparse.errors import AutosparseWarning
from tests.processes import process_group, rank_slice, run_on_processes

fsdp = pytest.importorskip("torch.distributed.fsdp")
checkpoint_state = pytest.importorskip("torch.distributed.checkpoint.state_dict")

# Eight steps cannot land on the target; the test is about equality, not about the budget.
pytestmark = pytest.mark.filterwarnings("ignore:gates froze at:autosparse.errors.AutosparseWarning")

WORLD, STEPS, GLOBAL_BATCH = 2, 8, 8
POLICY = {"rules": [{"granularity": "channel"}], "penalty": {"lambda": 0.05},
          "schedule": {"warmup_steps": 2, "freeze_step": 6}, "target": {"flops": 0.6}}


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(GLOBAL_BATCH, 12, generator=gen), torch.randint(0, 4, (GLOBAL_BATCH,), generator=gen)


def gated() -> nn.Module:
    x, _ = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutosparseWarning)
        net = autosparse.sparsify(build(), POLICY, example_inputs=(x[:2],))
    for i, gate in enumerate(autosparse.gates(net).values()):  # a non-uniform start, so gates move apart
        with torch.no_grad():
            gate.gamma.copy_(torch.linspace(-2, 2, gate.size) * (i + 1))
    return net


def train(model: nn.Module, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    with autosparse.training.attach(net, optimizer=opt):  # penalty gradient, schedule, controller, freeze
        for _ in range(STEPS):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


def _worker(rank: int, tmp: str) -> None:
    with process_group(rank, tmp, WORLD):
        x, y = data()
        net = gated()
        ignored = autosparse.training.fsdp_ignored_params(net)
        for layer in (net[0], net[2], net[4]):
            fsdp.fully_shard(layer, ignored_params=ignored)
        fsdp.fully_shard(net, ignored_params=ignored)
        part = rank_slice(rank, GLOBAL_BATCH, WORLD)
        train(net, net, x[part], y[part])
        options = checkpoint_state.StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = checkpoint_state.get_model_state_dict(net, options=options)  # a collective: every rank
        if rank == 0:
            fresh = gated()
            autosparse.load_gated_state(fresh, full)
            torch.save({"state": full, "kept": {k: g.kept() for k, g in autosparse.gates(fresh).items()}},
                       f"{tmp}/full.pt")
            with torch.no_grad():
                torch.save(autosparse.compact(fresh.eval())(x), f"{tmp}/out.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_on_processes(_worker, tmp_path_factory.mktemp("fsdp"), WORLD)


def _single_process() -> tuple[nn.Module, nn.Module]:
    x, y = data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same summation order in every matmul
    try:
        net = gated()
        train(net, net, x, y)
    finally:
        torch.set_num_threads(threads)
    return net, autosparse.compact(net.eval())


def test_fsdp2_training_equals_single_process(fsdp_run: Path) -> None:
    net, _ = _single_process()
    saved = torch.load(fsdp_run / "full.pt")
    expected = net.state_dict()
    assert saved["state"].keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(saved["state"][key], value, atol=1e-5, rtol=1e-4, msg=key)
    assert saved["kept"] == {k: g.kept() for k, g in autosparse.gates(net).items()}
    assert sum(saved["kept"].values()) < 64, "the budget controller closed no unit"


def test_fsdp2_compacted_on_rank0_equals_single_process(fsdp_run: Path) -> None:
    x, _ = data()
    _, small = _single_process()
    assert small[0].out_features < 32 or small[2].out_features < 32, "nothing was compacted"
    with torch.no_grad():
        diff = (torch.load(fsdp_run / "out.pt") - small(x)).abs().max().item()
    assert diff <= 1e-5
