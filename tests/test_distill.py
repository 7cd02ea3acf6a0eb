"""autosparse.distill: a KD term from the dense model, hooked on the student's forward (no second forward)."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autosparse
from autosparse.errors import ArgumentError
from autosparse.state import get_state
from autosparse.training.distill import kd_loss

X = torch.randn(6, 3, 10, generator=torch.Generator().manual_seed(0))
POLICY = {"rules": [{"granularity": "channel"}]}


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 4))


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(5, 7)
    assert float(kd_loss(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(logits + 3.0, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)  # softmax ignores shifts
    assert float(kd_loss(torch.randn(5, 7), logits, 2.0)) > 0.0
    seq = torch.randn(2, 3, 7)  # token logits: rows over every position
    assert float(kd_loss(seq, seq, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_term_is_zero_while_student_equals_teacher_and_positive_once_it_differs():
    net = autosparse.sparsify(_cnn(), POLICY, example_inputs=(X,))
    kd = autosparse.distill(net, temperature=2.0)
    assert kd().item() == 0.0  # before any forward
    net.train()(X)
    assert kd().item() == pytest.approx(0.0, abs=1e-6)
    get_state(net).gate_list()[0].zero_([0, 1, 2])  # the student moves away from the dense model
    net(X)
    term = kd()
    assert float(term) > 0.0 and term.requires_grad
    term.backward()
    assert get_state(net).gate_list()[1].gamma.grad is not None  # the gradient reaches the student
    assert all(p.grad is None and not p.requires_grad for p in kd.teacher.parameters())  # the teacher is frozen


def test_no_teacher_forward_in_eval_or_without_grad():
    net = autosparse.sparsify(_cnn(), POLICY, example_inputs=(X,))
    kd = autosparse.distill(net)
    calls = []
    kd.teacher.register_forward_hook(lambda *a: calls.append(1))
    net.eval()(X)
    with torch.no_grad():
        net.train()(X)
    assert calls == [] and kd.last is None
    net(X)
    assert calls == [1]


def test_a_plain_loop_trains_with_the_term_and_compact_still_works():
    net = autosparse.sparsify(_cnn(), POLICY, example_inputs=(X,))
    kd = autosparse.distill(net, weight=0.5)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    for _ in range(3):
        loss = F.cross_entropy(net.train()(X), y) + autosparse.penalty(net) + kd()
        opt.zero_grad()
        loss.backward()
        opt.step()
    get_state(net).gate_list()[0].zero_([0])
    small = autosparse.compact(net.eval())  # the hooks survive the deep copy but do nothing there
    calls = []
    kd.teacher.register_forward_hook(lambda *a: calls.append(1))
    small.train()(X)
    assert calls == []
    kd.remove()
    net(X)
    assert calls == [] and kd().item() == 0.0


def test_hidden_states_are_matched_and_bad_arguments_raise():
    net = autosparse.sparsify(_cnn(), POLICY, example_inputs=(X,))
    kd = autosparse.distill(net, hidden=["3"], weight=0.0, hidden_weight=1.0)
    net.train()(X)
    assert kd().item() == pytest.approx(0.0, abs=1e-6)
    get_state(net).gate_list()[0].zero_([0, 1])
    net(X)
    assert kd().item() > 0.0
    with pytest.raises(ArgumentError, match="temperature"):
        autosparse.distill(net, temperature=0.0)
    with pytest.raises(ArgumentError, match="nope"):
        autosparse.distill(net, hidden=["nope"])
    with pytest.raises(autosparse.NotSparsifiedError):
        autosparse.distill(_cnn())


class _WithLoss(nn.Module):
    """A model that returns its loss in a ``ModelOutput``, as a Hugging Face model given labels does."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _cnn()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.body(x)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def test_add_to_loss_puts_the_term_into_the_models_own_loss():
    pytest.importorskip("transformers")
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    net = autosparse.sparsify(_WithLoss(), POLICY, example_inputs=(X,))
    kd = autosparse.distill(net, add_to_loss=True)
    get_state(net).gate_list()[0].zero_([0, 1, 2])
    out = net.train()(X, labels=labels)
    assert kd().item() > 0.0
    assert float(out.loss) == pytest.approx(float(F.cross_entropy(out.logits, labels) + kd()), rel=1e-5)


def test_trainer_callback_adds_the_term_and_logs_it():
    pytest.importorskip("transformers")
    from autosparse.integrations import SparsityCallback

    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    net = autosparse.sparsify(_WithLoss(), POLICY, example_inputs=(X,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    callback = SparsityCallback(distill={"temperature": 2.0})
    state = types.SimpleNamespace(log_history=[], global_step=1)
    callback.on_train_begin(None, state, None, model=net, optimizer=opt)
    get_state(net).gate_list()[0].zero_([0, 1, 2])
    out = net.train()(X, labels=labels)
    term = float(callback.distiller())
    assert term > 0.0 and float(out.loss) == pytest.approx(float(F.cross_entropy(out.logits, labels)) + term)
    logs: dict = {}
    callback.on_log(None, state, None, logs=logs)
    assert logs["sparsity/distill"] == pytest.approx(term)
    callback.on_train_end(None, state, None)
    assert callback.distiller is None
    out = net(X, labels=labels)
    assert float(out.loss) == pytest.approx(float(F.cross_entropy(out.logits, labels)))  # hooks removed
