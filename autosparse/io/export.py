"""Export a compacted model: a ``torch.export`` program (``.pt2``) or an ONNX file, checked by running it.

The file is written to a temporary name in the target's directory and renamed into place only after
the check passed, so a failed export never leaves a partial file behind.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from autosparse.capture import call_kwargs
from autosparse.errors import ExportError
from autosparse.state import flatten_outputs, is_sparsified

Format = Literal["torch", "onnx"]


def export(model: nn.Module, path: str | os.PathLike[str], *, example_inputs: tuple,
           format: Format = "torch", example_kwargs: dict[str, Any] | None = None,
           check: bool = True, atol: float = 1e-4) -> Path:
    """Export ``model`` with ``torch.export`` (saved by ``torch.export.save``) or to ONNX.

    Args:
        model: a compacted (or any plain, ungated) model; exported in eval mode.
        path: the file to write (``.pt2`` for "torch", ``.onnx`` for "onnx" by convention).
        example_inputs: positional inputs, as a tuple; they fix the exported shapes.
        format: "torch" or "onnx".
        example_kwargs: keyword inputs; for models with a ``use_cache`` argument (Hugging Face)
            the default is ``{"use_cache": False}`` so that no cache object is returned.
        check: run the exported program (torch.export.load, or onnxruntime) on ``example_inputs``
            and require every output to match the eager model within ``atol``.
        atol: allowed max abs difference for ``check``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ExportError: the model is still gated, the exporter failed, or the check found a difference.
        ImportError: ONNX export or its check needs onnx / onnxscript / onnxruntime.

    Example:
        >>> small = autosparse.compact(net)
        >>> autosparse.export(small, "small.onnx", example_inputs=(x,), format="onnx")
    """
    if format not in ("torch", "onnx"):
        raise ExportError(f"export format must be 'torch' or 'onnx', got {format!r}")
    _check_exportable(model)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = call_kwargs(model) if example_kwargs is None else dict(example_kwargs)
    target = Path(path)
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            reference = flatten_outputs(model(*inputs, **kwargs))
        with _staged(target) as tmp:
            if format == "torch":
                outputs = _export_torch(model, inputs, kwargs, tmp, check)
            else:
                outputs = _export_onnx(model, inputs, kwargs, tmp, check)
            if check:
                _compare(reference, outputs, atol, format)
    finally:
        for module, mode in training.items():
            module.training = mode
    return target


def _check_exportable(model: nn.Module) -> None:
    if is_sparsified(model) or any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ExportError(
            f"{type(model).__name__} is still gated; export the compacted model: "
            "small = autosparse.compact(net); autosparse.export(small, path, example_inputs=...)")


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """Yield a temporary file path next to ``target``; move it (and ONNX external data) into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp = tmp_dir / target.name
        yield tmp
        mask = os.umask(0)
        os.umask(mask)
        for produced in tmp_dir.iterdir():  # the file, plus "<name>.data" for large ONNX models
            os.chmod(produced, 0o666 & ~mask)
            os.replace(produced, target.parent / produced.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _export_torch(model: nn.Module, inputs: tuple, kwargs: dict, tmp: Path, check: bool) -> list[torch.Tensor]:
    try:
        program = torch.export.export(model, inputs, kwargs=kwargs or None, strict=False)
    except Exception as exc:  # the exporter fails in many ways; all mean "not exportable as is"
        raise ExportError(f"torch.export could not export {type(model).__name__}: "
                          f"{type(exc).__name__}: {_first_line(exc)}") from exc
    with open(tmp, "wb") as handle:  # a handle: torch.export.save warns on names not ending in .pt2
        torch.export.save(program, handle)
    if not check:
        return []
    with open(tmp, "rb") as handle, torch.no_grad():
        return flatten_outputs(torch.export.load(handle).module()(*inputs, **kwargs))


def _export_onnx(model: nn.Module, inputs: tuple, kwargs: dict, tmp: Path, check: bool) -> list[torch.Tensor]:
    large = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > 1.5 * 2**30
    try:
        # The exporter reports progress on stdout and optimizer retries as warnings; a library should not.
        with contextlib.redirect_stdout(io.StringIO()), _quiet("onnxscript", "torch.onnx"):
            torch.onnx.export(model, inputs, str(tmp), kwargs=kwargs or None, dynamo=True,
                              external_data=large, verbose=False)
    except ImportError:
        raise
    except Exception as exc:  # the exporter fails in many ways; all mean "not exportable as is"
        raise ExportError(f"ONNX export of {type(model).__name__} failed: "
                          f"{type(exc).__name__}: {_first_line(exc)}") from exc
    if not check:
        return []
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("checking an ONNX export needs onnxruntime: pip install 'autosparse[export]', "
                          "or pass check=False") from exc
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    feed = {arg.name: x.detach().cpu().numpy() for arg, x in zip(session.get_inputs(), tensors)}
    return [torch.from_numpy(out) for out in session.run(None, feed)]


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _compare(reference: list[torch.Tensor], outputs: list[torch.Tensor], atol: float, fmt: str) -> None:
    if len(reference) != len(outputs):
        raise ExportError(f"the {fmt} export returns {len(outputs)} outputs, the model {len(reference)}")
    for i, (ref, out) in enumerate(zip(reference, outputs)):
        if tuple(ref.shape) != tuple(out.shape):
            raise ExportError(f"{fmt} export: output {i} has shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
        diff = float((ref.detach().cpu().double() - out.double()).abs().max()) if ref.numel() else 0.0
        if diff > atol:
            raise ExportError(f"{fmt} export: output {i} differs from the eager model by {diff:.3g} (> {atol:g})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
