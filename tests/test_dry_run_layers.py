"""The dry-run proof is not fooled by layer gates: a branch removed in the trial hides the groups inside it.

A timm NesT-style attention reads its head size as ``C // self.num_heads`` from its input width, so
removing heads breaks its reshape; under torch.export every size is a literal, so only the proof can
tell. Before the fix, the trial that zeroed most layer-gate branches
removed exactly the blocks whose head groups it was meant to prove, and ``compact()`` raised after
``sparsify()`` had accepted them.
"""

from __future__ import annotations

import torch
from torch import nn

import autosparse


class InputWidthAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = (int(size) for size in x.shape)  # fx cannot int() a traced size: captured by torch.export
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).permute(0, 2, 3, 1).reshape(b, n, c))  # NesT puts heads last


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = InputWidthAttention(dim, 4)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), *[Block(32) for _ in range(6)]).eval()


POLICY = {"rules": [{"granularity": "head"}, {"granularity": "layer"}]}


def test_head_groups_inside_layer_gated_branches_are_proven_with_the_branches_kept():
    x = torch.randn(2, 5, 8)
    net = autosparse.sparsify(_model(), POLICY, example_inputs=(x,))
    gates = autosparse.gates(net)
    assert not [k for k, g in gates.items() if g.granularity == "head"]  # every one fails the proof
    assert [g.granularity for g in gates.values()] == ["layer", "layer"]  # attention and MLP branches
    text = str(autosparse.explain(net))
    dropped = {line.split("'")[1] for line in text.splitlines()
               if line.strip().startswith("group '") and "dry-run compaction is not exact" in line}
    assert dropped == {f"{i}.attn.qkv" for i in range(1, 7)}  # every attention, with the proof's reason
    for layer in gates.values():
        layer.zero_(list(range(0, layer.size, 3)))  # drop a third of the branches
    with torch.no_grad():
        gated = net(x)
    small = autosparse.compact(net)
    with torch.no_grad():
        assert (small(x) - gated).abs().max().item() <= 1e-5 * gated.abs().max().item()
