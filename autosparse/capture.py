"""Capture: model -> fx graph with shapes and parameter names, for analysis only.

Two tracers are tried in order. ``torch.fx.symbolic_trace`` is fast (ResNet-50: well under a
second) and keeps ``call_module`` nodes; it fails on data-dependent control flow and on Hugging
Face transformers v5 models. ``torch.export.export(strict=False)`` is slower but captures those as
a graph of aten ops whose weight placeholders name the model's parameters. The gates and the
surgery always act on the user's own eager modules; the graph only tells what is coupled.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from autosparse.errors import CaptureError, ExampleInputsError
from autosparse.modules.mha import traceable_attention


@dataclass
class Capture:
    """An fx graph of a model plus what analysis needs to read it."""

    graph: fx.Graph
    kind: str  # "fx" (symbolic_trace) or "export" (torch.export, aten ops)
    root: nn.Module | None  # the module whose submodules a "fx" graph's call_module nodes target
    tensor_names: dict[str, str] = field(default_factory=dict)  # node name -> parameter/buffer FQN
    seconds: float = 0.0
    model: nn.Module | None = None  # the captured model itself (module attributes, never mutated)
    inputs: tuple = ()  # the example inputs as captured (positional) ...
    kwargs: dict[str, Any] = field(default_factory=dict)  # ... and the keyword inputs added (use_cache)
    constants: frozenset[str] = frozenset()  # get_attr targets that are tracer constants, not the model's

    def shape(self, node: Any) -> tuple[int, ...] | None:
        """The static shape of a node's tensor output, or None when it is not a tensor."""
        if not isinstance(node, fx.Node):
            return None
        meta = node.meta.get("val", node.meta.get("tensor_meta"))
        shape = getattr(meta, "shape", None)
        if shape is None:
            return None
        try:
            return tuple(int(s) for s in shape)
        except (TypeError, ValueError):  # symbolic sizes: treat as unknown
            return None

    def tensor_name(self, node: Any) -> str | None:
        """The FQN of the parameter or buffer a node stands for (get_attr or lifted placeholder)."""
        if not isinstance(node, fx.Node):
            return None
        if node.op == "get_attr":
            return None if node.target in self.constants else str(node.target)
        return self.tensor_names.get(node.name)

    def module(self, node: fx.Node) -> nn.Module | None:
        if node.op == "call_module" and self.root is not None:
            return self.root.get_submodule(str(node.target))
        return None

    def where(self, node: fx.Node) -> str:
        """A readable location for messages: the owning module path and the node name."""
        if node.op == "call_module":
            return f"module '{node.target}'"
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            path = path.replace("L['self'].", "").replace("L__self___", "")
            return f"node '{node.name}' in module '{path or '<root>'}'"
        return f"node '{node.name}'"


def normalize_inputs(model: nn.Module, example_inputs: Any) -> tuple:
    """``example_inputs`` as a tuple of positional inputs; a typed error saying what to pass otherwise."""
    if example_inputs is None:
        raise ExampleInputsError(
            f"{type(model).__name__}: example_inputs are required to analyse the model's shapes; "
            "pass a tuple of positional inputs, e.g. example_inputs=(torch.randn(1, 3, 224, 224),)"
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Mapping):
        raise ExampleInputsError(_keyword_inputs_message(model, example_inputs))
    if not isinstance(example_inputs, (tuple, list)):
        raise ExampleInputsError(
            f"example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}"
        )
    return tuple(example_inputs)


