"""Zoo sweep: does sparsify -> zero 30 % -> compact stay exact on timm, torchvision and Hugging Face models?

For every model of :mod:`benchmarks.zoo_models` (random weights, eval mode) and every policy of
``configs/`` that applies (channels and layers always; heads and transformer where the model has an
attention module), the sweep

1. calls ``autosparse.sparsify(model, policy, example_inputs=...)`` (timed) and checks that the
   freshly gated model computes what the dense one computed;
2. zeroes ~30 % of every gate's units at random (``max(1, round(0.3 n))``, at most ``n - 1``: every
   gate of two or more units loses at least one and keeps at least one; fixed seed);
3. calls ``autosparse.compact(net)`` (timed; it verifies equivalence itself) and measures the max
   relative difference itself, on the example inputs and on fresh inputs of the same shape;
4. measures ``reach``: zero all but one unit of every gate, compact, and divide the parameters left by
   the dense model's (lower is more reach; min_keep / round_to of a policy keep more).

Status: ``exact`` (compact succeeded), ``refused`` (sparsify raised a typed autosparse error, or gated
nothing), ``failed`` (compact raised, or anything else broke), ``timeout``, ``skipped`` (model not run:
too big, or it does not run on any input size tried).

Each model runs in a worker process (``--jobs`` of them, one torch thread each); a step that prints
nothing for ``--timeout`` seconds gets its worker killed and the model's remaining policies resubmitted.

Usage::

    python -m benchmarks.zoo [--only timm|torchvision|hf] [--quick] [--jobs 2] [--out DIR]

Writes ``benchmarks/results/zoo.json`` (one record per model x policy, stamped like every benchmark)
and ``benchmarks/results/zoo.md`` (support table and summary counts). With ``--only`` the records of
the other sources already in ``zoo.json`` are kept. ``--quick`` runs 13 representative models and
writes only where ``--out`` says (it prints the table otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = {
    "channels": ROOT / "configs" / "channels.yaml",
    "layers": ROOT / "configs" / "layers.yaml",
    "heads": ROOT / "configs" / "heads.yaml",
    "transformer": ROOT / "configs" / "transformer.yaml",
}
ATTENTION_POLICIES = ("heads", "transformer")
ZERO_FRACTION = 0.3
SEED = 0
TOL = 1e-4  # our own check: relative max difference beyond which an "exact" result is flagged
PREFIX = "@@ZOO "


# ================================================================ worker side
def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:limit]


def _reason(exc: BaseException, limit: int = 600) -> str:
    """The message of a refusal: its first line plus the listed reasons (NoGatesError lists them)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return " | ".join(lines[:4])[:limit]


def _tensors(out: Any) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _run(model: Any, inputs: tuple, kwargs: dict) -> list:
    import torch

    with torch.no_grad():
        return [t.detach().float().clone() for t in _tensors(model(*inputs, **kwargs))]


def _rel_diff(ref: list, out: list) -> float:
    """Max abs difference relative to each output's scale (what compact's own check measures)."""
    if len(ref) != len(out):
        return math.inf
    worst = 0.0
    for a, b in zip(ref, out):
        if a.shape != b.shape:
            return math.inf
        if a.numel():
            scale = max(float(a.abs().max()), 1e-6)
            worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


def _has_attention(model: Any) -> bool:
    from torch import nn

    for m in model.modules():
        name = type(m).__name__.lower()
        if isinstance(m, nn.MultiheadAttention) or "attention" in name or "attn" in name:
            return True
    return False


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _zero(gates: dict, fraction: float | None, rng: Any) -> None:
    """Zero units of every gate: ``fraction`` of them (>= 1, <= n - 1), or all but one when None."""
    for gate in gates.values():
        alive = [i for i in range(gate.size) if not bool(gate.forced_off[i])]
        if len(alive) <= 1:
            continue
        if fraction is None:
            k = len(alive) - 1
        else:
            k = min(len(alive) - 1, max(1, round(fraction * gate.size)))
        gate.zero_(sorted(int(i) for i in rng.choice(alive, size=k, replace=False)))


