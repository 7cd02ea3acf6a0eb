"""Save and load: compacted models as weights + a replayable plan, gated models as checkpoints.

A *save* (:func:`save` / :func:`load`) is a directory::

    plan.json           format, versions, the Record, the base architecture (names, shapes, hash),
                        module attributes after compaction, weight file hash, Hugging Face config info
    model.safetensors   the compacted weights (tied tensors stored once)
    config.json         Hugging Face models only: the config (edited where it can express the result)
    inputs.safetensors  optional example inputs (the CLI's export and report use them)

A *checkpoint* (:func:`save_checkpoint` / :func:`load_checkpoint`) holds a still-gated model so
training can resume: ``checkpoint.json`` (policy, model spec, step) + ``state.safetensors`` (the gated
``state_dict``) + ``inputs.safetensors``. Neither format pickles code. Every directory is written to a
temporary sibling first and renamed into place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autosparse.errors import NotSparsifiedError, PlanMismatchError
from autosparse.replay import (
    architecture,
    architecture_hash,
    check,
    check_layers,
    moved,
    replay,
    replay_layers,
    shapes_after,
)
from autosparse.state import get_state, is_sparsified

SAVE_FORMAT, CHECKPOINT_FORMAT, FORMAT_VERSION = "autosparse-save", "autosparse-checkpoint", 1
PLAN, WEIGHTS, INPUTS, CONFIG = "plan.json", "model.safetensors", "inputs.safetensors", "config.json"
CHECKPOINT, STATE = "checkpoint.json", "state.safetensors"
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
    record = getattr(model, "_autosparse_record", None)
    if is_sparsified(model) or record is None:
        raise NotSparsifiedError(
            f"save() takes a compacted model; {type(model).__name__} "
            + ("still has gates: call autosparse.compact(model) first, or use save_checkpoint() to resume "
               "training later" if is_sparsified(model) else "has no compaction record")
        )
    base_shapes = getattr(record, "base_shapes", None)
    layers = _layer_record(model, record)
    plan: dict[str, Any] = {
        "format": SAVE_FORMAT, "format_version": FORMAT_VERSION, "versions": _versions(),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}", "model_spec": model_spec,
        "base": None if base_shapes is None else {
            "sha256": architecture_hash(base_shapes), "shapes": {k: list(v) for k, v in base_shapes.items()}},
        "record": {"kept": record.kept, "groups": record.groups, **layers},
        "attributes": _attributes(model, record.kept, layers),
    }
    with _atomic_dir(directory, overwrite) as tmp:
        plan["weights"] = _write_tensors(model.state_dict(), tmp / WEIGHTS)
        plan["inputs"] = _write_inputs(example_inputs, tmp / INPUTS)
        plan["hf"] = _save_hf_config(model, record, tmp)
        (tmp / PLAN).write_text(json.dumps(plan, indent=1))
    return Path(directory)


def _versions() -> dict[str, str | None]:
    import autosparse  # the package imports this module: read the version at call time

    try:
        import transformers
    except ImportError:
        transformers = None
    return {"autosparse": autosparse.__version__, "torch": torch.__version__,
            "transformers": getattr(transformers, "__version__", None), "python": platform.python_version()}


def _layer_record(model: nn.Module, record: Any) -> dict[str, Any]:
    """Branches replaced by ZeroBranch (with the output structure each stands in for) and dropped layers."""
    from autosparse.nn import ZeroBranch

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


@contextlib.contextmanager
def _atomic_dir(directory: str | os.PathLike[str], overwrite: bool) -> Iterator[Path]:
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


def _write_tensors(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, Any]:
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
    return {"file": path.name, "sha256": _sha256(path), "aliases": aliases}


def _write_inputs(inputs: tuple | None, path: Path) -> dict[str, Any] | None:
    if inputs is None:
        return None
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError("example_inputs can be saved only as a tuple of tensors")
    entry = _write_tensors({f"input_{i}": x for i, x in enumerate(inputs)}, path)
    return {**entry, "count": len(inputs)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    plan = _read_json(root, PLAN, SAVE_FORMAT)
    weights = _check_file(root, plan.get("weights"))
    base = base_model if base_model is not None else _hf_base(plan, root)
    if is_sparsified(base) or getattr(base, "_autosparse_record", None) is not None:
        raise PlanMismatchError("load() needs a fresh base model; the one given is already gated or compacted")
    record_data = plan.get("record")
    if not isinstance(record_data, dict) or not isinstance(record_data.get("kept"), dict):
        raise PlanMismatchError(f"{root / PLAN} is corrupted: it has no valid 'record'")
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
    from autosparse.compaction import Record  # imported late: compaction pulls in the gating machinery

    record = Record(kept=kept, groups=record_data.get("groups", {}), replaced=list(replaced), dropped_layers=dropped)
    record.base_shapes = base_shapes
    target._autosparse_record = record
    return target.eval()


def load_inputs(directory: str | os.PathLike[str]) -> tuple | None:
    """The example inputs stored by :func:`save` or :func:`save_checkpoint`, or None."""
    root = Path(directory)
    meta = _read_json(root, CHECKPOINT, CHECKPOINT_FORMAT) if (root / CHECKPOINT).exists() else \
        _read_json(root, PLAN, SAVE_FORMAT)
    entry = meta.get("inputs")
    if entry is None:
        return None
    tensors = _read_tensors(_check_file(root, entry), entry["aliases"])
    return tuple(tensors[f"input_{i}"] for i in range(entry["count"]))


def _read_json(root: Path, name: str, fmt: str) -> dict[str, Any]:
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


def _check_file(root: Path, entry: Mapping[str, Any] | None) -> Path:
    if not entry:
        raise PlanMismatchError(f"{root}: the plan names no weight file")
    path = root / entry["file"]
    if not path.is_file():
        raise PlanMismatchError(f"{root} is incomplete: {entry['file']} is missing")
    if _sha256(path) != entry["sha256"]:
        raise PlanMismatchError(f"{path} is corrupted: its sha256 differs from the one recorded at save time")
    return path


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


def _read_tensors(path: Path, aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise PlanMismatchError(f"{path} is corrupted: {exc}") from None
    tensors.update({alias: tensors[name] for alias, name in aliases.items()})
    return tensors


def _load_tensors(model: nn.Module, path: Path, aliases: Mapping[str, str]) -> None:
    model.load_state_dict(_read_tensors(path, aliases), strict=True)


def _check_attributes(model: nn.Module, plan: Mapping[str, Any]) -> None:
    for name, attrs in plan.get("attributes", {}).items():
        now = _plain_attrs(model.get_submodule(name))
        for key, value in attrs.items():
            if key in now and now[key] != value:
                raise PlanMismatchError(
                    f"after replaying the plan, module '{name}' has {key}={now[key]!r} but the saved model had "
                    f"{value!r}; it was saved with autosparse {plan['versions']['autosparse']}, "
                    "whose surgery differs from this version's")


# ------------------------------------------------------------------------ gated checkpoints
def load_gated_state(net: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """``net.load_state_dict(state_dict)`` for a gated model, with errors that name the gate.

    Raises:
        PlanMismatchError: a gate is missing, extra, or of another size in ``state_dict``, or a
            weight has another shape (the checkpoint comes from another model or policy).

    Example:
        >>> net2 = autosparse.sparsify(build(), policy, example_inputs=(x,))
        >>> autosparse.load_gated_state(net2, torch.load("gated.pt"))
    """
    get_state(net)
    own = net.state_dict()
    gate_keys = {f"{prefix}.gamma": gate for prefix, gate in _gate_prefixes(net)}
    for key, gate in gate_keys.items():
        if key not in state_dict:
            raise PlanMismatchError(
                f"the checkpoint has no gate for group '{gate.name}' ({key}); it was saved from a model "
                "sparsified with another policy or architecture")
        if tuple(state_dict[key].shape) != (gate.size,):
            raise PlanMismatchError(
                f"gate '{gate.name}' has {gate.size} units in this model but "
                f"{tuple(state_dict[key].shape)[0] if state_dict[key].ndim else 0} in the checkpoint; "
                "sparsify the same architecture with the same policy before loading")
    extra = [k for k in state_dict if k.endswith(".gamma") and ".gate_" in k and k not in gate_keys]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if extra or missing or unexpected:
        raise PlanMismatchError(
            "the checkpoint does not fit this gated model: "
            + "; ".join(f"{what}: {keys[:4]}" for what, keys in
                        (("gates not in this model", extra), ("missing", missing), ("unexpected", unexpected))
                        if keys))
    for key, value in own.items():
        if tuple(state_dict[key].shape) != tuple(value.shape):
            raise PlanMismatchError(f"tensor '{key}' has shape {tuple(value.shape)} in this model but "
                                    f"{tuple(state_dict[key].shape)} in the checkpoint")
    net.load_state_dict(state_dict, strict=True)


def _gate_prefixes(net: nn.Module) -> Iterator[tuple[str, Any]]:
    from autosparse.gates import Gate

    for name, module in net.named_modules():
        if isinstance(module, Gate):
            yield name, module


def save_checkpoint(net: nn.Module, directory: str | os.PathLike[str], *, model_spec: str | None = None,
                    step: int | None = None, overwrite: bool = False) -> Path:
    """Save a gated (still training) model so that :func:`load_checkpoint` can resume it.

    Args:
        net: a model returned by :func:`autosparse.sparsify`.
        directory: the directory to create.
        model_spec: ``"pkg.module:build"`` that rebuilds the dense model; ``autosparse compact`` needs it.
        step: the training step (defaults to the model's own step counter).
        overwrite: replace an existing directory.

    Example:
        >>> autosparse.io.save_checkpoint(net, "ckpt", model_spec="mypkg.models:build")
        $ autosparse compact ckpt --out small
    """
    state = get_state(net)
    meta = {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, "versions": _versions(),
            "model_class": f"{type(net).__module__}.{type(net).__qualname__}", "model_spec": model_spec,
            "policy": state.policy.to_dict(), "step": state.step if step is None else int(step)}
    with _atomic_dir(directory, overwrite) as tmp:
        meta["weights"] = _write_tensors(net.state_dict(), tmp / STATE)
        meta["inputs"] = _write_inputs(state.example_inputs, tmp / INPUTS)
        (tmp / CHECKPOINT).write_text(json.dumps(meta, indent=1))
    return Path(directory)


def load_checkpoint(directory: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Sparsify ``model`` (dense, freshly built) with the saved policy and inputs, then load the gates.

    Raises:
        PlanMismatchError: not a checkpoint, a corrupted file, or a gate / weight that does not fit.
    """
    from autosparse.api import sparsify

    root = Path(directory)
    meta = _read_json(root, CHECKPOINT, CHECKPOINT_FORMAT)
    tensors = _read_tensors(_check_file(root, meta["weights"]), meta["weights"]["aliases"])
    if is_sparsified(model):
        raise NotSparsifiedError("load_checkpoint() takes the dense model; it sparsifies it itself")
    net = sparsify(model, meta["policy"], example_inputs=load_inputs(root))
    load_gated_state(net, tensors)
    get_state(net).step = int(meta.get("step") or 0)
    return net
