"""Save and load compacted models as weights + a replayable plan.

A *save* (:func:`save` / :func:`load`) is a directory::

    plan.json           format, versions, the Record, the base architecture (names, shapes, hash),
                        module attributes after compaction, weight file hash, Hugging Face config info
    model.safetensors   the compacted weights (tied tensors stored once)
    config.json         Hugging Face models only: the config (edited where it can express the result)
    inputs.safetensors  optional example inputs (the CLI's export and report use them)

What lives where: this module builds and checks the plan (including the Hugging Face config);
:mod:`autosparse.checkpoints` saves and resumes still-gated models (:func:`save_checkpoint`,
:func:`load_checkpoint`, :func:`load_gated_state`); :mod:`autosparse._savedir` holds the file names,
the atomic directory writes and the safetensors / JSON readers both formats share (and
:func:`load_inputs`). The public names of those two modules are re-exported here, so
``autosparse.io.save_checkpoint`` and friends keep working.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    CONFIG,
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
from autosparse.modules.blocks import ZeroBranch
from autosparse.state import is_sparsified

_HF_WIDTH_KEYS = ("intermediate_size", "n_inner", "d_ff")  # config keys that can express a pruned MLP


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
    record = record_of(model)
    if is_sparsified(model) or record is None:
        raise NotSparsifiedError(
            f"save() takes a compacted model; {type(model).__name__} "
            + ("still has gates: call autosparse.compact(model) first, or use save_checkpoint() to resume "
               "training later" if is_sparsified(model) else "has no compaction record")
        )
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
    with atomic_dir(directory, overwrite) as tmp:
        plan["weights"] = write_tensors(model.state_dict(), tmp / WEIGHTS)
        plan["inputs"] = write_inputs(example_inputs, tmp / INPUTS)
        plan["hf"] = _save_hf_config(model, record, tmp)
        (tmp / PLAN).write_text(json.dumps(plan, indent=1))
    return Path(directory)


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


def _save_hf_config(model: nn.Module, record: Any, tmp: Path) -> dict[str, Any] | None:
    """Write config.json; edit it where one key (e.g. intermediate_size) expresses the compaction."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_file"):
        return None
    base_shapes = getattr(record, "base_shapes", None)
    changes = _expressible_changes(model, base_shapes or {})
    out = copy.deepcopy(config)
    for key, value in (changes or {}).items():
        setattr(out, key, value)
    out.architectures = [type(model).__name__]
    out.to_json_file(str(tmp / CONFIG))
    return {"class": type(model).__name__, "base_config": _base_config(model, record, base_shapes),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "compatible": changes is not None,
            "config_changes": {**(getattr(record, "config_changes", None) or {}), **(changes or {})}}


def _on_meta(cls: type, config: Any) -> nn.Module | None:
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            return cls(config)
    except Exception:  # a config the class rejects simply does not describe the model
        return None


def _expressible_changes(model: nn.Module, base_shapes: Mapping) -> dict[str, int] | None:
    """Config edits (none, or one MLP width) under which ``type(model)(config)`` has the compacted shapes."""
    target = architecture(model)
    new_sizes = {n for name, shape in target.items() if name in base_shapes
                 for n, b in zip(shape, base_shapes[name]) if n != b}
    # One edited key can only explain one new width: with several, only the config as it is can fit.
    widths = new_sizes if len(new_sizes) == 1 else set()
    candidates = [{}] + [{key: size} for key in _HF_WIDTH_KEYS if hasattr(model.config, key) for size in widths]
    for changes in candidates:
        config = copy.deepcopy(model.config)
        for key, value in changes.items():
            setattr(config, key, value)
        fresh = _on_meta(type(model), config)
        if fresh is not None and architecture(fresh) == target:
            return changes
    return None


def _base_config(model: nn.Module, record: Any, base_shapes: Mapping | None) -> dict | None:
    """The config of the base model, verified to rebuild ``base_shapes``; None when it cannot be told.

    ``compact`` snapshots it before it rewrites widths and layer counts into the model's config.
    """
    saved = getattr(record, "base_config", None)
    if saved is None:  # a record from before the snapshot existed: only an untouched config will do
        if getattr(record, "config_changes", None) or getattr(record, "dropped_layers", None):
            return None
        saved = model.config.to_dict()
    if base_shapes is None:
        return saved
    fresh = _on_meta(type(model), type(model.config).from_dict(copy.deepcopy(saved)))
    return saved if fresh is not None and architecture(fresh) == dict(base_shapes) else None


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
    base = base_model if base_model is not None else _hf_base(plan, root)
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
    _check_attributes(target, plan)
    _attach_record(target, record_data, base_shapes)
    return target.eval()


def _saved_record(root: Path, plan: Mapping[str, Any]) -> dict[str, Any]:
    record_data = plan.get("record")
    if not isinstance(record_data, dict) or not isinstance(record_data.get("kept"), dict):
        raise PlanMismatchError(f"{root / PLAN} is corrupted: it has no valid 'record'")
    return record_data


def _attach_record(model: nn.Module, record_data: Mapping[str, Any], base_shapes: Mapping[str, Any]) -> None:
    """Give the loaded model the Record that compact() would have, so it can be saved or explained again."""
    record = Record(kept=record_data["kept"], groups=record_data.get("groups", {}),
                    replaced=list(record_data.get("replaced", {})), dropped_layers=record_data.get("dropped_layers", []))
    record.base_shapes = base_shapes
    attach_record(model, record)


def _hf_base(plan: Mapping[str, Any], root: Path) -> nn.Module:
    hf = plan.get("hf")
    if not hf or not hf.get("base_config"):
        raise PlanMismatchError(
            f"{root} holds a {plan.get('model_class')}: pass base_model=, a freshly built instance of it")
    import transformers

    cls = getattr(transformers, hf["class"])
    config = cls.config_class.from_dict(hf["base_config"])
    if hf.get("attn_implementation"):
        config._attn_implementation = hf["attn_implementation"]
    return cls(config)


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
