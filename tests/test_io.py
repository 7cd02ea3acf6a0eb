"""Save / load of compacted models, gated checkpoints, and every bad input they must refuse."""

from __future__ import annotations

import copy
import functools
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import autosparse
from autosparse import io
from autosparse.compaction.record import record_of
from autosparse.compaction.replay import architecture
from autosparse.errors import NotSparsifiedError, PlanMismatchError
from tests.zoo import get_case, output_tensors

POLICY = "configs/channels.yaml"


def _outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return output_tensors(model.eval()(*inputs))


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 0.0) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0.0)


def _gated(name: str, policy: str | dict) -> tuple[nn.Module, tuple]:
    model, inputs = get_case(name).build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return autosparse.sparsify(model, policy, example_inputs=inputs), inputs


@functools.cache
def compacted(name: str) -> tuple[nn.Module, tuple]:
    """A compacted zoo model, built once per session and only read by the tests.

    resnet_basic loses 2 channels of every group; hf_bert 1 head of 4 per layer and 8 of 64 MLP
    channels per layer; "hf_bert_mlp" only the MLP channels (a width its config can express).
    """
    if name == "resnet_basic":
        net, inputs = _gated(name, POLICY)
        for gate in autosparse.gates(net).values():
            gate.zero_([0, 1])
        return autosparse.compact(net), inputs
    net, inputs = _bert()
    net = copy.deepcopy(net)  # zero_ accumulates: each variant starts from the shared fresh gated model
    for gate in autosparse.gates(net).values():
        gate.zero_(range(8) if gate.size == 64 else [] if name == "hf_bert_mlp" else [1])
    return autosparse.compact(net), inputs


@functools.cache
def _bert() -> tuple[nn.Module, tuple]:
    return _gated("hf_bert", "configs/transformer.yaml")


def _fresh(name: str) -> nn.Module:
    return get_case(name.removesuffix("_mlp")).build()[0]


@pytest.fixture(scope="module")
def cnn_save(tmp_path_factory: pytest.TempPathFactory) -> Path:
    small, inputs = compacted("resnet_basic")
    return io.save(small, tmp_path_factory.mktemp("saves") / "cnn", example_inputs=inputs)


# ------------------------------------------------------------------------------ round trips
def test_cnn_round_trip_equal_outputs(cnn_save: Path) -> None:
    small, inputs = compacted("resnet_basic")
    base = _fresh("resnet_basic")
    loaded = io.load(cnn_save, base)
    _assert_same(_outputs(loaded, inputs), _outputs(small, inputs))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in small.parameters()) == 3684
    assert record_of(loaded).kept == record_of(small).kept
    assert architecture(base) == record_of(small).base_shapes  # the base was copied, not sliced
    assert {p.name for p in cnn_save.iterdir()} == {"plan.json", "model.safetensors", "inputs.safetensors"}
    _assert_same(list(io.load_inputs(cnn_save)), list(inputs))


def test_plan_records_versions_groups_and_attributes(cnn_save: Path) -> None:
    plan = json.loads((cnn_save / "plan.json").read_text())
    assert plan["format"] == "autosparse-save" and plan["versions"]["torch"] == torch.__version__
    assert plan["record"]["groups"]["0.0"] == {"before": 8, "after": 6}
    assert plan["record"]["kept"]["0.0.weight"] == {"0": [2, 3, 4, 5, 6, 7]}
    assert plan["attributes"]["0.0"]["out_channels"] == 6
    assert len(plan["base"]["sha256"]) == 64 and plan["hf"] is None


def test_load_inplace_slices_the_base_itself(cnn_save: Path) -> None:
    base = _fresh("resnet_basic")
    assert io.load(cnn_save, base, inplace=True) is base
    assert base[0][0].weight.shape == (6, 3, 3, 3)


def test_hf_round_trip_from_saved_config(tmp_path: Path) -> None:
    small, inputs = compacted("hf_bert")
    directory = io.save(small, tmp_path / "bert")
    plan = json.loads((directory / "plan.json").read_text())
    assert plan["hf"]["compatible"] is False  # per-layer head counts: config.json cannot say that
    assert (directory / "config.json").exists()
    assert small.encoder.layer[0].attention.self.query.weight.shape == (24, 32)
    for base in (None, _fresh("hf_bert")):  # rebuilt from the saved config, or given
        _assert_same(_outputs(io.load(directory, base), inputs), _outputs(small, inputs))


