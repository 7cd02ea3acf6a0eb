"""Latency budgets (target.latency): policy, the measured latency table, its cache, the cost model, prune.

Nothing here asserts a speed: the table's timer is replaced by a deterministic fake (latency = a
constant per call plus one proportional to the weight's size) wherever a number is asserted, so the
tests are exact and fast. Real timing runs only where the result is checked for sanity (positive,
finite); speed itself is measured by benchmarks/bench_latency_target.py.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import autosparse
from autosparse.errors import AutosparseWarning, PolicyError
from autosparse.measure import latency_report
from autosparse.policy import load_policy
from autosparse.pruning import prune, selection_of
from autosparse.state import get_state
from autosparse.training import latency, latency_timing
from autosparse.training.budget import build_cost_model
from autosparse.training.latency import Curve, latency_table

CHANNELS = {"rules": [{"granularity": "channel"}]}


class Net(nn.Module):
    """conv-bn-relu x 2 -> depthwise -> pool -> linear: dense, depthwise, norm and follower modules."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.act, self.pool, self.fc = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.b1(self.c1(x)))
        x = self.act(self.dw(self.act(self.b2(self.c2(x)))))
        return self.fc(self.pool(x).flatten(1))


def _net(target: float | None = None) -> nn.Module:
    torch.manual_seed(0)
    policy = {**CHANNELS, "target": {"latency": target}} if target else CHANNELS
    return autosparse.sparsify(Net().eval(), policy, example_inputs=(torch.randn(2, 3, 8, 8),))


