"""Keep a Hugging Face config consistent with a compacted model where the config can say it.

A config holds one number per kind of width (``num_attention_heads``, ``intermediate_size``).
When every layer ended with the same width, the config is updated and ``save_pretrained`` /
``from_pretrained`` round-trip as usual. When layers differ, the config cannot express the
model: it is left as it was and the per-layer widths live in the compaction record, which
``autosparse.load`` replays on a freshly built model.
"""

from __future__ import annotations

from torch import nn

from autosparse.modules.surgery import out_features, head_layout

_MLP_IN = ("gate_proj", "up_proj", "fc1", "c_fc", "wi", "w1")
_CONFIG_HEADS = ("num_attention_heads", "n_head", "num_heads")
_CONFIG_KV = ("num_key_value_heads",)
_CONFIG_MLP = ("intermediate_size", "n_inner", "d_ff")


def _attention_widths(model: nn.Module) -> tuple[set[int], set[int]]:
    layouts = [layout for layout in map(head_layout, model.modules()) if layout is not None]
    return {n_q for _, n_q, _ in layouts}, {n_kv for _, _, n_kv in layouts}


def _mlp_widths(model: nn.Module) -> set[int]:
    widths = set()
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in _MLP_IN and out_features(module):
            widths.add(out_features(module))
    return widths


def sync_config(model: nn.Module) -> dict[str, int]:
    """Write uniform widths back into ``model.config``; return what changed."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    changed: dict[str, int] = {}
    q_counts, kv_counts = _attention_widths(model)
    if not isinstance(getattr(config, "head_dim", None), int):
        # BERT/GPT-2 style configs derive head_dim = hidden_size / heads: a new head count would
        # change head_dim on reload, so only the record (autosparse.load) can express fewer heads.
        q_counts, kv_counts = set(), set()
    for keys, values in ((_CONFIG_HEADS, q_counts), (_CONFIG_KV, kv_counts), (_CONFIG_MLP, _mlp_widths(model))):
        if len(values) != 1:
            continue
        (value,) = values
        for key in keys:
            if isinstance(getattr(config, key, None), int) and getattr(config, key) != value:
                setattr(config, key, value)
                changed[key] = value
    return changed
