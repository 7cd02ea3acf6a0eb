"""export(): torch.export programs and ONNX files that run and match at several batch sizes and sequence
lengths, and that reflect the compaction."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.export import Dim

from autosparse.errors import ExportError
from autosparse.io import dynamic
from autosparse.io.export import export
from autosparse.measure import count_params
from tests.test_io import _assert_same, _fresh, _gated, _outputs, compacted

export_module = importlib.import_module("autosparse.io.export")  # autosparse.io.export is the function


def test_torch_export_round_trip_and_sizes(tmp_path: Path) -> None:
    small, inputs = compacted("resnet_basic")
    dense = _fresh("resnet_basic")
    path = export(small, tmp_path / "small.pt2", example_inputs=inputs)
    dense_path = export(dense, tmp_path / "dense.pt2", example_inputs=inputs, check=False)
    with open(path, "rb") as handle:
        program = torch.export.load(handle)
    assert sum(p.numel() for p in program.parameters()) == count_params(small) == 3684
    assert count_params(dense) == 5266
    assert path.stat().st_size < dense_path.stat().st_size
    assert inputs[0].shape[0] == 2
    for batch in (1, 2, 3):  # the batch is dynamic by default
        x = inputs[0][torch.arange(batch) % 2]
        with torch.no_grad():
            got = program.module()(x)  # an exported module has no eval(): it is already traced in eval
        assert got.shape == (batch, 10)
        _assert_same([got], _outputs(small, (x,)), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.pt2", "small.pt2"]  # no temporaries


def _resize(x: torch.Tensor, batch: int, length: int | None = None) -> torch.Tensor:
    x = x[torch.arange(batch) % x.shape[0]]
    return x if length is None else x[:, torch.arange(length) % x.shape[1]]


# hf_bert: batch and sequence length dynamic (the positions table allows at most 64 tokens).
SEQ = {"input_ids": {0: Dim("batch"), 1: Dim("seq", max=64)}}
SHAPES = {"resnet_basic": [(1, None), (3, None)], "hf_bert": [(1, 5), (3, 11), (2, 8)]}


@pytest.mark.parametrize("name", ["resnet_basic", "hf_bert"])
def test_onnx_export_matches_in_onnxruntime(tmp_path: Path, name: str) -> None:
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    small, inputs = compacted(name)
    path = export(small, tmp_path / f"{name}.onnx", example_inputs=inputs, format="onnx",
                  dynamic_shapes=SEQ if name == "hf_bert" else None)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert inputs[0].shape[0] == 2 and not isinstance(session.get_inputs()[0].shape[0], int)
    for batch, length in SHAPES[name]:
        x = _resize(inputs[0], batch, length)
        got = [torch.from_numpy(out) for out in session.run(None, {session.get_inputs()[0].name: x.numpy()})]
        assert got[0].shape[:2] == ((batch, 10) if length is None else (batch, length))
        _assert_same(got, _outputs(small, (x,)), atol=1e-4)
    # Every weight named after a parameter has the compacted shape.
    params = dict(small.named_parameters())
    shapes = {init.name: tuple(init.dims) for init in onnx.load(str(path)).graph.initializer}
    shared = [n for n in shapes if n in params]
    assert len(shared) >= 5
    assert all(shapes[n] == tuple(params[n].shape) for n in shared)
    assert sum(int(np.prod(s)) for s in shapes.values()) < count_params(_fresh(name))


def test_language_model_pt2_at_two_batches_and_lengths(tmp_path: Path) -> None:
    small, inputs = compacted("hf_bert")
    path = export(small, tmp_path / "bert.pt2", example_inputs=inputs, dynamic_shapes=SEQ)
    with open(path, "rb") as handle:
        module = torch.export.load(handle).module()
    for batch, length in SHAPES["hf_bert"]:
        x = _resize(inputs[0], batch, length)
        with torch.no_grad():
            got = module(x, use_cache=False)
        assert got[0].shape[:2] == (batch, length)
        _assert_same([got[0]], _outputs(small, (x,))[:1], atol=1e-5)


class FixedBatch(nn.Module):
    """Reshapes with a literal batch size: its batch dimension cannot be dynamic."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.reshape(2, -1))


