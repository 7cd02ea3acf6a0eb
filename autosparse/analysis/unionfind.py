"""Union-find over channel elements, with the reasons a class of elements cannot be pruned."""

from __future__ import annotations

import numpy as np

#: Element 0 stands for every position that is not prunable (model inputs, constants, unknown ops).
FIXED = 0


class Elements:
    """Union-find over integer element ids; element :data:`FIXED` is blocked from the start.

    Elements are the output features of producing parameters. Two elements are in one class when
    removing one without the other would change what the model computes.
    """

    def __init__(self) -> None:
        self._parent: list[int] = [FIXED]
        self._blocked: dict[int, list[str]] = {FIXED: ["not produced by a prunable weight"]}

    def __len__(self) -> int:
        return len(self._parent)

    def new(self, count: int) -> np.ndarray:
        """Create ``count`` fresh elements and return their ids."""
        start = len(self._parent)
        self._parent.extend(range(start, start + count))
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self._parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression keeps later look-ups O(1)
            parent[x], x = root, parent[x]
        return root

    def find_all(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        unique, inverse = np.unique(ids, return_inverse=True)  # broadcast labels repeat ids a lot
        roots = np.fromiter((self.find(i) for i in unique.tolist()), dtype=np.int64, count=len(unique))
        return roots[inverse].reshape(ids.shape)

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb == FIXED or (ra != FIXED and rb < ra):  # FIXED (and then the oldest id) stays the root
            ra, rb = rb, ra
        self._parent[rb] = ra
        reasons = self._blocked.pop(rb, None)
        if reasons:
            kept = self._blocked.setdefault(ra, [])
            kept.extend(r for r in reasons if r not in kept and len(kept) < 8)
        return ra

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Unite ``a[i]`` with ``b[i]`` for every position of two equally shaped id arrays."""
        a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
        for x, y in zip(a[a != b].tolist(), b[a != b].tolist()):
            self.union(x, y)

    def fuse(self, ids: np.ndarray) -> int:
        """Unite every element of ``ids`` into one class and return one of them."""
        flat = np.unique(np.asarray(ids).reshape(-1))
        first = int(flat[0])
        for x in flat[1:].tolist():
            self.union(first, x)
        return first

    def block(self, ids: np.ndarray, reason: str) -> None:
        """Mark the classes of ``ids`` as not prunable, remembering why (shown by ``explain``)."""
        for root in {self.find(i) for i in np.unique(np.asarray(ids)).tolist()}:
            reasons = self._blocked.setdefault(root, [])
            if reason not in reasons and len(reasons) < 8:
                reasons.append(reason)

    def blocked_reasons(self, x: int) -> list[str]:
        return self._blocked.get(self.find(x), [])
