"""Training with gates: penalty, schedule, budget controller and freeze (``autosparse.training.*``).

* :mod:`~autosparse.training.schedule`: :func:`attach` (hooks, no loop changes), :func:`step`,
  :func:`freeze`, the lambda warm-up and the per-model :class:`TrainingState`;
* :mod:`~autosparse.training.distributed`: FSDP2 / DDP: gates kept whole, their gradients averaged;
* :mod:`~autosparse.training.init`, :mod:`~autosparse.training.progressive`: the ``pretrained``
  regime: gates from l2 magnitude, units closed progressively along the controller's reference;
* :mod:`~autosparse.training.distill`: :func:`distill`, a KD term from the dense model, no second forward;
* :mod:`~autosparse.training.budget`: the cost model (FLOPs / params from the gate values) and the
  controller that adapts lambda so the compacted model lands on the policy's ``target``.

Example:
    >>> net = autosparse.sparsify(model, policy, example_inputs=(x,))
    >>> with autosparse.training.attach(net, optimizer=opt):
    ...     trainer.train()                       # any loop
"""

from __future__ import annotations

from autosparse.training.distill import Distiller, distill
from autosparse.training.distributed import average_gate_grads, fsdp_ignored_params
from autosparse.training.init import init_from_magnitude, magnitude_scores
from autosparse.training.schedule import (
    HISTORY,
    Attachment,
    TrainingState,
    attach,
    cost_fraction,
    current_lambda,
    freeze,
    gate_parameters,
    penalty_terms,
    penalty_value,
    step,
    training_state,
    warmup_factor,
)

__all__ = [
    "HISTORY",
    "Attachment",
    "Distiller",
    "TrainingState",
    "attach",
    "average_gate_grads",
    "cost_fraction",
    "current_lambda",
    "distill",
    "freeze",
    "fsdp_ignored_params",
    "gate_parameters",
    "init_from_magnitude",
    "magnitude_scores",
    "penalty_terms",
    "penalty_value",
    "step",
    "training_state",
    "warmup_factor",
]
