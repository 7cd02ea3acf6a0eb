"""Saving, loading and exporting: what leaves the training process.

* :mod:`~autosparse.io.save_load`: :func:`save` / :func:`load` of a compacted model with its replayable record;
* :mod:`~autosparse.io.checkpoints`: gated checkpoints to resume training, :func:`load_gated_state`;
* :mod:`~autosparse.io.format`: the on-disk format (atomic directories, JSON, safetensors, versions);
* :mod:`~autosparse.io.export`: ``torch.export`` (``.pt2``) and ONNX.

Every public name is re-exported here, so ``autosparse.io.<name>`` stays stable.
"""

from __future__ import annotations

from autosparse.io.checkpoints import load_checkpoint, load_gated_state, save_checkpoint
from autosparse.io.export import export
from autosparse.io.format import (
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    CONFIG,
    FORMAT_VERSION,
    INPUTS,
    PLAN,
    SAVE_FORMAT,
    STATE,
    WEIGHTS,
    load_inputs,
)
from autosparse.io.save_load import load, save

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_FORMAT",
    "CONFIG",
    "FORMAT_VERSION",
    "INPUTS",
    "PLAN",
    "SAVE_FORMAT",
    "STATE",
    "WEIGHTS",
    "export",
    "load",
    "load_checkpoint",
    "load_gated_state",
    "load_inputs",
    "save",
    "save_checkpoint",
]
