"""Save and load compacted models as weights + a replayable plan.

A *save* (:func:`save` / :func:`load`) is a directory::

    plan.json           format, versions, the Record, the base architecture (names, shapes, hash),
                        module attributes after compaction, weight file hash, Hugging Face config info
    model.safetensors   the compacted weights (tied tensors stored once)
    config.json         Hugging Face models only: the compacted model's config where it describes the
                        model exactly, otherwise a config plain transformers refuses (see hf_dir)
    inputs.safetensors  optional example inputs (the CLI's export and report use them)

What lives where: this module builds and checks the plan; :mod:`autosparse.io.hf_dir` writes the
Hugging Face config and rebuilds a base model from it; :mod:`autosparse.io.checkpoints` saves and
resumes still-gated models; :mod:`autosparse.io.format` holds the file names, the atomic directory
writes and the safetensors / JSON readers both formats share.

Importing this module registers :func:`_save_pretrained` with
:func:`autosparse.compaction.hf_config.register_directory_writer`: a compacted Hugging Face model whose
config cannot describe it saves through it, so its ``save_pretrained`` writes a directory that
:func:`load` reads and plain transformers refuses.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from autosparse.compaction.hf_config import register_directory_writer, sync_config
from autosparse.compaction.record import Record, attach_record, record_of
from autosparse.compaction.replay import (
    architecture,
    architecture_hash,
    check,
    check_layers,
    moved,
    replay,
    replay_layers,
    shapes_after,
)
from autosparse.errors import NotSparsifiedError, PlanMismatchError
from autosparse.io.format import (
    FORMAT_VERSION,
    INPUTS,
    PLAN,
    SAVE_FORMAT,
    WEIGHTS,
    atomic_dir,
    check_file,
    library_versions,
    read_json,
    read_tensors,
    write_inputs,
    write_tensors,
)
from autosparse.io.hf_dir import hf_base_model, write_hf_config
from autosparse.modules.blocks import ZeroBranch
from autosparse.state import is_sparsified


# ------------------------------------------------------------------------------------------ save
def save(model: nn.Module, directory: str | os.PathLike[str], *, model_spec: str | None = None,
         example_inputs: tuple | None = None, overwrite: bool = False) -> Path:
    """Save a compacted model as safetensors weights plus a ``plan.json`` that :func:`load` replays.

    Args:
        model: a model returned by :func:`autosparse.compact` (or by :func:`load`).
        directory: the directory to create.
        model_spec: how to build the base model (``"pkg.module:build"``), stored for the CLI.
        example_inputs: tensors stored next to the weights, for ``autosparse export`` / ``report``.
        overwrite: replace an existing directory (atomically) instead of raising.

    Returns:
        ``directory`` as a :class:`~pathlib.Path`.

    Raises:
        NotSparsifiedError: ``model`` was not compacted by autosparse (or is still gated).
        FileExistsError: ``directory`` exists and ``overwrite`` is false.

    Example:
        >>> small = autosparse.compact(net)
        >>> autosparse.save(small, "out/small")
        >>> again = autosparse.load("out/small", build_model())
    """
    record = _compacted_record(model)
    with atomic_dir(directory, overwrite) as tmp:
        _write(model, record, tmp, model_spec, example_inputs)
    return Path(directory)


def _compacted_record(model: nn.Module) -> Record:
    record = record_of(model)
    if is_sparsified(model) or record is None:
        raise NotSparsifiedError(
            f"save() takes a compacted model; {type(model).__name__} "
            + ("still has gates: call autosparse.compact(model) first, or use save_checkpoint() to resume "
               "training later" if is_sparsified(model) else "has no compaction record")
        )
    return record


def _write(model: nn.Module, record: Record, root: Path, model_spec: str | None, example_inputs: tuple | None) -> None:
    """Write the save's files into the existing directory ``root``."""
    base_shapes = getattr(record, "base_shapes", None)
    layers = _layer_record(model, record)
    plan: dict[str, Any] = {
        "format": SAVE_FORMAT, "format_version": FORMAT_VERSION, "versions": library_versions(),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}", "model_spec": model_spec,
        "base": None if base_shapes is None else {
            "sha256": architecture_hash(base_shapes), "shapes": {k: list(v) for k, v in base_shapes.items()}},
        "record": {"kept": record.kept, "groups": record.groups, **layers},
        "attributes": _attributes(model, record.kept, layers),
    }
    plan["weights"] = write_tensors(model.state_dict(), root / WEIGHTS)
    plan["inputs"] = write_inputs(example_inputs, root / INPUTS)
    plan["hf"] = write_hf_config(model, record, root)
    (root / PLAN).write_text(json.dumps(plan, indent=1))


