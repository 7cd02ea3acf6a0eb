"""A pruned Hugging Face model can be saved and loaded again.

Users find pruned models they cannot reload: a Hugging Face config holds one width for every layer, so
per-layer widths fail with a size mismatch, and ``from_pretrained`` fails unless the config is
rewritten. Per-layer widths must reload through ``autosparse.load`` (from the saved config or from the
user's freshly built model), and uniform widths through plain ``from_pretrained``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import autosparse
from autosparse.measure import count_params
from tests.zoo import HEAD_CHANNEL, get_case, rel_diff, run_no_grad


def test_per_layer_widths_reload_through_autosparse_load(tmp_path: Path):
    # HF configs cannot express per-layer widths (TP #495, #436; transformers #40840)
    model, inputs = get_case("hf_qwen2").build()
    net = autosparse.sparsify(model, HEAD_CHANNEL, example_inputs=inputs)
    gates = autosparse.gates(net)
    gates["model.layers.0.self_attn.q_proj"].zero_([0])
    gates["model.layers.0.mlp.gate_proj"].zero_(range(8))
    gates["model.layers.1.mlp.gate_proj"].zero_(range(24))
    small = autosparse.compact(net)
    assert [layer.mlp.gate_proj.out_features for layer in small.model.layers] == [56, 40]
    assert small.config.intermediate_size == 64  # one number cannot say [56, 40]: the config stays
    directory = autosparse.save(small, tmp_path / "qwen2")
    assert json.loads((directory / "plan.json").read_text())["hf"]["compatible"] is False
    fresh = get_case("hf_qwen2").build()[0]
    with pytest.raises(RuntimeError, match="size mismatch"):  # what users hit without autosparse.load
        copy.deepcopy(fresh).load_state_dict(small.state_dict())
    expected = run_no_grad(small, *inputs)
    for base in (None, fresh):  # rebuilt from the saved config, or the user's freshly built model
        loaded = autosparse.load(directory, base)
        assert type(loaded) is type(model)
        assert [layer.mlp.down_proj.in_features for layer in loaded.model.layers] == [56, 40]
        assert torch.equal(run_no_grad(loaded.eval(), *inputs).logits, expected.logits)


def test_uniform_widths_reload_with_plain_from_pretrained(tmp_path: Path):
    # HF from_pretrained fails after pruning unless the config is rewritten (TP #495)
    import transformers

    model, inputs = get_case("hf_mistral").build()
    net = autosparse.sparsify(model, HEAD_CHANNEL, example_inputs=inputs)
    for gate in autosparse.gates(net).values():  # the same units in every layer
        gate.zero_([1] if gate.granularity == "head" else range(0, gate.size, 4))
    small = autosparse.compact(net)
    directory = autosparse.save(small, tmp_path / "mistral")
    plan = json.loads((directory / "plan.json").read_text())
    assert plan["hf"]["compatible"] is True
    assert plan["hf"]["config_changes"] == {"num_attention_heads": 2, "num_key_value_heads": 1,
                                           "intermediate_size": 48}
    reloaded = transformers.MistralForCausalLM.from_pretrained(directory, attn_implementation="eager")
    assert count_params(reloaded) == count_params(small) < count_params(model)
    tokens = torch.randint(0, 64, (3, 5))
    assert rel_diff(run_no_grad(small, tokens), run_no_grad(reloaded, tokens)) <= 1e-6