def _keyword_inputs_message(model: nn.Module, given: Mapping) -> str:
    """Keyword inputs (a tokenizer's output): say which positional tuple to pass instead.

    Decision: example inputs are positional only, because they are stored with saves and
    checkpoints and replayed by ``compact`` and ``report`` as ``model(*inputs)``.
    """
    try:
        order = [n for n, p in inspect.signature(model.forward).parameters.items()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        order = []
    keys = [str(k) for k in given]
    unknown = [k for k in keys if k not in order]
    if unknown or not order:
        hint = f"{type(model).__name__}.forward has no positional parameter(s) {unknown}"
    else:
        last = max(order.index(k) for k in keys)
        parts = [f"inputs[{n!r}]" if n in keys else "None" for n in order[: last + 1]]
        tuple_text = f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"
        hint = f"pass example_inputs={tuple_text} in the order of {type(model).__name__}.forward"
    return (f"example_inputs is a {type(given).__name__} of keyword inputs ({', '.join(keys)}); example inputs "
            f"are positional (they are stored and replayed as model(*inputs)): {hint}")


def call_kwargs(model: nn.Module) -> dict[str, Any]:
    """Extra keyword inputs for a stable capture: Hugging Face caches make graphs data dependent."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def _check_runs(model: nn.Module, inputs: tuple, kwargs: dict[str, Any]) -> None:
    """Raise a clear :class:`ExampleInputsError` if the model itself fails on the inputs.

    Called before torch.export (which runs on fake tensors: it never sees values, e.g. token ids
    outside the vocabulary) and after a failed fx capture (whose shape pass is a real forward).
    """
    try:
        with torch.no_grad():
            model(*inputs, **kwargs)
    except Exception as exc:  # the user's forward: any failure means the inputs do not fit
        raise ExampleInputsError(
            f"{type(model).__name__} fails on the given example_inputs "
            f"({', '.join(str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs)}): "
            f"{type(exc).__name__}: {exc}. Pass inputs the model accepts."
        ) from exc


def _trace_fx(model: nn.Module, inputs: tuple) -> Capture:
    """symbolic_trace's graph, with every node's output shape from one real forward.

    The model itself is the graph's root (call_module targets are its paths): building a
    GraphModule would only generate and compile Python code that is never run. The shape pass is
    ``ShapeProp``'s per-node metadata on an Interpreter over the model.
    """
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    class _Shapes(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            result = super().run_node(node)
            found = False

            def meta(value: Any) -> Any:
                nonlocal found
                if isinstance(value, torch.Tensor):
                    found = True
                    return _extract_tensor_metadata(value)
                return value

            shapes = fx.node.map_aggregate(result, meta)
            if found:
                node.meta["tensor_meta"] = shapes
            return result

    before = set(vars(model))
    try:
        graph = _Tracer().trace(model)
        shapes = _Shapes(model, graph=graph)
        with torch.no_grad():
            shapes.run(*inputs)
    finally:
        # The tracer stores tensors that are no parameter or buffer (constants made in forward) as
        # attributes of the root; the model is left as it was, and they are named as nothing.
        added = [name for name in vars(model) if name not in before]
        for name in added:
            delattr(model, name)
    if next(shapes.args_iter, _Shapes) is not _Shapes:  # an Interpreter ignores surplus inputs; forward not
        raise TypeError(f"forward takes fewer than the {len(inputs)} example inputs given")
    return Capture(graph, "fx", model, constants=frozenset(added))


def _forward_owner(cls: type) -> type:
    """The class in ``cls``'s MRO that defines the ``forward`` its instances run."""
    return next((c for c in cls.__mro__ if "forward" in vars(c)), cls)


class _Tracer(fx.Tracer):
    """``symbolic_trace``'s tracer with two changes that keep the graph faithful to the forward.

    - Buffers are graph inputs (``get_attr``), as parameters are: arithmetic on them (a frozen
      BatchNorm's scale from its statistics) is recorded instead of baked into a constant that
      no one can slice.
    - A torch.nn module is a leaf only when the forward it runs is torch's: a subclass with its
      own forward may compute anything, so it is traced into and its ops are analysed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        owner = _forward_owner(type(m)).__module__
        return super().is_leaf_module(m, module_qualified_name) and owner.startswith(("torch.nn", "torch.ao.nn"))


_STACK_TRACE_SWITCH = "do_not_emit_stack_traces"  # in torch.fx.config of recent torch only (not 2.11)


@contextlib.contextmanager
def _no_stack_traces() -> Iterator[None]:
    """Analysis never reads node.stack_trace; recording it for every node costs ~25 % of export.
    Where torch has no switch for it, export just pays that cost."""
    import torch.fx.config as fx_config

    if not hasattr(fx_config, _STACK_TRACE_SWITCH):
        yield
        return
    saved = getattr(fx_config, _STACK_TRACE_SWITCH)
    setattr(fx_config, _STACK_TRACE_SWITCH, True)
    try:
        yield
    finally:
        setattr(fx_config, _STACK_TRACE_SWITCH, saved)


def _trace_export(model: nn.Module, inputs: tuple, kwargs: dict[str, Any]) -> Capture:
    with _no_stack_traces():
        program = torch.export.export(model, inputs, kwargs=kwargs or None, strict=False)
    sig = program.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    names.update(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    return Capture(program.graph, "export", None, names)


def on_meta(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is on the meta device (shapes only, no values).

    Example:
        >>> with torch.device("meta"):
        ...     net = nn.Linear(4, 4)
        >>> on_meta(net)
        True
    """
    return any(p.is_meta for p in model.parameters())


def _to_meta(inputs: tuple) -> tuple:
    return tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs)


