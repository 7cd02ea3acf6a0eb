"""Shared helpers of the benchmarks: model zoo, policies, FLOPs targeting, timing, results files.

Every benchmark script exposes ``main(argv) -> dict`` and writes one JSON file under
``benchmarks/results/`` (or ``--out``), stamped by :func:`stamp` with the autosparse, torch and
transformers versions and the git commit, so a number can always be traced to the code that made it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import autosparse
from autosparse.measure import count_flops, measure_latency

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- results
def git_commit() -> tuple[str, bool]:
    """The HEAD commit and whether the working tree has uncommitted changes under autosparse/."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return git("rev-parse", "HEAD") or "unknown", bool(git("status", "--porcelain", "--", "autosparse"))


def source_sha1() -> str:
    """A hash of the autosparse sources actually imported: pins the code even in a dirty tree."""
    digest = hashlib.sha1()
    for path in sorted(Path(autosparse.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def stamp(threads: int | None = None) -> dict[str, Any]:
    """What produced a result: versions, commit, machine and its load while the benchmark ran."""
    commit, dirty = git_commit()
    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = None
    return {
        "autosparse": autosparse.__version__,
        "torch": torch.__version__,
        "transformers": hf,
        "git_commit": commit,
        "autosparse_dirty": dirty,  # uncommitted changes in autosparse/ when this ran
        "autosparse_source_sha1": source_sha1(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_result(name: str, payload: dict[str, Any], out: str | os.PathLike | None) -> Path:
    """Write ``payload`` (with a fresh stamp) to ``<out or results>/<name>.json``."""
    folder = Path(out) if out else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def hidden() -> str:
    """argparse help for internal options (the worker flags of a fresh process)."""
    return argparse.SUPPRESS


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few seconds (used by the tests)")
    parser.add_argument("--out", default=None, help="folder for the JSON result (default benchmarks/results)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: robust on a shared machine; timings fixed to it)",
    )
    return parser


# ---------------------------------------------------------------- models
@dataclass
class Built:
    """A benchmark model, its example inputs for analysis/FLOPs, and how to make batches."""

    name: str
    model: nn.Module
    family: str  # "cnn" | "encoder" | "decoder"
    make_input: Callable[[int], torch.Tensor]  # batch size -> one input tensor

    def inputs(self, batch: int = 1) -> tuple:
        return (self.make_input(batch),)


def fast_init_(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Random normal weights, zero biases, unit norms: fast (one vectorised fill per tensor)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return model


def hf_model(cls_name: str, config: dict[str, Any], seed: int = 0) -> nn.Module:
    """A Hugging Face model with random weights, built without transformers' slow initialisers.

    ``no_init_weights`` skips the per-module init (tens of seconds at 1B parameters); the weights
    are real tensors, then filled by :func:`fast_init_` - never the meta device, since compaction
    must slice actual memory.
    """
    import transformers
    from transformers.initialization import no_init_weights

    cls = getattr(transformers, cls_name)
    cfg = cls.config_class(**config)
    with no_init_weights():
        model = cls(cfg)
    return fast_init_(model, seed=seed).eval()


def _images(size: int) -> Callable[[int], torch.Tensor]:
    return lambda b: torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b))


def _tokens(vocab: int, seq: int) -> Callable[[int], torch.Tensor]:
    return lambda b: torch.randint(0, vocab, (b, seq), generator=torch.Generator().manual_seed(b))


MODEL_NAMES = ("resnet50", "mobilenet_v2", "bert_base", "llama_small", "llama_1b")
BERT_BASE = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
)
LLAMA_SMALL = dict(
    vocab_size=8192,
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    intermediate_size=1536,
)
LLAMA_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=5632,
)
TINY = {
    "bert": dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    ),
    "llama": dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
    ),
}


