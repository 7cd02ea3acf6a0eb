"""Hugging Face ``Trainer`` trains a sparsified model unchanged: gates learn through attach()'s hooks.

The Trainer builds its own optimizer and loop; ``autosparse.training.attach`` adds the penalty
gradient and steps the schedule through hooks, so nothing in the Trainer is subclassed.
"""

from __future__ import annotations

import pytest
import torch

import autosparse

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class _Pairs(torch.utils.data.Dataset):
    """Token sequences labelled by whether token 3 occurs: a task a tiny BERT learns in a few steps."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(4, 64, (n, 8), generator=g)
        self.ids[: n // 2, 2] = 3
        self.labels = (self.ids == 3).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_trainer_moves_gates_and_the_result_compacts(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config)
    inputs = (torch.randint(4, 64, (2, 8)),)
    policy = {"rules": [{"granularity": "head"}, {"granularity": "channel"}],
              "penalty": {"lambda": 0.5}, "schedule": {"warmup_steps": 2}}
    net = autosparse.sparsify(model, policy, example_inputs=inputs)
    assert isinstance(net, transformers.BertForSequenceClassification)
    before = {name: gate.gamma.detach().clone() for name, gate in autosparse.gates(net).items()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=16,
                                          learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=net, args=args, train_dataset=_Pairs())
    with autosparse.training.attach(net):
        trainer.train()
    moved = [name for name, gate in autosparse.gates(net).items() if not torch.equal(gate.gamma, before[name])]
    assert moved == list(before), "every gate's gamma takes optimizer steps inside the Trainer"
    assert autosparse.state.get_state(net).step == 12  # the schedule advanced once per Trainer step
    net.eval()
    small = autosparse.compact(net)  # verified against the gated model on the example inputs
    assert isinstance(small, transformers.BertForSequenceClassification)
