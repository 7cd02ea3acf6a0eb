"""Values a forward computes and drops: they must stay shape-consistent, but their values do not count.

``out, _ = attn(x, x, x)`` drops the head-averaged attention weights; a reduction over channels
whose result is discarded must not pin those channels. A result that feeds an in-place op on a
live tensor is not discarded.
"""

from __future__ import annotations

import torch
from torch import nn

import autosparse
from tests.zoo import CHANNEL


class DiscardsAStatistic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        _energy = y.square().mean(dim=1)  # computed for nothing (a debugging leftover)
        return self.b(torch.relu(y))


class MutatesWithAStatistic(DiscardsAStatistic):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        out = self.b(torch.relu(y))
        out.add_(y.mean(dim=1, keepdim=True))  # no user reads the add_, but it changes `out`
        return out


def test_a_discarded_reduction_leaves_the_channels_prunable():
    torch.manual_seed(0)
    model, x = DiscardsAStatistic().eval(), torch.randn(2, 3, 8, 8)
    net = autosparse.sparsify(model, CHANNEL, example_inputs=(x,))
    assert set(autosparse.gates(net)) == {"a"}
    autosparse.gates(net)["a"].zero_([0, 3, 5])
    small = autosparse.compact(net)  # the dead mean still runs, on 5 channels
    assert small.a.out_channels == 5
    with torch.no_grad():
        assert torch.allclose(net(x), small(x), atol=1e-6)


def test_a_reduction_feeding_an_in_place_op_still_pins_the_channels():
    report = autosparse.explain(MutatesWithAStatistic().eval(), example_inputs=(torch.randn(2, 3, 8, 8),))
    assert not report.groups
    assert any("reduction" in why for _, why in report.unprunable)