def build(
    name: str,
    *,
    smoke: bool = False,
    layers: int | None = None,
    depths: tuple[int, ...] | None = None,
    image: int = 128,
    seq: int = 32,
) -> Built:
    """One of the benchmark models with random weights, in eval mode.

    Args:
        name: ``resnet50`` | ``mobilenet_v2`` | ``bert_base`` | ``llama_small`` | ``llama_1b``.
        smoke: tiny widths and inputs (seconds, for the tests).
        layers: override the number of transformer layers (model-size sweeps).
        depths: override ResNet stage depths (model-size sweeps).
        image, seq: input resolution / sequence length.
    """
    from benchmarks import models

    torch.manual_seed(0)
    if smoke:
        image, seq = 32, 8
    if name == "resnet50":
        net = models.resnet(
            depths or ((1, 1, 1, 1) if smoke else models.RESNET50_DEPTHS),
            width=0.125 if smoke else 1.0,
            num_classes=10 if smoke else 1000,
        )
        return Built(name, bn_stats(net), "cnn", _images(image))
    if name == "mobilenet_v2":
        net = models.mobilenet_v2(
            width=0.25 if smoke else 1.0, repeats=0.34 if smoke else 1.0, num_classes=10 if smoke else 1000
        )
        return Built(name, bn_stats(net), "cnn", _images(image))
    if name == "bert_base":
        cfg = dict(TINY["bert"] if smoke else BERT_BASE)
        if layers:
            cfg["num_hidden_layers"] = layers
        return Built(name, hf_model("BertModel", cfg), "encoder", _tokens(cfg["vocab_size"], seq))
    if name in ("llama_small", "llama_1b"):
        cfg = dict(TINY["llama"] if smoke else (LLAMA_SMALL if name == "llama_small" else LLAMA_1B))
        if layers:
            cfg["num_hidden_layers"] = layers
        return Built(name, hf_model("LlamaForCausalLM", cfg), "decoder", _tokens(cfg["vocab_size"], seq))
    raise ValueError(
        f"unknown benchmark model {name!r}; use resnet50, mobilenet_v2, bert_base, llama_small or llama_1b"
    )


