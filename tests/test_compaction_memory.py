"""Copy compaction must not hold two full models: the weights it slices or folds are never copied
at full size, no full-size folded weight is built, and the gated model stays untouched and shares
no storage with the compacted one. Checked on tensor identities and op shapes, not on timings."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import autosparse
from autosparse.compaction.record import record_of
from tests.zoo import CHANNEL, get_case


def _net() -> tuple[nn.Module, tuple]:
    model, inputs = get_case("resnet_bottleneck").build()
    net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    for gate in autosparse.gates(net).values():  # keep 5: no sliced shape can equal a full one
        gate.zero_(list(range(5, gate.size)))
    return net, inputs


def _sliced(net: nn.Module) -> dict[str, torch.Tensor]:
    """The gated model's tensors that compaction slices, by name (a gated weight: its original)."""
    out = {}
    for name in record_of(autosparse.compact(copy.deepcopy(net), verify=False)).kept:
        owner_name, _, attr = name.rpartition(".")
        owner = net.get_submodule(owner_name)
        chains = getattr(owner, "parametrizations", None)
        out[name] = chains[attr].original if chains is not None and attr in chains else getattr(owner, attr)
    return out


def test_copy_does_not_deepcopy_the_tensors_it_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    net, _ = _net()
    sliced = _sliced(net)
    assert len(sliced) > 10
    copied: list[int] = []
    for cls in (nn.Parameter, torch.Tensor):
        original = cls.__deepcopy__

        def spy(self, memo, original=original):
            copied.append(id(self))
            return original(self, memo)

        monkeypatch.setattr(cls, "__deepcopy__", spy)
    autosparse.compact(net)
    assert copied, "the spy saw no deepcopy at all"
    assert not {id(t) for t in sliced.values()} & set(copied)


def test_no_full_size_weight_is_built_while_compacting() -> None:
    net, _ = _net()
    full = {tuple(t.shape) for t in _sliced(net).values() if t.ndim > 1}
    others = {tuple(t.shape) for t in net.parameters() if t.ndim > 1} - full  # not sliced: legit copies
    shapes: list[tuple[int, ...]] = []

    class Shapes(TorchDispatchMode):  # the shape of every tensor an op allocates (not views, not set_)
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in seen:
                shapes.append(tuple(out.shape))
            return out

    with Shapes():
        autosparse.compact(net, verify=False)
    assert shapes
    assert not (set(shapes) & (full - others))


def test_copy_leaves_the_gated_model_unchanged_and_unshared() -> None:
    net, inputs = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = net(*inputs)
    small = autosparse.compact(net)
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(net(*inputs), out, rtol=0, atol=0)
    mine = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()] if t.numel()}
    assert not any(t.untyped_storage().data_ptr() in mine for t in [*small.parameters(), *small.buffers()])
    with torch.no_grad():
        for p in small.parameters():
            p.mul_(0.0)  # writing to the compacted model must not reach the gated one
    torch.testing.assert_close(net(*inputs), out, rtol=0, atol=0)


def test_inplace_compaction_matches_copy() -> None:
    net, inputs = _net()
    small = autosparse.compact(net)
    net.eval()
    expected = net(*inputs)
    autosparse.compact(net, inplace=True)
    torch.testing.assert_close(net(*inputs), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(small(*inputs), expected, rtol=1e-5, atol=1e-6)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
