"""The benchmark scripts still run: each ``main(["--smoke"])`` on tiny models, JSON with the expected keys.

The numbers of a smoke run mean nothing (tiny models on a busy machine); only their presence, sign and the
file layout are checked. The real runs are ``python -m benchmarks.<script>`` (see benchmarks/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

STAMP_KEYS = {"autosparse", "torch", "git_commit", "threads", "date"}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One results folder for the module, so the report test renders what the others wrote."""
    return tmp_path_factory.mktemp("benchmarks")


def _load(out: Path, name: str) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    assert data["smoke"] is True
    assert STAMP_KEYS <= set(data["stamp"])
    assert data["stamp"]["git_commit"]
    return data


def test_latency_smoke(out: Path) -> None:
    from benchmarks import bench_latency

    bench_latency.main(["--smoke", "--out", str(out)])
    data = _load(out, "latency")
    assert set(data["models"]) == set(bench_latency.MODELS)
    for m in data["models"].values():
        for batch, timed in m["latency"].items():
            assert {"dense", "50%/r1", "50%/hand", "50%/r8"} <= set(timed)
            assert all(t["ms"] > 0 and t["wall_min_ms"] > 0 for t in timed.values())
            for row in m["ratios"][batch].values():
                assert row["speedup"] > 0 and row["flops_reduction"] > 1
            assert m["ratios"][batch]["50%/r1"]["compacted_over_hand"] > 0
        assert all(0 < v["flops_frac"] < 1 for v in m["variants"].values())


def test_gate_overhead_smoke(out: Path) -> None:
    from benchmarks import bench_gate_overhead

    bench_gate_overhead.main(["--smoke", "--out", str(out)])
    data = _load(out, "gate_overhead")
    assert set(data["models"]) == set(bench_gate_overhead.MODELS)
    for m in data["models"].values():
        assert m["gates"] > 0 and m["sites"] >= m["gates"]
        assert m["step_ms"]["gated"]["ms"] > 0 and m["step_ms"]["ungated"]["ms"] > 0
        assert m["overhead"] > 0


def test_surgery_smoke(out: Path) -> None:
    from benchmarks import bench_surgery

    bench_surgery.main(["--smoke", "--out", str(out)])
    data = _load(out, "surgery")
    assert set(data["families"]) == {"resnet", "bert", "llama"}
    for family in data["families"].values():
        for row in family["rows"]:
            ours = row["autosparse"]
            assert ours["status"] == "ok", ours
            assert ours["nodes"] > 0 and ours["total_s"] > 0 and ours["gates"] > 0
            assert ours["compact_s"] > 0 and ours["peak_rss_mb"] > 0
        assert "slope_total_s" in family["scaling"]
    tp = data["families"]["resnet"]["rows"][0]["torch_pruning"]  # the one fresh-process run of the smoke
    assert tp["status"] in {"ok", "error", "timeout"}
    if tp["status"] == "ok":
        assert tp["total_s"] > 0


def test_memory_smoke(out: Path) -> None:
    from benchmarks import bench_memory

    bench_memory.main(["--smoke", "--out", str(out)])
    data = _load(out, "memory")
    for model in data["models"].values():
        for key in ("copy", "inplace"):
            row = model[key]
            assert row["status"] == "ok"
            assert row["model_mb"] > row["compacted_mb"] > 0
            assert row["peak_rss_mb"] > 0 and row["compact_s"] >= 0


def test_report_renders(out: Path, tmp_path: Path) -> None:
    from benchmarks import report

    assert report.render(tmp_path).count("no results yet") == len(report.RENDER)
    text = report.render(out)  # whatever the tests above wrote renders as tables
    for name in report.RENDER:
        assert (out / f"{name}.json").exists() == (f"bench_{name}`" not in text)


def test_gpu_check_smoke(out: Path) -> None:
    from benchmarks import gpu_check

    gpu_check.main(["--smoke", "--out", str(out)])  # on this machine: the CPU path of the same code
    data = _load(out, "gpu_check")
    assert set(data["exactness"]) == set(gpu_check.ZOO[:2])
    assert all(diff <= 1e-5 for diff in data["exactness"].values())
    assert all(m["dense"] > 0 and m["gated"] > 0 for m in data["overhead"].values())


