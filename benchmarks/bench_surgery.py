"""Q3 - analysis and surgery time and memory, and how they grow with the graph; vs Torch-Pruning.

For each family (ResNet, BERT, Llama at the ~1B config's widths) and four depths, a fresh process
warms up on a tiny model of the family (the one-time cost of lazy imports is reported apart as
``first_call_warmup_s``), builds the model with random weights and runs capture + analysis + gate insertion
(``sparsify(inplace=True)``), zeroes half of every gate's units and compacts in place (no
verification: Torch-Pruning verifies nothing either). It reports seconds per phase, the number of
graph nodes and peak RSS. Another fresh process, with a timeout, runs Torch-Pruning's
dependency-graph build (``MetaPruner(...)``) and pruning (``pruner.step()``) at the same 50 % on the
same model and input. A timeout is reported as such, and larger sizes of that family are skipped.
Both workers collect garbage right before the timed region (the model build's garbage is nobody's
cost) and record CPU time next to wall time (``total_cpu_s``; the speedup's ``cpu`` entry).

Targets: cost linear in graph nodes (log-log slope ~1); >= 5x faster than Torch-Pruning; no hang.

    PYTHONPATH=. python -m benchmarks.bench_surgery [--families resnet bert llama] [--tp-timeout 120] [--smoke]
"""

from __future__ import annotations

import gc
import json
import time
from typing import Any

from benchmarks import common

SIZES = {  # family -> (model name, four sizes: ResNet stage depths or transformer layers)
    "resnet": ("resnet50", [(1, 1, 1, 1), (2, 2, 2, 2), (3, 4, 6, 3), (3, 4, 23, 3)]),
    "bert": ("bert_base", [2, 4, 8, 12]),
    "llama": ("llama_1b", [2, 4, 8, 16]),
}
SMOKE_SIZES = {
    "resnet": ("resnet50", [(1, 1, 1, 1), (2, 2, 2, 2)]),
    "bert": ("bert_base", [1, 2]),
    "llama": ("llama_1b", [1, 2]),
}
IMAGE, SEQ = 64, 32  # the example input both tools analyse with


def _build(model: str, size: Any, smoke: bool) -> common.Built:
    if isinstance(size, (list, tuple)):
        return common.build(model, smoke=smoke, depths=tuple(size), image=IMAGE, seq=SEQ)
    return common.build(model, smoke=smoke, layers=int(size), image=IMAGE, seq=SEQ)


