"""Head layouts of timm-style attention: packed qkv + unbind, per-head tensors, widths read off inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autosparse

HEADS = "configs/heads.yaml"


class PackedAttention(nn.Module):
    """timm's Attention: qkv.reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)."""

    def __init__(self, dim=32, heads=4, table=False, temperature=False, width_from_input=False, window=4):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = heads, dim // heads, dim
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.width_from_input = width_from_input
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5) if temperature else None
        if table:
            self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
            self.register_buffer("index", torch.randint(0, (2 * window - 1) ** 2, (window * window, window * window)))

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = q @ k.transpose(-2, -1) * self.head_dim ** -0.5
        if self.temperature is not None:
            attn = attn * self.temperature
        if hasattr(self, "table"):
            bias = self.table[self.index.view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous()
            attn = attn + bias.unsqueeze(0)
        x = (attn.softmax(-1) @ v).transpose(1, 2)
        return self.proj(x.reshape(B, N, C if self.width_from_input else self.attn_dim))


class Block(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(32), PackedAttention(**kwargs)

    def forward(self, x):
        return x + self.attn(self.norm(x))


def _run(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("kwargs", [{}, {"table": True}, {"temperature": True}], ids=["qkv", "table", "temperature"])
def test_packed_qkv_heads_are_gated_and_compact_exactly(kwargs):
    torch.manual_seed(0)
    model, x = Block(**kwargs).eval(), torch.randn(2, 16, 32)
    net = autosparse.sparsify(model, HEADS, example_inputs=(x,))
    gate = autosparse.gates(net)["attn.qkv"]
    assert gate.granularity == "head" and gate.size == 4
    gate.zero_([1, 2])
    gated = _run(net, x)
    small = autosparse.compact(net)
    assert small.attn.qkv.out_features == 48 and small.attn.num_heads == 2 and small.attn.attn_dim == 16
    if "table" in kwargs:
        assert small.attn.table.shape == (49, 2)
    if "temperature" in kwargs:
        assert small.attn.temperature.shape == (2, 1, 1)
    assert float((gated - _run(small, x)).abs().max()) <= 1e-5 * float(gated.abs().max())


def test_a_width_read_off_the_input_keeps_the_heads_with_its_reason():
    model = Block(width_from_input=True).eval()
    report = autosparse.explain(model, example_inputs=(torch.randn(2, 16, 32),))
    reason = dict(report.unprunable)["attn.qkv"]
    assert "a reshape that takes the size of the channel dim from norm.shape[2]" in reason