def test_prune_smoke(out: Path) -> None:
    from benchmarks import bench_prune

    bench_prune.main(["--smoke", "--out", str(out)])
    data = _load(out, "prune_smoke")
    assert {r["method"] for r in data["summary"]} >= {"l2", "torch_pruning"}


def test_latency_target_smoke(out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Latency budgets: the prediction lands on the target, the compacted models are timed, the table is cached."""
    from benchmarks import bench_latency_target

    monkeypatch.setenv("AUTOSPARSE_CACHE", str(tmp_path))  # time the tables here, not in the user's cache
    bench_latency_target.main(["--smoke", "--out", str(out)])
    data = _load(out, "latency_target")
    assert set(data["models"]) == set(bench_latency_target.MODELS)
    assert data["settings"]["batches"] == [1] and data["settings"]["table_repeats"]["min"] >= 3
    assert (tmp_path / "latency.json").exists()
    for rows in data["models"].values():
        row = rows["1"]
        target, by_latency, by_flops = row["target"], row["latency_target"], row["flops_target"]
        assert target - 0.05 <= by_latency["predicted"] <= target + 1e-6
        for timed in (by_latency, by_flops):
            assert timed["ratio"] > 0 and timed["ratio_min"] > 0 and timed["dense_ms"] > 0 and timed["pairs"] >= 1
            assert 0 < timed["flops_frac"] <= 1 and timed["params"] > 0
        assert by_flops["predicted"] is None and row["prune_s"] > 0 and row["prune_cached_s"] > 0
        assert row["error"] == pytest.approx(by_latency["ratio"] / target - 1, abs=1e-3)


def test_lm_smoke(out: Path) -> None:
    """The byte-level Llama benchmark: stdlib corpus split by file, every method lands near its budget."""
    from benchmarks import bench_lm

    train, held = bench_lm.corpus(0.5)
    assert len(train) > 2**19 and len(held) > 2**14 and int(train.max()) < 256
    bench_lm.main(["--smoke", "--methods", "gates", "prune_l2", "--out", str(out)])
    data = _load(out, "lm_smoke")
    rows = {(r["method"], r["budget"]): r for r in data["summary"]}
    assert rows[("dense", 1.0)]["block_fraction"] == 1.0
    for method in ("gates", "prune_l2"):
        row = rows[(method, 0.5)]
        assert row["ok"] == 1 and 0 < row["bpb"] < 8.5  # 8 bits/byte is a uniform guess over bytes
        assert 0.4 < row["block_fraction"] <= 0.52


def test_pretrained_smoke(out: Path) -> None:
    """The pretrained-regime benchmark: every method lands on the FLOPs budget from the same dense model."""
    from benchmarks import bench_pretrained

    bench_pretrained.main(["--smoke", "--methods", "gates", "prune_l2", "--out", str(out)])
    data = _load(out, "pretrained_smoke")
    rows = {r["method"]: r for r in data["summary"]}
    assert set(rows) == {"dense", "gates", "prune_l2"}
    for method in ("gates", "prune_l2"):
        assert 0.2 < rows[method]["flops_fraction_mean"] <= 0.3 + 0.05 * 0.3 + 1e-9
        assert 0 <= rows[method]["accuracy_mean"] <= 100
    assert (out / "pretrained_smoke.md").read_text().count("|") > 4


def test_inplace_smoke(out: Path) -> None:
    """The in-place bfloat16 Llama benchmark: gates zeroed, compacted in place, fewer parameters."""
    from benchmarks import bench_inplace

    bench_inplace.main(["--smoke", "--out", str(out)])
    data = _load(out, "inplace_smoke")
    assert data["params_after"] > 0 and data["weights_mb"] > 0 and data["peak_rss_mb"] >= data["rss_before_mb"] > 0
    assert data["total_s"] >= data["sparsify_s"] > 0