# ---------------------------------------------------------------- workers (fresh processes)
def worker_autosparse(model: str, size: Any, smoke: bool) -> dict[str, Any]:
    import autosparse
    import autosparse.api
    import autosparse.capture
    import autosparse.compaction
    from autosparse.measure import count_params, model_size_bytes, peak_rss_mb, track_peak_rss

    start = time.perf_counter()
    tiny = common.build(model, smoke=True)  # first call: lazy imports (fx passes, export), one-time costs
    warm = autosparse.sparsify(tiny.model, common.policy_for(tiny.family), example_inputs=tiny.inputs(1))
    common.zero_fraction(warm, 0.5)
    autosparse.compact(warm, inplace=True, verify=False)
    warmup_s = time.perf_counter() - start
    del tiny, warm
    gc.collect()
    rss0 = common.current_rss_mb()
    start = time.perf_counter()
    built = _build(model, size, smoke)
    build_s = time.perf_counter() - start
    x = built.inputs(1)
    out: dict[str, Any] = {
        "params": count_params(built.model),
        "model_mb": model_size_bytes(built.model) / 2**20,
        "build_s": round(build_s, 2),
        "first_call_warmup_s": round(warmup_s, 2),
        "rss_after_build_mb": common.current_rss_mb() - rss0,
    }
    policy = common.policy_for(built.family)
    gc.collect()  # the model build's garbage is not the tool's cost (the Torch-Pruning worker does the same)
    with (
        track_peak_rss() as rss,
        common.phase_timer(autosparse.api, ["capture", "analyze", "make_plan", "_attach"]) as phases,
        common.phase_timer(autosparse.capture, ["_check_runs", "_trace_fx", "_trace_export"]) as inner,
        common.phase_timer(autosparse.compaction, ["replay"]) as surgery,
    ):
        t0, c0 = time.perf_counter(), time.process_time()
        net = autosparse.sparsify(built.model, policy, example_inputs=x, inplace=True)
        t1 = time.perf_counter()
        n_gates = len(autosparse.gates(net))
        common.zero_fraction(net, 0.5)
        autosparse.compact(net, inplace=True, verify=False)
        t2, c2 = time.perf_counter(), time.process_time()
    graph = getattr(phases.get("capture_result"), "graph", None)
    out.update(
        {
            "nodes": len(graph.nodes) if graph is not None else None,
            "capture_s": phases.get("capture"),
            # capture = tracing + one real forward: torch.fx's shape pass is that forward (in trace_s);
            # before torch.export (fake tensors only) it is a separate inputs check (check_s)
            "capture_check_s": inner.get("_check_runs"),
            "capture_trace_s": inner.get("_trace_fx") or inner.get("_trace_export"),
            "analysis_s": phases.get("analyze"),
            "plan_s": phases.get("make_plan"),
            "gates_s": phases.get("_attach"),
            "sparsify_s": t1 - t0,
            "compact_s": t2 - t1,
            "compact_slice_s": surgery.get("replay"),  # slicing tensors + fixing attributes
            "total_s": t2 - t0,
            "total_cpu_s": c2 - c0,  # one thread: CPU time, which busy neighbours inflate less than wall time
            "gates": n_gates,
            "rss_delta_mb": rss.delta_mb,
            "peak_rss_mb": peak_rss_mb(),
        }
    )
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def worker_tp(model: str, size: Any, smoke: bool) -> dict[str, Any]:
    import torch_pruning as tp

    from autosparse.measure import peak_rss_mb, track_peak_rss

    built = _build(model, size, smoke)
    net, x = built.model, built.inputs(1)[0]
    kwargs: dict[str, Any] = {}
    if built.family == "cnn":
        ignored = [net.head[-1]]
    elif built.family == "encoder":  # Torch-Pruning's examples/transformers/prune_hf_bert.py recipe
        ignored = [net.pooler]
        heads = {}
        for m in net.modules():
            if type(m).__name__ == "BertSelfAttention":
                heads.update(
                    {
                        m.query: m.num_attention_heads,
                        m.key: m.num_attention_heads,
                        m.value: m.num_attention_heads,
                    }
                )
        kwargs = dict(num_heads=heads, output_transform=lambda out: out.last_hidden_state.sum())
    else:  # Torch-Pruning's examples/LLMs/prune_llm.py recipe
        ignored = [net.lm_head]
        cfg, heads = net.config, {}
        for layer in net.model.layers:
            att = layer.self_attn
            heads.update(
                {
                    att.q_proj: cfg.num_attention_heads,
                    att.k_proj: cfg.num_key_value_heads,
                    att.v_proj: cfg.num_key_value_heads,
                }
            )
        kwargs = dict(num_heads=heads, output_transform=lambda out: out.logits.sum())
    if "num_heads" in kwargs:
        kwargs.update(prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5)
    out: dict[str, Any] = {}
    gc.collect()  # as in the autosparse worker: the model build's garbage is collected before timing
    with track_peak_rss() as rss:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            pruner = tp.pruner.MetaPruner(
                net,
                x,
                importance=tp.importance.GroupMagnitudeImportance(p=2),
                pruning_ratio=0.5,
                ignored_layers=ignored,
                **kwargs,
            )
            t1 = time.perf_counter()
            out["graph_s"] = t1 - t0
            for group in pruner.step(interactive=True):
                group.prune()
            out["prune_s"] = time.perf_counter() - t1
        except Exception as exc:  # report Torch-Pruning's own failures instead of crashing the sweep
            out.update(status="error", error=f"{type(exc).__name__}: {exc}"[:300])
        out["total_s"] = time.perf_counter() - t0
        out["total_cpu_s"] = time.process_time() - c0
    out.update(rss_delta_mb=rss.delta_mb, peak_rss_mb=peak_rss_mb(), tp_nodes=None)
    if "pruner" in locals():
        out["tp_nodes"] = len(pruner.DG.module2node)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


