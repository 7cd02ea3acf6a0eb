"""Heads, MLP channels and layers on transformer models: Hugging Face in, Hugging Face out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import autosparse
from autosparse.compaction.record import record_of
from tests.zoo import get_case, rel_diff

LAYER_CASES = ["hf_llama", "hf_mistral", "hf_qwen2", "hf_qwen3", "hf_gpt2", "hf_vit"]
ALL_GRANULARITIES = {"rules": [{"granularity": "head"}, {"granularity": "channel"}, {"granularity": "layer"}]}



@pytest.mark.parametrize("name", LAYER_CASES)
def test_layer_gates_remove_branches_and_layers(name):
    model, inputs = get_case(name).build()
    net = autosparse.sparsify(model, {"rules": [{"granularity": "layer"}]}, example_inputs=inputs)
    gates = autosparse.gates(net)
    assert len(gates) == 2 and all(g.granularity == "layer" and g.size == 2 for g in gates.values())
    with torch.no_grad():
        assert rel_diff(model(*inputs), net(*inputs)) <= 1e-6
    for gate in gates.values():
        gate.zero_([0])  # every branch of the first block
    with torch.no_grad():
        gated = net(*inputs)
    small = autosparse.compact(net)
    assert type(small) is type(model)
    record = record_of(small)
    assert len(record.replaced) == 2 and len(record.dropped_layers) == 1
    with torch.no_grad():
        assert rel_diff(gated, small(*inputs)) <= 1e-5
    layers = [m for m in small.modules() if isinstance(m, torch.nn.ModuleList) and len(m) >= 1]
    assert min(len(m) for m in layers) == 1
    if hasattr(small, "config") and hasattr(small.config, "num_hidden_layers"):
        assert small.config.num_hidden_layers == 1
    n_before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) < 0.75 * n_before


def test_layer_gate_nonzero_value_is_folded():
    model, inputs = get_case("hf_llama").build()
    net = autosparse.sparsify(model, {"rules": [{"granularity": "layer"}]}, example_inputs=inputs)
    gate = next(iter(autosparse.gates(net).values()))
    with torch.no_grad():
        gate.gamma.copy_(torch.tensor([0.3, -0.2]))  # both branches kept, unequal gate values
    assert gate.kept() == 2 and not torch.allclose(gate.values(), torch.ones(2))
    with torch.no_grad():
        gated = net(*inputs)
    small = autosparse.compact(net)
    assert record_of(small).replaced == []
    with torch.no_grad():
        assert rel_diff(gated, small(*inputs)) <= 1e-5


@pytest.mark.parametrize("name", ["hf_llama", "hf_gpt2", "hf_qwen3"])
def test_generate_after_compaction_matches_gated(name):
    model, inputs = get_case(name).build()
    net = autosparse.sparsify(model, ALL_GRANULARITIES, example_inputs=inputs)
    rng = np.random.default_rng(0)
    for gate in autosparse.gates(net).values():
        gate.zero_(rng.permutation(gate.size)[: gate.size // 2].tolist())
    small = autosparse.compact(net)
    prompt = inputs[0][:1, :4]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        expected = net.generate(prompt, **kwargs)
        got = small.generate(prompt, **kwargs)
    assert torch.equal(expected, got)
    assert got.shape[1] == prompt.shape[1] + 6


def test_gqa_units_are_whole_kv_groups():
    model, inputs = get_case("hf_llama").build()  # 4 query heads, 2 kv heads
    net = autosparse.sparsify(model, {"rules": [{"granularity": "head"}]}, example_inputs=inputs)
    heads = [g for g in autosparse.gates(net).values() if g.granularity == "head"]
    assert [g.size for g in heads] == [2, 2]  # one unit per KV group
    heads[0].zero_([1])
    small = autosparse.compact(net)
    attn = small.model.layers[0].self_attn
    assert attn.q_proj.out_features == 2 * attn.head_dim and attn.k_proj.out_features == attn.head_dim
    assert attn.o_proj.in_features == attn.q_proj.out_features
    assert small.model.layers[1].self_attn.q_proj.out_features == 4 * attn.head_dim


def test_head_attributes_are_rewritten_for_bert():
    model, inputs = get_case("hf_bert").build()
    net = autosparse.sparsify(model, {"rules": [{"granularity": "head"}]}, example_inputs=inputs)
    autosparse.gates(net)["encoder.layer.0.attention.self.query"].zero_([0, 2])
    small = autosparse.compact(net)
    attn = small.encoder.layer[0].attention.self
    assert attn.query.out_features == attn.key.out_features == attn.value.out_features == 2 * 8
    assert getattr(attn, "num_attention_heads", 2) == 2
    with torch.no_grad():
        small(torch.randint(0, 64, (3, 5)))  # another batch and sequence length


def test_head_policy_on_a_model_without_attention_says_so():
    model, inputs = get_case("resnet_basic").build()
    with pytest.raises(autosparse.NoGatesError, match="head"):
        autosparse.sparsify(model, {"rules": [{"granularity": "head"}]}, example_inputs=inputs)


def test_residual_hidden_size_is_reported_unprunable():
    model, inputs = get_case("hf_llama").build()
    report = autosparse.explain(model, example_inputs=inputs)
    assert any("embed_tokens" in where for where, _ in report.unprunable)
    assert any("normalis" in why or "reduction" in why for _, why in report.unprunable)


def test_uniform_widths_update_the_config_and_reload_with_from_pretrained(tmp_path):
    model, inputs = get_case("hf_llama").build()
    net = autosparse.sparsify(model, {"rules": [{"granularity": "head"}, {"granularity": "channel"}]},
                              example_inputs=inputs)
    for gate in autosparse.gates(net).values():  # the same units in every layer: widths stay uniform
        gate.zero_([0] if gate.granularity == "head" else list(range(0, gate.size, 2)))
    small = autosparse.compact(net)
    assert small.config.num_attention_heads == 2 and small.config.num_key_value_heads == 1
    assert small.config.intermediate_size == 32
    small.save_pretrained(tmp_path)
    reloaded = type(small).from_pretrained(tmp_path)
    with torch.no_grad():
        assert rel_diff(small(*inputs), reloaded(*inputs)) <= 1e-6


def test_torch_transformer_encoder_layers_are_not_offered_as_branches():
    model, inputs = get_case("torch_encoder").build()
    with pytest.raises(autosparse.NoGatesError):
        autosparse.sparsify(model, {"rules": [{"granularity": "layer"}]}, example_inputs=inputs)
    net = autosparse.sparsify(model, ALL_GRANULARITIES, example_inputs=inputs)
    for gate in autosparse.gates(net).values():
        gate.zero_([0])
    small = autosparse.compact(net)  # verified: the channel gates still compact exactly
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
