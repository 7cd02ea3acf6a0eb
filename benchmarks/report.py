"""Render the latest results as markdown tables; ``--write`` puts them into benchmarks/README.md.

PYTHONPATH=. python -m benchmarks.report [--write] [--results DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS

README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _stamp(d: dict[str, Any]) -> str:
    s = d["stamp"]
    dirty = (
        f" + uncommitted autosparse/ changes (sources sha1 {s.get('autosparse_source_sha1')})"
        if s.get("autosparse_dirty")
        else ""
    )
    return (
        f"_autosparse {s['autosparse']}, torch {s['torch']}, transformers {s.get('transformers')}, "
        f"commit `{s['git_commit'][:10]}`{dirty}; {s['cpu_count']} CPUs, {s['threads']} thread(s), "
        f"load average {s.get('loadavg_1m')} -> {s.get('loadavg_1m_end', '?')}; {s['date']}_"
    )


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "" if value is None else format(value, fmt)


def _ok(flag: bool | None) -> str:
    return "" if flag is None else (" ✓" if flag else " ✗")


def latency(d: dict[str, Any]) -> str:
    out = [
        f"### Q1 latency ({_stamp(d)})",
        "",
        "`ms` is the minimum CPU time of round-robin runs (see above). speedup = dense / compacted; "
        "/FLOPs = speedup / FLOPs reduction (target >= 0.8 for CNNs at the large batch); "
        "vs hand = compacted / hand-built twin (target <= 1.02).",
        "",
    ]
    for name, m in d["models"].items():
        rows = []
        for batch, timed in m["latency"].items():
            rows.append([name, batch, "dense", "1.00", f"{timed['dense']['ms']:.1f}", "", "", ""])
            for key, r in m["ratios"][batch].items():
                hand = r.get("compacted_over_hand")
                big = batch != "1" and m["family"] == "cnn"
                rows.append(
                    [
                        "",
                        "",
                        key,
                        f"{m['variants'][key]['flops_frac']:.3f}",
                        f"{timed[key]['ms']:.1f}",
                        f"{r['speedup']:.2f}",
                        f"{r['speedup_over_flops_reduction']:.2f}"
                        + _ok(r["speedup_over_flops_reduction"] >= 0.8 if big else None),
                        ""
                        if hand is None
                        else f"{hand:.3f}"
                        + _ok(hand <= 1.02)
                        + f" (hand {timed[key.split('/')[0] + '/hand']['ms']:.1f})",
                    ]
                )
        out += [
            _table(["model", "batch", "variant", "FLOPs", "ms", "speedup", "/FLOPs", "vs hand"], rows),
            "",
        ]
    return "\n".join(out)


def gate_overhead(d: dict[str, Any]) -> str:
    rows = [
        [
            name,
            m.get("regime", ""),
            m["batch"],
            m["gates"],
            m["sites"],
            f"{m['step_ms']['ungated']['ms']:.1f}",
            f"{m['step_ms']['gated']['ms']:.1f}",
            f"{m['overhead']:.3f}" + _ok(m["overhead"] <= m.get("target", d.get("target", 1.05))),
            _num(m.get("overhead_median_paired"), ".3f"),
        ]
        for name, m in d["models"].items()
    ]
    s = d["settings"]
    return "\n".join(
        [
            f"### Q2 gate overhead ({_stamp(d)})",
            "",
            f"Image {s['image']}px / sequence {s['seq']} (compute-bound models). "
            f"Targets: {d.get('targets', d.get('target'))}. {s.get('statistic', '')}",
            "",
            _table(
                ["model", "regime", "batch", "gates", "sites", "ungated ms", "gated ms", "overhead (min)",
                 "median paired"],
                rows,
            ),
        ]
    )


def surgery(d: dict[str, Any]) -> str:
    out = [
        f"### Q3 analysis + surgery ({_stamp(d)})",
        "",
        f"Example input: {d['settings']['image']}px image / {d['settings']['seq']} tokens, batch 1. "
        f"Torch-Pruning timeout {d['settings']['tp_timeout_s']:.0f} s. Times in seconds, RSS in MiB.",
        "",
    ]
    for family, f in d["families"].items():
        rows = []
        for r in f["rows"]:
            a, t = r["autosparse"], r.get("torch_pruning") or {}
            if a.get("status") != "ok":
                rows.append([r["size"], a.get("status"), a.get("error", "")] + [""] * 10)
                continue
            sp = r.get("speedup_vs_tp") or {}
            speed = (
                f"{sp['value']:.1f}x"
                if "value" in sp
                else f">= {sp['at_least']:.0f}x"
                if "at_least" in sp
                else "n/a"
            )
            tp_cell = {
                "ok": f"{t.get('total_s', 0):.2f}",
                "timeout": f"hang: timeout {t.get('timeout_s', 0):.0f} s",
                "skipped": "skipped (smaller size hung)",
                "error": f"crashed after {t.get('total_s', 0):.2f} (graph built in {t.get('graph_s') or 0:.2f})",
            }.get(t.get("status"), "")
            rows.append(
                [
                    ".".join(map(str, r["size"])) if isinstance(r["size"], list) else r["size"],
                    f"{a['params'] / 1e6:.1f}M",
                    a["nodes"],
                    _num(a.get("capture_s")),
                    _num(a.get("analysis_s")),
                    _num(a.get("gates_s")),
                    _num(a["compact_s"]),
                    _num(a["total_s"]),
                    f"{a['rss_delta_mb']:.0f} / {a['model_mb']:.0f}",
                    tp_cell,
                    f"{t['rss_delta_mb']:.0f}" if t.get("rss_delta_mb") is not None else "",
                    speed,
                ]
            )
        sc = f["scaling"]
        slopes = ", ".join(f"{k[6:]} {v}" for k, v in sc.items() if k.startswith("slope_") and v is not None)
        out += [
            f"**{family}** ({f['model']} widths; size = {'stage depths' if family == 'resnet' else 'layers'})",
            "",
            _table(
                [
                    "size",
                    "params",
                    "nodes",
                    "capture",
                    "analysis",
                    "gates",
                    "compact",
                    "total",
                    "RSS +MiB / model MiB",
                    "TP total",
                    "TP RSS +MiB",
                    "speedup vs TP",
                ],
                rows,
            ),
            "",
            f"log-log slope vs nodes (1 = linear): {slopes}; total s per 1k nodes: "
            f"{sc.get('total_s_per_1k_nodes')}",
            "",
        ]
        errors = {
            r["torch_pruning"].get("error") for r in f["rows"] if (r.get("torch_pruning") or {}).get("error")
        }
        if errors:
            out += ["Torch-Pruning errors: " + "; ".join(f"`{e}`" for e in sorted(errors)), ""]
    return "\n".join(out)


def memory(d: dict[str, Any]) -> str:
    rows = []
    for name, m in d["models"].items():
        for key, r in m.items():
            if r.get("status") != "ok":
                rows.append([name, key, r.get("status"), "", "", "", "", ""])
                continue
            rows.append(
                [
                    name,
                    key,
                    f"{r['model_mb']:.0f}",
                    f"{r['compacted_mb']:.0f}",
                    f"{r['peak_rss_mb']:.0f}",
                    f"{r['peak_over_model']:.2f}" + _ok(r["peak_over_model"] <= d["target_peak_over_model"]),
                    f"{r['extra_over_model']:.2f}",
                    f"{r['compact_s']:.1f}",
                ]
            )
    return "\n".join(
        [
            f"### Q4 compaction memory ({_stamp(d)})",
            "",
            f"Target: peak / model <= {d['target_peak_over_model']} (the gated model itself is 1x).",
            "",
            _table(
                [
                    "model",
                    "compact",
                    "model MiB",
                    "compacted MiB",
                    "peak RSS MiB",
                    "peak / model",
                    "extra / model",
                    "seconds",
                ],
                rows,
            ),
            "",
        ]
    )


RENDER = {"latency": latency, "gate_overhead": gate_overhead, "surgery": surgery, "memory": memory}


def render(folder: Path = RESULTS) -> str:
    parts = []
    for name, fn in RENDER.items():
        d = _load(folder, name)
        parts.append(
            fn(d) if d else f"### {name}\n\n(no results yet: run `python -m benchmarks.bench_{name}`)\n"
        )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"replace the tables in {README.name}")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    text = render(args.results)
    if args.write:
        readme = README.read_text()
        if START not in readme or END not in readme:
            raise SystemExit(f"{README} lacks the {START} / {END} markers")
        head, rest = readme.split(START, 1)
        README.write_text(head + START + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    else:
        print(text)
    return text


if __name__ == "__main__":
    main()
