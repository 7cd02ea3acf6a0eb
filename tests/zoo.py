"""The model zoo the test-suite is parametrised over: a new architecture is one line in a case list.

Every model is small (widths 8-32, 16x16 or 32x32 images, sequence length 8, vocabulary 64) and
deterministic: its build seeds the RNG itself. Builds return the model in eval mode after two no-grad
training-mode passes on random data, with random BatchNorm affines, so BatchNorm folding is exercised
with non-trivial statistics. Hugging Face models come from tiny configs with random weights; nothing is
downloaded and ``transformers`` is imported only when such a case is built.
The end of the file holds the small helpers the test files share (policies, no-grad runs, random
zero patterns).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import autosparse
from autosparse.errors import AutosparseWarning

FAMILIES = frozenset({"cnn", "hf-cnn", "transformer", "hf-transformer"})
# The architectural features a case exercises; tests select cases by these.
TAGS = frozenset(
    "attention chunk concat conv1d depthwise flatten glu gqa grouped groupnorm layernorm layerscale mha packed-qkv"
    " pixelshuffle residual rmsnorm rope se seq-first shuffle tied transpose upsample".split()
)


@dataclass(frozen=True)
class ZooCase:
    """One zoo entry.

    Args:
        name: unique id, also the pytest parameter id.
        build: seeds the RNG, returns ``(model, example_inputs)`` with the model in eval mode.
        family: one of ``FAMILIES``.
        traceable: ``torch.fx.symbolic_trace(model)`` succeeds.
        tags: features the model exercises, a subset of ``TAGS``.
        exportable: ``torch.export.export(model, inputs, strict=False)`` succeeds.
    """

    name: str
    build: Callable[[], tuple[nn.Module, tuple]]
    family: str
    traceable: bool
    tags: frozenset[str] = frozenset()
    exportable: bool = True

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(
                f"zoo case {self.name!r}: family {self.family!r} is not one of {sorted(FAMILIES)}"
            )
        unknown = self.tags - TAGS
        if unknown:
            raise ValueError(f"zoo case {self.name!r}: unknown tags {sorted(unknown)}; add them to zoo.TAGS")


def output_tensors(out: object) -> list[torch.Tensor]:
    """Flatten a model output (tensor, tuple, dict or Hugging Face ModelOutput) into its tensors."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in output_tensors(item)]
    return []


def rel_diff(a: object, b: object) -> float:
    """Max abs difference of two model outputs, relative to the first one's scale (1e-6 at least)."""
    pairs = list(zip(output_tensors(a), output_tensors(b), strict=True))
    assert pairs, "no output tensors to compare"
    worst = 0.0
    for x, y in pairs:
        assert x.shape == y.shape
        worst = max(worst, float((x - y).abs().max()) / max(float(x.abs().max()), 1e-6))
    return worst


# ---------------------------------------------------------------- inputs and builders
def _image(channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(2, channels, size, size)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 8))


def _sequence() -> torch.Tensor:
    return torch.randn(2, 8, 32)


def _signal() -> torch.Tensor:
    return torch.randn(2, 4, 32)


def _finish(model: nn.Module, make_input: Callable[[], torch.Tensor]) -> tuple[nn.Module, tuple]:
    """Randomise BatchNorm affines and running stats, switch to eval, draw the example input."""
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
        if bns:
            model.train()
            for _ in range(2):
                model(make_input() * 2.0 + 0.5)
    return model.eval(), (make_input(),)


def _build(
    factory: Callable[[], nn.Module], make_input: Callable[[], torch.Tensor]
) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return _finish(factory(), make_input)


def _build_hf(
    model_cls: str, make_input: Callable[[], torch.Tensor], config: dict
) -> tuple[nn.Module, tuple]:
    import transformers  # imported lazily: slow to import, and absent from minimal installs

    torch.manual_seed(0)
    cls = getattr(transformers, model_cls)
    return _finish(cls(cls.config_class(**config)), make_input)


def _case(name: str, factory, make_input, family: str, traceable: bool, tags: str = "") -> ZooCase:
    build = functools.partial(_build, factory, make_input)
    return ZooCase(name, build, family, traceable, frozenset(tags.split()))


def _hf_cnn(name: str, model_cls: str, tags: str, config: dict) -> ZooCase:
    build = functools.partial(_build_hf, model_cls, _image, config)
    return ZooCase(name, build, "hf-cnn", traceable=False, tags=frozenset(tags.split()))


