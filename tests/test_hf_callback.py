"""autosparse.integrations.SparsityCallback: a Hugging Face Trainer trains the gates with no other change."""

from __future__ import annotations

import pytest
import torch

import autosparse
from autosparse.training.schedule import training_state

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from autosparse.integrations import SparsityCallback  # noqa: E402  (needs transformers)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, num_key_value_heads=2))
    return transformers.BertForMaskedLM(transformers.BertConfig(**common, max_position_embeddings=16,
                                                                hidden_dropout_prob=0.0))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_three_trainer_steps_move_gates_step_schedule_and_log(kind, tmp_path):
    model = _model(kind)
    policy = {"rules": [{"granularity": "head"}, {"granularity": "channel"}],
              "penalty": {"lambda": 0.5}, "schedule": {"warmup_steps": 2}}
    net = autosparse.sparsify(model, policy, example_inputs=(torch.randint(0, 64, (2, 8)),))
    before = {name: gate.gamma.detach().clone() for name, gate in autosparse.gates(net).items()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                                          learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                                          logging_steps=1, disable_tqdm=True)
    callback = SparsityCallback()
    trainer = transformers.Trainer(model=net, args=args, train_dataset=_Tokens(), callbacks=[callback])
    trainer.train()
    assert autosparse.state.get_state(net).step == 3  # the schedule stepped once per optimizer step
    assert all(not torch.equal(g.gamma, before[n]) for n, g in autosparse.gates(net).items())
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]  # one per step (logging_steps=1)
    assert [entry["step"] for entry in logged] == [1, 2, 3]
    assert all(0.0 < e["sparsity/kept"] <= 1.0 and e["sparsity/penalty"] > 0.0 for e in logged)
    assert [e["sparsity/lambda"] for e in logged] == pytest.approx([0.25, 0.5, 0.5])  # warm-up over 2 steps
    tr = training_state(net)
    assert callback.attachment is None and tr.attachment is None and not tr.hooked  # removed on train end
    autosparse.compact(net.eval())  # still a valid gated model


def test_callback_refuses_a_model_without_gates(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=_model("bert"), args=args, train_dataset=_Tokens(),
                                   callbacks=[SparsityCallback()])
    with pytest.raises(autosparse.NotSparsifiedError, match="SparsityCallback"):
        trainer.train()
