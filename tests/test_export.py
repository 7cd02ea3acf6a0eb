"""export(): torch.export programs and ONNX files that run and match, and that reflect the compaction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from autosparse.errors import ExportError
from autosparse.io.export import export
from autosparse.measure import count_params
from tests.test_io import _assert_same, _fresh, _gated, _outputs, compacted


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
    with torch.no_grad():
        got = program.module()(*inputs)  # an exported module has no eval(): it is already traced in eval
    _assert_same([got], _outputs(small, inputs), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.pt2", "small.pt2"]  # no temporaries


@pytest.mark.parametrize("name", ["resnet_basic", "hf_bert"])
def test_onnx_export_matches_in_onnxruntime(tmp_path: Path, name: str) -> None:
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    small, inputs = compacted(name)
    path = export(small, tmp_path / f"{name}.onnx", example_inputs=inputs, format="onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs, strict=True)}
    got = [torch.from_numpy(out) for out in session.run(None, feed)]
    _assert_same(got, _outputs(small, inputs), atol=1e-4)
    # Every weight named after a parameter has the compacted shape.
    params = dict(small.named_parameters())
    shapes = {init.name: tuple(init.dims) for init in onnx.load(str(path)).graph.initializer}
    shared = [n for n in shapes if n in params]
    assert len(shared) >= 5
    assert all(shapes[n] == tuple(params[n].shape) for n in shared)
    assert sum(int(np.prod(s)) for s in shapes.values()) < count_params(_fresh(name))


def test_gated_model_is_refused(tmp_path: Path) -> None:
    net, inputs = _gated("resnet_basic", "configs/channels.yaml")
    for fmt in ("torch", "onnx"):
        with pytest.raises(ExportError, match="still gated; export the compacted model"):
            export(net, tmp_path / f"gated.{fmt}", example_inputs=inputs, format=fmt)
    assert list(tmp_path.iterdir()) == []


def test_failed_check_leaves_no_file(tmp_path: Path) -> None:
    small, inputs = compacted("resnet_basic")
    with pytest.raises(ExportError, match=r"output 0 differs from the eager model by .* \(> -1\)"):
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