def test_hf_config_expressible_result_is_save_pretrained_compatible(tmp_path: Path) -> None:
    import transformers

    small, inputs = compacted("hf_bert_mlp")
    directory = io.save(small, tmp_path / "bert_mlp")
    plan = json.loads((directory / "plan.json").read_text())
    assert plan["hf"]["compatible"] is True
    assert plan["hf"]["config_changes"] == {"intermediate_size": 56}
    hf = transformers.BertModel.from_pretrained(directory, attn_implementation="eager")
    assert hf.config.intermediate_size == 56
    _assert_same(_outputs(hf, inputs), _outputs(small, inputs), atol=1e-6)
    _assert_same(_outputs(io.load(directory), inputs), _outputs(small, inputs))


@functools.cache
def llama_layers() -> tuple[nn.Module, tuple]:
    return _gated("hf_llama", "configs/layers.yaml")  # two gates: attention and MLP branches of 2 layers


@pytest.mark.parametrize(("zeros", "replaced", "dropped", "compatible"), [
    (([0], [1]), {"model.layers.0.self_attn": 2, "model.layers.1.mlp": 0}, [], False),
    (([0], [0]), {"model.layers.0.self_attn": 0, "model.layers.0.mlp": 0}, ["model.layers.0"], True),
])
def test_removed_branches_and_layers_round_trip(tmp_path: Path, zeros: tuple, replaced: dict, dropped: list,
                                                compatible: bool) -> None:
    import transformers

    net, inputs = llama_layers()
    net = copy.deepcopy(net)
    for gate, index in zip(autosparse.gates(net).values(), zeros, strict=True):
        gate.zero_(index)
    small = autosparse.compact(net)
    directory = io.save(small, tmp_path / "llama")
    plan = json.loads((directory / "plan.json").read_text())
    assert (plan["record"]["replaced"], plan["record"]["dropped_layers"]) == (replaced, dropped)
    assert plan["hf"]["compatible"] is compatible  # dropping a whole layer is num_hidden_layers=1
    for base in (None, _fresh("hf_llama")):
        loaded = io.load(directory, base)
        assert len(loaded.model.layers) == 2 - len(dropped)
        _assert_same(_outputs(loaded, inputs), _outputs(small, inputs))
    if compatible:
        hf = transformers.LlamaForCausalLM.from_pretrained(directory, attn_implementation="eager")
        _assert_same(_outputs(hf, inputs), _outputs(small, inputs), atol=1e-6)


# ------------------------------------------------------------------------------ gated checkpoints
def test_gated_state_dict_resumes_training_state() -> None:
    net, inputs = _gated("resnet_basic", POLICY)
    first = next(iter(autosparse.gates(net).values()))
    first.zero_([0, 3])
    with torch.no_grad():
        first.gamma.add_(torch.linspace(-0.1, 0.1, first.size))
    state = net.state_dict()
    net2, _ = _gated("resnet_basic", POLICY)
    net2.load_state_dict(state)
    restored = next(iter(autosparse.gates(net2).values()))
    assert restored.kept() == first.kept() == 6
    assert torch.equal(restored.forced_off, first.forced_off)
    assert torch.equal(restored.gamma, first.gamma)
    _assert_same(_outputs(net2, inputs), _outputs(net, inputs))


