"""Hand-written benchmark CNNs whose every width is a constructor argument.

A compacted model keeps its classes and only its tensor shapes change, so the fastest a compacted
model can be is the same class built directly with the compacted widths ("hand-built"). These
builders take the widths explicitly and :func:`resnet_widths` / :func:`mobilenet_widths` read them
back from any (compacted) instance, so ``ResNet(**resnet_widths(small))`` is the hand-built twin
of ``small``. No torchvision: the layer layout follows ResNet-50 (He et al. 2016) and
MobileNetV2 (Sandler et al. 2018).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

RESNET50_DEPTHS = (3, 4, 6, 3)
MOBILENET_V2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)  # (expand, out, repeats, stride)


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 with a projection shortcut when the shape changes."""

    def __init__(self, cin: int, mid1: int, mid2: int, cout: int, stride: int, project: bool) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, mid1, 1)
        self.conv2 = conv_bn(mid1, mid2, 3, stride)
        self.conv3 = conv_bn(mid2, cout, 1, act=False)
        self.downsample = conv_bn(cin, cout, 1, stride, act=False) if project else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + skip)


class ResNet(nn.Module):
    """A bottleneck ResNet with explicit widths.

    Args:
        stem: output channels of the 7x7 stem.
        blocks: per stage, per block, the two inner widths ``(mid1, mid2)``.
        outs: per stage, the width of its residual stream.
        num_classes: classifier outputs.
    """

    def __init__(
        self, stem: int, blocks: list[list[tuple[int, int]]], outs: list[int], num_classes: int = 1000
    ) -> None:
        super().__init__()
        self.stem = conv_bn(3, stem, 7, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], stem
        for s, (stage, cout) in enumerate(zip(blocks, outs)):
            layers = []
            for b, (mid1, mid2) in enumerate(stage):
                stride = 2 if (b == 0 and s > 0) else 1
                layers.append(Bottleneck(cin, mid1, mid2, cout, stride, project=(b == 0)))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.pool(self.stem(x))))


def resnet(depths: tuple[int, ...] = RESNET50_DEPTHS, width: float = 1.0, num_classes: int = 1000) -> ResNet:
    """ResNet-50 at ``depths=(3, 4, 6, 3), width=1``; other depths give ResNet-26/101/... shapes."""
    base = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
    blocks = [[(c, c)] * d for c, d in zip(base, depths)]
    return ResNet(max(1, int(round(64 * width))), blocks, [4 * c for c in base[: len(depths)]], num_classes)


