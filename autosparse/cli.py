"""The ``autosparse`` command line: inspect, compact, export, report, demo.

MODEL arguments are ``package.module:callable`` (the callable returns a model, or a tuple
``(model, example_inputs)``) or a Hugging Face config: a local directory or ``config.json``, or a
hub name already in the local cache (nothing is downloaded). ``inspect``, ``export`` and ``report``
also take a save directory (``plan.json``) or a gated checkpoint (``checkpoint.json``). Exit codes: 0 success, 1 the command
ran and failed (an autosparse error, with its message), 2 the command line is wrong (unknown
option, a MODEL that cannot be resolved, a missing file).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autosparse import io
from autosparse.api import compact, gates, sparsify
from autosparse.compaction.record import require_record
from autosparse.errors import PlanMismatchError
from autosparse.io.export import Format, export
from autosparse.policy import json_schema_text
from autosparse.reporting.explain import Explanation, explain
from autosparse.reporting.report import report


class UsageError(Exception):
    """The command line cannot be acted on (exit code 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (``sys.exit(main())`` in the console script)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _dispatch(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return code
    except BrokenPipeError:
        # `autosparse report --json | head -1`: the reader has what it wanted; that is success.
        _stdout_to_devnull()
        return 0


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives until the process exits


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["demo"]:  # the demo parses its own options, --help included
        return _demo(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)  # exits with 2 on usage errors, as argparse does
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"autosparse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise
    except Exception as exc:  # every failure becomes a one-line message and exit code 1
        if args.traceback:
            raise
        print(f"autosparse {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autosparse", description="Learn structured sparsity, compact, save and export PyTorch models.",
        epilog="Exit codes: 0 success, 1 the command failed, 2 bad command line. "
               "MODEL: 'pkg.module:build' or a local Hugging Face config (directory, config.json or cached name).")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"autosparse {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="show what a policy would gate in a model, and what it cannot and why")
    p.add_argument("model", metavar="MODEL|SAVE_DIR|CHECKPOINT",
                   help="'pkg.module:build', a local Hugging Face config, a save directory or a checkpoint")
    p.add_argument("--policy", help="policy YAML file (e.g. configs/channels.yaml); required for a MODEL")
    p.add_argument("--model", dest="base", metavar="MODEL",
                   help="MODEL that builds the base of a save directory or checkpoint (default: its model_spec)")
    _input_options(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("compact", help="compact a gated checkpoint into a save directory")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="directory written by autosparse.io.save_checkpoint")
    p.add_argument("--out", required=True, help="save directory to write (autosparse.load reads it)")
    p.add_argument("--model", help="MODEL that builds the dense model (default: the checkpoint's model_spec)")
    p.add_argument("--no-verify", action="store_true", help="skip the equivalence check")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=_compact)

    p = sub.add_parser("export", help="export a saved compacted model with torch.export or to ONNX")
    p.add_argument("saved", metavar="SAVE_DIR|CHECKPOINT",
                   help="directory written by autosparse.save / autosparse compact, or a gated checkpoint "
                        "(compacted, verified, then exported)")
    p.add_argument("out", metavar="OUT", help="file to write (.pt2 or .onnx)")
    p.add_argument("--format", choices=("torch", "onnx"), help="default: from OUT's suffix (.onnx -> onnx)")
    p.add_argument("--model", help="MODEL that builds the base model (default: the save's model_spec)")
    p.add_argument("--no-check", action="store_true", help="do not run the exported file to compare outputs")
    p.add_argument("--static", action="store_true",
                   help="export at the example's batch size only (default: the batch size is dynamic)")
    _input_options(p)
    p.set_defaults(run=_export)

    p = sub.add_parser("report", help="params, FLOPs, size and latency before/after, per group and total")
    p.add_argument("path", metavar="SAVE_DIR|CHECKPOINT", help="a save directory or a gated checkpoint")
    p.add_argument("--model", help="MODEL that builds the base model (default: the stored model_spec)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-latency", action="store_true", help="skip the (slow, noisy) latency measurement")
    p.add_argument("--plot", metavar="PNG", help="also draw units per group before/after (needs matplotlib)")
    _input_options(p)
    p.set_defaults(run=_report)

    p = sub.add_parser("policy", help="the policy format: print its JSON Schema (for editors and CI)")
    p.add_argument("--schema", action="store_true", required=True,
                   help="print the JSON Schema of policy files (configs/policy.schema.json is a copy)")
    p.set_defaults(run=_policy)

    sub.add_parser("demo", help="train, sparsify and compact a small model end to end (demo --help)",
                   add_help=False)
    return parser


def _input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", metavar="N,C,H,W", type=_shape,
                   help="shape of one positional example input; repeat for several inputs")
    p.add_argument("--dtype", choices=("float", "long"), default="float",
                   help="long draws token ids below the config's vocab_size (default: float, randn)")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shape: {text!r}; write e.g. 1,3,224,224") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"not a shape: {text!r}; sizes must be >= 1")
    return shape