@pytest.mark.parametrize(("edit", "match"), [
    ("resize", r"gate '0\.0' has 8 units in this model but 9 in the checkpoint"),
    ("drop", r"no gate for group '0\.0'"),
    ("reshape_weight", r"tensor '0\.0\.weight' has shape \(8, 3, 3, 3\) in this model but \(7, 3, 3, 3\)"),
])
def test_load_gated_state_names_what_does_not_fit(edit: str, match: str) -> None:
    net, _ = _gated("resnet_basic", POLICY)
    state = dict(net.state_dict())
    key = next(k for k in state if k.endswith(".gamma"))
    if edit == "resize":
        state[key] = torch.zeros(9)
    elif edit == "drop":
        del state[key]
    else:
        state["0.0.weight"] = state["0.0.weight"][:7]
    with pytest.raises(PlanMismatchError, match=match):
        io.load_gated_state(net, state)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    net, inputs = _gated("resnet_basic", POLICY)
    for gate in autosparse.gates(net).values():
        gate.zero_([1])
    directory = io.save_checkpoint(net, tmp_path / "ckpt", model_spec="tests.zoo:nothing", step=120)
    again = io.load_checkpoint(directory, _fresh("resnet_basic"))
    assert [g.kept() for g in autosparse.gates(again).values()] == [7, 7, 15, 15]
    assert autosparse.state.get_state(again).step == 120
    _assert_same(_outputs(again, inputs), _outputs(net, inputs))


# ------------------------------------------------------------------------------ bad input
def _corrupt(directory: Path, how: str) -> None:
    weights, plan = directory / "model.safetensors", directory / "plan.json"
    if how == "flip_byte":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif how == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "no_weights":
        weights.unlink()
    elif how == "no_plan":
        plan.unlink()
    elif how == "bad_json":
        plan.write_text("{not json")
    elif how == "other_format":
        plan.write_text(json.dumps({"format": "something-else"}))
    elif how == "position_out_of_range":
        data = json.loads(plan.read_text())
        data["base"] = None  # skip the architecture hash so that the position check itself is reached
        data["record"]["kept"]["0.0.weight"]["0"] = [2, 3, 40]
        plan.write_text(json.dumps(data))


@pytest.mark.parametrize(("how", "match"), [
    ("flip_byte", "model.safetensors is corrupted: its sha256 differs"),
    ("truncate", "model.safetensors is corrupted"),
    ("no_weights", "incomplete: model.safetensors is missing"),
    ("no_plan", "is not an autosparse save: it has no plan.json"),
    ("bad_json", "plan.json is corrupted: not valid JSON"),
    ("other_format", "is not an autosparse save"),
    ("position_out_of_range", r"positions \[2, 3, 40\] of dim 0 of tensor '0\.0\.weight', which has size 8"),
])
def test_load_refuses_broken_saves(cnn_save: Path, tmp_path: Path, how: str, match: str) -> None:
    directory = tmp_path / "copy"
    directory.mkdir()
    for path in cnn_save.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    _corrupt(directory, how)
    base = _fresh("resnet_basic")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(PlanMismatchError, match=match):
        io.load(directory, base, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # untouched


def test_load_refuses_another_architecture(cnn_save: Path) -> None:
    other = _fresh("plain")
    shapes = architecture(other)
    with pytest.raises(PlanMismatchError, match=r"not the architecture the plan was saved from.*tensor\(s\) differ"):
        io.load(cnn_save, other, inplace=True)
    assert architecture(other) == shapes


def test_load_refuses_missing_directory_and_compacted_base(cnn_save: Path, tmp_path: Path) -> None:
    with pytest.raises(PlanMismatchError, match="no such directory"):
        io.load(tmp_path / "nowhere", _fresh("resnet_basic"))
    with pytest.raises(PlanMismatchError, match="already gated or compacted"):
        io.load(cnn_save, compacted("resnet_basic")[0])


def test_save_refuses_gated_and_plain_models(tmp_path: Path) -> None:
    net, _ = _gated("resnet_basic", POLICY)
    with pytest.raises(NotSparsifiedError, match="still has gates: call autosparse.compact"):
        io.save(net, tmp_path / "gated")
    with pytest.raises(NotSparsifiedError, match="has no compaction record"):
        io.save(nn.Linear(2, 2), tmp_path / "plain")
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic_and_does_not_clobber(tmp_path: Path) -> None:
    small, inputs = compacted("resnet_basic")
    with pytest.raises(TypeError, match="tuple of tensors"):
        io.save(small, tmp_path / "out", example_inputs=("not a tensor",))
    assert list(tmp_path.iterdir()) == []  # no half-written directory, no temporary left behind
    io.save(small, tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        io.save(small, tmp_path / "out")
    io.save(small, tmp_path / "out", example_inputs=inputs, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "inputs.safetensors").exists()