@pytest.mark.parametrize("fmt", ["torch", "onnx"])
def test_fixed_batch_model_needs_dynamic_batch_false(tmp_path: Path, fmt: str) -> None:
    x = (torch.randn(2, 3, 4),)
    with pytest.raises(ExportError, match=r"FixedBatch cannot be exported with a dynamic batch size: .* "
                                          r"to the traced size 2; pass dynamic_batch=False \(CLI: "):
        export(FixedBatch(), tmp_path / "m", example_inputs=x, format=fmt)
    assert list(tmp_path.iterdir()) == []
    path = export(FixedBatch(), tmp_path / "m", example_inputs=x, format=fmt, dynamic_batch=False)
    assert path.stat().st_size > 0


def test_a_failure_at_another_shape_names_the_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    model, x = nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4)
    # A static export checked at batch 3, as if the batch were dynamic: onnxruntime rejects the input.
    bound = dynamic.bind(model, (x,), {})
    monkeypatch.setattr(export_module, "_cases", lambda *_: [dynamic.Case.of(bound),
                                                             dynamic.resized(bound, [{0: Dim("b")}], {("dim", "b"): 3})])
    with pytest.raises(ExportError, match=r"the onnx export fails at input shapes \(3, 4\): .*invalid dim"):
        export(model, tmp_path / "m.onnx", example_inputs=(x,), format="onnx", dynamic_batch=False)
    assert list(tmp_path.iterdir()) == []


def test_batch_of_one_is_traced_at_two_and_checked_at_two(tmp_path: Path) -> None:
    small, inputs = compacted("resnet_basic")
    one = (inputs[0][:1],)
    cases = export_module._cases(dynamic.bind(small, one, {}), dynamic.batch_spec(dynamic.bind(small, one, {})))
    assert [c.label for c in cases] == ["(1, 3, 32, 32)", "(2, 3, 32, 32)"]
    path = export(small, tmp_path / "one.pt2", example_inputs=one)
    with open(path, "rb") as handle, torch.no_grad():
        got = torch.export.load(handle).module()(inputs[0][[0, 1, 0, 1]])
    _assert_same([got], _outputs(small, (inputs[0][[0, 1, 0, 1]],)), atol=1e-6)


def test_check_shapes_follow_the_dims() -> None:
    model = nn.Linear(4, 4)
    ids = torch.arange(16).reshape(2, 8)
    bound = dynamic.bind(model, (ids,), {})
    batch, seq = Dim("batch"), Dim("seq", min=6, max=9)
    found = dynamic.dims(bound, {"input": {0: batch, 1: seq}})
    assert found == {("dim", "batch"): (2, 0, found[("dim", "batch")][2], {0}), ("dim", "seq"): (8, 6, 9, {1})}
    small, large = dynamic.variant_sizes(found)
    assert small == {("dim", "batch"): 1, ("dim", "seq"): 6} and large == {("dim", "batch"): 3, ("dim", "seq"): 9}
    case = dynamic.resized(bound, {"input": {0: batch, 1: seq}}, large)
    assert case.label == "(3, 9)"
    assert case.args[0].tolist() == [[*range(8), 0], [*range(8, 16), 8], [*range(8), 0]]  # repeats, no new ids
    assert dynamic.variant_sizes(dynamic.dims(bound, {"input": {0: Dim.STATIC}})) == []


def test_gated_model_is_refused(tmp_path: Path) -> None:
    net, inputs = _gated("resnet_basic", "configs/channels.yaml")
    for fmt in ("torch", "onnx"):
        with pytest.raises(ExportError, match="still gated; export the compacted model"):
            export(net, tmp_path / f"gated.{fmt}", example_inputs=inputs, format=fmt)
    assert list(tmp_path.iterdir()) == []


def test_failed_check_leaves_no_file(tmp_path: Path) -> None:
    small, inputs = compacted("resnet_basic")
    with pytest.raises(ExportError, match=r"at input shapes \(2, 3, 32, 32\): output 0 differs from the "
                                          r"eager model by .* \(> -1\)"):
        export(small, tmp_path / "small.pt2", example_inputs=inputs, atol=-1.0)
    with pytest.raises(ExportError, match="format must be 'torch' or 'onnx'"):
        export(small, tmp_path / "small.tflite", example_inputs=inputs, format="tflite")
    assert list(tmp_path.iterdir()) == []


def test_export_keeps_training_flags(tmp_path: Path) -> None:
    small, inputs = compacted("resnet_basic")
    small.train()
    try:
        export(small, tmp_path / "m.pt2", example_inputs=inputs, check=False)
        assert all(m.training for m in small.modules())
    finally:
        small.eval()
