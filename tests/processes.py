"""Running a test's worker on several CPU processes (gloo), as the DDP and FSDP2 tests do."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.multiprocessing as mp


def run_on_processes(worker: Callable[[int, str], None], tmp: Path, world: int) -> Path:
    """``worker(rank, str(tmp))`` on ``world`` spawned processes; they rendezvous through a file in
    ``tmp``, so no free port or network is needed. Returns ``tmp`` (where the workers wrote)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
        mp.start_processes(worker, args=(str(tmp),), nprocs=world, join=True, start_method="spawn")
    return tmp