@contextlib.contextmanager
def _all_on_meta(model: nn.Module) -> Iterator[None]:
    """Every real parameter and buffer of ``model`` swapped for a meta copy until the block exits.

    A model built with only its parameters on meta (accelerate's ``init_empty_weights`` keeps buffers
    real) cannot run on meta inputs: one device is needed. Tied tensors stay tied (one copy per
    tensor); the original objects are put back, also on failure.
    """
    saved: list[tuple[dict, str, torch.Tensor]] = []
    copies: dict[int, torch.Tensor] = {}
    try:
        for module in model.modules():
            tables: tuple[tuple[dict[str, Any], type[nn.Parameter] | None], ...] = (
                (module._parameters, nn.Parameter), (module._buffers, None))
            for table, cls in tables:
                for name, tensor in table.items():
                    if tensor is None or tensor.is_meta:
                        continue
                    if id(tensor) not in copies:
                        copy = tensor.detach().to("meta")
                        copies[id(tensor)] = cls(copy, tensor.requires_grad) if cls else copy
                    saved.append((table, name, tensor))
                    table[name] = copies[id(tensor)]
        yield
    finally:
        for table, name, tensor in reversed(saved):
            table[name] = tensor


def _is_hf(model: nn.Module) -> bool:
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


def capture(model: nn.Module, example_inputs: Any) -> Capture:
    """Capture ``model``'s graph for analysis, leaving the model exactly as it was.

    The model runs in eval mode under ``no_grad`` (so BatchNorm statistics do not move) and each
    submodule's training flag is restored afterwards, also on failure. A model with parameters on
    the meta device is traced on meta (inputs moved there, real tensors swapped for meta copies
    meanwhile) and never run on values; ``Capture.inputs`` keeps the inputs as given.

    Raises:
        ExampleInputsError: inputs missing or not accepted by the model.
        CaptureError: neither torch.fx nor torch.export could capture the model.
    """
    inputs = normalize_inputs(model, example_inputs)
    kwargs = call_kwargs(model)
    meta = on_meta(model)  # plan without memory: trace on meta, never run on values
    modes = {m: m.training for m in model.modules()}
    start = time.perf_counter()
    try:
        model.eval()
        with traceable_attention(model), (_all_on_meta(model) if meta else contextlib.nullcontext()):
            # traceable_attention lets the tracers see nn.MultiheadAttention's heads
            result = _first_capture(model, _to_meta(inputs) if meta else inputs, kwargs, meta)
    finally:
        for module, mode in modes.items():
            module.training = mode
    result.model, result.inputs, result.kwargs = model, inputs, kwargs
    result.seconds = time.perf_counter() - start
    return result


def _first_capture(model: nn.Module, inputs: tuple, kwargs: dict[str, Any], meta: bool = False) -> Capture:
    """The first tracer that succeeds; :class:`CaptureError` listing every failure otherwise.

    On meta (``meta``) there are no values to check the inputs with: the fx shape pass runs on meta
    tensors and torch.export on its fake tensors. The eager check is skipped, because a forward on
    meta fails where code reads a value (transformers' ``find_packed_sequence_indices`` calls
    ``bool()`` on a tensor unless it sees a tracer or a fake tensor).
    """
    errors: list[str] = []
    # Every successful capture has run the model on the real inputs once: the fx shape pass is
    # that forward; torch.export only sees fake tensors, so it gets a real forward first.
    fx_first = not (_is_hf(model) or kwargs)
    attempts = [("torch.fx.symbolic_trace", lambda: _trace_fx(model, inputs))] if fx_first else []
    attempts.append(("torch.export", lambda: _trace_export(model, inputs, kwargs)))
    for name, attempt in attempts:
        if name == "torch.export" and not meta:
            _check_runs(model, inputs, kwargs)  # bad inputs: a clear error, not a tracer's
        try:
            return attempt()
        except Exception as exc:  # tracer failures come in many types; each is reported below
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise CaptureError(f"could not capture {type(model).__name__}: " + "; ".join(errors) + ". " + _hint(errors))


# What the tracers' messages say -> what to change; the first match wins (checked in order).
_HINTS = (
    (("autograd.function", "custom_function", "functionctx", "once_differentiable"),
     "A custom torch.autograd.Function could not be traced: define it with torch.library.custom_op "
     "(traced as one op) and give it an analysis rule with sparsify(..., op_rules={op: rule})."),
    (("numpy", "__array__", "tolist"),
     "The forward converts a tensor to NumPy or Python values: keep that computation in torch ops."),
    (("control flow", "data-dependent", "datadependent", "guardondatadependent", "item()"),
     "Make data-dependent control flow static (or move it out of forward)."),
)


def _hint(errors: list[str]) -> str:
    """The advice that fits the tracers' failures (a generic one when none is recognised)."""
    text = " ".join(errors).lower()
    for needles, advice in _HINTS:
        if any(n in text for n in needles):
            return advice + " Also check that example_inputs match what the model expects."
    return ("Check that example_inputs match what the model expects, and that its forward runs under "
            "torch.fx.symbolic_trace or torch.export.export(strict=False) (the errors above say where not).")
