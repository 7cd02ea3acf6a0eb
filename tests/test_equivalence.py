"""The core invariant over the whole zoo: fresh gates change nothing; compaction is exact.

For every architecture: a freshly sparsified model equals the original; random patterns of
zeroed units (including "everything but min_keep") compact into a model whose outputs equal the
gated model's (fp32, 1e-5 of the output scale); the compacted parameter count equals the count
predicted from the plan; and the compacted model runs at another batch/sequence size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import autosparse
from autosparse.compaction import removed_units
from autosparse.state import get_state
from tests.zoo import ALL_CASES, rel_diff

POLICY = {"rules": [{"granularity": "channel"}, {"granularity": "head"}]}
# Cases whose analysis must find attention heads (a regression here means heads were lost).
EXPECT_HEADS = {"hf_bert", "hf_roberta", "hf_gpt2", "hf_llama", "hf_mistral", "hf_qwen2", "hf_qwen3",
                "hf_vit", "hf_t5_encoder", "attention_block", "gqa_block", "hf_swin",
                "torch_encoder", "mha_block", "mha_seq_first"}
NOT_PRUNABLE = {"channel_shuffle"}  # hard-coded group counts: refused, never guessed



def _zero_random(net, seed: int, mode: str) -> None:
    rng = np.random.default_rng(seed)
    for gate in autosparse.gates(net).values():
        if mode == "all_but_one":
            off = rng.permutation(gate.size)[: gate.size - 1]
        else:
            off = rng.permutation(gate.size)[: int(rng.integers(0, gate.size))]
        gate.zero_(off.tolist())


def _expected_params(net) -> int:
    """Parameter count predicted from the plan: each sliced dim keeps its non-removed positions."""
    state = get_state(net)
    removed, _ = removed_units(state)
    removed_arr = np.fromiter(removed, dtype=np.int64)
    kept_per_dim: dict[str, dict[int, int]] = {}
    for m in state.plan.analysis.members:
        kept_per_dim.setdefault(m.name, {})[m.dim] = int((~np.isin(m.ids, removed_arr)).sum())
    total = 0
    for name, param in _original_parameters(net):
        shape = list(param.shape)
        for dim, kept in kept_per_dim.get(name, {}).items():
            shape[dim] = kept
        total += int(np.prod(shape))
    return total


def _original_parameters(net):
    """(name, tensor) of the model's own parameters, reading through the gate parametrizations."""
    seen = set()
    for name, module in net.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if hasattr(module, "parametrizations"):
            for attr, plist in module.parametrizations.items():
                params[attr] = plist.original
        for attr, p in params.items():
            if name.endswith("parametrizations") or ".parametrizations." in name or id(p) in seen:
                continue
            seen.add(id(p))
            yield (f"{name}.{attr}" if name else attr), p


def _resized(inputs: tuple) -> tuple:
    """Inputs with another batch size (and sequence length for token inputs)."""
    out = []
    for t in inputs:
        if t.dtype == torch.long:
            out.append(torch.randint(0, int(t.max()) + 1, (t.shape[0] + 1, max(2, t.shape[1] - 3))))
        else:
            out.append(torch.randn((t.shape[0] + 1,) + tuple(t.shape[1:]), dtype=t.dtype))
    return tuple(out)


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.name not in NOT_PRUNABLE], ids=lambda c: c.name)
def test_zoo_equivalence(case):
    torch.manual_seed(0)
    model, inputs = case.build()
    with torch.no_grad():
        reference = model(*inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = autosparse.sparsify(model, POLICY, example_inputs=inputs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "original modified"
    assert type(net) is type(model)
    with torch.no_grad():
        assert rel_diff(reference, net(*inputs)) <= 1e-6
    gates = autosparse.gates(net)
    assert gates, "no gate attached"
    if case.name in EXPECT_HEADS:
        assert any(g.granularity == "head" for g in gates.values()), f"{case.name}: heads not found"
    for seed, mode in ((1, "random"), (2, "random"), (3, "all_but_one")):
        trial = autosparse.sparsify(model, POLICY, example_inputs=inputs)
        _zero_random(trial, seed, mode)
        expected = _expected_params(trial)
        with torch.no_grad():
            gated_out = trial(*inputs)
        small = autosparse.compact(trial)
        with torch.no_grad():
            assert rel_diff(gated_out, small(*inputs)) <= 1e-5
            assert rel_diff(gated_out, trial(*inputs)) == 0.0, "compact changed the gated model"
            small(*_resized(inputs))  # attributes consistent with the new shapes
        assert sum(p.numel() for p in small.parameters()) == expected
        assert not any(hasattr(m, "parametrizations") for m in small.modules())
        if mode == "all_but_one":
            assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_channel_shuffle_is_refused_not_guessed():
    from tests.zoo import get_case

    model, inputs = get_case("channel_shuffle").build()
    report = autosparse.explain(model, example_inputs=inputs)
    assert report.groups == []  # grouped convs around a shuffle fuse every channel into one unit
    assert len(report.unprunable) >= 1
    with pytest.raises(autosparse.NoGatesError):
        autosparse.sparsify(model, POLICY, example_inputs=inputs)