def _policy_record(spec: Any, built: Any, policy: str, dense_out: list, dense_params: int) -> dict[str, Any]:
    import numpy as np

    import autosparse

    rec: dict[str, Any] = {"policy": policy, "status": None, "reason": "", "error_type": None}
    inputs, kwargs = built.make_inputs(0), built.kwargs
    start = time.perf_counter()
    try:
        net = autosparse.sparsify(built.model, str(POLICIES[policy]), example_inputs=inputs)
    except autosparse.AutosparseError as exc:
        rec.update(status="refused", error_type=type(exc).__name__, reason=_reason(exc),
                   sparsify_s=round(time.perf_counter() - start, 3))
        return rec
    except Exception as exc:  # an untyped crash inside sparsify is a failure, not a refusal
        rec.update(status="failed", stage="sparsify", error_type=type(exc).__name__, reason=_first_line(exc),
                   sparsify_s=round(time.perf_counter() - start, 3), traceback=_tb_tail())
        return rec
    rec["sparsify_s"] = round(time.perf_counter() - start, 3)
    gates = autosparse.gates(net)
    by_gran = Counter(g.granularity for g in gates.values())
    rec.update(n_gates=len(gates), gates_by_granularity=dict(by_gran), units=sum(g.size for g in gates.values()))
    if policy in ATTENTION_POLICIES:
        rec["head_gates"] = by_gran.get("head", 0)
    with contextlib.suppress(Exception):
        exp = autosparse.explain(net).to_dict()
        rec["capture"] = exp.get("capture")
        rec["n_unprunable"] = len(exp.get("unprunable", []))
        # Groups sparsify's own dry-run compaction found inexact and left ungated: analysis bugs
        # that the safety net turned into a smaller plan (or, when it drops every group, a refusal).
        dropped = [f"{u['where']}: {u['reason']}" for u in exp.get("unprunable", []) if "dry-run" in str(u)]
        if dropped:
            rec["dry_run_dropped"] = [d[:300] for d in dropped[:10]]
            rec["n_dry_run_dropped"] = len(dropped)
        rec["unknown_ops"] = list(exp.get("unknown_ops", []))[:8]
    if not gates:
        rec.update(status="refused", reason="sparsify returned a model with no gates")
        return rec
    try:
        rec["gated_vs_dense"] = _rel_diff(dense_out, _run(net, inputs, kwargs))
    except Exception as exc:
        rec.update(status="failed", stage="gated forward", error_type=type(exc).__name__, reason=_first_line(exc),
                   traceback=_tb_tail())
        return rec

    rng = np.random.default_rng(SEED)
    _zero(gates, ZERO_FRACTION, rng)
    ref = _run(net, inputs, kwargs)
    fresh_inputs = built.make_inputs(1)
    ref_fresh = _run(net, fresh_inputs, kwargs)
    start = time.perf_counter()
    try:
        small = autosparse.compact(net)
    except Exception as exc:  # EquivalenceError, CompactionError, or anything else
        rec.update(status="failed", stage="compact", error_type=type(exc).__name__, reason=_first_line(exc, 600),
                   compact_s=round(time.perf_counter() - start, 3))
        if not isinstance(exc, autosparse.AutosparseError):
            rec["traceback"] = _tb_tail()
        with contextlib.suppress(Exception):
            rec["reach"], rec["reach_rel_diff"] = _reach(net, inputs, kwargs, rng, dense_params)
        return rec
    rec["compact_s"] = round(time.perf_counter() - start, 3)
    rec["status"] = "exact"
    rec["params_after_zero30"] = round(_params(small) / dense_params, 4)
    try:
        rec["max_rel_diff"] = _rel_diff(ref, _run(small, inputs, kwargs))
        rec["max_rel_diff_fresh"] = _rel_diff(ref_fresh, _run(small, fresh_inputs, kwargs))
    except Exception as exc:
        rec["max_rel_diff_fresh"] = math.inf
        rec["self_check_error"] = f"{type(exc).__name__}: {_first_line(exc)}"
    del small
    try:
        rec["reach"], rec["reach_rel_diff"] = _reach(net, inputs, kwargs, rng, dense_params)
    except Exception as exc:
        rec["reach_error"] = f"{type(exc).__name__}: {_first_line(exc)}"
    flags = [k for k in ("gated_vs_dense", "max_rel_diff", "max_rel_diff_fresh", "reach_rel_diff")
             if not (rec.get(k, 0.0) <= TOL)]
    if flags:
        rec["flags"] = flags
    return rec


