"""Models larger than the machine: sparsify on the meta device, then materialize the dense weights.

The invariant: meta -> sparsify -> materialize(dense state dict) is the same gated model as
materialize -> sparsify (same gates, same outputs with the same units zeroed, the same compacted
model, also compacted in place).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import autosparse
from autosparse.errors import AutosparseWarning, NotSparsifiedError, PlanMismatchError
from autosparse.io.materialize import materialize

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
HEADS_AND_CHANNELS = {"rules": [{"name": "heads", "granularity": "head"},
                                {"name": "channels", "granularity": "channel"}]}


class SmallCNN(nn.Module):
    """conv-bn-relu x2 with a residual block, then pooling and a classifier (fx-traceable)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                                  nn.Conv2d(12, 8, 1))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.body(x)
        return self.head(x.mean((2, 3)))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    net = SmallCNN()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return net.eval()


def _llama_config(tied: bool = False):
    return transformers.LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, intermediate_size=80,
                                    tie_word_embeddings=tied)


def _llama(tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(_llama_config(tied)).eval()


def _on_meta(build):
    with torch.device("meta"):
        return build()


def _gated_pair(build, policy, inputs):
    """(meta -> sparsify -> materialize, dense -> sparsify) of the same model and weights."""
    dense = build()
    meta = _on_meta(lambda: type(dense)(dense.config) if hasattr(dense, "config") else type(dense)()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutosparseWarning)  # the dry run skipped on meta
        planned = autosparse.sparsify(meta, policy, example_inputs=inputs)
    assert all(p.is_meta for p in planned.parameters())
    materialize(planned, dense.state_dict())
    return planned, autosparse.sparsify(dense, policy, example_inputs=inputs)


def _zero_same(a: nn.Module, b: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for (name, ga), (name_b, gb) in zip(autosparse.gates(a).items(), autosparse.gates(b).items(), strict=True):
        assert name == name_b
        units = torch.randperm(ga.size, generator=gen)[: ga.size // 2].tolist()
        ga.zero_(units)
        gb.zero_(units)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


CASES = {
    "llama-gqa": (_llama, CONFIGS / "transformer.yaml", lambda: (torch.randint(0, 96, (2, 8)),)),
    "llama-gqa-heads-channels": (_llama, HEADS_AND_CHANNELS, lambda: (torch.randint(0, 96, (1, 8)),)),
    "llama-tied": (lambda: _llama(tied=True), HEADS_AND_CHANNELS, lambda: (torch.randint(0, 96, (1, 8)),)),
    "cnn": (_cnn, CONFIGS / "channels.yaml", lambda: (torch.randn(2, 3, 16, 16),)),
}


@pytest.mark.filterwarnings("ignore:policy. rules")  # transformer.yaml's globs for other families
@pytest.mark.parametrize("case", list(CASES))
def test_meta_then_materialize_equals_materialize_then_sparsify(case):
    build, policy, make_inputs = CASES[case]
    torch.manual_seed(2)
    inputs = make_inputs()
    planned, ref = _gated_pair(build, policy, inputs)
    sizes = {k: g.size for k, g in autosparse.gates(planned).items()}
    assert sizes == {k: g.size for k, g in autosparse.gates(ref).items()}
    assert len(sizes) >= 2
    assert planned.state_dict().keys() == ref.state_dict().keys()
    with torch.no_grad():
        fresh = (_logits(planned(*inputs)) - _logits(ref(*inputs))).abs().max().item()
    _zero_same(planned, ref)
    with torch.no_grad():
        zeroed = (_logits(planned(*inputs)) - _logits(ref(*inputs))).abs().max().item()
    assert fresh <= 1e-6 and zeroed <= 1e-6, (fresh, zeroed)
    small_ref = autosparse.compact(ref)
    small = autosparse.compact(planned, inplace=True)
    assert small is planned
    mine, theirs = small.state_dict(), small_ref.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), "the compacted weights differ"
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in build().parameters())


def test_meta_sparsify_allocates_nothing_and_warns_that_the_dry_run_was_skipped():
    meta = _on_meta(lambda: transformers.LlamaForCausalLM(_llama_config()))
    with pytest.warns(AutosparseWarning, match="dry-run compaction .* was skipped"):
        net = autosparse.sparsify(meta, HEADS_AND_CHANNELS, example_inputs=(torch.randint(0, 96, (1, 8)),))
    assert all(t.is_meta for t in [*net.parameters(), *net.buffers()])
    assert {g.gamma.device.type for g in autosparse.gates(net).values()} == {"meta"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verify=False: nothing to warn about
        autosparse.sparsify(meta, HEADS_AND_CHANNELS, example_inputs=(torch.randint(0, 96, (1, 8)),),
                            verify=False)
    assert not any(parametrize.is_parametrized(m) for m in meta.modules())  # inplace=False: a meta copy


def test_params_on_meta_with_real_buffers():
    """accelerate's init_empty_weights keeps buffers real: they are traced on meta and kept."""
    dense = _cnn()
    partial = copy.deepcopy(dense)
    for module in partial.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(p.to("meta"))
    x = torch.randn(1, 3, 16, 16)
    net = autosparse.sparsify(partial, CONFIGS / "channels.yaml", example_inputs=(x,), verify=False)
    assert not partial.stem[1].running_mean.is_meta  # the user's model keeps its real buffers
    params = {k: v for k, v in dense.state_dict().items() if "running" not in k and "batches" not in k}
    materialize(net, params)  # the real buffers need no key: they keep their values
    assert torch.equal(net.stem[1].running_var, dense.stem[1].running_var)
    ref = autosparse.sparsify(dense, CONFIGS / "channels.yaml", example_inputs=(x,))
    with torch.no_grad():
        assert (net(x) - ref(x)).abs().max().item() <= 1e-6


def test_hard_concrete_gates_open_after_materialize():
    policy = {**HEADS_AND_CHANNELS, "gate": {"kind": "hard_concrete"}}
    dense = _llama()
    meta = _on_meta(lambda: transformers.LlamaForCausalLM(_llama_config()))
    net = autosparse.sparsify(meta, policy, example_inputs=(torch.randint(0, 96, (1, 8)),), verify=False)
    materialize(net, dense.state_dict())
    ref = autosparse.sparsify(dense, policy, example_inputs=(torch.randint(0, 96, (1, 8)),))
    for gate, fresh in zip(autosparse.gates(net).values(), autosparse.gates(ref).values(), strict=True):
        assert torch.equal(gate.gamma, fresh.gamma) and not gate.forced_off.any()
        assert gate.kept() == gate.size


def test_materialize_names_missing_unexpected_and_misshapen_keys():
    dense = _llama()
    sd = dense.state_dict()

    def planned():
        meta = _on_meta(lambda: transformers.LlamaForCausalLM(_llama_config()))
        return autosparse.sparsify(meta, HEADS_AND_CHANNELS, example_inputs=(torch.randint(0, 96, (1, 8)),),
                                   verify=False)

    missing = {k: v for k, v in sd.items() if k != "model.layers.0.mlp.down_proj.weight"}
    with pytest.raises(PlanMismatchError, match=r"missing \(1\): \['model.layers.0.mlp.down_proj.weight'\]"):
        materialize(planned(), missing)
    with pytest.raises(PlanMismatchError, match=r"unexpected \(1\): \['extra.weight'\]"):
        materialize(planned(), {**sd, "extra.weight": torch.zeros(1)})
    bad = {**sd, "model.layers.1.mlp.up_proj.weight": torch.zeros(3, 3)}
    with pytest.raises(PlanMismatchError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(80, 64\)"):
        materialize(planned(), bad)
    with pytest.raises(NotSparsifiedError):
        materialize(dense, sd)


def test_tied_weights_stay_tied_and_either_key_loads_them():
    dense = _llama(tied=True)
    sd = {k: v for k, v in dense.state_dict().items() if k != "lm_head.weight"}  # as save_pretrained writes
    meta = _on_meta(lambda: transformers.LlamaForCausalLM(_llama_config(tied=True)))
    net = autosparse.sparsify(meta, HEADS_AND_CHANNELS, example_inputs=(torch.randint(0, 96, (1, 8)),),
                              verify=False)
    materialize(net, sd)
    assert net.lm_head.weight is net.model.embed_tokens.weight
    assert torch.equal(net.lm_head.weight, dense.lm_head.weight)


def test_bench_meta_smoke(tmp_path):
    from benchmarks import bench_meta

    data = bench_meta.main(["--smoke", "--out", str(tmp_path)])
    row = data["sizes"]["tiny"]
    assert row["all_on_meta"] and row["gates"] > 0 and row["sparsify_s"] > 0 and row["peak_rss_mb"] > 0
    assert (tmp_path / "meta.json").exists()


def test_gated_checkpoint_loads_after_materialize_without_a_state_dict():
    dense = _llama()
    inputs = (torch.randint(0, 96, (1, 8)),)
    ref = autosparse.sparsify(dense, HEADS_AND_CHANNELS, example_inputs=inputs)
    _zero_same(ref, ref)
    meta = _on_meta(lambda: transformers.LlamaForCausalLM(_llama_config()))
    net = autosparse.sparsify(meta, HEADS_AND_CHANNELS, example_inputs=inputs, verify=False)
    materialize(net)  # HF rotary buffers come from the model's own initialiser
    autosparse.io.load_gated_state(net, ref.state_dict())
    with torch.no_grad():
        assert torch.equal(net(*inputs).logits, ref(*inputs).logits)
