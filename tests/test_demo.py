"""The demo (``autosparse demo --quick``), the datasets it uses, and the quality benchmark's smoke run."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autosparse import demo
from autosparse.demo.data import load, load_digits, load_mnist1d


def test_quick_demo_trains_compacts_and_lands_on_budget(capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    assert demo.main(["--quick", "--no-progress", "--budget", "0.4"]) == 0
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "learned widths" in out and "latency" in out and "accuracy" in out
    widths = re.findall(r"^(\S+ \(Conv2d\))\s+(\d+)\s+(\d+)\s+\d+%$", out, flags=re.M)
    assert [int(before) for _, before, _ in widths] == [16, 32, 32]
    assert all(1 <= int(after) <= int(before) for _, before, after in widths)
    landed = float(re.search(r"FLOPs landed at ([0-9.]+) of dense", out).group(1))
    assert 0.35 <= landed <= 0.40 + 1e-9 and "within tolerance" in out
    before, after = re.search(r"^accuracy\s+([0-9.]+)%\s+([0-9.]+)%", out, flags=re.M).groups()
    assert before == after and float(after) > 90.0  # compaction is exact; the model learned the task
    assert seconds < 30 * 3  # < 30 s on an idle 2-core CPU; generous for shared CI machines


@pytest.mark.parametrize(
    ("argv", "needle"), [(["--budget", "1.5"], "target.flops"), (["--budget", "0"], "target.flops")]
)
def test_demo_bad_budget_is_a_policy_error(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main(["--quick", "--no-progress", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_demo_rejects_bad_epochs() -> None:
    with pytest.raises(SystemExit):
        demo.main(["--epochs", "0"])


def test_digits_split_is_fixed_and_stratified() -> None:
    data = load_digits()
    assert data.x_train.shape == (1347, 1, 8, 8) and data.x_test.shape == (450, 1, 8, 8)
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1.0
    assert torch.equal(load_digits().y_test, data.y_test)
    counts = torch.bincount(data.y_test, minlength=10)
    assert int(counts.min()) >= 43 and int(counts.max()) <= 46


def test_mnist1d_is_generated_locally_and_leaves_global_rngs_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import requests

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("mnist1d must not download")

    monkeypatch.setattr(requests, "get", no_network)
    load_mnist1d.cache_clear()
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    data = load_mnist1d()
    assert np.random.rand() == expected
    assert data.x_train.shape == (4000, 1, 40) and data.x_test.shape == (1000, 1, 40)
    assert sorted(torch.unique(data.y_train).tolist()) == list(range(10))
    assert load("mnist1d") is data
    with pytest.raises(ValueError, match="unknown dataset"):
        load("cifar")


def test_quality_benchmark_smoke(tmp_path: Path) -> None:
    from benchmarks import quality

    assert quality.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "quality_smoke.json").read_text())
    assert report["smoke"] is True
    assert {"autosparse", "torch", "git_commit", "threads", "date"} <= set(report["stamp"])
    methods = {row["method"]: row for row in report["summary"]}
    assert set(methods) == set(quality.METHODS)
    for name, row in methods.items():
        budget = 1.0 if name == "dense" else 0.3
        assert row["flops_fraction"] <= budget + 1e-9 and row["latency_ms"] > 0 and 0 <= row["accuracy"] <= 1
    assert methods["dense"]["flops_fraction"] == 1.0
    assert (tmp_path / "quality_smoke_digits.png").stat().st_size > 1000
    assert "| digits | 30% | autosparse |" in (tmp_path / "quality_smoke.md").read_text()
