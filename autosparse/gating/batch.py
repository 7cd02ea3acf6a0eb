"""All gate values of a model in one batched computation per forward pass.

Computed gate by gate, every gate site pays about eight small ops forward and as many backward
(softmax, scale, threshold, mask...). That is nothing next to a big convolution on a CPU, but on a
GPU each op is a kernel launch plus Python dispatch: ResNet-50's 53 sites added ~16 ms to an 18 ms
training step on an H200. Here a forward pre-hook on the model's root computes every plain
:class:`~autosparse.gating.gate.Gate` at once (their ``gamma`` padded into one matrix with ``-inf``, one
row softmax, one threshold) and lends each gate its row for the duration of that forward; a forward
hook that always runs (also on error) takes them back. Outside a forward, a gate computes its values
alone, as before, so folding, ``kept()`` and the penalty are unchanged.

The values equal the per-gate ones up to float rounding of the softmax sums (a padded row sums
the same terms plus exact zeros).
"""

from __future__ import annotations

import torch
from torch import nn

from autosparse.gating.gate import TINY_SHARE, Gate, remove_hooks, threshold


class _Layout:
    """Constants of the padded layout for one set of gates on one device."""

    def __init__(self, gates: list[Gate], device: torch.device) -> None:
        sizes = [g.size for g in gates]
        width = max(sizes)
        self.sizes = sizes
        self.mask = torch.arange(width, device=device)[None, :] < torch.tensor(sizes, device=device)[:, None]
        self.count = torch.tensor(sizes, dtype=torch.float32, device=device)[:, None]
        self.tau = torch.tensor([g.tau for g in gates], dtype=torch.float32, device=device)[:, None]
        self.penalty_weight = torch.tensor([g.penalty_weight for g in gates], dtype=torch.float32, device=device)
        self.device = device


def batched_values(gates: list[Gate], layout: _Layout) -> list[torch.Tensor]:
    """``[g.values() for g in gates]`` in one pass (the same formula, row by row)."""
    gammas = torch.cat([g.gamma.float() for g in gates])
    padded = torch.full(layout.mask.shape, float("-inf"), device=layout.device).masked_scatter(layout.mask, gammas)
    shares = torch.softmax(padded, dim=1)
    flat = threshold(shares, layout.count, layout.tau)[layout.mask].masked_fill(torch.cat([g.forced_off for g in gates]), 0.0)
    return list(flat.split(layout.sizes))


def batched_norms(gates: list[Gate], p: float, layout: _Layout) -> torch.Tensor:
    """``torch.stack([g.penalty(p) for g in gates])`` in one pass: each row's ``||shares||_p``."""
    gammas = torch.cat([g.gamma.float() for g in gates])
    padded = torch.full(layout.mask.shape, float("-inf"), device=layout.device).masked_scatter(layout.mask, gammas)
    shares = torch.softmax(padded, dim=1)
    # Padding is 0 after the softmax, and d(x^p)/dx is infinite at 0 (p < 1): raise 1 instead and
    # drop it, so no inf * 0 reaches the gradient (real shares are clamped as in Gate.penalty).
    powered = torch.where(layout.mask, shares.clamp_min(TINY_SHARE), 1.0).pow(p).masked_fill(~layout.mask, 0.0)
    return powered.sum(dim=1).pow(1.0 / p) * layout.penalty_weight


def penalty_norms(gates: list[Gate], p: float, cache: dict) -> torch.Tensor:
    """Each gate's ``penalty(p)``, batched when every gate is a plain :class:`Gate` on one device
    (the penalty's ~7 ops per gate are, like the values, dispatch-bound on a GPU)."""
    plain = len(gates) > 1 and all(g.batchable for g in gates)
    device = gates[0].gamma.device if gates else None
    if not plain or any(g.gamma.device != device for g in gates):
        return torch.stack([g.penalty(p) for g in gates])
    layout = cache.get(device)
    if layout is None:
        layout = cache[device] = _Layout(gates, device)
    return batched_norms(gates, p, layout)


class LazyBatch:
    """Every gate's values of one forward, computed on the first request, not in the pre-hook:
    wrappers that gather the gate parameters in their own pre-hook (FSDP2 shards them between
    forwards) have done so by the time the first gated weight is used."""

    def __init__(self, gates: list[Gate], layout: _Layout) -> None:
        self.gates, self.layout = gates, layout
        self.rows: dict[int, torch.Tensor] | None = None

    def row(self, gate: Gate) -> torch.Tensor:
        if self.rows is None:
            self.rows = {id(g): v for g, v in zip(self.gates, batched_values(self.gates, self.layout))}
        return self.rows[id(gate)]


class _StartForward:
    """Forward pre-hook on the root: lend every gate its batched values. A plain object, so it
    survives deepcopy and pickle (the copy's hook then holds the copy's gates)."""

    def __init__(self, gates: list[Gate]) -> None:
        self.gates = gates
        self.layout: _Layout | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not self.gates or any(g.gamma.device != self.gates[0].gamma.device for g in self.gates):
            return  # gates spread over devices (model parallel): each computes its own values
        device = self.gates[0].gamma.device
        if self.layout is None or self.layout.device != device:
            self.layout = _Layout(self.gates, device)
        batch = LazyBatch(self.gates, self.layout)
        for gate in self.gates:
            gate.lend(batch)

    def __getstate__(self) -> dict:
        return {"gates": self.gates, "layout": None}  # the layout is rebuilt on first use


class _EndForward:
    """Forward hook on the root, always called: the gates compute their own values again."""

    def __init__(self, gates: list[Gate]) -> None:
        self.gates = gates

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        for gate in self.gates:
            gate.lend(None)


def batch_gates(model: nn.Module, gates: list[Gate]) -> None:
    """Compute the plain gates of ``model`` in one batch per forward (hard-concrete gates sample
    noise per call and keep their own path)."""
    plain = [g for g in gates if g.batchable]
    if len(plain) < 2:
        return
    model.register_forward_pre_hook(_StartForward(plain))
    model.register_forward_hook(_EndForward(plain), always_call=True)


def unbatch_gates(model: nn.Module) -> None:
    """Remove the hooks of :func:`batch_gates` (compaction leaves no gate behind)."""
    for hook in remove_hooks(model, _StartForward, _EndForward):
        for gate in hook.gates:
            gate.lend(None)
