"""The modules autosparse may leave in a compacted model: a removed residual branch or block."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ZeroBranch(nn.Module):
    """Stands in for a residual branch whose layer gate reached zero: computes nothing.

    It returns zeros shaped like its first tensor input, in the output structure the branch had
    (a tensor, or a tuple whose other entries were None), so ``x + branch(x)`` stays ``x``.
    """

    def __init__(self, tuple_len: int = 0, name: str = "") -> None:
        super().__init__()
        self.tuple_len, self.replaced = tuple_len, name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        first = next(v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor))
        zeros = torch.zeros_like(first)
        if self.tuple_len:
            return (zeros,) + (None,) * (self.tuple_len - 1)
        return zeros

    def extra_repr(self) -> str:
        return f"replaces={self.replaced!r}"


IDENTITY = -1  # the ``tuple_len`` that marks a whole block replaced by an IdentityBlock


class IdentityBlock(ZeroBranch):
    """Stands in for a whole block ``x -> x + f(x)`` whose inline branch's layer gate reached zero.

    It returns its first tensor input. A Record's ``replaced`` marks it with ``tuple_len == -1``
    (:data:`IDENTITY`), which is why it is a kind of :class:`ZeroBranch`: one record for both.
    """

    def __init__(self, name: str = "") -> None:
        super().__init__(IDENTITY, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return next(v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor))
