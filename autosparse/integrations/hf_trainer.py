"""A Hugging Face ``Trainer`` callback: gates train, the schedule steps, sparsity shows in the logs.

``Trainer`` builds its optimizer itself, so the callback attaches on ``on_train_begin`` (when the
optimizer exists) with :func:`autosparse.training.attach` — the penalty's gradient added to the
gates after each backward, the schedule stepped after each optimizer step — and removes the hooks on
``on_train_end``. On every log it adds ``sparsity/kept`` (fraction of gated units still open),
``sparsity/penalty`` and ``sparsity/lambda`` to the Trainer's logs and ``state.log_history``.

With ``distill=True`` (or a dict of :func:`autosparse.training.distill` options) the callback also
keeps a frozen copy of the dense model and adds the distillation term to the ``loss`` the model
returns (a model given ``labels``), so the Trainer trains on ``task + KD`` with no second forward
written anywhere; ``sparsity/distill`` is logged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as exc:  # the core does not need transformers; this module does
    raise ImportError("autosparse.integrations needs transformers: pip install transformers accelerate") from exc

from autosparse.errors import NotSparsifiedError
from autosparse.state import get_state, is_sparsified
from autosparse.training.distill import Distiller, distill
from autosparse.training.schedule import Attachment, attach, current_lambda, penalty_terms


def sparsity_logs(model: nn.Module) -> dict[str, float]:
    """The numbers the callback logs: open fraction of gated units, the penalty and lambda now.

    Example:
        >>> sparsity_logs(net)
        {'sparsity/kept': 0.8125, 'sparsity/penalty': 0.0123, 'sparsity/lambda': 0.001}
    """
    gates = get_state(model).gate_list()
    with torch.no_grad():
        penalty = float(torch.stack(penalty_terms(model)).sum())  # not penalty_value(): no double-count warning
    return {"sparsity/kept": sum(g.kept() for g in gates) / max(sum(g.size for g in gates), 1),
            "sparsity/penalty": penalty, "sparsity/lambda": float(current_lambda(model))}


class SparsityCallback(TrainerCallback):
    """Train a sparsified model with ``transformers.Trainer`` unchanged.

    Args:
        model: the sparsified model; default: the model the Trainer trains (unwrapped from DDP).
        add_penalty_gradient: as in :func:`autosparse.training.attach`; False if ``compute_loss``
            already adds :func:`autosparse.penalty`.
        distill: ``True`` or a dict of options of :func:`autosparse.training.distill` (``teacher``,
            ``temperature``, ``weight``, ``hidden``, ``hidden_weight``): distil from the dense model
            (a frozen copy made at train begin) by adding the term to the model's ``output.loss``.

    Raises:
        NotSparsifiedError: at train begin, when the model has no gates.

    Example:
        >>> net = autosparse.sparsify(model, policy, example_inputs=(ids,))
        >>> trainer = Trainer(model=net, args=args, train_dataset=data, callbacks=[SparsityCallback()])
        >>> trainer.train()
        >>> small = autosparse.compact(net.eval())

    Reporting integrations (TensorBoard, W&B) run before user callbacks; to have them see the
    sparsity numbers, put this callback first: ``trainer.callback_handler.callbacks.insert(0, cb)``.
    """

    def __init__(self, model: nn.Module | None = None, *, add_penalty_gradient: bool = True,
                 distill: bool | dict[str, Any] = False) -> None:
        self.model, self.add_penalty_gradient = model, add_penalty_gradient
        self.distill_options: dict[str, Any] | None = (
            dict(distill) if isinstance(distill, dict) else {} if distill else None)
        self.attachment: Attachment | None = None
        self.distiller: Distiller | None = None
        self._target: nn.Module | None = None

    def _resolve(self, model: nn.Module | None) -> nn.Module:
        target = self.model if self.model is not None else model
        inner = getattr(target, "module", None)  # DDP / DataParallel wrap the sparsified model
        if target is not None and not is_sparsified(target) and isinstance(inner, nn.Module):
            target = inner
        if target is None or not is_sparsified(target):
            raise NotSparsifiedError(
                "SparsityCallback: the Trainer's model has no autosparse gates; pass "
                "autosparse.sparsify(model, policy, example_inputs=...) to the Trainer, or SparsityCallback(model=net)")
        return target

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        self._target = self._resolve(model)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it; the hooks go on the real one
        self.attachment = attach(self._target, optimizer=inner, add_penalty_gradient=self.add_penalty_gradient)
        if self.distill_options is not None and self.distiller is None:
            self.distiller = distill(self._target, **self.distill_options, add_to_loss=True)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self._target is None or logs is None:
            return
        numbers = sparsity_logs(self._target)
        if self.distiller is not None:
            numbers["sparsity/distill"] = float(self.distiller().detach())
        logs.update(numbers)
        # Trainer.log appended a copy of logs to the history before calling us: update that copy too
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(numbers)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.attachment is not None:
            self.attachment.remove()
        if self.distiller is not None:
            self.distiller.remove()  # and the teacher goes with the last reference to it
        self.attachment, self.distiller = None, None