def _reach(net: Any, inputs: tuple, kwargs: dict, rng: Any, dense_params: int) -> tuple[float, float]:
    """Zero all but one unit of every gate, compact in place (no verification), count parameters."""
    import autosparse

    _zero(autosparse.gates(net), None, rng)
    ref = _run(net, inputs, kwargs)
    small = autosparse.compact(net, inplace=True, verify=False)
    return round(_params(small) / dense_params, 4), _rel_diff(ref, _run(small, inputs, kwargs))


def _tb_tail(n: int = 4) -> list[str]:
    frames = traceback.extract_tb(sys.exc_info()[2])[-n:]
    return [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames]


def run_job(job: dict[str, Any], emit: Any) -> None:
    """Build one model and run its policies; ``emit`` every record as soon as it exists."""
    import torch

    from benchmarks import zoo_models as zm

    spec = zm.Spec(**job["spec"])
    base = {"source": spec.source, "family": spec.family, "model": spec.name}
    start = time.perf_counter()
    try:
        built = zm.build(spec, job["max_params"])
        inputs = built.make_inputs(0)
        dense_out = _run(built.model, inputs, built.kwargs)
    except zm.SkipModel as exc:
        emit({**base, "policy": "-", "status": "skipped", "reason": str(exc)[:300]})
        return
    except Exception as exc:
        emit({**base, "policy": "-", "status": "skipped", "error_type": type(exc).__name__,
              "reason": f"cannot build or run: {type(exc).__name__}: {_first_line(exc)}"})
        return
    attention = _has_attention(built.model)
    info = {
        **base,
        "params": _params(built.model),
        "inputs": [list(t.shape) if isinstance(t, torch.Tensor) else None for t in inputs],
        "attention": attention,
        "build_s": round(time.perf_counter() - start, 3),
        "autosparse_sha1": _source_sha1(),  # the tree is edited by others: which code ran this record
    }
    policies = [p for p in (job.get("policies") or POLICIES) if attention or p not in ATTENTION_POLICIES]
    for policy in policies:
        if policy in job.get("done", []):
            continue
        emit({"event": "start", "policy": policy})
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                rec = _policy_record(spec, built, policy, dense_out, info["params"])
        except Exception as exc:  # a bug of this script or an unexpected escape: still one record
            rec = {"policy": policy, "status": "failed", "stage": "harness", "error_type": type(exc).__name__,
                   "reason": _first_line(exc), "traceback": _tb_tail()}
        emit({**info, **rec})


def worker_main() -> None:
    """Read jobs (JSON lines) from stdin, write records (prefixed JSON lines) to stdout."""
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    out = sys.stdout

    def emit(obj: dict[str, Any]) -> None:
        out.write(PREFIX + json.dumps(obj, default=str) + "\n")
        out.flush()

    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            run_job(job, emit)
        except Exception as exc:
            emit({"event": "error", "error": f"{type(exc).__name__}: {_first_line(exc)}"})
        emit({"event": "done"})


