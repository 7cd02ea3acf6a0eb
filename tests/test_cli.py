"""The command line, as a subprocess (inspect) and in-process (the checkpoint -> save -> export chain)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import autosparse
from autosparse import cli, io

ROOT = Path(__file__).resolve().parents[1]
POLICY = str(ROOT / "configs" / "channels.yaml")
TINY = """
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(16, 10)).eval()

    def with_inputs():
        return build(), (torch.randn(2, 3, 16, 16),)

    not_a_model = 3
"""


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "tinymod.py").write_text(textwrap.dedent(TINY))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "autosparse", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_inspect_as_a_subprocess(tiny: Path) -> None:
    done = _run("inspect", "tinymod:build", "--policy", POLICY, "--input-shape", "1,3,16,16", cwd=tiny)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"tinymod:build: Sequential, 1,578 params; policy {POLICY} gates 2 groups (24 units)"
    assert "[gated] channel 8/8 kept  0 (1 conv, 8 ch)" in lines
    assert "[gated] channel 16/16 kept  3 (1 conv, 16 ch)" in lines
    assert "  - 7: channels reach the model's outputs" in lines


def _main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("args", "code", "message"), [
    (["inspect", "nosuchmodule:build", "--policy", POLICY], 2, "cannot import module 'nosuchmodule'"),
    (["inspect", "tinymod:nothing", "--policy", POLICY], 2, "has no attribute 'nothing'"),
    (["inspect", "tinymod:not_a_model", "--policy", POLICY], 2, "returned int, not a torch.nn.Module"),
    (["inspect", "no/such/config", "--policy", POLICY], 2, "neither 'package.module:callable' nor a Hugging Face"),
    (["inspect", "tinymod:build", "--policy", POLICY], 2, "no example inputs: pass --input-shape"),
    (["inspect", "tinymod:with_inputs", "--policy", "missing.yaml"], 2, "policy file 'missing.yaml' does not exist"),
    (["inspect", "tinymod:with_inputs", "--policy", str(ROOT / "configs/heads.yaml")], 1, "NoGatesError"),
    (["inspect", "tinymod:build", "--policy", POLICY, "--input-shape", "1,x"], 2, "not a shape: '1,x'"),
    (["compact", "nowhere", "--out", "o"], 2, "'nowhere' is not a directory"),
    (["export", ".", "out.onnx"], 1, "is not an autosparse save: it has no plan.json"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
])
def test_bad_command_lines(tiny: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                           args: list[str], code: int, message: str) -> None:
    monkeypatch.chdir(tiny)
    try:
        got = _main(capsys, *args)
    except SystemExit as exit_:  # argparse's own usage errors
        got = (exit_.code, "", capsys.readouterr().err)
    assert got[0] == code
    assert message in got[2]


@pytest.mark.parametrize("command", [[], ["inspect"], ["compact"], ["export"], ["report"]])
def test_help_for_every_command(capsys: pytest.CaptureFixture, command: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: autosparse {' '.join(command)}".rstrip())


def test_inspect_json(tiny: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _main(capsys, "inspect", "tinymod:with_inputs", "--policy", POLICY, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["gates"] == {"0": 8, "3": 16}
    assert data["unprunable"] == [{"where": "7", "reason": "channels reach the model's outputs"}]


def test_checkpoint_compact_export_report(tiny: Path, capsys: pytest.CaptureFixture) -> None:
    import tinymod

    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = autosparse.sparsify(tinymod.build(), POLICY, example_inputs=(x,))
    for gate in autosparse.gates(net).values():
        gate.zero_([0, 1, 2])
    io.save_checkpoint(net, tiny / "ckpt", model_spec="tinymod:build", step=5)

    code, out, _ = _main(capsys, "compact", str(tiny / "ckpt"), "--out", str(tiny / "small"))
    assert code == 0
    assert out.splitlines() == ["0: 8 -> 5", "3: 16 -> 13", f"wrote {tiny / 'small'}: 888 params (gated model: 1,602)"]
    small = io.load(tiny / "small", tinymod.build())
    with torch.no_grad():
        torch.testing.assert_close(small(x), autosparse.compact(net)(x), atol=1e-6, rtol=0)

    code, out, _ = _main(capsys, "export", str(tiny / "small"), str(tiny / "small.pt2"))
    assert code == 0 and out.startswith(f"wrote {tiny / 'small.pt2'} (torch, ") and out.endswith(" 888 params)\n")
    # The batch is dynamic by default; --static pins it; a checkpoint is compacted, then exported.
    code, out, _ = _main(capsys, "export", str(tiny / "ckpt"), str(tiny / "static.pt2"), "--static")
    assert code == 0 and out.endswith(" 888 params)\n")
    x3 = torch.randn(3, 3, 16, 16)
    with open(tiny / "small.pt2", "rb") as handle, torch.no_grad():
        torch.testing.assert_close(torch.export.load(handle).module()(x3), small(x3), atol=1e-5, rtol=0)
    with open(tiny / "static.pt2", "rb") as handle, pytest.raises(Exception, match="size"):
        torch.export.load(handle).module()(x3)

    code, out, _ = _main(capsys, "inspect", str(tiny / "small"))
    assert code == 0
    assert out.splitlines()[0] == f"{tiny / 'small'}: autosparse save of Sequential, 888 params; compacted by its plan (2 groups)"
    assert "  0: 8 -> 5" in out.splitlines() and "  3: 16 -> 13" in out.splitlines()
    code, out, _ = _main(capsys, "inspect", str(tiny / "ckpt"), "--json")
    assert code == 0
    data = json.loads(out)
    assert (data["kind"], data["step"], data["gates"]) == ("checkpoint", 5, {"0": 8, "3": 16})
    assert [(g["name"], g["kept"]) for g in data["groups"]] == [("0", 5), ("3", 13)]
    code, _, err = _main(capsys, "inspect", str(tiny / "small"), "--policy", POLICY)
    assert code == 2 and "holds its own plan: inspect it without --policy" in err

    code, out, _ = _main(capsys, "report", str(tiny / "small"), "--json", "--no-latency")
    assert code == 0
    total = json.loads(out)["total"]
    assert total["params"]["before"] == 1578 and total["params"]["after"] == 888
    code, out, _ = _main(capsys, "report", str(tiny / "ckpt"), "--no-latency")
    assert code == 0 and "8 -> 5 (0.62x)" in out

    code, _, err = _main(capsys, "compact", str(tiny / "ckpt"), "--out", str(tiny / "small"))
    assert code == 1 and "FileExistsError" in err and "overwrite" in err


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"autosparse {importlib.metadata.version('autosparse')}\n"


def test_a_closed_pipe_is_not_an_error(tiny: Path) -> None:
    """`autosparse report --json | head -1`: the reader left; exit 0, and nothing on stderr."""
    import tinymod

    small = autosparse.compact(autosparse.sparsify(tinymod.build(), POLICY, example_inputs=(torch.randn(2, 3, 16, 16),)))
    io.save(small, tiny / "small", model_spec="tinymod:build", example_inputs=(torch.randn(2, 3, 16, 16),))
    read, write = os.pipe()
    os.close(read)  # every write to the pipe fails with EPIPE, deterministically
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tiny), str(ROOT)])}
    try:
        done = subprocess.run([sys.executable, "-m", "autosparse", "report", str(tiny / "small"), "--json",
                               "--no-latency"], cwd=tiny, env=env, stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (0, "")


def test_demo_is_dispatched(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    calls: list[list[str]] = []
    fake = types.ModuleType("autosparse.demo")
    fake.main = lambda argv=None: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "autosparse.demo", fake)
    assert cli.main(["demo", "--steps", "3"]) == 0
    assert calls == [["--steps", "3"]]


def test_policy_schema_command_prints_the_shipped_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["policy", "--schema"]) == 0
    shipped = (Path(__file__).resolve().parents[1] / "configs" / "policy.schema.json").read_text()
    assert json.loads(capsys.readouterr().out) == json.loads(shipped)
