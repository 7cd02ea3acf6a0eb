"""Modules and module surgery that compaction produces or needs.

* :mod:`~autosparse.modules.surgery`: slicing a tensor in place and the per-class attribute fixers
  (``in_features``, ``num_heads``, ...) that keep a sliced module consistent;
* :mod:`~autosparse.modules.mha`: the traceable / head-pruned stand-in for ``nn.MultiheadAttention``;
* :mod:`~autosparse.modules.blocks`: :class:`ZeroBranch` and :class:`IdentityBlock`, what a removed
  residual branch or block becomes.
"""

from __future__ import annotations

from autosparse.modules.blocks import IdentityBlock, ZeroBranch
from autosparse.modules.mha import PrunedMultiheadAttention

__all__ = ["IdentityBlock", "PrunedMultiheadAttention", "ZeroBranch"]
