"""``uniform: true``: every group of a rule keeps one width, so a Hugging Face config can state it.

Three layers whose gates leave 2, 3 and 1 KV head groups (of 4) and 40, 30 and 20 MLP channels
(of 64) open: the freeze step cuts them to the rounded means, 2 heads and 32 channels (30 rounded
up by ``round_to: 8``); without a freeze, compaction tops every layer up to the widest (3 and 40),
which is exact. Either way plain ``from_pretrained`` reloads the saved model. Also: ``prune`` with
uniform rules, the joint kept masks in isolation, and ``autosparse.api.summary``.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import autosparse
from autosparse.api import summary
from autosparse.errors import AutosparseWarning
from autosparse.gating.gate import Gate
from autosparse.gating.kept import kept_masks
from autosparse.policy import Rule
from autosparse.state import get_state
from autosparse.training.budget import build_cost_model
from tests.zoo import get_case, output_tensors

transformers = pytest.importorskip("transformers")

_TEXT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, intermediate_size=64,
             max_position_embeddings=64, attn_implementation="eager")
LLAMA = dict(_TEXT, num_attention_heads=8, num_key_value_heads=4, use_cache=False)  # head_dim 4, 2 q per KV
BERT = dict(_TEXT, num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
UNIFORM = {"rules": [{"granularity": "head", "name": "heads", "uniform": True, "round_to": 2},
                     {"granularity": "channel", "name": "mlp", "uniform": True, "round_to": 8}]}
OPEN = {"head": [2, 3, 1], "channel": [40, 30, 20]}  # open units per layer, after zeroing
ATOL = 1e-5


def _gated(cls_name: str, config: dict, policy: dict = UNIFORM, opened: dict[str, list[int]] = OPEN):
    """The model sparsified with uniform rules, gammas perturbed (so gate values differ) and
    each layer's gates zeroed down to ``opened`` units."""
    torch.manual_seed(0)
    cls = getattr(transformers, cls_name)
    model = cls(cls.config_class(**config)).eval()
    inputs = (torch.randint(0, 64, (2, 8)),)
    net = autosparse.sparsify(model, policy, example_inputs=inputs)
    gen = torch.Generator().manual_seed(1)
    seen = {"head": 0, "channel": 0}
    for gate in autosparse.gates(net).values():
        with torch.no_grad():
            gate.gamma.copy_(0.1 * torch.randn(gate.size, generator=gen))
        count = opened[gate.granularity][seen[gate.granularity]]
        seen[gate.granularity] += 1
        gate.zero_(torch.randperm(gate.size, generator=gen)[: gate.size - count])
    return net, inputs


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return output_tensors(model(*inputs))[0]


def _kept(net, granularity: str) -> list[int]:
    return [g.kept() for g in autosparse.gates(net).values() if g.granularity == granularity]


def _plain_reload_diff(small, inputs, tmp_path) -> float:
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    return float((_logits(small, inputs) - _logits(again, inputs)).abs().max())