def resnet_widths(model: ResNet) -> dict:
    """The constructor arguments that rebuild ``model``'s shapes (e.g. after compaction)."""
    blocks = [[(b.conv1[0].out_channels, b.conv2[0].out_channels) for b in stage] for stage in model.layers]
    outs = [stage[0].conv3[0].out_channels for stage in model.layers]
    return {
        "stem": model.stem[0].out_channels,
        "blocks": blocks,
        "outs": outs,
        "num_classes": model.head[2].out_features,
    }


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> project 1x1; residual when stride 1 and widths match."""

    def __init__(self, cin: int, hidden: int, cout: int, stride: int, expand: bool, residual: bool) -> None:
        super().__init__()
        self.expand = conv_bn(cin, hidden, 1) if expand else None
        self.dw = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = conv_bn(hidden, cout, 1, act=False)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.expand is None else self.expand(x)
        y = self.project(self.dw(y))
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """MobileNetV2 with explicit widths.

    Args:
        stem: output channels of the first 3x3 conv.
        blocks: per block ``(hidden, out, stride, expand)``; a block is residual when its stride is 1
            and it keeps its input width (as in the original, decided by the *original* widths,
            which ``residual`` records so a compacted twin keeps the same topology).
        residual: per block, whether it has a skip connection.
        last: width of the final 1x1 conv.
    """

    def __init__(
        self,
        stem: int,
        blocks: list[tuple[int, int, int, bool]],
        residual: list[bool],
        last: int,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.stem = conv_bn(3, stem, 3, 2)
        layers, cin = [], stem
        for (hidden, cout, stride, expand), res in zip(blocks, residual):
            layers.append(InvertedResidual(cin, hidden, cout, stride, expand, res))
            cin = cout
        self.blocks = nn.Sequential(*layers)
        self.last = conv_bn(cin, last, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.last(self.blocks(self.stem(x))))


def mobilenet_v2(width: float = 1.0, repeats: float = 1.0, num_classes: int = 1000) -> MobileNetV2:
    def w(c: int) -> int:
        return max(8, int(round(c * width / 8)) * 8)

    blocks, residual, cin = [], [], w(32)
    for t, c, n, s in MOBILENET_V2_SETTINGS:
        for i in range(max(1, int(round(n * repeats)))):
            stride = s if i == 0 else 1
            blocks.append((cin * t, w(c), stride, t != 1))
            residual.append(stride == 1 and cin == w(c))
            cin = w(c)
    return MobileNetV2(w(32), blocks, residual, max(1280, w(1280)) if width >= 1 else w(1280), num_classes)


def mobilenet_widths(model: MobileNetV2) -> dict:
    blocks = [
        (b.dw[0].out_channels, b.project[0].out_channels, b.dw[0].stride[0], b.expand is not None)
        for b in model.blocks
    ]
    return {
        "stem": model.stem[0].out_channels,
        "blocks": blocks,
        "residual": [b.residual for b in model.blocks],
        "last": model.last[0].out_channels,
        "num_classes": model.head[2].out_features,
    }


# ---------------------------------------------------------------- hand-built twins
def hand_built(dense: nn.Module, compacted: nn.Module) -> nn.Module:
    """The same architecture built directly with ``compacted``'s widths (the latency limit)."""
    from benchmarks.common import bn_stats, hf_model

    if isinstance(compacted, ResNet):
        return bn_stats(ResNet(**resnet_widths(compacted)))
    if isinstance(compacted, MobileNetV2):
        return bn_stats(MobileNetV2(**mobilenet_widths(compacted)))
    cls = type(compacted).__name__
    if cls == "LlamaForCausalLM":
        return hf_model(cls, _llama_config(compacted))
    if cls == "BertModel":
        return _bert_twin(dense, compacted)
    raise ValueError(f"no hand-built twin for {cls}")


def _uniform(values: list[int], what: str) -> int:
    if len(set(values)) != 1:
        raise ValueError(f"{what} differs between layers ({sorted(set(values))}); no config expresses that")
    return values[0]


def _llama_config(model: nn.Module) -> dict[str, Any]:
    cfg = model.config.to_dict()
    layers = model.model.layers
    head_dim = layers[0].self_attn.head_dim
    cfg.update(
        num_attention_heads=_uniform(
            [layer.self_attn.q_proj.out_features // head_dim for layer in layers], "heads"
        ),
        num_key_value_heads=_uniform(
            [layer.self_attn.k_proj.out_features // head_dim for layer in layers], "kv heads"
        ),
        intermediate_size=_uniform(
            [layer.mlp.gate_proj.out_features for layer in layers], "intermediate size"
        ),
        head_dim=head_dim,
    )
    return {
        k: cfg[k]
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
        )
    }


def _bert_twin(dense: nn.Module, model: nn.Module) -> nn.Module:
    """BertConfig cannot express ``heads * head_size != hidden``: build from the dense config with the
    compacted intermediate size, then give each attention fresh Linear layers of the kept heads."""
    from benchmarks.common import BERT_BASE, fast_init_, hf_model

    cfg = {k: getattr(dense.config, k) for k in BERT_BASE}
    layers = model.encoder.layer
    cfg["intermediate_size"] = _uniform(
        [layer.intermediate.dense.out_features for layer in layers], "intermediate"
    )
    twin = hf_model("BertModel", cfg)
    for mine, theirs in zip(twin.encoder.layer, layers):
        att, ref = mine.attention.self, theirs.attention.self
        width = ref.query.out_features
        for attr in ("query", "key", "value"):
            setattr(att, attr, nn.Linear(model.config.hidden_size, width))
        mine.attention.output.dense = nn.Linear(width, model.config.hidden_size)
        att.num_attention_heads, att.all_head_size = width // att.attention_head_size, width
    return fast_init_(twin, seed=1).eval()