# ---------------------------------------------------------------------------------- commands
def _inspect(args: argparse.Namespace) -> int:
    if _kind(args.model) is not None:
        return _inspect_saved(args)
    model, built_inputs = build_model(args.model)
    inputs = _inputs(args, model, built_inputs)
    if args.policy is None:
        raise UsageError("inspecting a MODEL needs --policy (e.g. --policy configs/channels.yaml)")
    _require_file(args.policy, "policy")
    with _progress("inspect", 2) as tick:
        net = sparsify(model, args.policy, example_inputs=inputs)
        tick()
        explanation = explain(net)
        tick()
    head = (f"{args.model}: {type(model).__name__}, {_params(model):,} params; policy {args.policy}")
    _print_inspection(args, {"model": args.model, "policy": args.policy}, head, net, explanation)
    return 0


def _inspect_saved(args: argparse.Namespace) -> int:
    """``inspect`` of a save directory (what was removed) or a checkpoint (its gates, and why)."""
    if args.policy is not None:
        raise UsageError(f"{args.model} holds its own plan: inspect it without --policy")
    kind, model, meta = _load_any(args.model, args.base)
    step = f", step {meta['step']}" if meta.get("step") is not None else ""
    head = f"{args.model}: autosparse {kind} of {type(model).__name__}{step}, {_params(model):,} params"
    extra = {"path": args.model, "kind": kind, "params": _params(model)}
    if kind == "save":
        head += f"; compacted by its plan ({len(require_record(model).groups)} groups)"
    else:
        head += "; its stored policy"
        extra["step"] = meta.get("step")
    _print_inspection(args, extra, head, model if kind == "checkpoint" else None, explain(model))
    return 0


def _print_inspection(args: argparse.Namespace, extra: dict[str, Any], head: str, net: nn.Module | None,
                      explanation: Explanation) -> None:
    gated = gates(net) if net is not None else {}
    if args.json:
        print(json.dumps({**extra, "gates": {name: g.size for name, g in gated.items()},
                          **explanation.to_dict()}, indent=1))
        return
    if net is not None:
        head += f" gates {len(gated)} groups ({sum(g.size for g in gated.values())} units)"
    print(head)
    print(explanation)


def _compact(args: argparse.Namespace) -> int:
    meta = _read_meta(args.checkpoint, io.CHECKPOINT)
    spec = args.model or meta.get("model_spec")
    if not spec:
        raise UsageError("the checkpoint records no model_spec; pass --model pkg.module:build")
    with _progress("compact", 3) as tick:
        net = io.load_checkpoint(args.checkpoint, build_model(spec)[0])
        tick()
        small = compact(net, verify=not args.no_verify)
        tick()
        io.save(small, args.out, model_spec=spec, example_inputs=io.load_inputs(args.checkpoint),
                overwrite=args.overwrite)
        tick()
    for name, units in require_record(small).groups.items():
        print(f"{name}: {units['before']} -> {units['after']}")
    before, after = (sum(p.numel() for p in m.parameters()) for m in (net, small))
    print(f"wrote {args.out}: {after:,} params (gated model: {before:,})")
    return 0


def _export(args: argparse.Namespace) -> int:
    kind, small, _ = _load_any(args.saved, args.model, required=True)
    if kind == "checkpoint":
        small = compact(small)
    inputs = _inputs(args, small, io.load_inputs(args.saved))
    fmt: Format = args.format or ("onnx" if args.out.endswith(".onnx") else "torch")  # argparse checks choices
    with _progress("export", 1) as tick:
        path = export(small, args.out, example_inputs=inputs, format=fmt, check=not args.no_check,
                      dynamic_batch=not args.static)
        tick()
    print(f"wrote {path} ({fmt}, {os.path.getsize(path):,} bytes, "
          f"{sum(p.numel() for p in small.parameters()):,} params)")
    return 0


def _report(args: argparse.Namespace) -> int:
    kind, model, meta = _load_any(args.path, args.model, required=True)
    before = _base_model(args.path, meta, args.model) if kind == "save" else None
    inputs = _inputs(args, model, io.load_inputs(args.path))
    with _progress("report", 1) as tick:
        result = report(model, before=before, example_inputs=inputs, latency=not args.no_latency)
        tick()
    print(result.to_json() if args.json else result)
    if args.plot:
        result.plot(args.plot)
    return 0


def _demo(argv: list[str]) -> int:
    try:
        demo = importlib.import_module("autosparse.demo")
    except ImportError as exc:
        print(f"autosparse demo: error: the demo is not available ({exc})", file=sys.stderr)
        return 1
    return int(demo.main(argv) or 0)


