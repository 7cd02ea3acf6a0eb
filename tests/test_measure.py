"""Tests of autosparse.measure and autosparse.plots: exact FLOP counts, state restoration, plots."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from autosparse.errors import ExampleInputsError
from autosparse.measure import (
    LatencyStats,
    Summary,
    compare,
    count_flops,
    count_params,
    flops_by_module,
    measure_latency,
    model_size_bytes,
    peak_rss_mb,
    summarize,
    track_peak_rss,
)

CONV_FLOPS = 2 * 8 * 3 * 3 * 3 * 16 * 16  # 2 * C_out * C_in * k * k * H_out * W_out
HEAD_FLOPS = 2 * 1 * (8 * 16 * 16) * 10  # 2 * batch * in_features * out_features


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 16 * 16, 10))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x)))) * scale


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 50, bias=False)
        self.proj.weight = self.embed.weight  # tied, as in language models


def _image() -> tuple[torch.Tensor]:
    return (torch.randn(1, 3, 16, 16),)


@pytest.mark.parametrize(
    ("module", "inputs", "expected"),
    [
        (nn.Conv2d(3, 8, 3, padding=1), (torch.randn(1, 3, 16, 16),), CONV_FLOPS),
        (nn.Linear(10, 20), (torch.randn(4, 10),), 2 * 4 * 10 * 20),
        (ConvNet(), (torch.randn(1, 3, 16, 16),), CONV_FLOPS + HEAD_FLOPS),
    ],
    ids=["conv2d", "linear", "conv+linear"],
)
def test_count_flops_matches_hand_count(module: nn.Module, inputs: tuple, expected: int) -> None:
    assert count_flops(module, inputs) == expected


def test_count_flops_passes_keyword_arguments() -> None:
    assert count_flops(ConvNet(), _image(), {"scale": 2.0}) == CONV_FLOPS + HEAD_FLOPS


def test_flops_by_module_uses_module_names() -> None:
    counts = flops_by_module(ConvNet(), _image())
    assert counts == {
        "": CONV_FLOPS + HEAD_FLOPS,
        "conv": CONV_FLOPS,
        "head": HEAD_FLOPS,
        "head.1": HEAD_FLOPS,
    }
    assert list(counts) == ["", "conv", "head", "head.1"]  # named_modules order


@pytest.mark.parametrize("bad", [torch.randn(1, 3, 16, 16), [torch.randn(1, 3, 16, 16)]])
def test_example_inputs_must_be_a_tuple(bad: object) -> None:
    with pytest.raises(ExampleInputsError, match=r"wrap a single tensor as \(x,\)"):
        count_flops(ConvNet(), bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # ExampleInputsError is a ValueError too
        measure_latency(ConvNet(), bad)  # type: ignore[arg-type]


def test_count_params_counts_tied_parameter_once() -> None:
    model = TiedNet()
    assert count_params(model) == 50 * 16
    assert model_size_bytes(model) == 50 * 16 * 4


def test_count_params_and_size_include_frozen_parameters_and_buffers() -> None:
    model = ConvNet()
    model.conv.requires_grad_(False)
    params = (8 * 3 * 3 * 3 + 8) + 2 * 8 + (8 * 16 * 16 * 10 + 10)
    assert count_params(model) == params
    buffers_bytes = 2 * 8 * 4 + 8  # running mean and var (float32), num_batches_tracked (int64)
    assert model_size_bytes(model) == params * 4 + buffers_bytes


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


@pytest.mark.parametrize(
    "measure",
    [
        lambda model: count_flops(model, _image()),
        lambda model: flops_by_module(model, _image()),
        lambda model: measure_latency(model, _image(), repeats=2, warmup=1),
        lambda model: summarize(model, _image()),
    ],
    ids=["count_flops", "flops_by_module", "measure_latency", "summarize"],
)
def test_measuring_restores_modes_and_keeps_running_stats(measure) -> None:
    model = ConvNet().train()
    model.head.eval()  # mixed flags must come back exactly, not as one model-wide flag
    modes = _modes(model)
    stats = {name: buf.clone() for name, buf in model.bn.named_buffers()}
    measure(model)
    assert _modes(model) == modes
    for name, buf in model.bn.named_buffers():
        assert torch.equal(buf, stats[name]), name


def test_modes_restored_when_the_forward_raises() -> None:
    model = ConvNet().train()
    with pytest.raises(RuntimeError):
        count_flops(model, (torch.randn(1, 5, 16, 16),))  # wrong channel count
    assert all(_modes(model).values())


def test_latency_stats_are_positive_and_ordered() -> None:
    threads = torch.get_num_threads()
    stats = measure_latency(ConvNet(), _image(), repeats=7, warmup=2, threads=1)
    assert isinstance(stats, LatencyStats)
    assert stats.repeats == 7
    assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms
    assert torch.get_num_threads() == threads


def test_latency_with_a_single_repeat() -> None:
    stats = measure_latency(nn.Linear(4, 4), (torch.randn(2, 4),), repeats=1, warmup=0)
    assert stats.min_ms == stats.median_ms == stats.p90_ms > 0


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"warmup": -1}, {"threads": 0}])
def test_latency_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        measure_latency(nn.Linear(4, 4), (torch.randn(2, 4),), **kwargs)


def test_peak_rss_and_tracker_see_a_large_allocation() -> None:
    assert peak_rss_mb() > 0
    with track_peak_rss() as rss:
        assert rss.delta_mb is None
        block = torch.ones(2**24)  # 64 MiB, written, so resident
        time.sleep(0.05)  # let the sampler see it: the block frees it before exiting
        del block
    assert rss.delta_mb is not None
    assert rss.delta_mb >= 40
    assert rss.peak_mb >= rss.start_mb + rss.delta_mb - 1e-9


def test_summary_compare_and_json() -> None:
    model = ConvNet()
    before = summarize(model, _image(), latency=True)
    assert before.flops == CONV_FLOPS + HEAD_FLOPS
    assert before.params == count_params(model)
    assert before.latency_ms is not None and before.latency_ms > 0
    after = Summary(params=before.params // 2, flops=before.flops // 4, size_bytes=before.size_bytes // 2)
    table = compare(before, after)
    lines = table.splitlines()
    assert lines[0].split() == ["before", "after", "ratio"]
    assert [line.split()[0] for line in lines[1:]] == ["params", "FLOPs", "size", "latency"]
    assert lines[2].endswith("0.25x")
    assert lines[4].endswith("-")  # no latency after, so no ratio
    assert len({len(line) for line in lines[1:4]}) == 1  # right-aligned columns
    assert json.loads(json.dumps(after.to_dict())) == {
        "params": after.params,
        "flops": after.flops,
        "size_bytes": after.size_bytes,
        "latency_ms": None,
    }


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plots():
    pytest.importorskip("matplotlib")
    from autosparse.reporting import plots

    return plots


def _draw(plots, kind: str, path):
    if kind == "widths":
        names = [f"backbone.layer{i}.conv" for i in range(30)]
        return plots.plot_widths(dict.fromkeys(names, 64), {n: 10 + i for i, n in enumerate(names)}, path)
    if kind == "kept_fraction":
        history = {f"group{g}": [(s, 1.0 - g * s / 4000) for s in range(0, 200, 10)] for g in range(20)}
        return plots.plot_kept_fraction(history, path)
    results = [
        {"method": m, "flops_fraction": f, "accuracy": a}
        for m in ("autosparse", "magnitude")
        for f, a in ((1.0, 0.95), (0.25, 0.80), (0.5, 0.90))
    ]
    return plots.plot_accuracy_vs_flops(results, path)


@pytest.mark.parametrize("kind", ["widths", "kept_fraction", "accuracy_vs_flops"])
def test_plots_write_png_atomically(tmp_path, kind: str) -> None:
    plots = _plots()
    target = tmp_path / "out" / f"{kind}.png"
    assert _draw(plots, kind, target) == target
    data = target.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1024
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp file left behind
    _draw(plots, kind, target)  # overwriting works too
    assert [p.name for p in target.parent.iterdir()] == [target.name]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p, path: p.plot_widths({}, {}, path), "both empty"),
        (lambda p, path: p.plot_kept_fraction({"a": []}, path), "at least one group"),
        (lambda p, path: p.plot_accuracy_vs_flops([], path), "at least one result"),
        (lambda p, path: p.plot_accuracy_vs_flops([{"method": "x"}], path), r"results\[0\]"),
    ],
)
def test_plots_reject_bad_input_and_leave_nothing(tmp_path, call, message: str) -> None:
    plots = _plots()
    with pytest.raises(ValueError, match=message):
        call(plots, tmp_path / "bad.png")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_no_temp_file(tmp_path) -> None:
    plots = _plots()
    with pytest.raises(ValueError):  # matplotlib rejects the unknown format while saving
        plots.plot_widths({"a": 2}, {"a": 1}, tmp_path / "plot.not-a-format")
    assert list(tmp_path.iterdir()) == []