class FakeTiming:
    """Deterministic 'timings': 0.01 ms per call plus 1e-4 ms per weight element; 0.05 ms besides."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.order, self.best, self.total = model, [], {}, 0.0

    def run(self, inputs: tuple, kwargs: dict, timing: Any) -> None:
        calls: list[tuple[str, int]] = []
        handles = [m.register_forward_pre_hook(lambda mod, args, n=n: calls.append((n, 0)))
                   for n, m in self.model.named_modules() if next(m.children(), None) is None]
        self.model(*inputs, **kwargs)
        for handle in handles:
            handle.remove()
        modules = dict(self.model.named_modules())
        self.order = calls
        self.best = {key: 0.01 + 1e-4 * getattr(getattr(modules[key[0]], "weight", None), "numel", lambda: 0)()
                     for key in calls}
        self.total = sum(self.best.values()) + 0.05

    def calls(self, overhead: float) -> dict:
        return dict(self.best)


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AUTOSPARSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "latency.json"


@pytest.fixture()
def fake_timer(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    monkeypatch.setattr(latency_timing, "_Timing", FakeTiming)
    monkeypatch.setattr(latency_timing, "_hook_overhead", lambda now, sync: 0.0)


# ----------------------------------------------------------------------------- policy


def test_policy_accepts_a_latency_target() -> None:
    policy = load_policy({**CHANNELS, "target": {"latency": 0.5, "tolerance": 0.02}})
    assert policy.target.metric == "latency" and policy.target.latency == 0.5


@pytest.mark.parametrize(("target", "key", "says"), [
    ({"latency": 1.5}, "target.latency", "(0, 1)"),
    ({"latency": 0}, "target.latency", "(0, 1)"),
    ({"latency": "fast"}, "target.latency", "a fraction"),
    ({"latency": True}, "target.latency", ""),
    ({"flops": 0.5, "latency": 0.5}, "target.latency", "at most one"),
    ({"params": 0.5, "latency": 0.5}, "target.latency", "at most one"),
    ({"latency": 0.5, "latancy": 0.5}, "latancy", ""),
])
def test_policy_rejects_bad_latency_targets(target: dict, key: str, says: str) -> None:
    with pytest.raises(PolicyError, match=key) as raised:
        load_policy({**CHANNELS, "target": target})
    assert says in str(raised.value)


# ----------------------------------------------------------------------------- curve and cost model


def test_curve_is_piecewise_linear_monotone_and_differentiable() -> None:
    curve = Curve.measured([1.0, 0.75, 0.5, 0.25], [10.0, 8.0, 8.5, 3.0])  # 0.5 measured slower than 0.75
    assert curve.ys[-1] == 1.0 and list(curve.ys) == sorted(curve.ys)
    assert curve.ys == pytest.approx((0.3, 0.825, 0.825, 1.0))  # the slower narrower point pooled
    p = torch.tensor(0.875, dtype=torch.float64, requires_grad=True)
    value = curve(p)
    value.backward()
    assert float(value.detach()) == pytest.approx(0.9125) and float(p.grad) == pytest.approx(0.7)
    assert float(curve(torch.tensor(0.0))) >= 0.0  # extrapolated below the narrowest width, never negative


def test_latency_cost_is_one_at_full_width_and_monotone(fake_timer: None) -> None:
    net = _net()
    cost = build_cost_model(net, get_state(net), "latency")
    full = torch.ones(cost.n_units, dtype=torch.float64)
    assert cost.fraction(full) == pytest.approx(1.0, abs=1e-12)
    fractions = [cost.fraction(full * s) for s in (1.0, 0.8, 0.6, 0.4, 0.2)]
    assert all(a >= b for a, b in zip(fractions, fractions[1:])) and fractions[-1] < 1.0
    # removing any one unit never costs latency; the gradient is what the selection prices units by
    assert bool((cost.unit_costs(full) >= 0).all())


def test_training_builds_a_latency_controller(fake_timer: None) -> None:
    net = _net(target=0.6)
    assert autosparse.training.cost_fraction(net, "latency") == pytest.approx(1.0)
    state = autosparse.training.training_state(net)
    assert state.controller is not None and state.controller.target == 0.6


def test_an_unreachable_latency_target_names_the_key(fake_timer: None) -> None:
    with pytest.raises(PolicyError, match="target.latency"):
        prune(Net().eval(), {"rules": [{"granularity": "channel", "min_keep": 0.9}], "target": {"latency": 0.2}},
              example_inputs=(torch.randn(2, 3, 8, 8),))


# ----------------------------------------------------------------------------- cache


def test_cache_round_trip_measures_nothing_the_second_time(fake_timer: None, cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    net = _net()
    first = latency_table(net)
    assert cache.exists() and not first.cached
    assert [p.name for p in cache.parent.iterdir()] == ["latency.json"]  # the temporary file was renamed
    entries = json.loads(cache.read_text())["entries"]
    assert len(entries) == 1 and next(iter(entries)).startswith("cpu:")

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("timed again despite the cache")

    monkeypatch.setattr(latency_timing, "_Timing", boom)
    second = latency_table(net)
    assert second.cached and second.entries == first.entries and second.dense_ms == first.dense_ms


@pytest.mark.parametrize("garbage", ["{not json", '{"version": 99, "entries": {}}', "[]", "\udcff"])
def test_a_corrupted_cache_is_ignored_with_a_warning(fake_timer: None, cache: Path, garbage: str) -> None:
    cache.parent.mkdir(parents=True)
    cache.write_text(garbage, encoding="utf-8", errors="surrogateescape")
    with pytest.warns(AutosparseWarning, match="latency cache .* ignored"):
        table = latency_table(_net())
    assert table.dense_ms > 0 and not table.cached
    assert json.loads(cache.read_text())["version"] == 1  # rewritten whole


def test_a_corrupted_entry_is_measured_again(fake_timer: None, cache: Path) -> None:
    net = _net()
    latency_table(net)
    data = json.loads(cache.read_text())
    key = next(iter(data["entries"]))
    data["entries"][key]["calls"][0][2] = ["x"]
    cache.write_text(json.dumps(data))
    assert not latency_table(net).cached


def test_the_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOSPARSE_CACHE", str(tmp_path))
    assert latency.cache_path() == tmp_path / "latency.json"
    monkeypatch.delenv("AUTOSPARSE_CACHE")
    assert latency.cache_path() == Path(os.path.expanduser("~")) / ".cache" / "autosparse" / "latency.json"


# ----------------------------------------------------------------------------- prune


@pytest.mark.parametrize("target", [0.8, 0.6])
def test_prune_lands_the_predicted_latency_on_target(fake_timer: None, target: float) -> None:
    x = (torch.randn(2, 3, 8, 8),)
    small = prune(Net().eval(), {**CHANNELS, "target": {"latency": target}}, example_inputs=x)
    selection = selection_of(small)
    assert selection is not None and selection.metric == "latency"
    assert target - 0.05 <= selection.predicted <= target + 1e-9
    assert selection.removed  # something was cut, and compaction verified it
    assert small(*x).shape == (2, 10)


def test_the_table_restores_the_gates_it_zeroed(fake_timer: None) -> None:
    net = _net()
    latency_table(net)
    assert not any(bool(g.forced_off.any()) for g in autosparse.gates(net).values())


# ----------------------------------------------------------------------------- real timing, sanity only


def test_real_table_and_report_are_sane(cache: Path) -> None:
    net = _net()
    table = latency_table(net, widths=(0.5,))
    assert math.isfinite(table.dense_ms) and table.dense_ms > 0 and table.entries
    assert all(e.ms >= 0 and e.curve.ys[-1] == 1.0 for e in table.entries)
    assert {e.follows for e in table.entries if e.name == "act"} <= {"b1", "dw", "b2"}
    dense, small = Net().eval(), nn.Sequential(nn.Flatten(), nn.Linear(192, 10))
    report = latency_report(dense, small, (torch.randn(2, 3, 8, 8),), predicted=0.5, repeats=3, warmup=1)
    assert report.pairs == 3 and report.predicted == 0.5
    assert report.ratio > 0 and report.ratio_min > 0 and report.dense_ms > 0
    assert set(report.to_dict()) >= {"ratio", "ratio_min", "cpu_ratio", "predicted"}