# ---------------------------------------------------------------------------------- helpers
def build_model(spec: str) -> tuple[nn.Module, tuple | None]:
    """Build the model a MODEL argument names; returns ``(model, example_inputs or None)``.

    Raises:
        UsageError: ``spec`` is neither an importable ``module:callable`` nor a local HF config.
    """
    if os.path.exists(spec):
        return _from_hf_config(spec), None
    module_name, colon, attr = spec.partition(":")
    if colon:
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise UsageError(f"MODEL {spec!r}: cannot import module {module_name!r} ({exc}); "
                             "is it on PYTHONPATH?") from None
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise UsageError(f"MODEL {spec!r}: module {module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        built = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
        model, inputs = built if isinstance(built, tuple) else (built, None)
        if not isinstance(model, nn.Module):
            raise UsageError(f"MODEL {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model.eval(), tuple(inputs) if inputs is not None else None
    try:
        return _from_hf_config(spec), None
    except (ImportError, OSError, ValueError):
        raise UsageError(f"MODEL {spec!r} is neither 'package.module:callable' nor a Hugging Face config "
                         "found locally (a directory, a config.json, or a cached hub name)") from None


def _from_hf_config(spec: str) -> nn.Module:
    import transformers

    path = Path(spec)
    source = str(path.parent) if path.is_file() else spec
    config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    cls = getattr(transformers, (config.architectures or [""])[0], None)
    model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    return model.eval()


def _inputs(args: argparse.Namespace, model: nn.Module, fallback: tuple | None) -> tuple:
    if args.input_shape:
        config = getattr(model, "config", None)
        high = int(getattr(config, "vocab_size", 0) or 2)
        return tuple(torch.randint(0, high, shape) if args.dtype == "long" else torch.randn(shape)
                     for shape in args.input_shape)
    if fallback is not None:
        return fallback
    raise UsageError("no example inputs: pass --input-shape (e.g. --input-shape 1,3,224,224), "
                     "or have MODEL return (model, example_inputs)")


def _policy(args: argparse.Namespace) -> int:
    print(json_schema_text(), end="")
    return 0


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise UsageError(f"{what} file {path!r} does not exist")


def _kind(path: str) -> str | None:
    """The kind of directory ``path`` is: "save" (plan.json), "checkpoint" (checkpoint.json) or None."""
    root = Path(path)
    if (root / io.PLAN).is_file():
        return "save"
    return "checkpoint" if (root / io.CHECKPOINT).is_file() else None


def _load_any(path: str, spec: str | None, required: bool = False) -> tuple[str, nn.Module, dict[str, Any]]:
    """Load a save directory (the compacted model) or a checkpoint (the gated model); returns
    ``(kind, model, metadata)``. With ``required`` anything else is the error of a missing plan.json."""
    kind = _kind(path) or ("save" if required else None)
    if kind == "save":
        model, meta = _load_saved(path, spec)
        return kind, model, meta
    meta = _read_meta(path, io.CHECKPOINT)
    spec = spec or meta.get("model_spec")
    if not spec:
        raise UsageError("the checkpoint records no model_spec; pass --model pkg.module:build")
    return "checkpoint", io.load_checkpoint(path, build_model(spec)[0]), meta


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _version() -> str:
    try:
        return importlib.metadata.version("autosparse")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "(not installed)"


def _read_meta(directory: str, name: str) -> dict[str, Any]:
    path = Path(directory) / name
    if not Path(directory).is_dir():
        raise UsageError(f"{directory!r} is not a directory")
    if not path.is_file():
        what = "checkpoint" if name == "checkpoint.json" else "save"
        raise PlanMismatchError(f"{directory} is not an autosparse {what}: it has no {name}")
    return json.loads(path.read_text())


def _load_saved(directory: str, spec: str | None) -> tuple[nn.Module, dict[str, Any]]:
    meta = _read_meta(directory, io.PLAN)
    base = _base_model(directory, meta, spec) if (spec or meta.get("model_spec") or not meta.get("hf")) else None
    return io.load(directory, base, inplace=True), meta


def _base_model(directory: str, meta: dict[str, Any], spec: str | None) -> nn.Module:
    spec = spec or meta.get("model_spec")
    if spec:
        return build_model(spec)[0]
    if meta.get("hf"):
        return io.hf_base_model(meta, Path(directory)).eval()
    raise UsageError(f"{directory} records no model_spec; pass --model pkg.module:build")


@contextlib.contextmanager
def _progress(what: str, steps: int) -> Iterator[Any]:
    """A tqdm bar over a command's steps on an interactive stderr; silent otherwise."""
    bar = None
    if sys.stderr.isatty():
        with contextlib.suppress(ImportError):
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"autosparse {what}", leave=False, file=sys.stderr)
    try:
        yield (lambda: bar.update(1)) if bar is not None else (lambda: None)
    finally:
        if bar is not None:
            bar.close()


if __name__ == "__main__":
    sys.exit(main())
