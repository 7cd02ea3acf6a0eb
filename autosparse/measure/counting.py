"""Counting: a model's parameters, bytes and FLOPs; and how measurements run the model.

:func:`check_inputs` and :func:`eval_mode` are shared by every measurement that runs the model
(here and in :mod:`autosparse.measure.timing`).

Example:
    >>> count_flops(torch.nn.Linear(10, 20), (torch.randn(4, 10),))
    1600
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autosparse.errors import ExampleInputsError


def count_params(model: nn.Module) -> int:
    """Count the model's scalar parameters, each shared (tied) parameter once.

    Frozen parameters (``requires_grad=False``) are counted too; buffers are not.

    Args:
        model: Any module.

    Example:
        >>> count_params(torch.nn.Linear(10, 20))
        220
    """
    # Module.parameters() already yields a Parameter reachable by two names only once.
    return sum(p.numel() for p in model.parameters())


def model_size_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (persistent or not), each shared one once.

    Args:
        model: Any module.

    Example:
        >>> model_size_bytes(torch.nn.Linear(10, 20))  # 220 float32 values
        880
    """
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def check_inputs(example_inputs: Any) -> tuple:
    """``example_inputs`` itself if it is a tuple of positional arguments.

    Raises:
        ExampleInputsError: It is not a tuple (e.g. a bare tensor); the message says to wrap it.

    Example:
        >>> check_inputs((1,))
        (1,)
    """
    if not isinstance(example_inputs, tuple):
        raise ExampleInputsError(
            f"example_inputs must be a tuple of positional arguments, got {type(example_inputs).__name__}; "
            "wrap a single tensor as (x,)"
        )
    return example_inputs


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode, then restore every submodule's own training flag.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Dropout()).train()
        >>> with eval_mode(net):
        ...     net[0].training
        False
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        # Set the attribute, not .train(flag): .train() would overwrite the children's own flags.
        for module, training in flags:
            module.training = training


def _flop_counter(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None) -> FlopCounterMode:
    inputs = check_inputs(example_inputs)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(*inputs, **(example_kwargs or {}))
    return counter


def count_flops(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> int:
    """Count the FLOPs of one forward pass in eval mode, without gradients.

    Uses :class:`torch.utils.flop_counter.FlopCounterMode`, so a multiply-add counts as 2 FLOPs and
    only ops it knows (matmuls, convolutions, attention) are counted; element-wise ops and bias
    additions are not.

    Args:
        model: The module to run.
        example_inputs: Positional arguments of ``model``, as a tuple.
        example_kwargs: Keyword arguments of ``model``, if any.

    Returns:
        The total FLOPs of the forward pass.

    Example:
        >>> count_flops(torch.nn.Linear(10, 20), (torch.randn(4, 10),))  # 2 * 4 * 10 * 20
        1600
    """
    return int(_flop_counter(model, example_inputs, example_kwargs).get_total_flops())


def flops_by_module(
    model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None
) -> dict[str, int]:
    """FLOPs of one forward pass attributed to each module that performed counted ops.

    Keys are the names of :meth:`torch.nn.Module.named_modules` (``"layer1.0.conv1"``), with ``""``
    for the whole model. Counts are inclusive: a parent's count includes its children's. Modules
    without counted ops are absent.

    Args:
        model, example_inputs, example_kwargs: As for :func:`count_flops`.

    Returns:
        A dict from module name to FLOPs, in ``named_modules`` order.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 20))
        >>> flops_by_module(model, (torch.randn(4, 10),))
        {'': 1600, '0': 1600}
    """
    counts = _flop_counter(model, example_inputs, example_kwargs).get_flop_counts()
    # FlopCounterMode names the root by its class name and children "Root.child"; "Global" is the total.
    root = type(model).__name__
    result: dict[str, int] = {}
    for key, per_op in counts.items():
        if key == root or key.startswith(root + "."):
            result[key[len(root) + 1 :]] = int(sum(per_op.values()))  # "Root" -> "", "Root.a.b" -> "a.b"
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(result.items(), key=lambda item: order.get(item[0], len(order))))
