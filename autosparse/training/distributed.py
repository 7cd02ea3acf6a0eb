"""Gates under data parallelism: DDP needs nothing extra; FSDP2 keeps the gates out of its shards.

Gate parameters are tiny (one float per unit) and every gated weight reads them, so sharding them
with the module that happens to own them would leave most sites holding a sharded ``gamma`` while
their own weight is gathered. With FSDP2 they are therefore passed as ``ignored_params``: every
rank holds them whole, and their gradients are averaged here (FSDP averages only what it shards).
Averaging is idempotent, so it is also harmless where DDP has already averaged them.

Example:
    >>> gates = fsdp_ignored_params(net)
    >>> for block in net.layers:
    ...     fully_shard(block, ignored_params=gates)
    >>> fully_shard(net, ignored_params=gates)
    >>> autosparse.training.attach(net, optimizer=opt)   # averages gate gradients before each step
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from autosparse.state import get_state

try:  # DTensor is what FSDP2 shards parameters into; absent from builds without distributed
    from torch.distributed.tensor import DTensor, distribute_tensor

    HAS_DTENSOR = True
except ImportError:  # pragma: no cover - every supported torch build has it
    HAS_DTENSOR = False  # DTensor and distribute_tensor are then undefined: read them only after this


def fsdp_ignored_params(model: nn.Module) -> set[nn.Parameter]:
    """The gate parameters, to pass as ``fully_shard(..., ignored_params=...)`` on every call."""
    return {gate.gamma for gate in get_state(model).gate_list()}


def average_gate_grads(model: nn.Module) -> None:
    """Average every gate's gradient over the ranks of the default process group (no-op outside
    a multi-process run). Call before ``optimizer.step()``; :func:`~autosparse.training.attach` does."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    gammas = [gate.gamma for gate in get_state(model).gate_list()]
    if not gammas or any(HAS_DTENSOR and isinstance(g, DTensor) for g in gammas):
        return  # sharded by the wrapper, which reduces them itself
    flat = torch.cat([(g.grad if g.grad is not None else torch.zeros_like(g)).flatten() for g in gammas])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for gamma, part in zip(gammas, flat.split([g.numel() for g in gammas])):
        gamma.grad = part.view_as(gamma).clone()


def scale_(param: torch.Tensor, ratio: torch.Tensor) -> None:
    """``param *= ratio`` (``ratio`` broadcasts to ``param``), also when FSDP2 has sharded ``param``."""
    ratio = ratio.to(param.dtype)
    if HAS_DTENSOR and isinstance(param, DTensor):
        full = ratio.to(param.device).expand(param.shape).contiguous()  # the same on every rank
        param.mul_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
    else:
        param.mul_(ratio)