# ================================================================ parent side
class Worker:
    """One worker process; its stdout lines arrive through a queue so reads can time out."""

    def __init__(self) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", prefix="zoo-worker-", suffix=".log", delete=False)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_VERBOSITY": "error"}
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.zoo", "--worker"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                self.lines.put(json.loads(line[len(PREFIX):]))
        self.lines.put(None)  # EOF: the process ended

    def send(self, job: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def stderr_tail(self) -> str:
        with contextlib.suppress(OSError):
            text = Path(self.log.name).read_text(errors="replace")
            lines = [ln for ln in text.splitlines() if ln.strip() and "Warning" not in ln]
            return " | ".join(lines[-3:])[-400:]
        return ""

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


def sweep(specs: list, *, jobs: int, timeout: float, max_params: int, policies: list[str] | None,
          progress: bool = True) -> list[dict[str, Any]]:
    """Run every spec in ``jobs`` worker processes; one record per model x policy (or one skip)."""
    todo: queue.Queue = queue.Queue()
    for spec in specs:
        todo.put({"spec": asdict(spec), "max_params": max_params, "policies": policies, "done": []})
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    total, started = len(specs), time.perf_counter()
    finished = [0]

    def slot() -> None:
        worker: Worker | None = None
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                break
            if worker is None or worker.proc.poll() is not None:
                worker = Worker()
            worker.send(job)
            current, mine, resubmitted = None, [], False
            while True:
                try:
                    msg = worker.lines.get(timeout=timeout)
                except queue.Empty:
                    msg = "timeout"
                if msg == "timeout" or msg is None:  # hang or crash: record it, resubmit the rest
                    crashed = msg is None
                    tail = worker.stderr_tail() if crashed else ""
                    worker.kill()
                    worker = None
                    name = job["spec"]["name"]
                    rec = {"source": job["spec"]["source"], "family": job["spec"]["family"], "model": name,
                           "policy": current or "build",
                           "status": "failed" if crashed else "timeout",
                           "error_type": "WorkerCrash" if crashed else "Timeout",
                           "reason": (f"worker process died: {tail}" if crashed
                                      else f"no progress for {timeout:.0f} s")}
                    mine.append(rec)
                    if current is not None:
                        job["done"] = job["done"] + [r["policy"] for r in mine]
                        todo.put(job)  # the remaining policies, in a fresh worker
                        resubmitted = True
                    break
                if msg.get("event") == "start":
                    current = msg["policy"]
                    continue
                if msg.get("event") == "error":
                    mine.append({"source": job["spec"]["source"], "family": job["spec"]["family"],
                                 "model": job["spec"]["name"], "policy": current or "build", "status": "failed",
                                 "error_type": "Harness", "reason": msg["error"]})
                    continue
                if msg.get("event") == "done":
                    break
                mine.append(msg)
                current = None
            with lock:
                records.extend(mine)
                finished[0] += 0 if resubmitted else 1
                if progress:
                    for r in mine:
                        print(f"[{finished[0]}/{total} {time.perf_counter() - started:6.0f}s] "
                              f"{r['source']:<11} {r['model']:<34} {r['policy']:<11} {r['status']:<8} "
                              f"{(r.get('reason') or '')[:90]}", flush=True)
        if worker is not None:
            worker.kill()

    threads = [threading.Thread(target=slot) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    order = {(s.source, s.name): i for i, s in enumerate(specs)}
    pol_order = {p: i for i, p in enumerate(["-", "build", *POLICIES])}
    records.sort(key=lambda r: (order.get((r["source"], r["model"]), 1 << 30), pol_order.get(r["policy"], 99)))
    return records


# ================================================================ outputs
STATUSES = ("exact", "refused", "failed", "timeout", "skipped")


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    by_source: dict[str, Counter] = defaultdict(Counter)
    by_policy: dict[str, Counter] = defaultdict(Counter)
    models: dict[str, set] = defaultdict(set)
    failures: dict[str, list[str]] = defaultdict(list)
    flagged, masked = [], []
    for r in records:
        by_source[r["source"]][r["status"]] += 1
        models[r["source"]].add(r["model"])
        if r["policy"] != "-":
            by_policy[r["policy"]][r["status"]] += 1
        if r["status"] in ("failed", "timeout"):
            failures[r.get("error_type") or "?"].append(f"{r['source']}:{r['model']}:{r['policy']}")
        if r.get("flags"):
            flagged.append(f"{r['source']}:{r['model']}:{r['policy']}:{','.join(r['flags'])}")
        if r.get("n_dry_run_dropped") or "dry-run compaction is not exact" in (r.get("reason") or ""):
            masked.append(f"{r['source']}:{r['model']}:{r['policy']} ({r['status']})")
    return {
        "models": {k: len(v) for k, v in models.items()},
        "by_source": {k: dict(v) for k, v in by_source.items()},
        "by_policy": {k: dict(v) for k, v in by_policy.items()},
        "failures_by_error_type": dict(failures),
        "exact_but_flagged": flagged,
        "dry_run_masked": masked,
    }


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}g}" if math.isfinite(x) else str(x)
    return str(x)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(records: list[dict[str, Any]], summary: dict[str, Any], stamp: dict[str, Any]) -> str:
    lines = [
        "# autosparse zoo sweep",
        "",
        "`python -m benchmarks.zoo` — random-weight models from timm, torchvision and Hugging Face "
        "transformers; for each policy: sparsify, zero ~30 % of every gate's units, compact "
        "(`exact` = compact succeeded; it verifies equivalence itself). "
        "`reach` = parameters left when every gate keeps one unit / dense parameters (lower is more reach). "
        "Seconds: sparsify + compact.",
        "",
        f"autosparse {stamp.get('autosparse')} (commit `{str(stamp.get('git_commit'))[:12]}`"
        f"{', dirty' if stamp.get('autosparse_dirty') else ''}), torch {stamp.get('torch')}, "
        f"transformers {stamp.get('transformers')}, timm {stamp.get('timm')}, "
        f"torchvision {stamp.get('torchvision')}, {stamp.get('date')}; autosparse sources "
        f"{stamp.get('autosparse_source_sha1_start')} -> {stamp.get('autosparse_source_sha1_end')} "
        "(start -> end of the last run; they differ when autosparse changed during the sweep)",
        "",
        "## Summary",
        "",
        "| source | models | " + " | ".join(STATUSES) + " |",
        "|---|---|" + "---|" * len(STATUSES),
    ]
    total = Counter()
    for source, counts in summary["by_source"].items():
        total.update(counts)
        lines.append(f"| {source} | {summary['models'][source]} | "
                     + " | ".join(str(counts.get(s, 0)) for s in STATUSES) + " |")
    lines.append(f"| **all** | {sum(summary['models'].values())} | "
                 + " | ".join(str(total.get(s, 0)) for s in STATUSES) + " |")
    lines += ["", "| policy | " + " | ".join(STATUSES[:4]) + " |", "|---|" + "---|" * 4]
    for policy, counts in summary["by_policy"].items():
        lines.append(f"| {policy} | " + " | ".join(str(counts.get(s, 0)) for s in STATUSES[:4]) + " |")
    if summary["failures_by_error_type"]:
        lines += ["", "Failures by error type:", ""]
        for err, where in summary["failures_by_error_type"].items():
            lines.append(f"- `{err}` ({len(where)}): " + ", ".join(where))
    if summary.get("dry_run_masked"):
        lines += ["", "Groups that sparsify's own dry-run compaction found inexact and left ungated (analysis "
                  "bugs caught by the safety net; `refused` when it left nothing, else `exact` with fewer gates):", "",
                  ", ".join(summary["dry_run_masked"])]
    if summary["exact_but_flagged"]:
        lines += ["", f"Exact but flagged by the sweep's own check (relative difference > {TOL:g}):", ""]
        lines += [f"- {f}" for f in summary["exact_but_flagged"]]
    lines += [
        "",
        "## Support table",
        "",
        "| source | family | model | policy | status | gates | heads | reach | max rel diff | s | reason |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        secs = (r.get("sparsify_s") or 0) + (r.get("compact_s") or 0)
        diff = max((r.get(k) for k in ("max_rel_diff", "max_rel_diff_fresh") if r.get(k) is not None), default=None)
        reason = r.get("reason") or ""
        if r.get("error_type") and r["status"] != "skipped":
            reason = f"{r['error_type']}: {reason}"
        if r.get("flags"):
            reason = f"flags: {','.join(r['flags'])}. {reason}"
        if r.get("n_dry_run_dropped"):
            reason = f"{r['n_dry_run_dropped']} group(s) dropped by the dry run: {r['dry_run_dropped'][0]} {reason}"
        lines.append(
            f"| {r['source']} | {r['family']} | {r['model']} | {r['policy']} | {r['status']} | "
            f"{_fmt(r.get('n_gates'))} | {_fmt(r.get('head_gates'))} | {_fmt(r.get('reach'))} | {_fmt(diff, 2)} | "
            f"{secs:.1f} | {_md_escape(reason[:160])} |"
        )
    return "\n".join(lines) + "\n"


def _stamp() -> dict[str, Any]:
    try:
        from benchmarks.common import stamp

        out = stamp(threads=1)
    except Exception:  # the shared helper imports autosparse internals that may be moving
        import platform

        import torch

        import autosparse

        out = {"autosparse": autosparse.__version__, "torch": torch.__version__,
               "python": platform.python_version(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for mod in ("timm", "torchvision", "transformers"):
        with contextlib.suppress(Exception):
            out[mod] = __import__(mod).__version__
    return out


def _source_sha1() -> str:
    """A hash of the autosparse sources imported (to tell whether they changed during the sweep)."""
    import hashlib

    import autosparse

    digest = hashlib.sha1()
    for path in sorted(Path(autosparse.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("timm", "torchvision", "hf"), help="one source only")
    parser.add_argument("--quick", action="store_true", help="13 representative models (a few minutes)")
    parser.add_argument("--models", default="", help="comma-separated model names to keep (after --only)")
    parser.add_argument("--policies", default="", help=f"comma-separated subset of {sorted(POLICIES)} "
                        "(default all; heads and transformer only where the model has an attention module)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds a step may run without output")
    parser.add_argument("--max-params", type=float, default=60e6, help="skip larger models")
    parser.add_argument("--out", default=None, help="folder for zoo.json / zoo.md (default benchmarks/results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main()
        return {}

    from benchmarks import zoo_models as zm

    specs = zm.specs(args.only, args.quick)
    if args.models:
        keep = {m.strip() for m in args.models.split(",") if m.strip()}
        specs = [s for s in specs if s.name in keep]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()] or None
    unknown = set(policies or ()) - set(POLICIES)
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}; choose from {sorted(POLICIES)}")
    print(f"zoo: {len(specs)} models, {args.jobs} workers", flush=True)
    sha_start = _source_sha1()
    start = time.perf_counter()
    records = sweep(specs, jobs=args.jobs, timeout=args.timeout, max_params=int(args.max_params), policies=policies)
    wall = round(time.perf_counter() - start, 1)

    out_dir = Path(args.out) if args.out else (None if args.quick else RESULTS)
    json_path = out_dir / "zoo.json" if out_dir else None
    runs: list[dict[str, Any]] = []
    if json_path and json_path.exists() and (args.only or args.models) and not args.quick:
        with contextlib.suppress(Exception):  # keep the other sources' / models' records of a full run
            previous = json.loads(json_path.read_text())
            runs = previous.get("runs") or [previous.get("config", {})]
            old = previous["records"]
            ran = {(r["source"], r["model"]) for r in records}
            kept = [r for r in old if (r["source"], r["model"]) not in ran
                    and (args.models or r["source"] != args.only)]
            records = kept + records
    summary = summarize(records)
    stamp = _stamp()
    stamp["autosparse_source_sha1_start"] = sha_start
    stamp["autosparse_source_sha1_end"] = _source_sha1()
    payload = {
        "benchmark": "zoo",
        "stamp": stamp,
        "config": {"zero_fraction": ZERO_FRACTION, "seed": SEED, "tolerance": TOL, "jobs": args.jobs,
                   "timeout_s": args.timeout, "max_params": int(args.max_params), "quick": args.quick,
                   "only": args.only, "policies": {k: str(v.relative_to(ROOT)) for k, v in POLICIES.items()},
                   "wall_s": wall, "models": args.models or None, "policies_run": policies,
                   "autosparse_source_sha1": (sha_start, stamp["autosparse_source_sha1_end"])},
        "summary": summary,
        "records": records,
    }
    payload["runs"] = [*runs, payload["config"]]  # every run merged into this file, oldest first
    text = markdown(records, summary, stamp)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "zoo.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
        (out_dir / "zoo.md").write_text(text)
        print(f"wrote {out_dir / 'zoo.json'} and {out_dir / 'zoo.md'} ({wall} s)")
    else:
        print(text)
    print(json.dumps(summary["by_source"]))
    return payload


if __name__ == "__main__":
    main()
