"""Pruning really removes units, in the amounts and widths the user asked for.

Users find the model size unchanged after pruning or ONNX export (masking mistaken for removal), FLOPs
cut without a latency gain unless widths are hardware-friendly multiples, errors at some global
ratios; they want a recipe file (ignored layers, per-module floors, ``round_to``) and measured numbers
next to the result. These tests check the compacted state dict, parameter counts and ONNX file size,
rounded widths, every ratio up to everything off, and the report's FLOPs cut.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

import autosparse
from autosparse.compaction.record import record_of
from autosparse.measure import count_flops, count_params
from tests import zoo
from tests.zoo import CHANNEL, classifier, conv_bn, get_case, images, rel_diff, run_no_grad, zero_random


# ----------------------------------------------------------------------------- masking vs removal
def test_compaction_really_shrinks_state_dict_parameters_and_onnx(tmp_path: Path):
    # "model size unchanged after pruning / ONNX export" (ultralytics #16806, sparseml #741)
    pytest.importorskip("onnxruntime")
    model, inputs = get_case("plain").build()  # conv(3->8), conv(8->16), conv(16->32), each + BN; linear(32->10)
    net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    for gate, off in zip(autosparse.gates(net).values(), ([0, 1, 2], range(0, 16, 3), range(20)), strict=True):
        gate.zero_(off)
    a, b, c = (gate.kept() for gate in autosparse.gates(net).values())
    assert (a, b, c) == (5, 10, 12)
    original = model.state_dict()
    gated = {k.replace(".parametrizations.weight.original", ".weight"): v for k, v in net.state_dict().items()}
    assert all(gated[k].shape == v.shape for k, v in original.items())  # gating alone is a mask
    small = autosparse.compact(net)
    shrunk = small.state_dict()
    assert shrunk.keys() == original.keys()
    assert all(shrunk[k].numel() <= v.numel() for k, v in original.items())
    assert sum(v.numel() for v in shrunk.values()) < sum(v.numel() for v in original.values()) // 2
    # conv weights (bias-free) + BatchNorm affines + the classifier, from the kept units alone
    assert count_params(small) == 27 * a + 9 * a * b + 9 * b * c + 2 * (a + b + c) + 10 * c + 10
    assert small[1][1].running_mean.shape == (b,)
    dense_file = autosparse.export(model, tmp_path / "dense.onnx", example_inputs=inputs, format="onnx")
    small_file = autosparse.export(small, tmp_path / "small.onnx", example_inputs=inputs, format="onnx")
    assert small_file.stat().st_size < 0.6 * dense_file.stat().st_size


# ----------------------------------------------------------------------------- round_to widths
def test_round_to_8_gives_multiples_of_8_after_compaction():
    # FLOPs cut without latency gain (TP ResNet-50 table; TensorRT #3884): round_to
    widths = (24, 48, 64)
    model, inputs = zoo._build(lambda: classifier(conv_bn(3, 24), conv_bn(24, 48, stride=2),
                                                  conv_bn(48, 64, stride=2), width=64), images())
    policy = {"rules": [{"granularity": "channel", "round_to": 8}]}
    for seed in range(3):
        net = autosparse.sparsify(model, policy, example_inputs=inputs)
        zero_random(net, seed)
        kept = [gate.kept() for gate in autosparse.gates(net).values()]
        gated = run_no_grad(net, *inputs)
        small = autosparse.compact(net)  # the zero-gated units kept for rounding contribute nothing
        assert rel_diff(gated, run_no_grad(small, *inputs)) <= 1e-5
        got = [small[i][0].out_channels for i in range(3)]
        assert got == [min(n, -(-k // 8) * 8) for n, k in zip(widths, kept, strict=True)]
        assert all(w % 8 == 0 for w in got) and sum(got) < sum(widths)


# ----------------------------------------------------------------------------- recipes, ratios, FLOPs
def test_yaml_recipe_with_ignored_layers_per_module_ratio_and_round_to(tmp_path: Path):
    # best practice: SparseML's YAML recipes; TP's ignored_layers, per-module ratios and round_to
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "rules:\n"
        "  - {name: deep, granularity: channel, modules: ['2.*'], min_keep: 0.5}\n"
        "  - {name: rest, granularity: channel, exclude: ['0.*'], round_to: 4}\n"
        "schedule: {warmup_steps: 10, freeze_step: 100}\n"
    )
    model, inputs = get_case("plain").build()  # widths 8, 16, 32 produced by 0.0, 1.0, 2.0
    net = autosparse.sparsify(model, str(recipe), example_inputs=inputs)
    assert set(autosparse.gates(net)) == {"1.0", "2.0"}  # "0.*" ignored
    for gate in autosparse.gates(net).values():
        gate.zero_(range(gate.size))  # everything off: the recipe's floors decide
    small = autosparse.compact(net)
    assert [small[i][0].out_channels for i in range(3)] == [8, 4, 16]


@pytest.mark.parametrize("fraction", [0.3, 0.7, 1.0])
def test_any_global_ratio_compacts(fraction: float):
    # errors at certain global ratios (TP #204)
    model, inputs = get_case("densenet").build()
    net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    for gate in autosparse.gates(net).values():
        gate.zero_(range(int(round(fraction * gate.size))))
    gated = run_no_grad(net, *inputs)
    small = autosparse.compact(net)
    assert rel_diff(gated, run_no_grad(small, *inputs)) <= 1e-5
    groups = record_of(small).groups
    assert all(1 <= g["after"] <= g["before"] for g in groups.values())
    if fraction == 1.0:
        assert all(g["after"] == 1 for g in groups.values())
    assert count_params(small) < count_params(model)


def test_report_gives_the_measured_flops_cut_next_to_the_model():
    # best practice: nn_pruning's measured numbers next to the result (no timing asserted here)
    model, inputs = get_case("resnet_bottleneck").build()
    net = autosparse.sparsify(model, CHANNEL, example_inputs=inputs)
    zero_random(net, 0)
    small = autosparse.compact(copy.deepcopy(net))
    total = autosparse.report(net, latency=False).total
    assert total.flops == (count_flops(model, inputs), count_flops(small, inputs))
    assert total.params == (count_params(model), count_params(small))
    assert total.flops[1] < total.flops[0] and total.latency_ms is None