def bn_stats(net: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affines, so folding and slicing see real values."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


# ---------------------------------------------------------------- policies and pruning
def policy_for(family: str, round_to: int = 1) -> dict[str, Any]:
    """Channels for CNNs; heads + MLP channels for transformers (round_to on channel rules)."""
    channels = {"name": "channels", "granularity": "channel", "round_to": round_to}
    if family == "cnn":
        return {"rules": [channels]}
    return {"rules": [{"name": "heads", "granularity": "head"}, channels]}


def zero_fraction(net: nn.Module, keep: float, seed: int = 0) -> None:
    """Zero all but ``ceil(keep * n)`` random units of every gate (at least one kept)."""
    rng = np.random.default_rng(seed)
    for gate in autosparse.gates(net).values():
        n_keep = min(gate.size, max(1, math.ceil(keep * gate.size - 1e-9)))
        gate.zero_(rng.permutation(gate.size)[n_keep:].tolist())


def compact_at(gated: nn.Module, keep: float, seed: int = 0, verify: bool = False) -> nn.Module:
    """A compacted copy of ``gated`` with ``keep`` of every gate's units; ``gated`` is untouched."""
    trial = copy.deepcopy(gated)
    zero_fraction(trial, keep, seed)
    if verify:
        return autosparse.compact(trial)
    return autosparse.compact(trial, inplace=True, verify=False)


def search_keep(
    gated: nn.Module,
    inputs: tuple,
    dense_flops: int,
    target: float,
    *,
    exponent: float,
    tol: float = 0.03,
    iters: int = 8,
) -> tuple[float, float]:
    """Find the kept fraction whose compacted FLOPs are ``target`` of dense (bisection).

    Returns ``(keep, achieved_fraction)``; stops once within ``tol`` (relative) of the target.
    ``exponent`` gives the first guess ``target ** (1 / exponent)`` (2 for chains of convolutions).
    """
    lo, hi, keep = 0.0, 1.0, target ** (1.0 / exponent)
    best = (keep, math.inf, 1.0)
    for _ in range(iters):
        frac = count_flops(compact_at(gated, keep), inputs) / dense_flops
        if abs(frac / target - 1) < best[1]:
            best = (keep, abs(frac / target - 1), frac)
        if abs(frac / target - 1) <= tol:
            break
        lo, hi = (keep, hi) if frac < target else (lo, keep)
        keep = (lo + hi) / 2
    return best[0], best[2]


# ---------------------------------------------------------------- timing
def timed_ms(fn: Callable[[], Any]) -> tuple[float, float]:
    """``(wall, cpu)`` milliseconds of one call; cpu is this process's CPU time (all its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def summarize_ms(wall: list[float], cpu: list[float]) -> dict[str, float]:
    """Min and median of wall and CPU times. ``ms`` (the headline) is the minimum CPU time.

    On a shared, oversubscribed machine wall time mostly measures the neighbours; with one
    thread, CPU time is what the model itself cost (and equals wall time on an idle machine).
    """
    return {
        "ms": round(min(cpu), 3),
        "cpu_min_ms": round(min(cpu), 3),
        "cpu_median_ms": round(float(np.median(cpu)), 3),
        "wall_min_ms": round(min(wall), 3),
        "wall_median_ms": round(float(np.median(wall)), 3),
        "repeats": len(wall),
    }


def interleaved_latency(
    models: dict[str, nn.Module], inputs: tuple, *, repeats: int, warmup: int, threads: int
) -> dict[str, dict[str, float]]:
    """Inference latency of several models, timed round-robin so load drift hits all of them alike.

    Eval mode, ``torch.inference_mode``, ``threads`` intra-op threads; ``warmup`` untimed runs
    each (via :func:`autosparse.measure.measure_latency`) first. Returns :func:`summarize_ms` per model.
    """
    for model in models.values():
        if warmup:
            measure_latency(model, inputs, repeats=1, warmup=warmup - 1, threads=threads)
    wall: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    flags = {k: m.training for k, m in models.items()}
    try:
        with num_threads(threads), torch.inference_mode():
            for model in models.values():
                model.eval()
            for _ in range(repeats):
                for key, model in models.items():
                    w, c = timed_ms(lambda m=model: m(*inputs))
                    wall[key].append(w)
                    cpu[key].append(c)
    finally:
        for key, model in models.items():
            model.train(flags[key])
    return {k: summarize_ms(wall[k], cpu[k]) for k in models}


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def phase_timer(module: Any, names: list[str]) -> Iterator[dict[str, Any]]:
    """Time calls to ``module.<name>`` (e.g. the steps ``sparsify`` calls) without running them twice.

    Yields ``{name: seconds, name + "_result": last return value}``; names the module lacks are
    skipped (the core may be refactored; the benchmark then reports fewer phases).
    """
    record: dict[str, Any] = {}
    saved = {n: getattr(module, n) for n in names if hasattr(module, n)}

    def wrap(name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            record[name] = record.get(name, 0.0) + time.perf_counter() - start
            record[name + "_result"] = result
            return result

        return timed

    try:
        for name, fn in saved.items():
            setattr(module, name, wrap(name, fn))
        yield record
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def run_worker(module: str, args: list[str], timeout: float) -> dict[str, Any]:
    """Run ``python -m <module> <args>`` in a fresh process; its last stdout line is a JSON dict.

    A fresh process gives a clean peak RSS and lets a hang be cut off: the result is then
    ``{"status": "timeout"}`` (or ``"error"`` with the tail of stderr).
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout}
    wall = round(time.perf_counter() - start, 2)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
        return {
            "status": "error",
            "returncode": proc.returncode,
            "error": " | ".join(tail)[-400:],
            "wall_s": wall,
        }
    result = json.loads(lines[-1])
    result.setdefault("status", "ok")
    result["wall_s"] = wall
    return result


def current_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) on log(x): 1.0 is linear growth."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / den, 3) if den else None