def _save_pretrained(model: nn.Module, directory: Path) -> None:
    """``save_pretrained`` of a compacted model its config cannot describe: an autosparse save in place
    (other files there, a tokenizer's, are kept), loadable by :func:`load` and refused by transformers."""
    _write(model, _compacted_record(model), directory, None, None)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(directory)


register_directory_writer(_save_pretrained)


def _layer_record(model: nn.Module, record: Any) -> dict[str, Any]:
    """Branches replaced by ZeroBranch (with the output structure each stands in for) and dropped layers."""
    tuple_lens = {m.replaced: m.tuple_len for m in model.modules() if isinstance(m, ZeroBranch)}
    replaced = getattr(record, "replaced", None) or []
    return {"replaced": {name: tuple_lens.get(name, 0) for name in replaced},
            "dropped_layers": list(getattr(record, "dropped_layers", None) or [])}


def _attributes(model: nn.Module, kept: Mapping[str, Any], layers: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Plain-valued attributes of every module replay touches (owners and their parents), by final name."""
    owners = dict.fromkeys(name.rpartition(".")[0] for name in kept)
    names = (moved(n, list(layers["replaced"]), layers["dropped_layers"])
             for n in dict.fromkeys([*owners, *(o.rpartition(".")[0] for o in owners)]))
    return {name: _plain_attrs(model.get_submodule(name)) for name in names if name is not None}


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, (bool, int, float, str)) or (
                isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value)):
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


# ------------------------------------------------------------------------------------------ load
def load(directory: str | os.PathLike[str], base_model: nn.Module | None = None, *,
         inplace: bool = False) -> nn.Module:
    """Rebuild a saved compacted model: replay its plan on a fresh base model, then load the weights.

    Everything is checked before any tensor is sliced: the directory format, the weight file's
    hash, the base model's architecture against the one the plan was made on, and that the
    replayed shapes are exactly those of the saved weights.

    Args:
        directory: written by :func:`save`.
        base_model: a freshly built, uncompacted model of the saved architecture (weights are
            irrelevant). Optional for Hugging Face models: the saved config rebuilds it.
        inplace: slice ``base_model`` itself rather than a deep copy (saves memory for big models).

    Returns:
        The compacted model, equal in outputs to the one that was saved, in eval mode.

    Raises:
        PlanMismatchError: ``directory`` is not an autosparse save, a file is corrupted, or the
            plan does not fit ``base_model``; the message names the file or tensor at fault.

    Example:
        >>> small = autosparse.load("out/small", MyNet())
        >>> bert = autosparse.load("out/bert")  # Hugging Face: the base is rebuilt from config.json
    """
    root = Path(directory)
    plan = read_json(root, PLAN, SAVE_FORMAT)
    weights = check_file(root, plan.get("weights"))
    base = base_model if base_model is not None else hf_base_model(plan, root)
    if is_sparsified(base) or record_of(base) is not None:
        raise PlanMismatchError("load() needs a fresh base model; the one given is already gated or compacted")
    record_data = _saved_record(root, plan)
    kept = record_data["kept"]
    replaced, dropped = record_data.get("replaced", {}), record_data.get("dropped_layers", [])
    _check_base(base, plan)
    check(base, kept)
    check_layers(base, replaced, dropped)
    base_shapes = architecture(base)
    _check_weights(weights, shapes_after(base_shapes, kept, list(replaced), dropped), plan["weights"]["aliases"])
    target = base if inplace or base_model is None else copy.deepcopy(base)
    replay(target, kept)
    replay_layers(target, replaced, dropped)
    _load_tensors(target, weights, plan["weights"]["aliases"])
    # the rebuilt base carries the base config: make it describe the replayed model (or mark it)
    config_changes = sync_config(target)
    _check_attributes(target, plan)
    _attach_record(target, record_data, base_shapes, plan.get("hf") or {}).config_changes = config_changes
    return target.eval()


def _saved_record(root: Path, plan: Mapping[str, Any]) -> dict[str, Any]:
    record_data = plan.get("record")
    if not isinstance(record_data, dict) or not isinstance(record_data.get("kept"), dict):
        raise PlanMismatchError(f"{root / PLAN} is corrupted: it has no valid 'record'")
    return record_data


def _attach_record(model: nn.Module, record_data: Mapping[str, Any], base_shapes: dict[str, tuple[int, ...]],
                   hf: Mapping[str, Any]) -> Record:
    """Give the loaded model the Record that compact() would have, so it can be saved or explained again."""
    record = Record(kept=record_data["kept"], groups=record_data.get("groups", {}),
                    replaced=list(record_data.get("replaced", {})), dropped_layers=record_data.get("dropped_layers", []))
    record.base_shapes = base_shapes
    record.base_config = hf.get("base_config")
    attach_record(model, record)
    return record


def _check_base(base: nn.Module, plan: Mapping[str, Any]) -> None:
    saved = plan.get("base")
    if saved is None:  # saved from a record without base shapes: check() and the weights decide
        return
    shapes = architecture(base)
    if architecture_hash(shapes) == saved["sha256"]:
        return
    expected = {k: tuple(v) for k, v in saved["shapes"].items()}
    diffs = [f"'{k}': missing in the base model" for k in expected if k not in shapes]
    diffs += [f"'{k}': not in the saved architecture" for k in shapes if k not in expected]
    diffs += [f"'{k}': base model {shapes[k]}, saved {expected[k]}"
              for k in expected if k in shapes and shapes[k] != expected[k]]
    raise PlanMismatchError(
        f"the base {type(base).__name__} is not the architecture the plan was saved from "
        f"({plan.get('model_class')}); {len(diffs)} tensor(s) differ, e.g. " + "; ".join(diffs[:5]))


def _check_weights(path: Path, expected: Mapping[str, tuple[int, ...]], aliases: Mapping[str, str]) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise PlanMismatchError(f"{path} is corrupted: {exc}") from None
    for name in expected:
        shape = stored.get(aliases.get(name, name))
        if shape is None:
            raise PlanMismatchError(f"{path} has no tensor '{name}', which the replayed model needs")
        if shape != expected[name]:
            raise PlanMismatchError(
                f"tensor '{name}': the replayed plan gives shape {expected[name]}, {path.name} holds {shape}")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise PlanMismatchError(f"{path.name} holds tensors the base model lacks: {extra[:5]}")


def _load_tensors(model: nn.Module, path: Path, aliases: Mapping[str, str]) -> None:
    model.load_state_dict(read_tensors(path, aliases), strict=True)


def _check_attributes(model: nn.Module, plan: Mapping[str, Any]) -> None:
    for name, attrs in plan.get("attributes", {}).items():
        now = _plain_attrs(model.get_submodule(name))
        for key, value in attrs.items():
            if key in now and now[key] != value:
                raise PlanMismatchError(
                    f"after replaying the plan, module '{name}' has {key}={now[key]!r} but the saved model had "
                    f"{value!r}; it was saved with autosparse {plan['versions']['autosparse']}, "
                    "whose surgery differs from this version's")