def _train(net, inputs, steps: int) -> dict[str, torch.Tensor]:
    """A few optimizer steps on a toy loss plus the penalty; returns the masks the cost model
    predicted for the uniform rules just before the freeze step's equalization."""
    state = get_state(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    predicted = {}
    for _ in range(steps):
        opt.zero_grad()
        loss = output_tensors(net(*inputs))[0].pow(2).mean() + autosparse.penalty(net)
        loss.backward()
        opt.step()
        if state.step + 1 == state.policy.schedule.freeze_step:
            masks = kept_masks(state.gate_list(), [gg.rule for gg in state.plan.gated], predict=True)
            predicted = {gg.name: m for gg, m in zip(state.plan.gated, masks)}
        autosparse.training.step(net)
    return predicted


def test_llama_gqa_freeze_equalizes_and_reloads_through_plain_from_pretrained(tmp_path) -> None:
    net, inputs = _gated("LlamaForCausalLM", LLAMA, {**UNIFORM, "schedule": {"warmup_steps": 1, "freeze_step": 3}})
    state = get_state(net)
    params = build_cost_model(net, state, "params")
    predicted_params = float(params.cost(params.kept_now(state)))
    masks = _train(net, inputs, steps=5)  # the freeze at step 3, then two steps of fine-tuning
    assert get_state(net).training.frozen
    assert _kept(net, "head") == [2, 2, 1] and _kept(net, "channel") == [32, 30, 20]
    for gg, gate in zip(state.plan.gated, state.gate_list()):  # the freeze kept the predicted units
        assert not ((gate.values() != 0) & ~masks[gg.name]).any()
    small = autosparse.compact(net)
    layers = small.model.layers
    assert [m.self_attn.q_proj.out_features for m in layers] == [16, 16, 16]  # 2 KV groups x 2 heads x 4
    assert [m.self_attn.k_proj.out_features for m in layers] == [8, 8, 8]
    assert [m.mlp.gate_proj.out_features for m in layers] == [32, 32, 32]
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (4, 2)
    assert small.config.intermediate_size == 32
    # 4,320 parameters no gate reaches + 3 layers x (1,536 attention + 3,072 MLP), as predicted before training
    assert sum(p.numel() for p in small.parameters()) == predicted_params == 18_144
    assert _plain_reload_diff(small, inputs, tmp_path) <= ATOL


def test_llama_without_freeze_tops_up_to_the_widest_layer_exactly(tmp_path) -> None:
    # 2 KV groups at most: 3 (6 heads) would not divide hidden_size 32, which transformers refuses to save
    net, inputs = _gated("LlamaForCausalLM", LLAMA, opened={"head": [2, 1, 2], "channel": OPEN["channel"]})
    expected = _logits(net, inputs)
    small = autosparse.compact(net)  # verifies equivalence itself; checked again here on the logits
    assert float((_logits(small, inputs) - expected).abs().max()) <= ATOL
    assert [m.mlp.gate_proj.out_features for m in small.model.layers] == [40, 40, 40]
    assert [m.self_attn.k_proj.out_features for m in small.model.layers] == [8, 8, 8]
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (4, 2)
    assert small.config.intermediate_size == 40
    assert _plain_reload_diff(small, inputs, tmp_path) <= ATOL


def test_bert_uniform_mlp_reloads_and_uniform_heads_are_equal_per_layer(tmp_path) -> None:
    net, inputs = _gated("BertModel", BERT)
    autosparse.training.freeze(net)
    assert _kept(net, "head") == [2, 2, 1] and _kept(net, "channel") == [32, 30, 20]
    small = autosparse.compact(net)
    layers = small.encoder.layer
    assert [m.attention.self.query.out_features for m in layers] == [16, 16, 16]  # 2 heads x 8
    assert [m.intermediate.dense.out_features for m in layers] == [32, 32, 32]
    assert small.config.intermediate_size == 32
    # BERT derives the head size from hidden_size / num_attention_heads: no config says 2 heads of 8
    autosparse.save(small, tmp_path / "heads")
    hf = json.loads((tmp_path / "heads" / "plan.json").read_text())["hf"]
    assert hf["compatible"] is False and "BertModel(config) builds (32, 32)" in hf["reason"]
    saved = autosparse.load(tmp_path / "heads")
    assert float((_logits(small, inputs) - _logits(saved, inputs)).abs().max()) == 0.0

    mlp_only = {"rules": [UNIFORM["rules"][1]]}
    net, inputs = _gated("BertModel", BERT, mlp_only)
    autosparse.training.freeze(net)
    small = autosparse.compact(net)
    assert small.config.intermediate_size == 32
    assert _plain_reload_diff(small, inputs, tmp_path / "mlp") <= ATOL


def test_prune_moves_the_groups_of_a_uniform_rule_together() -> None:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    inputs = (torch.randint(0, 64, (2, 8)),)
    small = autosparse.prune(model, {**UNIFORM, "target": {"flops": 0.6}}, example_inputs=inputs)
    layers = small.model.layers
    heads = {m.self_attn.k_proj.out_features for m in layers}
    widths = {m.mlp.gate_proj.out_features for m in layers}
    assert len(heads) == 1 and len(widths) == 1 and widths.pop() % 8 == 0
    assert small.config.num_key_value_heads * 4 == heads.pop()


def test_kept_masks_exact_tops_up_and_predict_takes_the_mean() -> None:
    rule = Rule("channel", name="mlp", round_to=4, uniform=True)
    gates = [Gate(f"g{i}", "channel", 16).zero_(range(16 - n)) for i, n in enumerate([9, 6, 2])]
    with torch.no_grad():
        gates[0].gamma.copy_(torch.linspace(1, 0, 16) * 0.1)  # unit 15 has the smallest gate of g0
    exact = kept_masks(gates, [rule] * 3)
    predict = kept_masks(gates, [rule] * 3, predict=True)
    assert [int(m.sum()) for m in exact] == [12, 12, 12]  # widest: 9 open -> 12
    assert [int(m.sum()) for m in predict] == [8, 8, 8]  # mean 17 / 3 -> 6 -> 8
    assert all(m[16 - n:].all() for m, n in zip(exact, [9, 6, 2]))  # every open unit stays
    assert predict[0][7:15].all() and not predict[0][15]  # g0 keeps its 8 largest gates
    alone = kept_masks(gates, [Rule("channel", round_to=4)] * 3)
    assert [int(m.sum()) for m in alone] == [12, 8, 4]


def test_summary_counts_the_units_and_the_reachable_cost() -> None:
    model, inputs = get_case("hf_llama").build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutosparseWarning)
        net = autosparse.sparsify(model, {"rules": [{"granularity": "head"}, {"granularity": "channel"}]},
                                  example_inputs=inputs)
    line = summary(net)
    assert line.startswith("gated 4 groups: 2 head (4 units), 2 channel (128 units) | ")
    assert "params: 18,432 of 22,688 reachable (81.2%), compact keeps 100.0%" in line
    assert line.endswith("FLOPs: 90.5% reachable, compact keeps 100.0%")
    for gate in autosparse.gates(net).values():
        gate.zero_(range(0, gate.size, 2))
    # half of every layer's 9,216 reachable parameters go: 22,688 - 9,216 = 13,472 = 59.4 %
    assert "compact keeps 59.4% | FLOPs: " in summary(net)
