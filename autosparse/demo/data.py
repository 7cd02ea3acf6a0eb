"""Small real datasets that ship with installed packages: nothing is downloaded.

* :func:`load_digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images), as
  ``(N, 1, 8, 8)`` images in [0, 1], with a fixed stratified 75/25 train/test split.
* :func:`load_mnist1d`: MNIST-1D (Greydanus, 2020), generated locally by
  ``mnist1d.data.make_dataset`` with the package's default arguments (4,000 train / 1,000 test
  signals of length 40, seed 42), as ``(N, 1, 40)`` signals. ``make_dataset`` never touches the
  network; only ``get_dataset`` can download, and it is not used.

Example:
    >>> data = load_digits()
    >>> data.x_train.shape, data.num_classes
    (torch.Size([1347, 1, 8, 8]), 10)
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Dataset:
    """A classification dataset split into train and test tensors.

    Attributes:
        name: ``"digits"`` or ``"mnist1d"``.
        x_train, y_train, x_test, y_test: float32 inputs and int64 labels.
        num_classes: Number of labels.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])


def load_digits(test_size: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits as images in [0, 1], split with a fixed stratified shuffle.

    Args:
        test_size: Fraction of the 1,797 images held out for testing.
        seed: Seed of the split (not of training).
    """
    return _digits(float(test_size), int(seed))


@functools.cache
def _digits(test_size: float, seed: int) -> Dataset:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    xtr, xte, ytr, yte = train_test_split(
        x, bunch.target, test_size=test_size, random_state=seed, stratify=bunch.target
    )
    return Dataset("digits", *_tensors(xtr, ytr, xte, yte), num_classes=10)


@functools.cache
def load_mnist1d() -> Dataset:
    """MNIST-1D with the package's default arguments, generated locally (about 2 s, cached per process).

    ``make_dataset`` seeds Python's and NumPy's global generators; their states are restored after.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    saved_np, saved_py = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(saved_np)
        random.setstate(saved_py)
    xtr, xte = (np.asarray(raw[k], dtype=np.float32)[:, None] for k in ("x", "x_test"))
    return Dataset("mnist1d", *_tensors(xtr, raw["y"], xte, raw["y_test"]), num_classes=10)


def _tensors(xtr, ytr, xte, yte) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(np.ascontiguousarray(xtr)),
        torch.as_tensor(ytr, dtype=torch.long),
        torch.from_numpy(np.ascontiguousarray(xte)),
        torch.as_tensor(yte, dtype=torch.long),
    )


def load(name: str) -> Dataset:
    """:func:`load_digits` or :func:`load_mnist1d` by name.

    Raises:
        ValueError: ``name`` is neither ``"digits"`` nor ``"mnist1d"``.
    """
    if name == "digits":
        return load_digits()
    if name == "mnist1d":
        return load_mnist1d()
    raise ValueError(f"unknown dataset {name!r}; expected 'digits' or 'mnist1d'")
