"""Keep a Hugging Face config consistent with a compacted model, or make its saves refuse plain loading.

A config holds one number per kind of width (``num_attention_heads``, ``intermediate_size``) and a
layer count. :func:`sync_config` writes the compacted widths into it where every layer ended with the
same width, then checks the result the only way that cannot be fooled: it builds ``type(model)(config)``
on the ``meta`` device and compares modules, tensor shapes and size attributes (:func:`config_mismatch`).

When the config cannot describe the model (per-layer widths, a branch replaced by ``ZeroBranch``,
fewer heads in a family whose head size is ``hidden_size / heads``), a plain ``from_pretrained`` would
rebuild another model and load the weights into it half-initialised. So such a model's
``save_pretrained`` is replaced (:func:`mark_inexpressible`): it writes an autosparse save, whose
``config.json`` (:func:`refusing_config`) makes ``from_pretrained`` and ``AutoConfig`` raise with a
message that says to use ``autosparse.load(directory)``.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autosparse.compaction.replay import architecture
from autosparse.errors import ArgumentError, CompactionError
from autosparse.modules.surgery import head_layout, out_features

_MLP_IN = ("gate_proj", "up_proj", "fc1", "c_fc", "wi", "w1")
_MLP_IN_PATHS = ("intermediate.dense",)  # BERT, RoBERTa, ViT: the layer is named by its parent
_CONFIG_HEADS = ("num_attention_heads", "n_head", "num_heads")
_CONFIG_KV = ("num_key_value_heads",)
_CONFIG_MLP = ("intermediate_size", "n_inner", "d_ff", "moe_intermediate_size")
_CONFIG_HEAD_DIM = ("head_dim", "d_kv")  # families whose head size does not follow from the head count
_RUNTIME_ATTRS = frozenset({"training", "gradient_checkpointing"})  # flags a user may toggle: not structure
REFUSAL_KEY = "autosparse"  # the config.json entry that explains a refusing config

# Set by autosparse.io (a higher layer) at import: writes an autosparse save into a directory. A model
# marked inexpressible saves through it, so the directory it writes is one autosparse.load() reads.
_directory_writer: Callable[[nn.Module, Path], None] | None = None


def register_directory_writer(writer: Callable[[nn.Module, Path], None]) -> None:
    """Install what a marked model's ``save_pretrained`` writes (``autosparse.io`` registers it)."""
    global _directory_writer
    _directory_writer = writer


# ------------------------------------------------------------------------------------------ widths
def _mlp_widths(model: nn.Module) -> set[int]:
    widths: set[int] = set()
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in _MLP_IN or name.endswith(_MLP_IN_PATHS):
            width = out_features(module)
            if width:
                widths.add(width)
    return widths


def _expert_widths(model: nn.Module) -> set[int]:
    """Inner widths of expert banks stored as 3-D ``(experts, hidden, inner)`` down projections."""
    downs = (getattr(m, "down_proj", None) for m in model.modules())
    return {int(d.shape[-1]) for d in downs if isinstance(d, torch.Tensor) and d.ndim == 3}


def _uniform_widths(model: nn.Module, config: Any, add_head_dim: bool) -> dict[str, int]:
    """Config keys whose value every layer of ``model`` agrees on, where they differ from ``config``.

    Head counts need the head size in the config: BERT/GPT-2 style classes derive it as
    ``hidden_size / heads``, so a new head count alone would change it on reload. ``add_head_dim``
    adds ``head_dim`` to a config that lacks it (Qwen2, ViT and others read ``getattr(config,
    "head_dim", ...)``); :func:`sync_config` keeps the edits only if a ``meta`` build confirms them.
    """
    layouts = [layout for layout in map(head_layout, model.modules()) if layout is not None]
    q_counts, kv_counts = {n_q for _, n_q, _ in layouts}, {n_kv for _, _, n_kv in layouts}
    head_dims = {d for d, _, _ in layouts}
    out: dict[str, int] = {}
    has_head_dim = any(isinstance(getattr(config, key, None), int) for key in _CONFIG_HEAD_DIM)
    if not has_head_dim and add_head_dim and len(head_dims) == 1:
        out["head_dim"], has_head_dim = next(iter(head_dims)), True
    if not has_head_dim:
        q_counts, kv_counts = set(), set()
    for keys, values in ((_CONFIG_HEADS, q_counts), (_CONFIG_KV, kv_counts), (_CONFIG_MLP, _mlp_widths(model))):
        if len(values) == 1:
            (value,) = values
            out.update({key: value for key in keys if isinstance(getattr(config, key, None), int)
                        and getattr(config, key) != value})
    return out


