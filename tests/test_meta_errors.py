"""A model gated on the meta device has shapes but no values: what needs values says so, typed.

``explain`` works on the shapes (sizes, no kept counts); gate values, the penalty, a training
step and compaction raise :class:`NotMaterializedError` naming ``autosparse.io.materialize``, and
all of them work once the model is materialised.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import autosparse
from autosparse.errors import AutosparseWarning, NotMaterializedError
from autosparse.io.materialize import materialize

POLICY = {"rules": [{"granularity": "channel"}], "target": {"flops": 0.6}}


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()


def _meta_gated() -> tuple[nn.Module, nn.Module]:
    """(gated on meta, the dense model with real weights of the same architecture)."""
    torch.manual_seed(0)
    dense = _net()
    with torch.device("meta"):
        meta = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutosparseWarning)  # the dry run is skipped on meta
        gated = autosparse.sparsify(meta, POLICY, example_inputs=(torch.randn(1, 3, 8, 8),))
    return gated, dense


NEEDS_VALUES = {
    "penalty": lambda net: autosparse.penalty(net),
    "step": lambda net: autosparse.training.step(net),
    "kept": lambda net: [g.kept() for g in autosparse.gates(net).values()],
    "compact": lambda net: autosparse.compact(net),
    "compact_inplace": lambda net: autosparse.compact(net, inplace=True),
}


@pytest.mark.parametrize("what", sorted(NEEDS_VALUES))
def test_what_needs_values_raises_a_typed_error_naming_materialize(what):
    net, _ = _meta_gated()
    with pytest.raises(NotMaterializedError, match=r"materialise first with autosparse\.io\.materialize"):
        NEEDS_VALUES[what](net)
    assert isinstance(NotMaterializedError("x"), RuntimeError)  # catchable as the built-in, too


def test_explain_works_on_shapes_then_counts_after_materialize():
    net, dense = _meta_gated()
    report = autosparse.explain(net)
    gated = [g for g in report.groups if g.status == "gated"]
    assert gated and all(g.kept is None and g.open is None for g in gated)
    assert "units" in str(report)
    materialize(net, dense.state_dict())
    report = autosparse.explain(net)
    assert all(g.kept == g.units for g in report.groups if g.status == "gated")  # fresh gates: all open


def test_penalty_and_step_work_after_materialize():
    net, dense = _meta_gated()
    materialize(net, dense.state_dict())
    loss = net(torch.randn(2, 3, 8, 8)).pow(2).mean() + autosparse.penalty(net)
    loss.backward()
    autosparse.training.step(net)
    assert all(g.gamma.grad is not None for g in autosparse.gates(net).values())
