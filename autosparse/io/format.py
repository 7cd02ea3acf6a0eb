"""The on-disk directory format that saves and checkpoints share, and the machinery that writes it safely.

Both kinds of directory (:mod:`autosparse.io` writes *saves* of compacted models, :mod:`autosparse.checkpoints`
writes *checkpoints* of gated ones) are a JSON metadata file plus safetensors files; neither pickles code.
This module holds what they have in common:

- the file names and format tags (:data:`PLAN`, :data:`CHECKPOINT`, ...) and :func:`library_versions`;
- :func:`atomic_dir`: every directory is written to a temporary sibling first and renamed into place,
  so a failure leaves nothing half-written;
- :func:`write_tensors` / :func:`read_tensors`: safetensors with each tied tensor stored once and a sha256;
- :func:`read_json` / :func:`check_file`: reading the metadata back, with errors that name the file at fault;
- :func:`load_inputs`: the example inputs either kind may hold (re-exported as ``autosparse.io.load_inputs``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _installed_version
from pathlib import Path
from typing import Any

import torch

from autosparse.errors import PlanMismatchError

SAVE_FORMAT, CHECKPOINT_FORMAT, FORMAT_VERSION = "autosparse-save", "autosparse-checkpoint", 1
PLAN, WEIGHTS, INPUTS, CONFIG = "plan.json", "model.safetensors", "inputs.safetensors", "config.json"
CHECKPOINT, STATE = "checkpoint.json", "state.safetensors"


# ------------------------------------------------------------------------------------------ write
def _version(package: str) -> str | None:
    try:
        return _installed_version(package)
    except PackageNotFoundError:  # running from a source tree that was never installed
        return None


def library_versions() -> dict[str, str | None]:
    """The versions a file was written with, so a later mismatch can be explained."""
    try:
        import transformers
    except ImportError:
        transformers_version = None
    else:
        transformers_version = getattr(transformers, "__version__", None)
    return {"autosparse": _version("autosparse"), "torch": torch.__version__,
            "transformers": transformers_version, "python": platform.python_version()}


@contextlib.contextmanager
def atomic_dir(directory: str | os.PathLike[str], overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``directory``; move it into place only if the block succeeds."""
    target = Path(directory)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _publish_modes(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_modes(tmp: Path) -> None:
    """mkdtemp and some writers create private files; a save gets the umask's usual modes."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    for path in tmp.iterdir():
        os.chmod(path, 0o666 & ~mask)


def write_tensors(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """Write tensors with safetensors, each shared (tied) tensor once; returns the JSON entry."""
    from safetensors.torch import save_file

    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride(), tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = tensor.detach().to("cpu").contiguous().clone()
    save_file(unique, str(path), metadata={"format": "pt"})  # "pt": what transformers expects
    return {"file": path.name, "sha256": file_sha256(path), "aliases": aliases}


def write_inputs(inputs: tuple | None, path: Path) -> dict[str, Any] | None:
    """Write example inputs (a tensor or a tuple of tensors); returns the JSON entry, or None if none."""
    if inputs is None:
        return None
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError("example_inputs can be saved only as a tuple of tensors")
    entry = write_tensors({f"input_{i}": x for i, x in enumerate(inputs)}, path)
    return {**entry, "count": len(inputs)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ read
def load_inputs(directory: str | os.PathLike[str]) -> tuple | None:
    """The example inputs stored by :func:`autosparse.io.save` or :func:`autosparse.io.save_checkpoint`, or None.

    Raises:
        PlanMismatchError: ``directory`` is neither a save nor a checkpoint, or the inputs file is corrupted.

    Example:
        >>> inputs = autosparse.io.load_inputs("out/small")
        >>> small = autosparse.load("out/small", MyNet()); small(*inputs)
    """
    root = Path(directory)
    meta = read_json(root, CHECKPOINT, CHECKPOINT_FORMAT) if (root / CHECKPOINT).exists() else \
        read_json(root, PLAN, SAVE_FORMAT)
    entry = meta.get("inputs")
    if entry is None:
        return None
    tensors = read_tensors(check_file(root, entry), entry["aliases"])
    return tuple(tensors[f"input_{i}"] for i in range(entry["count"]))


def read_json(root: Path, name: str, fmt: str) -> dict[str, Any]:
    """Read a save's or checkpoint's metadata file, checking its format tag and version."""
    path = root / name
    what = "save" if fmt == SAVE_FORMAT else "checkpoint"
    if not root.is_dir():
        raise PlanMismatchError(f"{root} is not an autosparse {what}: no such directory")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanMismatchError(f"{root} is not an autosparse {what}: it has no {name}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanMismatchError(f"{path} is corrupted: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise PlanMismatchError(f"{path} is not an autosparse {what} (format {data.get('format')!r}, "
                                f"expected {fmt!r})" if isinstance(data, dict) else f"{path} is not a JSON object")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise PlanMismatchError(f"{path} has format version {data['format_version']}; this autosparse "
                                f"reads up to {FORMAT_VERSION}: upgrade autosparse")
    return data


def check_file(root: Path, entry: Mapping[str, Any] | None) -> Path:
    """The path of a tensor file named in the metadata, once its sha256 matches the recorded one."""
    if not entry:
        raise PlanMismatchError(f"{root}: the plan names no weight file")
    path = root / entry["file"]
    if not path.is_file():
        raise PlanMismatchError(f"{root} is incomplete: {entry['file']} is missing")
    if file_sha256(path) != entry["sha256"]:
        raise PlanMismatchError(f"{path} is corrupted: its sha256 differs from the one recorded at save time")
    return path


def read_tensors(path: Path, aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`write_tensors`, restoring each tied tensor under all its names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise PlanMismatchError(f"{path} is corrupted: {exc}") from None
    tensors.update({alias: tensors[name] for alias, name in aliases.items()})
    return tensors
