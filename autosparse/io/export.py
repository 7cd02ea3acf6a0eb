"""Export a compacted model: a ``torch.export`` program (``.pt2``) or an ONNX file, checked by running it.

The batch size is dynamic by default (see :mod:`autosparse.io.dynamic`); both formats come from one
``torch.export`` trace, so a model that fixes its batch size fails the same way for both. The file is written to a temporary name in the target's directory and renamed into place only after
the check passed, so a failed export never leaves a partial file behind.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.nn.utils import parametrize

from autosparse.capture import call_kwargs
from autosparse.errors import ExportError
from autosparse.io import dynamic
from autosparse.state import flatten_outputs, is_sparsified

Format = Literal["torch", "onnx"]
_STATIC_HINT = "pass dynamic_batch=False (CLI: autosparse export --static) to export at the example's batch size only"


def export(model: nn.Module, path: str | os.PathLike[str], *, example_inputs: tuple,
           format: Format = "torch", example_kwargs: dict[str, Any] | None = None,
           dynamic_batch: bool = True, dynamic_shapes: Any = None,
           check: bool = True, atol: float = 1e-4) -> Path:
    """Export ``model`` with ``torch.export`` (saved by ``torch.export.save``) or to ONNX.

    The batch size (dim 0 of every tensor input) is dynamic unless ``dynamic_batch=False``: the file
    runs at any batch size, not only the example's.

    Args:
        model: a compacted (or any plain, ungated) model; exported in eval mode.
        path: the file to write (``.pt2`` for "torch", ``.onnx`` for "onnx" by convention).
        example_inputs: positional inputs, as a tuple; they fix every size that is not dynamic.
        format: "torch" or "onnx".
        example_kwargs: keyword inputs; for models with a ``use_cache`` argument (Hugging Face)
            the default is ``{"use_cache": False}`` so that no cache object is returned.
        dynamic_batch: give dim 0 of every tensor input (of the first input's size) one shared
            ``torch.export.Dim("batch")``. False: every size is the example's.
        dynamic_shapes: passed to ``torch.export.export`` as is (keyed by ``forward``'s parameter
            names, e.g. ``{"input_ids": {0: Dim("batch"), 1: Dim("seq", max=512)}}``); it replaces
            the batch default.
        check: run the exported program (torch.export.load, or onnxruntime) on ``example_inputs``
            and, for each dynamic dim, on inputs with that dim smaller (batch 1) and larger
            (example + 1), and require every output to match the eager model within ``atol``.
        atol: allowed max abs difference for ``check``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ExportError: the model is still gated, the exporter failed (e.g. the model fixes its batch
            size: the message says to pass ``dynamic_batch=False``), or the check found a difference
            or a failure at some input shapes (named in the message).
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
    bound = dynamic.bind(model, inputs, kwargs)
    spec = _user_spec(bound, dynamic_shapes) if dynamic_shapes is not None else \
        dynamic.batch_spec(bound) if dynamic_batch else None
    target = Path(path)
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        program = _trace(model, bound, spec, by_default=dynamic_shapes is None)
        with _staged(target) as tmp:
            run = _save_torch(program, tmp) if format == "torch" else _save_onnx(model, program, tmp)
            if check:
                for case in _cases(bound, spec):
                    _check_case(model, run(), case, atol, format, spec is not None)
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


def _trace(model: nn.Module, bound: inspect.BoundArguments, spec: Any, by_default: bool) -> ExportedProgram:
    """``torch.export`` the model; errors name what to change."""
    case = dynamic.Case.of(bound)
    if by_default and spec is not None and _batch_of(case) == 1:
        # torch.export specialises sizes 0 and 1: trace a batch of 2 (the example, twice) instead.
        case = dynamic.resized(bound, spec, {("dim", dynamic.BATCH): 2})
    try:
        return torch.export.export(model, case.args, kwargs=case.kwargs or None, dynamic_shapes=spec, strict=False)
    except Exception as exc:  # the exporter fails in many ways; all mean "not exportable as is"
        text = str(exc)
        if by_default and spec is not None and ("specialized" in text or "Constraints violated" in text):
            raise ExportError(f"{type(model).__name__} cannot be exported with a dynamic batch size: its code "
                              f"fixes the batch (dim 0 of the inputs) to the traced size {_batch_of(case)}; "
                              f"{_STATIC_HINT}") from exc
        raise ExportError(f"torch.export could not export {type(model).__name__}: "
                          f"{type(exc).__name__}: {_summary(exc)}") from exc


def _user_spec(bound: inspect.BoundArguments, spec: Any) -> Any:
    """A dict spec completed with None (static) for the inputs it leaves out, e.g. ``use_cache``."""
    if not isinstance(spec, dict):
        return spec
    unknown = sorted(set(spec) - set(bound.arguments))
    if unknown:
        raise ExportError(f"dynamic_shapes names {unknown}, which are not inputs of this call; "
                          f"its keys must be among forward's arguments given: {list(bound.arguments)}")
    return {name: spec.get(name) for name in bound.arguments}


def _batch_of(case: dynamic.Case) -> int | None:
    tensors = [t for t in (*case.args, *case.kwargs.values()) if isinstance(t, torch.Tensor) and t.dim()]
    return int(tensors[0].shape[0]) if tensors else None


def _cases(bound: inspect.BoundArguments, spec: Any) -> list[dynamic.Case]:
    """The example inputs, then the same with every dynamic dim smaller, then larger."""
    cases = [dynamic.Case.of(bound)]
    found = dynamic.dims(bound, spec) if spec is not None else None
    for sizes in dynamic.variant_sizes(found or {}):
        cases.append(dynamic.resized(bound, spec, sizes))
    return cases


Runner = Callable[[dynamic.Case], list[torch.Tensor]]


def _save_torch(program: ExportedProgram, tmp: Path) -> Callable[[], Runner]:
    with open(tmp, "wb") as handle:  # a handle: torch.export.save warns on names not ending in .pt2
        torch.export.save(program, handle)

    @functools.cache
    def runner() -> Runner:  # loaded once, on the first check
        with open(tmp, "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, not the user's
            module = torch.export.load(handle).module()
        return lambda case: flatten_outputs(module(*case.args, **case.kwargs))

    return runner


def _save_onnx(model: nn.Module, program: ExportedProgram, tmp: Path) -> Callable[[], Runner]:
    large = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > 1.5 * 2**30
    try:
        # The exporter reports progress on stdout and optimizer retries as warnings; a library should not.
        with contextlib.redirect_stdout(io.StringIO()), _quiet("onnxscript", "torch.onnx"):
            torch.onnx.export(program, (), str(tmp), dynamo=True, external_data=large, verbose=False)
    except ImportError:
        raise
    except Exception as exc:  # the exporter fails in many ways; all mean "not exportable as is"
        raise ExportError(f"ONNX export of {type(model).__name__} failed: "
                          f"{type(exc).__name__}: {_first_line(exc)}") from exc

    @functools.cache
    def runner() -> Runner:  # one session, on the first check
        try:
            import onnxruntime  # optional: only the check needs it
        except ImportError as exc:
            raise ImportError("checking an ONNX export needs onnxruntime: pip install 'autosparse[export]', "
                              "or pass check=False") from exc
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        names = [arg.name for arg in session.get_inputs()]

        def run(case: dynamic.Case) -> list[torch.Tensor]:
            feed = {name: x.detach().cpu().numpy() for name, x in dynamic.feed(case, names).items()}
            return [torch.from_numpy(out) for out in session.run(None, feed)]

        return run

    return runner


def _check_case(model: nn.Module, run: Runner, case: dynamic.Case, atol: float, fmt: str, dynamic_: bool) -> None:
    """Run the file and the eager model on ``case``; raise ExportError naming the shapes on a difference."""
    with torch.no_grad():
        reference = flatten_outputs(model(*case.args, **case.kwargs))
    try:
        with torch.no_grad():
            outputs = run(case)
    except Exception as exc:  # a runtime rejecting the shapes, or any other failure of the exported file
        hint = f"; {_STATIC_HINT}, or check dynamic_shapes" if dynamic_ else ""
        raise ExportError(f"the {fmt} export fails at input shapes {case.label}: "
                          f"{type(exc).__name__}: {_first_line(exc)}{hint}") from exc
    _compare(reference, outputs, atol, f"{fmt} export at input shapes {case.label}")


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
        raise ExportError(f"the {fmt} returns {len(outputs)} outputs, the model {len(reference)}")
    for i, (ref, out) in enumerate(zip(reference, outputs)):
        if tuple(ref.shape) != tuple(out.shape):
            raise ExportError(f"{fmt}: output {i} has shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
        diff = float((ref.detach().cpu().double() - out.double()).abs().max()) if ref.numel() else 0.0
        if diff > atol:
            raise ExportError(f"{fmt}: output {i} differs from the eager model by {diff:.3g} (> {atol:g})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _summary(exc: BaseException, lines: int = 6) -> str:
    """The first lines of an exporter error, up to its boilerplate (they hold the suggested fixes)."""
    kept = []
    for line in str(exc).strip().splitlines():
        if line.startswith("The error above occurred"):
            break
        line = line.split("For more information")[0].strip()
        if line:
            kept.append(line)
    return " ".join(kept[:lines])
