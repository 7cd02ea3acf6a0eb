"""Integrations with training frameworks; each imports its framework, which the core never requires.

* :mod:`~autosparse.integrations.hf_trainer`: :class:`SparsityCallback`, a ``transformers.TrainerCallback``
  that does for a Hugging Face ``Trainer`` what :func:`autosparse.training.attach` does for any loop.

Importing this package imports ``transformers``.

Example:
    >>> from autosparse.integrations import SparsityCallback
    >>> trainer = transformers.Trainer(model=net, args=args, train_dataset=data, callbacks=[SparsityCallback()])
"""

from __future__ import annotations

from autosparse.integrations.hf_trainer import SparsityCallback

__all__ = ["SparsityCallback"]
