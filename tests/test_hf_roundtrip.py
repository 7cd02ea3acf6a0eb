"""Hugging Face out: a saved compacted model reloads EXACTLY through plain transformers, or plain
transformers refuses it with a message naming ``autosparse.load`` — never a silently different model.

Every Hugging Face family of the zoo, every granularity: uniform widths (the config can say them),
ragged widths, a residual branch replaced by ``ZeroBranch``, a whole layer dropped. Both ways a user
saves: the model's own ``save_pretrained`` and ``autosparse.save``.
"""

from __future__ import annotations

import copy
import functools
import json
import warnings

import numpy as np
import pytest
import torch

import autosparse
from autosparse.compaction.record import record_of
from autosparse.errors import AutosparseWarning
from tests.zoo import get_case, output_tensors

transformers = pytest.importorskip("transformers")

TEXT = ["hf_bert", "hf_roberta", "hf_gpt2", "hf_llama", "hf_mistral", "hf_qwen2", "hf_qwen3", "hf_t5_encoder"]
VISION = ["hf_vit", "hf_swin", "hf_resnet_basic", "hf_resnet_bottleneck", "hf_convnext", "hf_mobilenetv2"]
FAMILIES = TEXT + VISION
# families whose config can say a head count: head_dim (or T5's d_kv) is in it, or the class reads it if added
HEADS_IN_CONFIG = {"hf_llama", "hf_mistral", "hf_qwen2", "hf_qwen3", "hf_t5_encoder", "hf_vit"}
MLP_WIDTH_IN_CONFIG = HEADS_IN_CONFIG | {"hf_bert", "hf_roberta", "hf_gpt2"}
LAYER_FAMILIES = ["hf_llama", "hf_mistral", "hf_qwen2", "hf_qwen3", "hf_gpt2", "hf_vit"]
ATOL = 1e-5
EVERY_GRANULARITY = {"rules": [{"granularity": g} for g in ("head", "channel", "layer")]}


@functools.cache
def _gated_once(name: str):
    model, inputs = get_case(name).build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutosparseWarning)  # a granularity the family lacks
        return autosparse.sparsify(model, EVERY_GRANULARITY, example_inputs=inputs), inputs


def _sparsified(name: str, granularity: str):
    """A fresh copy of the family's gated model (sparsified once: capture is the slow part)."""
    net, inputs = _gated_once(name)
    if not any(g.granularity == granularity for g in autosparse.gates(net).values()):
        pytest.skip(f"{name} has no {granularity} units")
    return copy.deepcopy(net), inputs


