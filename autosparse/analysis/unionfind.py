"""Union-find over channel elements, with the reasons a class of elements cannot be pruned.

Labels unite whole id arrays at a time (an element-wise add of two 2048-channel tensors is 2048
unions), so the parents live in a numpy array and array operations are vectorised: roots by
pointer jumping, unions by linking the roots involved. A class's root is always its smallest id
(:data:`FIXED`, 0, wins every union), whatever order the unions come in, so the vectorised path
gives the same roots as one union at a time. Only the order in which two *blocked* classes'
reasons are merged depends on the sequence; those few links are replayed one by one.
"""

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
        self._parent = np.zeros(1024, dtype=np.int64)  # by id; the first _size are in use (grows by doubling)
        self._flagged = np.zeros(1024, dtype=bool)  # root -> it has blocked reasons (keys of _blocked)
        self._flagged[FIXED] = True
        self._size = 1
        self._blocked: dict[int, list[str]] = {FIXED: ["not produced by a prunable weight"]}

    def __len__(self) -> int:
        return self._size

    def new(self, count: int) -> np.ndarray:
        """Create ``count`` fresh elements and return their ids."""
        start, end = self._size, self._size + count
        if end > len(self._parent):
            grown = np.empty(max(end, 2 * len(self._parent)), dtype=np.int64)
            grown[:start] = self._parent[:start]
            self._parent = grown
            self._flagged = np.concatenate([self._flagged, np.zeros(len(grown) - len(self._flagged), bool)])
        ids = np.arange(start, end, dtype=np.int64)
        self._parent[start:end] = ids
        self._size = end
        return ids

    def find(self, x: int) -> int:
        return int(self.find_all(np.array([x], dtype=np.int64))[0])

    def find_all(self, ids: np.ndarray) -> np.ndarray:
        """The class root of every id (same shape); compresses the paths it walked."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        parent = self._parent
        roots = parent[flat]
        while True:
            up = parent[roots]
            if np.array_equal(up, roots):
                break
            roots = up
        parent[flat] = roots
        return roots.reshape(ids.shape)

    def roots(self) -> np.ndarray:
        """The root of every element, indexed by element id (a snapshot: later unions change it)."""
        return self.find_all(np.arange(self._size, dtype=np.int64))

    def union(self, a: int, b: int) -> int:
        self._link(self.find_all(np.array([a])), self.find_all(np.array([b])))
        return self.find(a)

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Unite ``a[i]`` with ``b[i]`` for every position of two equally shaped id arrays."""
        ra = self.find_all(np.asarray(a).reshape(-1))
        rb = self.find_all(np.asarray(b).reshape(-1))
        differ = ra != rb
        if differ.any():
            self._link(ra[differ], rb[differ])

    def fuse(self, ids: np.ndarray) -> int:
        """Unite every element of ``ids`` into one class and return one of them."""
        flat = np.unique(np.asarray(ids).reshape(-1))
        self.fuse_rows(flat[None, :])
        return int(flat[0])

    def fuse_rows(self, rows: np.ndarray) -> None:
        """``fuse`` each row of a 2-D id array (in row order): one vectorised call for many rows."""
        rows = np.sort(np.asarray(rows, dtype=np.int64), axis=1)
        if rows.shape[1] < 2:
            return
        firsts = np.repeat(rows[:, :1], rows.shape[1] - 1, axis=1)
        self.union_arrays(firsts, rows[:, 1:])

    def block(self, ids: np.ndarray, reason: str) -> None:
        """Mark the classes of ``ids`` as not prunable, remembering why (shown by ``explain``)."""
        roots = np.unique(self.find_all(np.asarray(ids).reshape(-1)))
        known = self._flagged[roots]
        for root in roots[known].tolist():
            reasons = self._blocked[root]
            if reason not in reasons and len(reasons) < 8:
                self._blocked[root] = [*reasons, reason]
        # Reason lists are never changed in place (always replaced), so fresh roots share one.
        self._blocked.update(dict.fromkeys(roots[~known].tolist(), [reason]))
        self._flagged[roots] = True

    def blocked_reasons(self, x: int) -> list[str]:
        return self._blocked.get(self.find(x), [])

    def blocked_roots(self) -> dict[int, list[str]]:
        """Reasons by class root (every key is a current root), for reading after the walk."""
        return self._blocked

    # -- linking ---------------------------------------------------------------------------------
    def _link(self, ra: np.ndarray, rb: np.ndarray) -> None:
        """Unite root ``ra[i]`` with root ``rb[i]`` for every i, in that order."""
        nodes, local = np.unique(np.concatenate([ra, rb]), return_inverse=True)
        la, lb = local[: len(ra)], local[len(ra):]
        comp = _components(len(nodes), la, lb)  # nodes are sorted: a component's min is its root
        new_root = nodes[comp]
        carriers = np.flatnonzero(self._flagged[nodes]).tolist()
        if carriers:
            self._move_reasons(nodes, comp, carriers, la, lb)
            self._flagged[nodes] = False
            self._flagged[new_root[carriers]] = True
        self._parent[nodes] = new_root

    def _move_reasons(self, nodes, comp, carriers, la, lb) -> None:
        """Reasons follow their class to its new root. Where two blocked classes meet, replay the
        unions one by one (a tiny local union-find) so the reasons merge in the same order."""
        per_comp: dict[int, list[int]] = {}
        for i in carriers:
            per_comp.setdefault(int(comp[i]), []).append(i)
        replay = {c for c, members in per_comp.items() if len(members) > 1}
        for c, members in per_comp.items():
            if c not in replay and members[0] != c:  # one blocked class: its reasons just move
                self._blocked[int(nodes[c])] = self._blocked.pop(int(nodes[members[0]]))
        if not replay:
            return
        mask = np.isin(comp[la], list(replay))
        parent = list(range(len(nodes)))
        reasons = {i: self._blocked.pop(int(nodes[i])) for c in replay for i in per_comp[c]}

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for x, y in zip(la[mask].tolist(), lb[mask].tolist()):
            rx, ry = find(x), find(y)
            if rx == ry:
                continue
            rx, ry = min(rx, ry), max(rx, ry)
            parent[ry] = rx
            moved = reasons.pop(ry, None)
            if moved:
                kept = list(reasons.get(rx, []))
                kept.extend(r for r in moved if r not in kept and len(kept) < 8)
                reasons[rx] = kept
        for i, kept in reasons.items():
            self._blocked[int(nodes[i])] = kept


def _components(k: int, la: np.ndarray, lb: np.ndarray) -> np.ndarray:
    """Connected components of ``k`` nodes joined by edges ``(la[i], lb[i])``: each node's smallest
    member, by min-label hooking and pointer jumping (a few array passes)."""
    comp = np.arange(k, dtype=np.int64)
    while True:
        ca, cb = comp[la], comp[lb]
        if np.array_equal(ca, cb):
            return comp
        low = np.minimum(ca, cb)
        np.minimum.at(comp, ca, low)
        np.minimum.at(comp, cb, low)
        while True:
            up = comp[comp]
            if np.array_equal(up, comp):
                break
            comp = up
