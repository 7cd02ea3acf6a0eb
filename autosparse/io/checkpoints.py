"""Checkpoints of gated (still training) models, so training can resume; also loading a gated state.

A checkpoint (:func:`save_checkpoint` / :func:`load_checkpoint`) is a directory: ``checkpoint.json``
(policy, model spec, step) + ``state.safetensors`` (the gated ``state_dict``) + ``inputs.safetensors``.
It is written atomically through :mod:`autosparse._savedir`, like a save of a compacted model
(:mod:`autosparse.io`). :func:`load_gated_state` loads a plain gated ``state_dict`` with errors that
name the gate at fault. All three are re-exported from :mod:`autosparse.io`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autosparse.api import sparsify
from autosparse.errors import NotSparsifiedError, PlanMismatchError
from autosparse.gating.gate import Gate
from autosparse.io.format import (
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    INPUTS,
    STATE,
    atomic_dir,
    check_file,
    library_versions,
    load_inputs,
    read_json,
    read_tensors,
    write_inputs,
    write_tensors,
)
from autosparse.state import get_state, is_sparsified


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
    meta = {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, "versions": library_versions(),
            "model_class": f"{type(net).__module__}.{type(net).__qualname__}", "model_spec": model_spec,
            "policy": state.policy.to_dict(), "step": state.step if step is None else int(step)}
    with atomic_dir(directory, overwrite) as tmp:
        meta["weights"] = write_tensors(net.state_dict(), tmp / STATE)
        meta["inputs"] = write_inputs(state.example_inputs, tmp / INPUTS)
        (tmp / CHECKPOINT).write_text(json.dumps(meta, indent=1))
    return Path(directory)


def load_checkpoint(directory: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Sparsify ``model`` (dense, freshly built) with the saved policy and inputs, then load the gates.

    Raises:
        PlanMismatchError: not a checkpoint, a corrupted file, or a gate / weight that does not fit.
        NotSparsifiedError: ``model`` is already gated.

    Example:
        >>> net = autosparse.io.load_checkpoint("ckpt", build())  # gated, at the saved step
        >>> loss = task_loss(net(x)) + autosparse.penalty(net)
    """
    root = Path(directory)
    meta = read_json(root, CHECKPOINT, CHECKPOINT_FORMAT)
    tensors = read_tensors(check_file(root, meta["weights"]), meta["weights"]["aliases"])
    if is_sparsified(model):
        raise NotSparsifiedError("load_checkpoint() takes the dense model; it sparsifies it itself")
    net = sparsify(model, meta["policy"], example_inputs=load_inputs(root))
    load_gated_state(net, tensors)
    get_state(net).step = int(meta.get("step") or 0)
    return net