def _outputs(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return output_tensors(model(*inputs))


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def plain_reload(small, directory, inputs) -> float | None:
    """``type(small).from_pretrained(directory)`` as transformers alone does it: the max abs difference
    of every output, or None when it refused; a refusal must say to use autosparse.load."""
    try:
        again = type(small).from_pretrained(directory)
    except Exception as exc:  # the refusal, whatever transformers wraps it in
        assert "autosparse.load(directory)" in str(exc), str(exc)
        with pytest.raises(Exception, match=r"autosparse\.load"):
            transformers.AutoConfig.from_pretrained(directory)
        return None
    return _max_diff(_outputs(small, inputs), _outputs(again.eval(), inputs))


def check_both_saves(small, inputs, tmp_path) -> bool:
    """Both save routes: exact through plain transformers, or refused; autosparse.load exact either way.
    Returns whether plain transformers loaded them."""
    expected = _outputs(small, inputs)
    small.save_pretrained(tmp_path / "pretrained")
    autosparse.save(small, tmp_path / "save")
    diffs = [plain_reload(small, tmp_path / d, inputs) for d in ("pretrained", "save")]
    assert (diffs[0] is None) == (diffs[1] is None), "both routes agree on whether the config describes the model"
    plan = json.loads((tmp_path / "save" / "plan.json").read_text())
    assert plan["hf"]["compatible"] is (diffs[1] is not None)
    for d in diffs:
        assert d is None or d <= ATOL
    routes = ["save"] if diffs[0] is not None else ["save", "pretrained"]  # a refused save_pretrained is a save
    for route in routes:
        again = autosparse.load(tmp_path / route)
        assert _max_diff(expected, _outputs(again, inputs)) == 0.0
    return diffs[0] is not None


def _layer_gates(net) -> list:
    return [g for g in autosparse.gates(net).values() if g.granularity == "layer"]


def _zero(net, rng: np.random.Generator | None, granularities: tuple[str, ...]) -> None:
    """Zero every other unit (the same in every layer: uniform widths), or random ones (``rng``)."""
    for gate in autosparse.gates(net).values():
        if gate.granularity not in granularities:
            continue
        units = list(range(0, gate.size, 2)) if rng is None else rng.permutation(gate.size)[: rng.integers(
            1, gate.size)].tolist()
        gate.zero_(units if gate.size > 1 else [])


@pytest.mark.parametrize("name", FAMILIES)
def test_uniform_mlp_widths_round_trip_through_plain_from_pretrained(name, tmp_path):
    net, inputs = _sparsified(name, "channel")
    _zero(net, None, ("channel",))
    small = autosparse.compact(net)
    loaded = check_both_saves(small, inputs, tmp_path)
    if name in MLP_WIDTH_IN_CONFIG:
        assert loaded, f"{name}: a uniform MLP width is one config key"
        key = {"hf_gpt2": "n_inner", "hf_t5_encoder": "d_ff"}.get(name, "intermediate_size")
        assert getattr(small.config, key) == 32  # 64 channels, every other one zeroed


@pytest.mark.parametrize("name", TEXT + ["hf_vit", "hf_swin"])
def test_uniform_heads_round_trip_or_refuse(name, tmp_path):
    net, inputs = _sparsified(name, "head")
    _zero(net, None, ("head",))
    small = autosparse.compact(net)
    assert check_both_saves(small, inputs, tmp_path) is (name in HEADS_IN_CONFIG)
    if name in HEADS_IN_CONFIG:
        assert small.config.num_attention_heads == 2  # 4 heads (GQA: 2 KV groups), every other one zeroed
        assert getattr(small.config, "num_key_value_heads", 1) == 1


@pytest.mark.parametrize("name", FAMILIES)
def test_ragged_widths_are_refused_or_exact(name, tmp_path):
    net, inputs = _sparsified(name, "channel")
    _zero(net, np.random.default_rng(1), ("head", "channel"))
    check_both_saves(autosparse.compact(net), inputs, tmp_path)


@pytest.mark.parametrize("name", LAYER_FAMILIES + ["hf_resnet_basic", "hf_convnext"])
def test_dropped_branch_is_refused(name, tmp_path):
    net, inputs = _sparsified(name, "layer")
    gate = [g for g in autosparse.gates(net).values() if g.granularity == "layer"][-1]
    gate.zero_([0])  # one kind of branch of the first block (a CNN: the whole block): a stand-in
    small = autosparse.compact(net)
    assert record_of(small).replaced
    assert check_both_saves(small, inputs, tmp_path) is False


@pytest.mark.parametrize("name", LAYER_FAMILIES)
def test_dropped_layer_round_trips(name, tmp_path):
    net, inputs = _sparsified(name, "layer")
    for gate in _layer_gates(net):
        gate.zero_([0])  # every branch of the first block: the block leaves its ModuleList
    small = autosparse.compact(net)
    assert len(record_of(small).dropped_layers) == 1
    assert check_both_saves(small, inputs, tmp_path) is True
    assert small.config.num_hidden_layers == 1


def test_silent_wrong_llama_mlp_branch_now_refused(tmp_path):
    """The issue's case: GQA Llama, one decoder layer's MLP branch gated off, plain from_pretrained."""
    net, inputs = _sparsified("hf_llama", "layer")
    assert net.config.num_key_value_heads < net.config.num_attention_heads
    _layer_gates(net)[-1].zero_([1])  # the MLP branch of the second decoder layer
    small = autosparse.compact(net)
    small.save_pretrained(tmp_path)
    with pytest.raises(AttributeError, match=r"autosparse\.load\(directory\)"):
        transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(AttributeError, match=r"autosparse\.load\(directory\)"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    note = json.loads((tmp_path / "config.json").read_text())["autosparse"]
    assert note["transformers_loadable"] is False and "ZeroBranch" in note["reason"]
    again = autosparse.load(tmp_path)
    assert _max_diff(_outputs(small, inputs), _outputs(again, inputs)) == 0.0


def test_save_pretrained_keeps_other_files_and_reloaded_model_saves_again(tmp_path):
    net, inputs = _sparsified("hf_llama", "layer")
    _layer_gates(net)[-1].zero_([0])
    small = autosparse.compact(net)
    (tmp_path / "tokenizer.json").write_text("{}")  # a tokenizer saved first must survive
    small.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "plan.json").exists()
    again = autosparse.load(tmp_path)
    again.save_pretrained(tmp_path / "again")  # the loaded model is marked too
    with pytest.raises(AttributeError, match=r"autosparse\.load"):
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "again")
    assert _max_diff(_outputs(small, inputs), _outputs(autosparse.load(tmp_path / "again"), inputs)) == 0.0
