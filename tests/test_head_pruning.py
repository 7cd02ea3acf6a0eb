"""Attention-head pruning leaves a model whose attributes agree with its weights, within LLM constraints.

Users of head-pruning tools find ``num_heads`` / ``all_head_size`` / ``num_key_value_groups`` stale
after pruning (the model then breaks at another sequence length), heads pruned across grouped-query
(GQA) key/value groups, multi-query (MQA) attention unsupported, and Qwen3's per-``head_dim``
``q_norm`` / ``k_norm`` weights sliced as if they were heads. These tests compact BERT, Llama (GQA and
MQA) and Qwen3 and check attributes, weight layouts and outputs.
"""

from __future__ import annotations

import torch
from torch import nn

import autosparse
from tests import zoo
from tests.zoo import HEAD, HEAD_CHANNEL, get_case, rel_diff, run_no_grad


# ----------------------------------------------------------------------------- stale attributes
def test_bert_attributes_match_the_weights_per_layer_at_a_new_length():
    # stale num_heads / all_head_size after head pruning (INC #525, TP #287, #461)
    model, inputs = get_case("hf_bert").build()
    net = autosparse.sparsify(model, HEAD, example_inputs=inputs)
    gates = autosparse.gates(net)
    gates["encoder.layer.0.attention.self.query"].zero_([0, 2])
    gates["encoder.layer.1.attention.self.query"].zero_([3])
    small = autosparse.compact(net)
    for layer, heads in zip(small.encoder.layer, (2, 3), strict=True):
        attn = layer.attention.self
        width = heads * attn.attention_head_size
        assert (attn.num_attention_heads, attn.attention_head_size, attn.all_head_size) == (heads, 8, width)
        assert attn.query.out_features == attn.key.out_features == attn.value.out_features == width
        assert layer.attention.output.dense.in_features == width
    ids = torch.randint(0, 64, (3, 5))  # another batch size and sequence length, with padding
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    gated, compacted = run_no_grad(net, ids, attention_mask=mask), run_no_grad(small, ids, attention_mask=mask)
    assert rel_diff(gated, compacted) <= 1e-5


def test_llama_attributes_match_the_weights_after_kv_group_pruning():
    # num_key_value_groups / head_dim must agree with the weights (TP #461)
    model, inputs = get_case("hf_llama").build()  # 4 query heads, 2 kv heads, head_dim 8
    net = autosparse.sparsify(model, HEAD, example_inputs=inputs)
    autosparse.gates(net)["model.layers.0.self_attn.q_proj"].zero_([1])
    small = autosparse.compact(net)
    for layer, kv in zip(small.model.layers, (1, 2), strict=True):
        attn = layer.self_attn
        assert attn.head_dim == 8 and attn.k_proj.out_features == attn.v_proj.out_features == kv * 8
        assert attn.q_proj.out_features == kv * attn.num_key_value_groups * attn.head_dim
        assert attn.o_proj.in_features == attn.q_proj.out_features
    tokens = torch.randint(0, 64, (1, 11))
    assert rel_diff(run_no_grad(net, tokens), run_no_grad(small, tokens)) <= 1e-5


# ----------------------------------------------------------------------------- GQA / MQA constraints
def _llama(q_heads: int, kv_heads: int) -> tuple[nn.Module, tuple]:
    config = dict(zoo._CAUSAL, num_attention_heads=q_heads, num_key_value_heads=kv_heads)
    return zoo._build_hf("LlamaForCausalLM", zoo._tokens, config)


def test_gqa_units_are_kv_groups_and_the_compacted_layout_is_valid():
    # pruning must respect KV groups (TP #495); GQA graph builds hang (TP #474, #527)
    model, inputs = _llama(8, 2)  # head_dim 4, 4 query heads per kv head
    report = autosparse.explain(model, example_inputs=inputs)  # completes (no hang on GQA)
    assert [(g.granularity, g.units) for g in report.groups if g.granularity == "head"] == [("head", 2)] * 2
    net = autosparse.sparsify(model, HEAD, example_inputs=inputs)
    autosparse.gates(net)["model.layers.0.self_attn.q_proj"].zero_([0])
    small = autosparse.compact(net)
    before, after = model.model.layers[0].self_attn, small.model.layers[0].self_attn
    # the kept query heads are exactly the 4 that read kv head 1, in order
    assert torch.equal(after.q_proj.weight, before.q_proj.weight[16:32])
    assert torch.equal(after.k_proj.weight, before.k_proj.weight[4:8])
    assert torch.equal(after.v_proj.weight, before.v_proj.weight[4:8])
    assert torch.equal(after.o_proj.weight, before.o_proj.weight[:, 16:32])
    assert after.num_key_value_groups == 4
    tokens = torch.randint(0, 64, (2, 13))
    assert rel_diff(run_no_grad(net, tokens), run_no_grad(small, tokens)) <= 1e-5


def test_mqa_query_heads_compact():
    # MQA support requested across LLM pruning tools
    model, inputs = _llama(8, 1)
    net = autosparse.sparsify(model, HEAD, example_inputs=inputs)
    gate = autosparse.gates(net)["model.layers.0.self_attn.q_proj"]
    assert gate.size == 8  # with one shared kv head, each query head is a unit
    gate.zero_([1, 4, 6])
    small = autosparse.compact(net)
    attn = small.model.layers[0].self_attn
    assert attn.q_proj.out_features == 5 * 4 and attn.num_key_value_groups == 5
    assert rel_diff(run_no_grad(net, *inputs), run_no_grad(small, *inputs)) <= 1e-5


# ----------------------------------------------------------------------------- Qwen3 q/k norms
def test_qwen3_q_norm_and_k_norm_keep_head_dim_whole():
    # TP warns about Qwen3 q_norm / k_norm (bare per-head_dim weights)
    model, inputs = get_case("hf_qwen3").build()
    net = autosparse.sparsify(model, HEAD_CHANNEL, example_inputs=inputs)
    gates = autosparse.gates(net)
    attention = {n: g for n, g in gates.items() if "self_attn" in n}
    assert {n: (g.granularity, g.size) for n, g in attention.items()} == {
        "model.layers.0.self_attn.q_proj": ("head", 2), "model.layers.1.self_attn.q_proj": ("head", 2)}
    gates["model.layers.0.self_attn.q_proj"].zero_([1])
    small = autosparse.compact(net)
    attn = small.model.layers[0].self_attn
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (8,) and attn.head_dim == 8
    assert (attn.q_proj.out_features, attn.k_proj.out_features) == (16, 8)
    tokens = torch.randint(0, 64, (2, 6))
    assert rel_diff(run_no_grad(net, tokens), run_no_grad(small, tokens)) <= 1e-5
