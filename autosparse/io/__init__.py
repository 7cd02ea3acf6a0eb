"""Saving, loading and exporting: what leaves the training process.

* :mod:`~autosparse.io.save_load`: :func:`save` / :func:`load` of a compacted model with its replayable record;
* :mod:`~autosparse.io.hf_dir`: the Hugging Face ``config.json`` of a save (exact or refusing), :func:`hf_base_model`;
* :mod:`~autosparse.io.checkpoints`: gated checkpoints to resume training, :func:`load_gated_state`;
* :mod:`~autosparse.io.materialize`: :func:`materialize` fills a model gated on the meta device (to_empty, dense weights, fresh gates);
* :mod:`~autosparse.io.format`: the on-disk format (atomic directories, JSON, safetensors, versions);
* :mod:`~autosparse.io.export`: ``torch.export`` (``.pt2``) and ONNX.
* :mod:`~autosparse.io.dynamic`: the dynamic shapes of an export and the input shapes its check runs at.

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
from autosparse.io.hf_dir import hf_base_model
from autosparse.io.materialize import materialize
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
    "hf_base_model",
    "load",
    "load_checkpoint",
    "load_gated_state",
    "load_inputs",
    "materialize",
    "save",
    "save_checkpoint",
]