def _hf_transformer(name: str, model_cls: str, tags: str, config: dict, make_input=_tokens) -> ZooCase:
    build = functools.partial(_build_hf, model_cls, make_input, config)
    return ZooCase(name, build, "hf-transformer", traceable=False, tags=frozenset(tags.split()))


# ---------------------------------------------------------------- CNN building blocks
def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act=nn.ReLU) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act()] if act else []))


def classifier(*features: nn.Module, width: int, num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(*features, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(width, num_classes))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride=stride)
        self.conv2 = conv_bn(cout, cout, act=None)
        same = stride == 1 and cin == cout
        self.downsample = None if same else conv_bn(cin, cout, 1, stride, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv2(self.conv1(x)) + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck; ``groups > 1`` makes it a ResNeXt block."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, stride, groups), conv_bn(mid, cout, 1, act=None)
        )
        same = stride == 1 and cin == cout
        self.downsample = None if same else conv_bn(cin, cout, 1, stride, act=None)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.body(x) + identity)


class DenseBlock(nn.Module):
    """DenseNet block: each layer sees the concatenation of all earlier features (pre-activation BN)."""

    def __init__(self, cin: int, growth: int, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1, bias=False))
            for c in range(cin, cin + n * growth, growth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            conv_bn(cin, hidden, 1, act=nn.ReLU6),
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            conv_bn(hidden, cout, 1, act=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.use_residual else self.body(x)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x).flatten(1)))))
        return x * s[:, :, None, None]


class UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down1, self.down2, self.bottom = conv_bn(3, 8), conv_bn(8, 16), conv_bn(16, 16)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec2, self.dec1 = conv_bn(32, 16), conv_bn(24, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.down1(x)
        d2 = self.down2(self.pool(d1))
        b = self.bottom(self.pool(d2))
        u2 = self.dec2(torch.cat([F.interpolate(b, scale_factor=2.0, mode="bilinear"), d2], 1))
        return self.head(self.dec1(torch.cat([self.up(u2), d1], 1)))


class ChunkSplitNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.left, self.right = conv_bn(8, 8), conv_bn(8, 8)
        self.mid = conv_bn(16, 16)
        self.small, self.large = conv_bn(4, 16), conv_bn(12, 16)
        self.head = classifier(width=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.chunk(self.stem(x), 2, dim=1)
        x = self.mid(torch.cat([self.left(a), self.right(b)], 1))
        a, b = torch.split(x, [4, 12], dim=1)
        return self.head(self.small(a) + self.large(b))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleBlock(nn.Module):
    def __init__(self, channels: int, groups: int = 4) -> None:
        super().__init__()
        self.groups = groups
        self.conv1 = conv_bn(channels, channels, 1, groups=groups)
        self.dw = conv_bn(channels, channels, 3, groups=channels, act=None)
        self.conv2 = conv_bn(channels, channels, 1, groups=groups, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.dw(channel_shuffle(self.conv1(x), self.groups)))
        return F.relu(x + out)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, then channels-last LayerNorm + MLP, scaled by a bare per-channel parameter."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.fc1, self.fc2 = nn.Linear(channels, 2 * channels), nn.Linear(2 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.fc2(F.gelu(self.fc1(y)))
        return x + y.permute(0, 3, 1, 2)


# ---------------------------------------------------------------- transformer building blocks
class AttentionBlock(nn.Module):
    """Post-LN encoder block: separate q/k/v projections and F.scaled_dot_product_attention."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        att = (
            F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        )
        x = self.norm1(x + self.out(att))
        return self.norm2(x + self.fc2(F.gelu(self.fc1(x))))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class GQABlock(nn.Module):
    """Pre-RMSNorm Llama-style block: 8 query heads share 2 kv heads, RoPE, causal softmax, SwiGLU MLP."""

    def __init__(self, dim: int = 32, q_heads: int = 8, kv_heads: int = 2, hidden: int = 64):
        super().__init__()
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, dim // q_heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q = nn.Linear(dim, q_heads * self.head_dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(q_heads * self.head_dim, dim, bias=False)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.q_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        angles = torch.outer(torch.arange(t, device=x.device, dtype=x.dtype), self.inv_freq).repeat(1, 2)
        q, k = (
            q * angles.cos() + rotate_half(q) * angles.sin(),
            k * angles.cos() + rotate_half(k) * angles.sin(),
        )
        repeat = self.q_heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        scores = scores + torch.full((t, t), float("-inf"), device=x.device).triu(1)
        out = torch.softmax(scores, dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, t, self.q_heads * self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attn_norm(x))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class NanoGPTAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.dim, dim=2)
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class NanoGPTBlock(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = NanoGPTAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT with tied input/output embeddings."""

    def __init__(self, vocab: int = 64, max_len: int = 8, dim: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.h = nn.ModuleList(NanoGPTBlock(dim) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class MHABlock(nn.Module):
    """Pre-LN block around nn.MultiheadAttention, called the usual way (weights returned, ignored)."""

    def __init__(self, dim: int = 32, heads: int = 4, batch_first: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        a, _ = self.attn(h, h, h)
        x = x + a
        return x + self.fc2(F.gelu(self.fc1(x)))


def mha_net() -> nn.Module:
    return nn.Sequential(MHABlock(), MHABlock())


def mha_seq_first_net() -> nn.Module:
    return nn.Sequential(MHABlock(batch_first=False), MHABlock(batch_first=False))


def attention_net() -> nn.Module:
    return nn.Sequential(AttentionBlock(), AttentionBlock())


def gqa_net() -> nn.Module:
    return nn.Sequential(GQABlock(), GQABlock())


def torch_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


# ---------------------------------------------------------------- CNN nets
def plain_net() -> nn.Module:
    return classifier(conv_bn(3, 8), conv_bn(8, 16, stride=2), conv_bn(16, 32, stride=2), width=32)


def resnet_basic_net() -> nn.Module:
    return classifier(conv_bn(3, 8), BasicBlock(8, 8), BasicBlock(8, 16, stride=2), width=16)


def resnet_bottleneck_net() -> nn.Module:
    return classifier(conv_bn(3, 16), Bottleneck(16, 8, 32, stride=2), Bottleneck(32, 8, 32), width=32)


def resnext_net() -> nn.Module:
    blocks = Bottleneck(16, 16, 32, stride=2, groups=4), Bottleneck(32, 16, 32, groups=4)
    return classifier(conv_bn(3, 16), *blocks, width=32)


def densenet() -> nn.Module:
    transition = nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 16, 1), nn.AvgPool2d(2)
    return classifier(conv_bn(3, 8), DenseBlock(8, growth=8, n=3), *transition, width=16)


def mobilenetv2_net() -> nn.Module:
    blocks = InvertedResidual(8, 8, 1, 2), InvertedResidual(8, 16, 2, 2), InvertedResidual(16, 16, 1, 2)
    stem, last = conv_bn(3, 8, stride=2, act=nn.ReLU6), conv_bn(16, 32, 1, act=nn.ReLU6)
    return classifier(stem, *blocks, last, width=32)


def squeeze_excite_net() -> nn.Module:
    return classifier(conv_bn(3, 16), conv_bn(16, 32, stride=2), SqueezeExcite(32), width=32)


def conv1d_net() -> nn.Module:
    def conv_bn1d(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv1d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm1d(cout), nn.ReLU()]

    head = nn.AdaptiveAvgPool1d(1), nn.Flatten(1), nn.Linear(16, 10)
    return nn.Sequential(*conv_bn1d(4, 8), *conv_bn1d(8, 16), *head)


def conv_transpose_net() -> nn.Module:
    up = nn.ConvTranspose2d(8, 16, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
    return nn.Sequential(conv_bn(3, 8, stride=2), *up, nn.Conv2d(16, 4, 3, padding=1))


def flatten_linear_net() -> nn.Module:
    """No global pooling: the first Linear sees channel-major C*H*W features (16 x 8 x 8)."""
    head = nn.Flatten(1), nn.Linear(16 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10)
    return nn.Sequential(conv_bn(3, 8), conv_bn(8, 16, stride=2), *head)


def channel_shuffle_net() -> nn.Module:
    return classifier(conv_bn(3, 16), ShuffleBlock(16), ShuffleBlock(16), width=16)


def pixel_shuffle_net() -> nn.Module:
    return nn.Sequential(conv_bn(3, 16), nn.PixelShuffle(2), conv_bn(4, 8), nn.Conv2d(8, 3, 3, padding=1))


def groupnorm_net() -> nn.Module:
    first = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU()
    second = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(8, 32), nn.ReLU()
    return classifier(*first, *second, width=32)


def convnext_net() -> nn.Module:
    return classifier(nn.Conv2d(3, 16, 4, stride=4), ConvNeXtBlock(16), ConvNeXtBlock(16), width=16)


# ---------------------------------------------------------------- the cases
_IMG, _IMG16 = _image, functools.partial(_image, size=16)
_ENCODER = "attention residual layernorm"
_LLM = "attention gqa rope residual rmsnorm glu"

CNN_CASES = [
    _case("plain", plain_net, _IMG, "cnn", True),
    _case("resnet_basic", resnet_basic_net, _IMG, "cnn", True, "residual"),
    _case("resnet_bottleneck", resnet_bottleneck_net, _IMG, "cnn", True, "residual"),
    _case("densenet", densenet, _IMG, "cnn", True, "concat"),
    _case("mobilenetv2", mobilenetv2_net, _IMG, "cnn", True, "depthwise residual"),
    _case("resnext", resnext_net, _IMG, "cnn", True, "grouped residual"),
    _case("squeeze_excite", squeeze_excite_net, _IMG, "cnn", True, "se"),
    _case("unet", UNet, _IMG, "cnn", True, "concat upsample"),
    _case("chunk_split", ChunkSplitNet, _IMG, "cnn", True, "chunk concat"),
    _case("conv1d", conv1d_net, _signal, "cnn", True, "conv1d"),
    _case("conv_transpose", conv_transpose_net, _IMG, "cnn", True, "transpose"),
    _case("flatten_linear", flatten_linear_net, _IMG16, "cnn", True, "flatten"),
    _case("channel_shuffle", channel_shuffle_net, _IMG, "cnn", True, "shuffle grouped depthwise residual"),
    _case("pixel_shuffle", pixel_shuffle_net, _IMG16, "cnn", True, "pixelshuffle"),
    _case("groupnorm", groupnorm_net, _IMG, "cnn", True, "groupnorm"),
    _case("convnext_layernorm", convnext_net, _IMG, "cnn", True, "layernorm depthwise residual layerscale"),
]

TRANSFORMER_CASES = [
    # nn.TransformerEncoder branches on tensor properties (fast-path checks), which fx cannot trace.
    # Its nn.MultiheadAttention is analysed through autosparse.mha's traceable stand-in.
    _case("torch_encoder", torch_encoder, _sequence, "transformer", False, "packed-qkv mha " + _ENCODER),
    _case("mha_block", mha_net, _sequence, "transformer", True, "packed-qkv mha " + _ENCODER),
    _case("mha_seq_first", mha_seq_first_net, _sequence, "transformer", True, "packed-qkv mha seq-first " + _ENCODER),
    _case("attention_block", attention_net, _sequence, "transformer", True, _ENCODER),
    _case("gqa_block", gqa_net, _sequence, "transformer", True, _LLM),
    _case("nanogpt", NanoGPT, _tokens, "transformer", True, "attention packed-qkv residual layernorm tied"),
]

# Hugging Face configs: tiny, dropout off, eager attention, no KV cache.
_VISION = dict(num_labels=10, num_channels=3)
_RESNET_BASIC = dict(_VISION, embedding_size=8, depths=[1, 1], hidden_sizes=[8, 16], layer_type="basic")
# hidden_sizes 16/32 so the bottleneck's 4x reduction leaves 4/8 channels, not 2/4.
_RESNET_BOTTLENECK = dict(_RESNET_BASIC, hidden_sizes=[16, 32], layer_type="bottleneck")
_CONVNEXT = dict(_VISION, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1])
_TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    attn_implementation="eager",
)
_BERT = dict(_TEXT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_CAUSAL = dict(_TEXT, num_key_value_heads=2, use_cache=False, attention_dropout=0.0)
_GPT2 = dict(
    vocab_size=64,
    n_positions=64,
    n_embd=32,
    n_layer=2,
    n_head=4,
    n_inner=64,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    use_cache=False,
    bos_token_id=0,
    eos_token_id=0,
    attn_implementation="eager",
)
_T5 = dict(
    vocab_size=64,
    d_model=32,
    d_kv=8,
    num_heads=4,
    d_ff=64,
    num_layers=2,
    dropout_rate=0.0,
    attn_implementation="eager",
)
_VIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=16,
    patch_size=4,
    num_channels=3,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    attn_implementation="eager",
)
_SWIN = dict(
    image_size=32,
    patch_size=4,
    num_channels=3,
    embed_dim=16,
    depths=[1, 1],
    num_heads=[2, 4],
    window_size=4,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    drop_path_rate=0.0,
    attn_implementation="eager",
)
_MOBILENET = dict(
    _VISION,
    image_size=32,
    depth_multiplier=0.1,
    expand_ratio=2.0,
    min_depth=8,
    finegrained_output=False,
    classifier_dropout_prob=0.0,
)

# No Hugging Face model is fx-traceable (data-dependent control flow, item assignment on proxies).
HF_CNN_CASES = [
    _hf_cnn("hf_resnet_basic", "ResNetForImageClassification", "residual", _RESNET_BASIC),
    _hf_cnn("hf_resnet_bottleneck", "ResNetForImageClassification", "residual", _RESNET_BOTTLENECK),
    _hf_cnn(
        "hf_convnext", "ConvNextForImageClassification", "depthwise layernorm layerscale residual", _CONVNEXT
    ),
    _hf_cnn("hf_mobilenetv2", "MobileNetV2ForImageClassification", "depthwise residual", _MOBILENET),
]

HF_TRANSFORMER_CASES = [
    _hf_transformer("hf_bert", "BertModel", _ENCODER, _BERT),
    _hf_transformer("hf_roberta", "RobertaModel", _ENCODER, _BERT),
    _hf_transformer("hf_gpt2", "GPT2LMHeadModel", "attention packed-qkv residual layernorm tied", _GPT2),
    _hf_transformer("hf_llama", "LlamaForCausalLM", _LLM, _CAUSAL),
    _hf_transformer("hf_mistral", "MistralForCausalLM", _LLM, dict(_CAUSAL, sliding_window=None)),
    _hf_transformer("hf_qwen2", "Qwen2ForCausalLM", _LLM, _CAUSAL),
    _hf_transformer("hf_qwen3", "Qwen3ForCausalLM", _LLM, dict(_CAUSAL, head_dim=8)),
    _hf_transformer("hf_t5_encoder", "T5EncoderModel", "attention residual rmsnorm", _T5),
    _hf_transformer("hf_vit", "ViTModel", _ENCODER, _VIT, _IMG16),
    _hf_transformer("hf_swin", "SwinModel", _ENCODER, _SWIN, _image),
]

ALL_CASES = CNN_CASES + HF_CNN_CASES + TRANSFORMER_CASES + HF_TRANSFORMER_CASES
_BY_NAME = {case.name: case for case in ALL_CASES}
if len(_BY_NAME) != len(ALL_CASES):
    raise ValueError("zoo case names must be unique")


def get_case(name: str) -> ZooCase:
    """Return the zoo case called ``name``; raises KeyError listing the known names."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no zoo case {name!r}; known cases: {sorted(_BY_NAME)}") from None


# ---------------------------------------------------------------- helpers shared by the test files
CHANNEL = {"rules": [{"granularity": "channel"}]}
HEAD = {"rules": [{"granularity": "head"}]}
HEAD_CHANNEL = {"rules": [{"granularity": "head"}, {"granularity": "channel"}]}
LAYER = {"rules": [{"granularity": "layer"}]}
LAYER_AND_CHANNEL = {"rules": [{"granularity": "layer"}, {"granularity": "channel"}]}


def images(channels: int = 3, size: int = 16) -> Callable[[], torch.Tensor]:
    """An example-input factory for :func:`_build`: a batch of two random ``size x size`` images."""
    return lambda: torch.randn(2, channels, size, size)


def run_no_grad(model: nn.Module, *inputs, **kwargs):
    """``model(*inputs, **kwargs)`` without autograd."""
    with torch.no_grad():
        return model(*inputs, **kwargs)


def sparsify_quietly(model: nn.Module, policy, inputs: tuple) -> nn.Module:
    """``autosparse.sparsify`` with AutosparseWarning silenced (e.g. rules that match nothing in a mixed policy)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutosparseWarning)
        return autosparse.sparsify(model, policy, example_inputs=inputs)


def zero_random(net: nn.Module, seed: int | np.random.Generator) -> None:
    """Zero a random number (at least one, never all) of random units in every gate.

    ``seed`` may be a numpy Generator, to draw successive patterns from one stream."""
    rng = np.random.default_rng(seed)
    for gate in autosparse.gates(net).values():
        gate.zero_(rng.permutation(gate.size)[: int(rng.integers(1, gate.size))].tolist())


def layer_gate(net: nn.Module) -> autosparse.Gate:
    """The one layer gate of ``net``."""
    (gate,) = [g for g in autosparse.gates(net).values() if g.granularity == "layer"]
    return gate
