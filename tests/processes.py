"""Running a test's worker on several CPU processes (gloo), as the DDP and FSDP2 tests do."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_on_processes(worker: Callable[[int, str], None], tmp: Path, world: int) -> Path:
    """``worker(rank, str(tmp))`` on ``world`` spawned processes; they rendezvous through a file in
    ``tmp``, so no free port or network is needed. Returns ``tmp`` (where the workers wrote)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
        mp.start_processes(worker, args=(str(tmp),), nprocs=world, join=True, start_method="spawn")
    return tmp


@contextlib.contextmanager
def process_group(rank: int, tmp: str, world: int) -> Iterator[None]:
    """Inside a worker: one thread, the gloo group of ``world`` ranks (file rendezvous in ``tmp``),
    destroyed on the way out, also on error."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_slice(rank: int, total: int, world: int) -> slice:
    """This rank's equal share of a global batch of ``total`` samples."""
    return slice(rank * total // world, (rank + 1) * total // world)
