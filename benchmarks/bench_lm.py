"""A byte-level Llama on the Python standard library: gates vs one-shot magnitude vs Torch-Pruning.

One question: a small trained language model (Llama layout, grouped-query attention) is pruned to
50 % and 25 % of its decoder-block parameters and fine-tuned for the same number of steps by every
method; which one keeps the lowest held-out bits per byte?

* **data**: the ``.py`` files of the running interpreter's standard library, read as bytes (every
  machine has them). Files are split, not bytes: a file goes to the held-out set when the CRC-32 of
  its relative path is divisible by 10, so the split is fixed across machines with the same Python.
* **model**: ``LlamaForCausalLM`` (transformers, random init), vocabulary 256 (bytes), hidden 128,
  4 layers, 8 query heads sharing 4 KV heads, MLP 384. Trained dense with AdamW and a cosine rate.
* **methods** (each starts from the same trained dense model, each gets the same fine-tune steps):
  ``gates``: ``autosparse.sparsify`` with head (KV group) and MLP-channel rules and a ``params``
  target and the pretrained recipe (``regime: pretrained``: gates start from l2 magnitude, units close
  progressively, freeze at 30 %); ``prune_l2``: ``autosparse.prune``
  with L2 magnitude per KV group and MLP channel, then fine-tuning; ``torch_pruning``: Torch-Pruning's
  LLM recipe (``MetaPruner`` with L2 magnitude, ``num_heads`` and ``prune_num_heads``), run in a
  separate process with a time limit; where it fails or hangs the row says so.
* **metric**: held-out bits per byte (mean next-byte cross-entropy / ln 2) on fixed windows.

The budget is a fraction of the parameters inside the decoder blocks; the policy's ``target.params``
is the equivalent fraction of the whole model (embeddings and norms are not prunable).

Run (about 30 minutes on 2 busy cores; ``--quick``: 1 seed, short training, a few minutes)::

    PYTHONPATH=. python -m benchmarks.bench_lm [--quick]

Writes ``benchmarks/results/lm.json`` (stamped; ``--out`` elsewhere) and prints a Markdown table.
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import statistics
import sys
import sysconfig
import time
import warnings
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import autosparse
from autosparse import training
from autosparse.demo.run import lr_factors
from autosparse.measure import count_params
from autosparse.state import get_state, is_sparsified
from benchmarks.common import base_parser, stamp, write_result

METHODS = ("gates", "prune_l2", "torch_pruning")
BUDGETS = (0.5, 0.25)
SEQ, BATCH = 128, 16
CONFIG = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
          "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": SEQ,
          "tie_word_embeddings": True}


def corpus(limit_mb: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) byte tensors from the standard library's sources, split by file; the
    training bytes are capped at ``limit_mb`` and the held-out ones at a tenth of that."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[bool, bytearray] = {False: bytearray(), True: bytearray()}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or rel.startswith("test/"):
            continue
        held = zlib.crc32(rel.encode()) % 10 == 0
        if len(parts[held]) < limit_mb * 2**20 * (0.1 if held else 1.0):
            parts[held].extend(path.read_bytes() + b"\n")
    return tuple(torch.frombuffer(parts[h], dtype=torch.uint8).long() for h in (False, True))  # type: ignore[return-value]


def batch_at(data: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=generator)
    return torch.stack([data[s : s + SEQ + 1] for s in start.tolist()])


def next_byte_loss(model: nn.Module, chunk: torch.Tensor) -> torch.Tensor:
    logits = model(chunk[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))


@torch.no_grad()
def bits_per_byte(model: nn.Module, held: torch.Tensor, windows: int = 64) -> float:
    """Mean next-byte cross-entropy in bits on ``windows`` evenly spaced held-out windows."""
    model.eval()
    step = (len(held) - SEQ - 1) // windows
    chunks = torch.stack([held[i * step : i * step + SEQ + 1] for i in range(windows)])
    losses = [float(next_byte_loss(model, chunks[i : i + BATCH])) for i in range(0, windows, BATCH)]
    return statistics.mean(losses) / math.log(2)


def train(model: nn.Module, data: torch.Tensor, steps: int, seed: int, lr: float = 2e-3) -> nn.Module:
    """AdamW with a cosine rate; a sparsified model gets the penalty and its gates their own rate,
    with the demo's schedule of its regime (``demo.lr_factors``: the cosine restarts at the freeze)."""
    generator = torch.Generator().manual_seed(seed)
    gated = is_sparsified(model)
    gates = training.gate_parameters(model) if gated else []
    rest = [p for p in model.parameters() if all(p is not g for g in gates)]
    groups = [{"params": rest, "lr": lr, "weight_decay": 0.01}]
    groups += [{"params": gates, "lr": 1e-2, "weight_decay": 0.0}] if gates else []
    optimizer = torch.optim.AdamW(groups)
    factors = lr_factors(steps, get_state(model).policy.schedule if gated else None)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    model.train()
    for _ in range(steps):
        loss = next_byte_loss(model, batch_at(data, generator))
        if gated:
            loss = loss + autosparse.penalty(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if gated:
            training.step(model)
    return model.eval()


def block_params(model: nn.Module) -> int:
    return count_params(model.model.layers)


def policy(model: nn.Module, budget: float, steps: int) -> dict:
    """Heads (KV groups) and MLP channels; ``budget`` of the block parameters as a whole-model target."""
    total, blocks = count_params(model), block_params(model)
    return {
        "rules": [{"name": "heads", "granularity": "head"},
                  {"name": "mlp", "granularity": "channel", "types": ["Linear"]}],
        "penalty": {"lambda": 1e-3, "p": 0.5},
        # A trained model and a short fine-tune: the pretrained recipe (docs/training.md).
        "schedule": {"warmup_steps": max(1, int(0.03 * steps)), "freeze_step": max(2, int(0.3 * steps)),
                     "regime": "pretrained"},
        "target": {"params": (total - blocks + budget * blocks) / total, "tolerance": 0.02},
    }


def example(held: torch.Tensor) -> tuple[torch.Tensor]:
    return (held[: 2 * SEQ].reshape(2, SEQ),)


def run_method(method: str, dense: nn.Module, data: tuple, budget: float, seed: int, steps: int,
               tp_timeout: float) -> dict:
    train_bytes, held = data
    start = time.perf_counter()
    if method == "gates":
        net = autosparse.sparsify(copy.deepcopy(dense), policy(dense, budget, steps), example_inputs=example(held))
        small = autosparse.compact(train(net, train_bytes, steps, seed))
        pruned_bpb = None
    else:
        small = prune_one(method, dense, budget, held, tp_timeout)
        if isinstance(small, str):
            return {"method": method, "budget": budget, "seed": seed, "error": small}
        pruned_bpb = bits_per_byte(small, held)
        train(small, train_bytes, steps, seed)
    return {"method": method, "budget": budget, "seed": seed, "bpb": bits_per_byte(small, held),
            "bpb_pruned": pruned_bpb, "block_fraction": block_params(small) / block_params(dense),
            "params": count_params(small), "seconds": time.perf_counter() - start}


def prune_one(method: str, dense: nn.Module, budget: float, held: torch.Tensor, timeout: float):
    if method == "prune_l2":
        return autosparse.prune(dense, policy(dense, budget, 1), example_inputs=example(held), importance="l2")
    return torch_pruning_in_subprocess(dense, budget, held, timeout)


def torch_pruning_in_subprocess(dense: nn.Module, budget: float, held: torch.Tensor, timeout: float):
    """Torch-Pruning's LLM recipe in a child process (it can hang on GQA models): the pruned model,
    or a string saying how it failed."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        job = pool.apply_async(torch_pruning_llm, (dense, budget, example(held)))
        try:
            return job.get(timeout)
        except multiprocessing.TimeoutError:
            return f"Torch-Pruning did not finish within {timeout:.0f} s"
        except Exception as error:  # its failure is the result of this row
            return f"Torch-Pruning failed: {type(error).__name__}: {str(error)[:300]}"


def torch_pruning_llm(model: nn.Module, budget: float, inputs: tuple) -> nn.Module:
    """Torch-Pruning's documented LLM set-up: L2 magnitude, heads pruned as units (num_heads per
    q/k/v projection), the same ratio in every layer, the embedding and the LM head left alone."""
    import torch_pruning as tp

    torch.set_num_threads(1)
    cfg = model.config
    num_heads = {}
    for layer in model.model.layers:
        attn = layer.self_attn
        num_heads[attn.q_proj] = cfg.num_attention_heads
        num_heads[attn.k_proj] = num_heads[attn.v_proj] = cfg.num_key_value_heads
    norms = [(m.weight, 0) for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=inputs[0], importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.9, iterative_steps=90, num_heads=num_heads, prune_num_heads=True,
        prune_head_dims=False, head_pruning_ratio=0.9, ignored_layers=[model.lm_head],
        unwrapped_parameters=norms, output_transform=lambda out: out.logits,
    )
    blocks = block_params(model)
    for _ in range(90):  # raise the ratio step by step until the block parameters fit the budget
        if block_params(model) <= budget * blocks:
            break
        pruner.step()
    return model


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for key in sorted({(r["method"], r["budget"]) for r in rows}, key=lambda k: (-k[1], k[0])):
        same = [r for r in rows if (r["method"], r["budget"]) == key]
        ok = [r["bpb"] for r in same if "bpb" in r]
        out.append({"method": key[0], "budget": key[1], "runs": len(same), "ok": len(ok),
                    "bpb": statistics.mean(ok) if ok else None,
                    "bpb_sd": statistics.pstdev(ok) if len(ok) > 1 else 0.0,
                    "block_fraction": statistics.mean(r["block_fraction"] for r in same if "bpb" in r) if ok else None,
                    "error": next((r["error"] for r in same if "error" in r), None)})
    return out


def table(summary: list[dict]) -> str:
    lines = ["| budget (block params) | method | held-out bits/byte (mean ± sd) | block fraction | note |",
             "|---|---|---|---|---|"]
    for r in summary:
        value = f"{r['bpb']:.3f} ± {r['bpb_sd']:.3f}" if r["bpb"] is not None else "-"
        frac = f"{r['block_fraction']:.3f}" if r["block_fraction"] is not None else "-"
        lines.append(f"| {r['budget']:.0%} | {r['method']} | {value} | {frac} | {r['error'] or ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, short training (a few minutes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dense-steps", type=int, default=2000)
    parser.add_argument("--finetune-steps", type=int, default=600)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--tp-timeout", type=float, default=240.0,
                        help="seconds Torch-Pruning may take per budget (it hangs building its graph of HF Llama)")
    args = parser.parse_args(argv)
    if args.quick or args.smoke:
        args.seeds, args.dense_steps, args.finetune_steps = [0], 300, 100
    if args.smoke:
        args.dense_steps, args.finetune_steps, args.budgets, args.tp_timeout = 4, 10, [0.5], 60.0
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    data = corpus(0.5 if args.smoke else 8.0)
    rows: list[dict] = []
    failures: list[dict] = []
    for seed in args.seeds:
        rows += run_seed(args, data, seed, failures)
    summary = summarize(rows)
    payload = {"benchmark": "lm", "smoke": args.smoke, "quick": args.quick, "stamp": stamp(threads=args.threads),
               "config": {**vars(args), "model": CONFIG, "seq": SEQ,
               "batch": BATCH, "train_bytes": len(data[0]), "held_bytes": len(data[1])},
               "summary": summary, "rows": rows}
    path = write_result("lm_smoke" if args.smoke else "lm_quick" if args.quick else "lm", payload, args.out)
    print(table(summary))
    print(f"wrote {path}", file=sys.stderr)
    return 0


def run_seed(args, data: tuple, seed: int, failures: list[dict]) -> list[dict]:
    """One dense model per seed, then every method at every budget from a copy of it."""
    from benchmarks.common import hf_model

    dense = train(hf_model("LlamaForCausalLM", CONFIG, seed=seed), data[0], args.dense_steps, seed)
    rows = [{"method": "dense", "budget": 1.0, "seed": seed, "bpb": bits_per_byte(dense, data[1]),
             "block_fraction": 1.0, "params": count_params(dense)}]
    print(f"seed {seed} dense: {rows[0]['bpb']:.3f} bits/byte", file=sys.stderr, flush=True)
    for budget in args.budgets:
        for method in args.methods:
            failed = next((r for r in failures if (r["method"], r["budget"]) == (method, budget)), None)
            if failed is not None:  # a peer that hung or failed once is not retried on every seed
                rows.append({**failed, "seed": seed, "error": failed["error"] + " (not retried)"})
                continue
            row = run_method(method, dense, data, budget, seed + 1, args.finetune_steps, args.tp_timeout)
            print(f"seed {seed} {method} {budget:.0%}: {row.get('bpb', row.get('error'))}", file=sys.stderr, flush=True)
            rows.append(row)
            if "error" in row:
                failures.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