def _fix_mlp_attributes(model: nn.Module) -> None:
    """MLP modules that keep their width as a config-named attribute (Llama's ``intermediate_size``)
    get the width their weights now have: informational for their forward, but part of the module."""
    for module in model.modules():
        for key in _CONFIG_MLP:
            layer = next((getattr(module, n) for n in _MLP_IN if isinstance(getattr(module, n, None), nn.Module)),
                         None)
            if isinstance(getattr(module, key, None), int) and layer is not None and out_features(layer):
                setattr(module, key, out_features(layer))


def _with(config: Any, edits: dict[str, int]) -> Any:
    out = copy.deepcopy(config)
    for key, value in edits.items():
        setattr(out, key, value)
    return out


def sync_config(model: nn.Module) -> dict[str, int]:
    """Make ``model.config`` describe the compacted model; mark the model where no config can.

    Candidate edits, each kept only if a ``meta`` build of ``type(model)(config)`` is the model's
    architecture (:func:`config_mismatch`): the uniform widths, the same with ``head_dim`` added where
    the config lacks it, then one MLP width key set to a new width. When none
    fits, the uniform widths are written anyway and the model is marked (:func:`mark_inexpressible`).

    Returns:
        The config keys changed (``{}`` for a model without a Hugging Face config).

    Example:
        >>> small = autosparse.compact(net)  # calls sync_config
        >>> small.config.intermediate_size   # every MLP kept 32 channels
        32
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    _fix_mlp_attributes(model)
    uniform = _uniform_widths(model, config, add_head_dim=False)
    candidates = [uniform, _uniform_widths(model, config, add_head_dim=True)]
    candidates += [{**uniform, **edit} for edit in _single_width_edits(model, _with(config, uniform))]
    reason = None
    for items in dict.fromkeys(map(lambda e: tuple(sorted(e.items())), candidates)):
        reason = config_mismatch(model, _with(config, dict(items)))
        if reason is None:
            break
    edits = dict(items) if reason is None else uniform
    for key, value in edits.items():
        setattr(config, key, value)
    if reason is None:
        unmark(model)
    else:
        mark_inexpressible(model)
    return edits


def _single_width_edits(model: nn.Module, config: Any) -> list[dict[str, int]]:
    """One MLP key set to a width the model has and ``type(model)(config)`` lacks: covers MLPs whose
    layer names :func:`_mlp_widths` does not know."""
    fresh = on_meta(type(model), copy.deepcopy(config))
    if isinstance(fresh, str):
        return []
    sizes = {n for t in model.state_dict(keep_vars=True).values() for n in t.shape}
    sizes -= {n for t in fresh.state_dict(keep_vars=True).values() for n in t.shape}
    sizes |= _expert_widths(model)  # may equal another size of the model (hidden, head_dim)
    return [{key: size} for key in _CONFIG_MLP if hasattr(config, key) for size in sorted(sizes)]


# ------------------------------------------------------------------------------------------ check
def on_meta(cls: type, config: Any) -> nn.Module | str:
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            return cls(config)
    except Exception as exc:  # a config the class rejects simply does not describe the model
        return f"{cls.__name__}(config) fails: {type(exc).__name__}: {exc}"


def _plain(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k not in _RUNTIME_ATTRS and isinstance(v, (bool, int, float, str))}


def config_mismatch(model: nn.Module, config: Any = None) -> str | None:
    """Why ``type(model)(config)`` would not be ``model``'s architecture; None when it would be.

    Compares, on a ``meta``-device build: module names and classes, every parameter and buffer
    (name and shape), and the plain size attributes of every module (``num_heads``, ``head_dim``...).

    Example:
        >>> config_mismatch(small)
        "'model.layers.0.mlp' is a ZeroBranch; LlamaForCausalLM(config) builds a LlamaMLP there"
    """
    config = copy.deepcopy(model.config if config is None else config)
    invalid = _invalid(config)
    if invalid is not None:
        return invalid
    fresh = on_meta(type(model), config)
    if isinstance(fresh, str):
        return fresh
    cls = type(model).__name__
    mine = {n: type(m).__name__ for n, m in model.named_modules()}
    theirs = {n: type(m).__name__ for n, m in fresh.named_modules()}
    for name in sorted(mine.keys() | theirs.keys()):
        if mine.get(name) != theirs.get(name):
            return (f"'{name}' is a {mine.get(name, 'missing module')}; {cls}(config) builds "
                    f"{theirs.get(name, 'nothing')} there")
    shapes = {**architecture(model), **{n: tuple(b.shape) for n, b in model.named_buffers()}}
    fresh_shapes = {**architecture(fresh), **{n: tuple(b.shape) for n, b in fresh.named_buffers()}}
    for name in sorted(shapes.keys() | fresh_shapes.keys()):
        if shapes.get(name) != fresh_shapes.get(name):
            return f"tensor '{name}' has shape {shapes.get(name)}; {cls}(config) builds {fresh_shapes.get(name)}"
    modules = dict(fresh.named_modules())
    for name, module in model.named_modules():
        ours, built = _plain(module), _plain(modules[name])
        for key in sorted(ours.keys() & built.keys()):
            if ours[key] != built[key]:
                return f"module '{name}' has {key}={ours[key]!r}; {cls}(config) builds {key}={built[key]!r}"
    return None


def _invalid(config: Any) -> str | None:
    """Why transformers would refuse to save or load ``config`` (its own validation, e.g. a head
    count that does not divide hidden_size in families that check it); None when it accepts it."""
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return None
    try:
        validate()
    except Exception as exc:  # transformers raises its own (strict dataclass) validation errors
        return f"transformers rejects the rewritten config: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


# ------------------------------------------------------------------------------------------ refuse
def refusing_config(model: nn.Module, reason: str) -> dict[str, Any]:
    """The ``config.json`` of a model its config cannot describe: plain transformers refuses to load it.

    Loading a config runs ``getattr(torch, config["dtype"])``; the ``dtype`` written here is a
    sentence, so ``from_pretrained`` / ``AutoConfig.from_pretrained`` raise an ``AttributeError``
    that quotes it, before any weight is read. The true dtype and the reason are under
    ``"autosparse"``. ``autosparse.load`` never reads ``config.json`` (the plan holds the config).
    """
    config: Any = model.config  # a transformers config; nn.Module.__getattr__ types it Tensor | Module
    out = json.loads(config.to_json_string(use_diff=False))
    dtype = next((str(p.dtype).rpartition(".")[2] for p in model.parameters()), None)
    message = (f"autosparse: transformers cannot rebuild this pruned {type(model).__name__} from its "
               f"config.json; load the directory with autosparse.load(directory)")
    out.update(dtype=message, torch_dtype=message, architectures=[type(model).__name__])
    out[REFUSAL_KEY] = {"transformers_loadable": False, "reason": reason, "dtype": dtype,
                        "load_with": "autosparse.load(directory)"}
    return out


def mark_inexpressible(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (and ``push_to_hub``, ``Trainer.save_model``) write an autosparse
    save with a refusing ``config.json`` instead of a directory transformers would load wrongly."""
    # an instance attribute, not a config field: nothing in a config is both inert in memory and fatal on
    # load, and transformers rewrites dtype/architectures during save_pretrained. A partial pickles and
    # deep-copies with the model (bound to the copy).
    model.save_pretrained = functools.partial(  # type: ignore[assignment]  # nn.Module.__setattr__ takes any value
        _save_pretrained_refusing, model)


def unmark(model: nn.Module) -> None:
    """Undo :func:`mark_inexpressible` (the config describes the model again)."""
    model.__dict__.pop("save_pretrained", None)


def _save_pretrained_refusing(model: nn.Module, save_directory: str | os.PathLike[str], *args: Any,
                              **kwargs: Any) -> None:
    if kwargs.get("push_to_hub"):
        raise ArgumentError("save_pretrained(push_to_hub=True) on a model its config cannot describe: call "
                            "model.push_to_hub(repo_id), which uploads the autosparse save this method writes")
    if _directory_writer is None:  # `import autosparse` registers it; only a broken install gets here
        raise CompactionError("autosparse.io is not loaded, so this compacted model cannot be saved safely")
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    _directory_writer(model, directory)