# ---------------------------------------------------------------- driver
def sweep(sizes: dict[str, tuple[str, list]], args: Any) -> dict[str, Any]:
    families: dict[str, Any] = {}
    for family in args.families:
        if family not in sizes:
            continue
        model, steps = sizes[family]
        rows, tp_dead = [], None
        for size in steps:
            spec = json.dumps(size)
            row: dict[str, Any] = {"size": size}
            if args.inprocess:  # the smoke test: no fresh process, so peak RSS is not meaningful
                row["autosparse"] = {**worker_autosparse(model, size, args.smoke), "status": "ok"}
            else:
                row["autosparse"] = common.run_worker(
                    "benchmarks.bench_surgery",
                    _worker_args("autosparse", model, spec, args.smoke),
                    timeout=args.timeout,
                )
            if tp_dead is not None:
                row["torch_pruning"] = {"status": "skipped", "reason": f"timed out at size {tp_dead}"}
            elif family in args.tp_families and (not args.smoke or size == steps[0]):
                row["torch_pruning"] = common.run_worker(
                    "benchmarks.bench_surgery",
                    _worker_args("tp", model, spec, args.smoke),
                    timeout=args.tp_timeout,
                )
                if row["torch_pruning"]["status"] == "timeout":
                    tp_dead = size
            row["speedup_vs_tp"] = _speedup(row)
            print(
                f"[surgery] {family} {size}: autosparse {row['autosparse'].get('total_s')} s, "
                f"tp {row.get('torch_pruning', {}).get('status')} {row.get('torch_pruning', {}).get('total_s')}",
                flush=True,
            )
            rows.append(row)
            gc.collect()
        families[family] = {"model": model, "rows": rows, "scaling": _scaling(rows)}
    return families


def _worker_args(tool: str, model: str, spec: str, smoke: bool) -> list[str]:
    return ["--worker", tool, "--model", model, "--size", spec] + (["--smoke"] if smoke else [])


def _speedup(row: dict[str, Any]) -> dict[str, Any] | None:
    ours, theirs = row["autosparse"], row.get("torch_pruning")
    if not theirs or ours.get("status") != "ok":
        return None
    if theirs["status"] == "timeout":  # a lower bound: TP needed at least the whole timeout
        return {"at_least": round(theirs["timeout_s"] / ours["total_s"], 2)}
    if theirs["status"] == "ok":
        out = {"value": round(theirs["total_s"] / ours["total_s"], 2)}
        if theirs.get("total_cpu_s") and ours.get("total_cpu_s"):  # the same ratio on CPU time
            out["cpu"] = round(theirs["total_cpu_s"] / ours["total_cpu_s"], 2)
        return out
    return None  # Torch-Pruning failed: nothing to compare


def _scaling(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Log-log slope of each cost against graph nodes (1.0 = linear), and seconds per 1k nodes."""
    ok = [
        r["autosparse"]
        for r in rows
        if r["autosparse"].get("status") == "ok" and r["autosparse"].get("nodes")
    ]
    nodes = [r["nodes"] for r in ok]
    out: dict[str, Any] = {"nodes": nodes}
    for key in ("capture_s", "analysis_s", "sparsify_s", "compact_s", "total_s", "rss_delta_mb"):
        values = [r.get(key) for r in ok]
        if all(v is not None for v in values):
            out[f"slope_{key}"] = common.loglog_slope(nodes, values)
    out["total_s_per_1k_nodes"] = [round(1e3 * r["total_s"] / r["nodes"], 3) for r in ok]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument(
        "--tp-timeout", type=float, default=120.0, help="seconds before a Torch-Pruning run is cut"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds before an autosparse run is cut"
    )
    parser.add_argument(
        "--tp-families",
        nargs="*",
        default=list(SIZES),
        choices=list(SIZES),
        help="families to run Torch-Pruning on (none: --tp-families)",
    )
    parser.add_argument("--inprocess", action="store_true", help="run autosparse in this process (smoke)")
    parser.add_argument("--worker", choices=["autosparse", "tp"], help=common.hidden())
    parser.add_argument("--model", help=common.hidden())
    parser.add_argument("--size", help=common.hidden())
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        fn = worker_autosparse if args.worker == "autosparse" else worker_tp
        result = fn(args.model, json.loads(args.size), args.smoke)
        print(json.dumps(result), flush=True)
        return result
    if args.smoke:  # Torch-Pruning hangs on Llama even at tiny sizes: the smoke runs it on ResNet only
        args.tp_timeout, args.tp_families, args.inprocess = min(args.tp_timeout, 30.0), ["resnet"], True
    payload: dict[str, Any] = {
        "benchmark": "surgery",
        "smoke": args.smoke,
        "stamp": common.stamp(args.threads),
        "settings": {
            "image": IMAGE,
            "seq": SEQ,
            "prune_fraction": 0.5,
            "tp_timeout_s": args.tp_timeout,
            "policy": "heads + channels",
            "tp": "MetaPruner + GroupMagnitudeImportance, pruning_ratio 0.5",
        },
        "targets": {"speedup_vs_tp": 5.0, "slope": 1.0},
        "families": sweep(SMOKE_SIZES if args.smoke else SIZES, args),
    }
    payload["stamp"]["loadavg_1m_end"] = common.stamp()["loadavg_1m"]
    common.write_result("surgery", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
