"""Mixture-of-experts: the experts' MLP channels (3-D weights run by a grouped matmul) are gated,
compact exactly at widths the grouped-matmul kernel accepts, and reload as plain Hugging Face models."""

from __future__ import annotations

import pytest
import torch

import autosparse
from autosparse.analysis import Registry
from autosparse.analysis.ops_experts import ALIGN
from autosparse.errors import RegistryError

transformers = pytest.importorskip("transformers")

_TEXT = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, use_cache=False, tie_word_embeddings=False, attn_implementation="eager")
CONFIGS = {
    "mixtral": ("MixtralForCausalLM", dict(_TEXT, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
                "intermediate_size"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", dict(_TEXT, head_dim=16, intermediate_size=128, num_experts=4,
                                               num_experts_per_tok=2, moe_intermediate_size=40),
                  "moe_intermediate_size"),
}


def _build(name: str):
    cls_name, config, _ = CONFIGS[name]
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    model = cls(cls.config_class(**config)).eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    return model, (ids,)


def _expert_gates(net) -> dict:
    return {k: g for k, g in autosparse.gates(net).items() if k.endswith("mlp.experts")}


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_expert_channels_are_gated_and_compact_exactly_at_aligned_widths(name):
    model, inputs = _build(name)
    width = CONFIGS[name][1].get("moe_intermediate_size", CONFIGS[name][1]["intermediate_size"])
    net = autosparse.sparsify(model, "configs/channels.yaml", example_inputs=inputs)
    gates = _expert_gates(net)
    assert len(gates) == 2 and all(g.size == width for g in gates.values())
    for i, gate in enumerate(gates.values()):
        gate.zero_(list(range(3 + 10 * i, 16 + 10 * i)))  # 13 zeros: 35 / 27 open, not multiples of 8
    gated = _logits(net, inputs)
    small = autosparse.compact(net)
    kept = [m.down_proj.shape[-1] for n, m in small.named_modules() if n.endswith("mlp.experts")]
    # rounded up to the grouped matmul's alignment (the extra units kept are zero-gated)
    assert kept == [{48: 40, 40: 32}[width]] * 2 and all(k % ALIGN == 0 for k in kept)
    assert all(m.gate_up_proj.shape[1] == 2 * k for k, (n, m) in
               zip(kept, ((n, m) for n, m in small.named_modules() if n.endswith("mlp.experts"))))
    assert (gated - _logits(small, inputs)).abs().max().item() <= 1e-5 * gated.abs().max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_uniform_expert_widths_reload_with_plain_from_pretrained(name, tmp_path):
    model, inputs = _build(name)
    key = CONFIGS[name][2]
    net = autosparse.sparsify(model, {"rules": [{"granularity": "channel", "modules": ["*experts*"],
                                                 "uniform": True}]}, example_inputs=inputs)
    for gate in _expert_gates(net).values():
        gate.zero_(list(range(gate.size // 2 + 4)))
    small = autosparse.compact(net)
    expected = getattr(model.config, key) // 2 - 4
    expected += -expected % ALIGN
    assert getattr(small.config, key) == expected
    assert all(m.intermediate_dim == expected for n, m in small.named_modules() if n.endswith("mlp.experts"))
    small.save_pretrained(tmp_path)
    reloaded = type(small).from_pretrained(tmp_path).eval()
    assert (_logits(reloaded, inputs) - _logits(small, inputs)).abs().max().item() <= 1e-6


def test_registry_matcher_is_validated_and_copied():
    rules = Registry()
    with pytest.raises(RegistryError, match="callable"):
        rules.register_matcher("not a predicate", lambda ctx: None)  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="exactly one argument"):
        rules.register_matcher(lambda target: True, lambda: None)  # type: ignore[arg-type]
    handler = lambda ctx: None  # noqa: E731
    rules.register_matcher(lambda target: target is torch.sin, handler)
    extended = rules.extended({})
    assert extended.lookup("call_function", torch.sin) is handler
    assert extended.lookup("call_function", torch.cos) is None
