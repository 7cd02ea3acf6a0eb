"""The demo (``autosparse demo --quick``), the datasets it uses, and the quality benchmark's smoke run."""

from __future__ import annotations

import importlib
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autosparse import demo
from autosparse.demo.data import load, load_digits, load_mnist1d

run_module = importlib.import_module("autosparse.demo.run")  # the package's `run` is the function


def test_quick_demo_trains_compacts_and_lands_on_budget(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    start = time.perf_counter()
    assert demo.main(["--quick", "--no-progress", "--budget", "0.4", "--out", str(tmp_path / "out")]) == 0
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "learned widths" in out and "latency" in out and "accuracy" in out
    widths = re.findall(r"^(block\d\.conv) \(Conv2d, (\d+) ch\)\s+(\d+)\s+(\d+)\s+\d+%$", out, flags=re.M)
    assert [name for name, *_ in widths] == ["block1.conv", "block2.conv", "block3.conv"]
    assert [int(before) for _, label, before, _ in widths] == [16, 32, 32]
    assert all(label == before and 1 <= int(after) <= int(before) for _, label, before, after in widths)
    landed = float(re.search(r"FLOPs landed at ([0-9.]+) of dense", out).group(1))
    assert 0.35 <= landed <= 0.40 + 1e-9 and "within tolerance" in out
    dense, gated, compacted = re.search(
        r"^accuracy  dense baseline ([0-9.]+)%  gated ([0-9.]+)%  compacted ([0-9.]+)%", out, flags=re.M).groups()
    assert gated == compacted and float(compacted) > 90.0  # compaction is exact; the model learned the task
    assert float(dense) > 95.0  # the same recipe without gates
    assert seconds < 30 * 3  # < 30 s on an idle 2-core CPU; generous for shared CI machines
    # --out: the numbers as JSON and the plots, in a directory that appears only when complete.
    written = tmp_path / "out"
    assert sorted(p.name for p in written.iterdir()) == ["kept.json", "kept.png", "report.json", "widths.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left beside it
    report = json.loads((written / "report.json").read_text())
    assert f"{report['accuracy_dense']:.2%}" == f"{dense}%" and report["widths"]["block1.conv"]["before"] == 16
    kept = json.loads((written / "kept.json").read_text())
    assert set(kept) == {"block1.conv", "block2.conv", "block3.conv"}
    assert kept["block1.conv"][0] == [0, 1.0] and len(kept["block1.conv"]) >= 10  # every 10 of 8 x 22 steps
    assert all((written / name).stat().st_size > 1000 for name in ("widths.png", "kept.png"))


def test_demo_refuses_an_existing_out_dir_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--quick", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and time.perf_counter() - start < 5
    assert "already exists; choose a new directory" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_failed_write_leaves_no_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(run_module, "plot_widths", broken)
    result = {"widths": {"block1.conv": {"before": 16, "after": 6}}, "accuracy_dense": 0.99}
    dense = demo.wide_cnn(1, 10, (16, 32, 32), named=True)
    with pytest.raises(RuntimeError, match="disk full"):
        run_module.write_outputs(tmp_path / "out", result, dense, None)
    assert list(tmp_path.iterdir()) == []


def test_named_cnn_is_the_same_network() -> None:
    torch.manual_seed(0)
    plain = demo.wide_cnn(1, 10, (8, 16, 16))
    torch.manual_seed(0)
    named = demo.wide_cnn(1, 10, (8, 16, 16), named=True)
    assert [t.shape for t in plain.state_dict().values()] == [t.shape for t in named.state_dict().values()]
    assert list(named.state_dict())[:2] == ["block1.conv.weight", "block1.bn.weight"]
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(plain.eval()(x), named.eval()(x))
    assert run_module.group_label("block2.conv", 16, named) == "block2.conv (Conv2d, 16 ch)"


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
    (uniform,) = [run for run in report["runs"] if run["method"] == "autosparse_uniform"]
    assert len(set(uniform["widths"])) == 1 and uniform["widths"][0] < 32  # one common, reduced width
    assert (tmp_path / "quality_smoke_digits.png").stat().st_size > 1000
    assert "| digits | 30% | autosparse |" in (tmp_path / "quality_smoke.md").read_text()
