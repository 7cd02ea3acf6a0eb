"""Distillation from the dense model while the gates train, without a second forward in the loop.

:func:`distill` keeps a frozen *teacher* (by default a plain copy of the sparsified model as it is
now, i.e. the dense model it was made from) and hooks the student's forward: every training-mode
forward with gradients on also runs the teacher on the same inputs (under ``no_grad``, in eval
mode) and computes

    ``weight * T**2 * KL(softmax(teacher / T) || softmax(student / T))``  (batch mean over rows)

on the logits (a tensor output, an output's ``.logits``, or the first element of a tuple), plus,
for each module named in ``hidden``, ``hidden_weight * mean((s - t)**2) / mean(t**2)`` on its output.
A plain loop adds the term of the latest forward: ``loss = ce + kd()``. With ``add_to_loss=True``
(what :class:`~autosparse.integrations.SparsityCallback` uses) the term is added to the ``loss``
field of the model's output, so a Hugging Face ``Trainer`` trains on it unchanged.

Memory: one more copy of the dense model's parameters and buffers (no gradients, no optimizer
state) and, per step, the teacher's activations of one forward, freed as it goes (``no_grad``).
Time: one more forward per training step, about a third of a training step's compute.

Example:
    >>> net = autosparse.sparsify(model, policy, example_inputs=(x,))
    >>> kd = autosparse.training.distill(net, temperature=4.0, weight=1.0)
    >>> for x, y in loader:
    ...     loss = F.cross_entropy(net(x), y) + autosparse.penalty(net) + kd()
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autosparse.compaction import compact_model
from autosparse.errors import ArgumentError
from autosparse.state import get_state, unwrap


class Distiller:
    """The hooks and the latest term of :func:`distill`; call it for the term, :meth:`remove` to stop.

    Attributes:
        teacher: the frozen dense model (eval mode, no gradients).
        temperature, weight, hidden_weight: as given to :func:`distill`.
        last: the term of the latest hooked forward (a 0-dim tensor), or ``None``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, temperature: float, weight: float,
                 hidden: Sequence[str], hidden_weight: float, add_to_loss: bool) -> None:
        self.teacher, self.temperature, self.weight = teacher, float(temperature), float(weight)
        self.hidden_weight, self.add_to_loss = float(hidden_weight), add_to_loss
        self.last: torch.Tensor | None = None
        self._student_hidden: dict[str, torch.Tensor] = {}
        self._teacher_hidden: dict[str, torch.Tensor] = {}
        # Hooks are plain functions holding weak references: a deep copy of the student (as
        # compact() makes) shares them, and they do nothing for a module that is not the student.
        ref, me = weakref.ref(student), weakref.ref(self)

        def after_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            owner = me()
            return owner._after_forward(module, args, kwargs, output) if owner and module is ref() else None

        self._handles = [student.register_forward_hook(after_forward, with_kwargs=True)]
        for name in hidden:
            for model, store in ((student, self._student_hidden), (teacher, self._teacher_hidden)):
                module = model.get_submodule(name)
                self._handles.append(module.register_forward_hook(_keep(store, name, weakref.ref(module))))
        self.hidden = tuple(hidden)

    def __call__(self) -> torch.Tensor:
        """The term of the latest training forward (0 before the first one, or after :meth:`remove`)."""
        return self.last if self.last is not None else torch.zeros(())

    def remove(self) -> None:
        """Remove the hooks; the teacher stays referenced until this object goes."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.last = [], None

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not (module.training and torch.is_grad_enabled()):
            return None  # evaluation: no teacher forward, no term
        with torch.no_grad():
            teacher_out = self.teacher(*args, **kwargs)
        term = self.weight * kd_loss(logits_of(output), logits_of(teacher_out), self.temperature)
        for name in self.hidden:
            s, t = self._student_hidden.pop(name), self._teacher_hidden.pop(name)
            term = term + self.hidden_weight * (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
        self.last = term
        loss = getattr(output, "loss", None)
        if self.add_to_loss and isinstance(loss, torch.Tensor):
            output["loss"] = loss + term.to(loss.dtype)  # a Hugging Face ModelOutput (or a dict)
            return output
        return None


def _keep(store: dict[str, torch.Tensor], name: str, ref: weakref.ref):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        if module is ref():
            store[name] = logits_of(output)

    return hook


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: the tensor itself, its ``.logits``, or its first element.

    Raises:
        ArgumentError: none of these is a tensor.
    """
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise ArgumentError(f"distill: cannot find logits in a {type(output).__name__} output; the model must "
                            "return a tensor, an object with .logits, or a tuple whose first item is the logits")
    return logits


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over all rows of the last dim.

    Zero exactly when the two logits agree up to a constant per row; the ``T**2`` keeps the
    gradient's size independent of ``T`` (Hinton et al. 2015).

    Example:
        >>> kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 2.0)
        tensor(0.)
    """
    s = F.log_softmax(student.float().reshape(-1, student.shape[-1]) / temperature, dim=-1)
    t = F.log_softmax(teacher.float().reshape(-1, teacher.shape[-1]) / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def distill(net: nn.Module, teacher: nn.Module | None = None, *, temperature: float = 4.0, weight: float = 1.0,
            hidden: Sequence[str] = (), hidden_weight: float = 1.0, add_to_loss: bool = False) -> Distiller:
    """Distil from the dense model into the gated one: one line, no second forward in the loop.

    Args:
        net: a sparsified model (the student).
        teacher: the dense model; default a frozen plain copy of ``net`` as it is now (call this
            before training, when ``net`` still computes what the dense model computed).
        temperature: softmax temperature ``T`` of the logits term; > 0.
        weight: weight of the logits term; >= 0.
        hidden: names of modules (in both models) whose outputs are matched too.
        hidden_weight: weight of each hidden-state term.
        add_to_loss: also add the term to ``output.loss`` (Hugging Face models given labels).

    Returns:
        A :class:`Distiller`: ``kd()`` is the term of the latest training forward.

    Raises:
        ArgumentError: a bad temperature or weight, or a ``hidden`` name missing from a model.
        NotSparsifiedError: ``net`` has no gates and no teacher was given.

    Example:
        >>> kd = distill(net)
        >>> loss = F.cross_entropy(net(x), y) + autosparse.penalty(net) + kd()
    """
    if not temperature > 0 or not weight >= 0 or not hidden_weight >= 0:
        raise ArgumentError(f"distill: temperature must be > 0 and weights >= 0, got temperature={temperature!r}, "
                            f"weight={weight!r}, hidden_weight={hidden_weight!r}")
    inner = unwrap(net)
    if teacher is None:
        get_state(inner)  # a clear NotSparsifiedError rather than a compaction failure
        teacher = compact_model(inner, inplace=False, verify=False, rtol=0.0)
    teacher.eval().requires_grad_(False)
    for name in hidden:
        for model, which in ((inner, "net"), (teacher, "teacher")):
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ArgumentError(f"distill: hidden={name!r} is not a module of the {which}") from None
    return Distiller(inner, teacher, temperature=temperature, weight=weight, hidden=hidden,
                     hidden_weight=hidden_weight, add_to_loss=add_to_loss)
