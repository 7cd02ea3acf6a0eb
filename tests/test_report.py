"""report() against FLOPs and parameter counts computed by hand; GateLogger and the plots."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import autosparse
from autosparse.errors import ExampleInputsError
from autosparse.reporting import report
from autosparse.reporting.logger import GateLogger


def _sparsify(model: nn.Module, x: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return autosparse.sparsify(model.eval(), "configs/channels.yaml", example_inputs=(x,))


def _conv_net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    return model, torch.randn(1, 3, 8, 8)


def conv_flops(cin: int, cout: int, k: int = 3, pixels: int = 64) -> int:
    return 2 * cin * cout * k * k * pixels  # one multiply-add = 2 FLOPs per weight and output pixel


def test_conv_linear_numbers_match_hand_computation() -> None:
    model, x = _conv_net()
    net = _sparsify(model, x)
    first, second = autosparse.gates(net).values()  # conv "0" (8 channels), conv "2" (4 channels)
    first.zero_([0, 1])
    second.zero_([3])
    result = report(net, latency=False)
    total = result.total
    assert total.params == (3 * 8 * 9 + 8 + 8 * 4 * 9 + 4 + 4 * 10 + 10, 3 * 6 * 9 + 6 + 6 * 3 * 9 + 3 + 3 * 10 + 10)
    assert total.flops == (conv_flops(3, 8) + conv_flops(8, 4) + 2 * 4 * 10,
                           conv_flops(3, 6) + conv_flops(6, 3) + 2 * 3 * 10)
    assert total.size_bytes == (4 * total.params[0], 4 * total.params[1])
    assert total.latency_ms is None
    rows = {row.name: row for row in result.groups}
    assert rows["0"].units == (8, 6)
    assert rows["0"].params == (3 * 8 * 9 + 8 + 8 * 4 * 9, 3 * 6 * 9 + 6 + 6 * 3 * 9)  # conv 0 + conv 2's inputs
    assert rows["0"].flops == (conv_flops(3, 8) + conv_flops(8, 4), conv_flops(3, 6) + conv_flops(6, 3))
    assert rows["2"].units == (4, 3)
    assert rows["2"].flops == (conv_flops(8, 4) + 2 * 4 * 10, conv_flops(6, 3) + 2 * 3 * 10)


def test_linear_model_and_compacted_comparison() -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), torch.randn(5, 16)
    net = _sparsify(model, x)
    autosparse.gates(net)["0"].zero_(range(12))
    result = report(net, latency=True, repeats=2)
    assert result.total.params == (16 * 32 + 32 + 32 * 8 + 8, 16 * 20 + 20 + 20 * 8 + 8)
    assert result.total.flops == (2 * 5 * (16 * 32 + 32 * 8), 2 * 5 * (16 * 20 + 20 * 8))
    assert all(ms > 0 for ms in result.total.latency_ms)
    # The same totals from a compacted model compared with the dense one.
    small = autosparse.compact(net)
    again = report(small, before=model, example_inputs=(x,), latency=False)
    assert (again.total.params, again.total.flops) == (result.total.params, result.total.flops)
    assert [(row.name, row.units, row.flops) for row in again.groups] == [("0", (32, 20), None)]


def test_text_json_and_plot(tmp_path: Path) -> None:
    model, x = _conv_net()
    net = _sparsify(model, x)
    next(iter(autosparse.gates(net).values())).zero_([0, 1])
    result = report(net, latency=False)
    text = str(result)
    assert text.splitlines()[0].split() == ["units", "params", "FLOPs", "size", "latency"]
    assert "8 -> 6 (0.75x)" in text and "64.51K -> 48.38K" in text
    data = json.loads(result.to_json())
    after = conv_flops(3, 6) + conv_flops(6, 4) + 2 * 4 * 10
    assert data["total"]["flops"] == {"before": 64592, "after": after, "ratio": pytest.approx(after / 64592)}
    pytest.importorskip("matplotlib")
    png = result.plot(tmp_path / "widths.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_needs_inputs_and_a_baseline() -> None:
    with pytest.raises(ValueError, match="needs before="):
        report(nn.Linear(2, 2))
    with pytest.raises(ExampleInputsError, match="needs example_inputs"):
        report(nn.Linear(2, 2), before=nn.Linear(2, 2))


def test_gate_logger_records_every_n_steps(tmp_path: Path) -> None:
    model, x = _conv_net()
    net = _sparsify(model, x)
    seen: list[int] = []
    log = GateLogger(net, every=2, sink=lambda step, fractions: seen.append(step))
    for step in range(5):
        if step == 3:
            autosparse.gates(net)["0"].zero_([0, 1, 2, 3])
        log.step()
    assert seen == [0, 2, 4]
    assert log.history["0"] == [(0, 1.0), (2, 1.0), (4, 0.5)]
    assert log.history["2"] == [(0, 1.0), (2, 1.0), (4, 1.0)]
    assert json.loads(log.save(tmp_path / "kept.json").read_text())["0"][-1] == [4, 0.5]
    with pytest.raises(ValueError, match="every must be >= 1"):
        GateLogger(net, every=0)
    with pytest.raises(autosparse.NotSparsifiedError):
        GateLogger(model)
    pytest.importorskip("matplotlib")
    assert log.plot(tmp_path / "kept.png").stat().st_size > 1000


def test_residual_branch_groups_count_whole_branches() -> None:
    import copy

    from tests.test_io import llama_layers

    net, _ = llama_layers()
    net = copy.deepcopy(net)
    for gate in autosparse.gates(net).values():
        gate.zero_([0])  # both branches of layer 0 go, so the layer itself is dropped
    rows = {row.name: row for row in report(net, latency=False).groups}
    tokens, mlp, attn = 2 * 8, 3 * 32 * 64, 32 * 32 + 2 * 32 * 16 + 32 * 32  # per layer; k, v: 2 kv heads of 8
    scores = 2 * 2 * (2 * 4 * 8 * 8 * 8)  # q @ k^T and attn @ v, batch 2, 4 heads, 8 x 8 positions, head dim 8
    assert rows["LlamaMLP branches"].params == (2 * mlp, mlp)
    assert rows["LlamaMLP branches"].flops == (2 * 2 * tokens * mlp, 2 * tokens * mlp)
    assert rows["LlamaAttention branches"].params == (2 * attn, attn)
    assert rows["LlamaAttention branches"].flops == (2 * (2 * tokens * attn + scores), 2 * tokens * attn + scores)
