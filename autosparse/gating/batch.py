"""All gate values of a model in one batched computation per forward pass.

Computed gate by gate, every gate site pays about eight small ops forward and as many backward
(softmax, scale, threshold, mask...). That is nothing next to a big convolution on a CPU, but on a
GPU each op is a kernel launch plus Python dispatch: ResNet-50's 53 sites added ~16 ms to an 18 ms
training step on an H200. Here a forward pre-hook on the model's root computes every plain
:class:`~autosparse.gating.gate.Gate` at once (their ``gamma`` padded into one matrix with ``-inf``, one
row softmax, one threshold) and lends each gate its row for the duration of that forward; a forward
hook that always runs (also on error) takes them back. Outside a forward, a gate computes its values
alone, as before, so folding, ``kept()`` and the penalty are unchanged.

The same batch hands every :class:`~autosparse.gating.gate.GateSite` its multiplier, already shaped
for broadcasting against its weight (``(1, n, 1, 1)`` for a convolution's input dim): one gather,
one view and one split for all sites of a shape, instead of a view (or a gather, for heads) per
site, forward and backward.

The values equal the per-gate ones up to float rounding of the softmax sums (a padded row sums
the same terms plus exact zeros).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from torch import nn

from autosparse.gating.gate import TINY_SHARE, Gate, GateSite, raise_on_meta, remove_hooks


class _Layout:
    """Constants of the padded layout for one set of gates (and the sites reading them) on one device.

    Row ``r`` of the padded matrix holds gate ``r``'s gammas, then ``-inf`` (0 after the softmax).
    The gammas are *scattered* into a ``-inf`` vector at fixed, distinct positions (``real_index``):
    the backward of that is a plain gather, where the backward of a gather that repeats positions
    (the padding) is an accumulating scatter, serial on a CPU (~4 ms a step for BERT-base's gates).
    Every shape is static and no boolean mask indexes anything, so ``torch.compile`` traces it
    without a graph break.

    Sites read the thresholded matrix flattened, followed by a 1 (positions no gate controls): one
    gather per group of sites, with no per-gate vector in between.
    """

    def __init__(self, gates: list[Gate], device: torch.device, sites: Sequence[GateSite] = ()) -> None:
        sizes = [g.size for g in gates]
        real = np.arange(max(sizes))[None, :] < np.asarray(sizes)[:, None]
        real_flat = np.flatnonzero(real.ravel())  # the padded position of every unit, gate by gate
        self.sizes, self.shape, self.device = sizes, real.shape, device
        self.real_index = torch.as_tensor(real_flat, device=device)
        self.real = torch.as_tensor(real, dtype=torch.float32, device=device)  # 1 at real units, 0 at padding
        self.neg_inf = torch.full((real.size,), float("-inf"), device=device)
        # Every unit's forced_off read in padded order; the padding reads an appended False.
        forced_index = np.full(real.size, len(real_flat))
        forced_index[real_flat] = np.arange(len(real_flat))
        self.forced_index = torch.as_tensor(forced_index, device=device)
        self.no = torch.zeros(1, dtype=torch.bool, device=device)
        self.one = torch.ones(1, device=device)
        self.count = torch.tensor(sizes, dtype=torch.float32, device=device)[:, None]
        self.tau = torch.tensor([g.tau for g in gates], dtype=torch.float32, device=device)[:, None]
        self.keep = 1.0 - self.tau  # threshold()'s denominator, once
        self.penalty_weight = torch.tensor([g.penalty_weight for g in gates], dtype=torch.float32, device=device)
        self.row = {id(g): r for r, g in enumerate(gates)}
        self.groups, self.slot = _site_groups(sites, self.row, real_flat[np.cumsum([0, *sizes[:-1]])], real.size,
                                              device)


def _site_groups(sites: Sequence[GateSite], row: dict[int, int], starts: np.ndarray, one: int,
                 device: torch.device) -> tuple[dict[tuple[int, int], tuple[torch.Tensor, list[int]]],
                                                dict[int, tuple[tuple[int, int], int]]]:
    """The sites grouped by the shape of their multiplier (dim, rank): per group the positions all
    its sites read (one gather) and their lengths (one split); per site its group and part."""
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    slot: dict[int, tuple[tuple[int, int], int]] = {}
    for site in sites:
        positions = _positions(site, row, starts, one)
        if positions is not None:
            group = groups.setdefault((site.dim, site.ndim), [])
            slot[id(site)] = ((site.dim, site.ndim), len(group))
            group.append(positions)
    return ({key: (torch.as_tensor(np.concatenate(parts), device=device), [len(p) for p in parts])
             for key, parts in groups.items()}, slot)


def _positions(site: GateSite, row: dict[int, int], starts: np.ndarray, one: int) -> np.ndarray | None:
    """Where each position of ``site`` reads in ``cat(padded values, [1])`` (``starts``: the padded
    position of each gate's first unit; ``one``: that of the 1); None if one of its gates is not
    in the batch."""
    if any(id(g) not in row for g in site.gates):
        return None
    local = np.concatenate([starts[row[id(g)]] + np.arange(g.size) for g in site.gates] + [np.array([one])])
    return local[site.index.cpu().numpy()]


def _padded_shares(gates: list[Gate], layout: _Layout) -> torch.Tensor:
    """Row-wise softmax of the gammas, one row per gate, zero past each gate's size."""
    # _parameters directly: nn.Module.__getattr__ would add a Python call per gate and forward
    gammas = torch.cat([cast(torch.Tensor, g._parameters["gamma"]) for g in gates])
    if gammas.dtype != torch.float32:
        gammas = gammas.float()
    padded = layout.neg_inf.index_put((layout.real_index,), gammas)  # out of place: neg_inf is kept
    return torch.softmax(padded.view(layout.shape), dim=1)


def padded_values(gates: list[Gate], layout: _Layout) -> torch.Tensor:
    """Every gate's values in the padded layout, flattened (0 at the padding)."""
    gated = torch.relu(layout.count * _padded_shares(gates, layout) - layout.tau) / layout.keep  # threshold()
    forced = torch.cat([*(cast(torch.Tensor, g._buffers["forced_off"]) for g in gates), layout.no])
    return gated.flatten().masked_fill(forced[layout.forced_index], 0.0)


def batched_values(gates: list[Gate], layout: _Layout) -> torch.Tensor:
    """``torch.cat([g.values() for g in gates])`` in one pass (the same formula, row by row)."""
    return padded_values(gates, layout)[layout.real_index]


def batched_norms(gates: list[Gate], p: float, layout: _Layout) -> torch.Tensor:
    """``torch.stack([g.penalty(p) for g in gates])`` in one pass: each row's ``||shares||_p``."""
    shares = _padded_shares(gates, layout)
    # Padding is 0 after the softmax, and d(x^p)/dx is infinite at 0 (p < 1). Clamped as real shares
    # are in Gate.penalty, its derivative is finite (<= p * 1e30) and the mask's exact 0 drops both
    # its value and its gradient.
    powered = shares.clamp_min(TINY_SHARE).pow(p) * layout.real
    return powered.sum(dim=1).pow(1.0 / p) * layout.penalty_weight


def penalty_norms(gates: list[Gate], p: float, cache: dict) -> torch.Tensor:
    """Each gate's ``penalty(p)``, batched when every gate is a plain :class:`Gate` on one device
    (the penalty's ~7 ops per gate are, like the values, dispatch-bound on a GPU)."""
    plain = len(gates) > 1 and all(g.batchable for g in gates)
    device = gates[0].gamma.device if gates else None
    if device is not None and device.type == "meta":
        raise_on_meta("autosparse.penalty", gates)
    if not plain or device is None or any(g.gamma.device != device for g in gates):
        return torch.stack([g.penalty(p) for g in gates])
    layout = cache.get(device)
    if layout is None:
        layout = cache[device] = _Layout(gates, device)
    return batched_norms(gates, p, layout)


class LazyBatch:
    """Every gate's values of one forward, computed on the first request, not in the pre-hook:
    wrappers that gather the gate parameters in their own pre-hook (FSDP2 shards them between
    forwards) have done so by the time the first gated weight is used.

    It also hands each :class:`~autosparse.gating.gate.GateSite` its multiplier, computed once per
    forward, already shaped for broadcasting against its weight.
    """

    def __init__(self, gates: list[Gate], layout: _Layout) -> None:
        self.gates, self.layout = gates, layout
        self.ext: torch.Tensor | None = None  # the padded values and a 1 (positions no gate controls)
        self.rows: tuple[torch.Tensor, ...] | None = None
        self.parts: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self.sites: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def _ext(self) -> torch.Tensor:
        if self.ext is None:
            self.ext = torch.cat([padded_values(self.gates, self.layout), self.layout.one])
        return self.ext

    def _group(self, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """The multipliers of one group of sites (one gather, one view, one split for all)."""
        if key not in self.parts:
            index, sizes = self.layout.groups[key]
            dim, ndim = key
            shape = [-1 if d == dim else 1 for d in range(ndim)]
            self.parts[key] = self._ext()[index].view(shape).split(sizes, dim=dim)
        return self.parts[key]

    def row(self, gate: Gate) -> torch.Tensor:
        if self.rows is None:  # only for a gate's values() inside a forward: sites read _group
            self.rows = self._ext()[self.layout.real_index].split(self.layout.sizes)
        return self.rows[self.layout.row[id(gate)]]

    def shaped(self, site: GateSite, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``site.shaped(dtype)`` for this forward."""
        key = (id(site), dtype)
        values = self.sites.get(key)
        if values is None:
            values = self.sites[key] = self._shaped(site, dtype)
        return values

    def _shaped(self, site: GateSite, dtype: torch.dtype) -> torch.Tensor:
        slot = self.layout.slot.get(id(site))
        if slot is None:  # a site created after batch_gates, or one with a gate outside the batch
            values = site.values_from_gates().view(site.view_shape)
        else:
            values = self._group(slot[0])[slot[1]]
        if values.device != site.index.device:
            values = values.to(site.index.device)
        return values if values.dtype == dtype else values.to(dtype)


class _StartForward:
    """Forward pre-hook on the root: lend every gate its batched values. A plain object, so it
    survives deepcopy and pickle (the copy's hook then holds the copy's gates and sites)."""

    def __init__(self, gates: list[Gate], sites: list[GateSite]) -> None:
        self.gates, self.sites = gates, sites
        self.layout: _Layout | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        device = self.gates[0].gamma.device
        if any(g.gamma.device != device for g in self.gates):
            return  # gates spread over devices (model parallel): each computes its own values
        if self.layout is None or self.layout.device != device:
            self.layout = _Layout(self.gates, device, self.sites)
        batch = LazyBatch(self.gates, self.layout)
        for gate in self.gates:
            gate.__dict__["_lent"] = batch  # Gate.lend without the call

    def __getstate__(self) -> dict:
        return {"gates": self.gates, "sites": self.sites, "layout": None}  # the layout is rebuilt on first use


class _EndForward:
    """Forward hook on the root, always called: the gates compute their own values again."""

    def __init__(self, gates: list[Gate]) -> None:
        self.gates = gates

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        for gate in self.gates:
            gate.__dict__["_lent"] = None


def batch_gates(model: nn.Module, gates: list[Gate]) -> None:
    """Compute the plain gates of ``model`` in one batch per forward (hard-concrete gates sample
    noise per call and keep their own path)."""
    plain = [g for g in gates if g.batchable]
    if len(plain) < 2:
        return
    sites = [m for m in model.modules() if isinstance(m, GateSite)]
    model.register_forward_pre_hook(_StartForward(plain, sites))
    model.register_forward_hook(_EndForward(plain), always_call=True)


def unbatch_gates(model: nn.Module) -> None:
    """Remove the hooks of :func:`batch_gates` (compaction leaves no gate behind)."""
    for hook in remove_hooks(model, _StartForward, _EndForward):
        for gate in hook.gates:
            gate.lend(None)
