"""Channel labels: which element sits at each position of a tensor's one prunable dimension.

A :class:`Label` says that along dimension ``dim`` of a tensor, position ``i`` carries element
``ids[i]``; every other dimension carries no prunable structure. Keeping a single labelled
dimension per tensor is what makes compaction rectangular: removing units only ever deletes whole
slices along one dimension. Operations that would label two dimensions fuse the later ones
(their positions must then go together) - see :func:`normalize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autosparse.analysis.unionfind import Elements


@dataclass(frozen=True)
class Label:
    """Element ids along the one prunable dimension ``dim`` of a tensor."""

    dim: int
    ids: np.ndarray

    def moved(self, dim: int) -> Label:
        return Label(dim, self.ids)


def normalize(elements: Elements, ids: np.ndarray, reason: str) -> Label | None:
    """Turn an id array (size 1 or full on each dim) into a single-dim label.

    Dims along which every position is in one class are dropped. If several dims still vary,
    positions along all but the first are fused (they can then only be removed together). If the
    only varying dims have to be fused away entirely, the caller decides (see ``fuse_dims``).
    """
    varying = []
    roots = elements.find_all(ids)
    for d in range(ids.ndim):
        if ids.shape[d] == 1:
            continue
        first = np.take(roots, [0], axis=d)
        if not np.all(roots == first):
            varying.append(d)
    if not varying:
        return None
    keep = varying[0]
    if len(varying) > 1:
        ids = fuse_dims(elements, ids, [d for d in varying[1:]], reason)
    line = np.moveaxis(ids, keep, 0).reshape(ids.shape[keep], -1)[:, 0]
    return Label(keep, np.ascontiguousarray(line))


def fuse_dims(elements: Elements, ids: np.ndarray, dims: list[int], reason: str) -> np.ndarray:
    """Fuse ids along ``dims`` (for each position of the other dims); block if nothing else varies."""
    others = [d for d in range(ids.ndim) if d not in dims and ids.shape[d] > 1]
    if not others:
        elements.block(ids, reason)
        return np.take(ids, [0] * 1, axis=dims[0]) if dims else ids
    moved = np.moveaxis(ids, dims, list(range(ids.ndim - len(dims), ids.ndim)))
    elements.fuse_rows(moved.reshape(-1, int(np.prod([ids.shape[d] for d in dims]))))
    return np.take(ids, [0], axis=dims[0]) if len(dims) == 1 else ids


def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Split a reshape into runs of source and target dims whose sizes multiply to the same value."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        gi: list[int] = []
        gj: list[int] = []
        pi = pj = 1
        while True:
            if pi <= pj and i < len(src) and (not gi or pi < pj or src[i] == 1):
                pi *= src[i]
                gi.append(i)
                i += 1
            elif j < len(dst) and (pj < pi or not gj):
                pj *= dst[j]
                gj.append(j)
                j += 1
            elif i < len(src) and pi == pj and src[i] == 1:
                gi.append(i)
                i += 1
            elif j < len(dst) and pi == pj and dst[j] == 1:
                gj.append(j)
                j += 1
            else:
                break
            if pi == pj and gi and gj and (i >= len(src) or src[i] != 1) and (j >= len(dst) or dst[j] != 1):
                break
        if pi != pj:
            raise ValueError(f"cannot match reshape {src} -> {dst}")
        groups.append((gi, gj))
    return groups


def reshape_label(
    elements: Elements, label: Label, src: tuple[int, ...], dst: tuple[int, ...], reason: str,
    parts: tuple[int, ...] = (),
) -> tuple[Label | None, bool]:
    """Carry a label through a reshape. Returns the new label and whether a split fused positions.

    ``parts`` are output dims that later ops take apart position by position (q, k, v of a packed
    projection): their positions are united first, as an equal split would, so the label can sit
    on the dim after them (the heads) instead of fusing it.
    """
    for gi, gj in reshape_groups(src, dst):
        if label.dim not in gi:
            continue
        in_sizes = [src[d] for d in gi]
        local = [1] * len(gi)
        local[gi.index(label.dim)] = len(label.ids)
        ids = np.broadcast_to(label.ids.reshape(local), in_sizes).reshape([dst[d] for d in gj])
        view = [1] * len(dst)
        for d in gj:
            view[d] = dst[d]
        full = ids.reshape(view)
        for d in (d for d in parts if d in gj and dst[d] > 1):
            first = np.take(full, [0], axis=d)
            for i in range(1, dst[d]):
                elements.union_arrays(first, np.take(full, [i], axis=d))
        before = len(np.unique(elements.find_all(label.ids)))
        out = normalize(elements, full, reason)
        after = 0 if out is None else len(np.unique(elements.find_all(out.ids)))
        return out, after < before
    return label, False
