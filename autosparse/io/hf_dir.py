"""The Hugging Face part of a save directory: ``config.json``, the base config, rebuilding the base model.

A save of a Hugging Face model always has a ``config.json``. Either the compacted model's config
describes it exactly (checked by :func:`autosparse.compaction.hf_config.config_mismatch` on a ``meta``
build), and then plain ``from_pretrained`` loads the directory; or it does not, and the file written is
:func:`~autosparse.compaction.hf_config.refusing_config`, which plain transformers refuses to load with
a message that points to ``autosparse.load``. Never a config that loads into another model.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from autosparse.compaction.hf_config import config_mismatch, on_meta, refusing_config
from autosparse.compaction.replay import architecture
from autosparse.errors import PlanMismatchError
from autosparse.io.format import CONFIG


def write_hf_config(model: nn.Module, record: Any, root: Path) -> dict[str, Any] | None:
    """Write ``root/config.json`` (exact, or refusing); return the plan's ``"hf"`` entry (None: not HF).

    Example:
        >>> write_hf_config(small, record_of(small), Path("out"))["compatible"]
        True
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_file"):
        return None
    reason = config_mismatch(model)
    if reason is None:
        out = copy.deepcopy(config)
        out.architectures = [type(model).__name__]
        out.to_json_file(str(root / CONFIG))
    else:
        (root / CONFIG).write_text(json.dumps(refusing_config(model, reason), indent=2, sort_keys=True))
    base_shapes = getattr(record, "base_shapes", None)
    return {"class": type(model).__name__, "base_config": _base_config(model, record, base_shapes),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "compatible": reason is None, "reason": reason,
            "config_changes": dict(getattr(record, "config_changes", None) or {})}


def _hf_config(model: nn.Module) -> Any:
    """``model.config``, a transformers config (``nn.Module.__getattr__`` types it ``Tensor | Module``)."""
    return model.config


def _base_config(model: nn.Module, record: Any, base_shapes: Mapping | None) -> dict | None:
    """The config of the base model, verified to rebuild ``base_shapes``; None when it cannot be told.

    ``compact`` snapshots it before it rewrites widths and layer counts into the model's config.
    """
    saved = getattr(record, "base_config", None)
    if saved is None:  # a record from before the snapshot existed: only an untouched config will do
        if getattr(record, "config_changes", None) or getattr(record, "dropped_layers", None):
            return None
        saved = _hf_config(model).to_dict()
    if base_shapes is None:
        return saved
    fresh = on_meta(type(model), type(_hf_config(model)).from_dict(copy.deepcopy(saved)))
    return saved if not isinstance(fresh, str) and architecture(fresh) == dict(base_shapes) else None


def hf_base_model(plan: Mapping[str, Any], root: Path) -> nn.Module:
    """A fresh base model built from the saved base config (what ``autosparse.load(dir)`` replays on).

    Raises:
        PlanMismatchError: the save holds no base config (not a Hugging Face model, or one whose
            config could not be verified to rebuild the base): pass ``base_model=``.

    Example:
        >>> base = hf_base_model(json.loads(Path("out/plan.json").read_text()), Path("out"))
    """
    hf = plan.get("hf")
    if not hf or not hf.get("base_config"):
        raise PlanMismatchError(
            f"{root} holds a {plan.get('model_class')}: pass base_model=, a freshly built instance of it")
    import transformers  # deferred: the core does not require transformers

    cls = getattr(transformers, hf["class"])
    config = cls.config_class.from_dict(hf["base_config"])
    if hf.get("attn_implementation"):
        config._attn_implementation = hf["attn_implementation"]
    return cls(config)
