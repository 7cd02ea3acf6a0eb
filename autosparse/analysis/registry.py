"""The one table of op knowledge: how channels flow through each op, and which weights to slice.

A *rule* is a function ``handler(ctx) -> None`` that reads the labels of an fx node's inputs
through :class:`~autosparse.analysis.context.OpContext` and sets the label of its output, records
the weights the op owns (members), and blocks what it cannot carry. Rules are keyed by

- an ``nn.Module`` subclass (``call_module`` nodes of a torch.fx trace; subclasses inherit),
- a callable (``call_function`` nodes: ``torch.cat``, ``operator.add``, an aten op overload or packet),
- a method name string (``call_method`` nodes: ``"view"``, ``"relu"``),
- a predicate over ``call_function`` targets (:meth:`Registry.register_matcher`), for ops that a
  library outside the core defines (matched by qualified name without importing that library).

Anything without a rule is *unknown*: its inputs' channels become unprunable and ``explain``
reports the op and where it sits. Nothing is ever guessed to be element-wise.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch

from autosparse.analysis.context import OpContext
from autosparse.errors import RegistryError

Handler = Callable[[OpContext], None]
RuleKey = type | Callable[..., Any] | str


def _check_key(key: RuleKey) -> None:
    if isinstance(key, str):
        if not key.isidentifier():
            raise RegistryError(f"rule key {key!r}: a method name must be an identifier, e.g. 'view'")
        return
    if isinstance(key, type):
        if not issubclass(key, torch.nn.Module):
            raise RegistryError(f"rule key {key.__name__}: a class key must subclass torch.nn.Module")
        return
    if not callable(key):
        raise RegistryError(f"rule key {key!r}: use an nn.Module subclass, a callable or a method name")


def _check_handler(key: RuleKey, handler: Handler) -> None:
    if not callable(handler):
        raise RegistryError(f"rule for {key!r}: the handler must be callable, got {type(handler).__name__}")
    try:
        inspect.signature(handler).bind(None)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"rule for {key!r}: the handler must take exactly one argument (ctx)") from exc


class Registry:
    """A validated mapping from op keys to handlers, with MRO and overload-packet fallbacks."""

    def __init__(self, rules: Mapping[RuleKey, Handler] | None = None) -> None:
        self._rules: dict[RuleKey, Handler] = {}
        self._matchers: list[tuple[Callable[[Any], bool], Handler]] = []
        for key, handler in (rules or {}).items():
            self.register(key, handler)

    def register(self, keys: RuleKey | Iterable[RuleKey], handler: Handler) -> None:
        """Register ``handler`` for one key or several; raises :class:`RegistryError` if malformed."""
        many = isinstance(keys, (list, tuple, set, frozenset))
        listed = cast("Iterable[RuleKey]", keys) if many else [cast(RuleKey, keys)]
        for given in listed:
            # A @torch.library.custom_op function appears in graphs as its OpOverload.
            key: RuleKey = getattr(given, "_opoverload", given)
            _check_key(key)
            _check_handler(key, handler)
            self._rules[key] = handler

    def register_matcher(self, matches: Callable[[Any], bool], handler: Handler) -> None:
        """Register ``handler`` for every ``call_function`` target ``matches`` accepts (consulted
        after the keyed rules), e.g. a custom op of a library autosparse does not import."""
        if not callable(matches):
            raise RegistryError(f"matcher {matches!r}: must be a callable taking an fx target")
        _check_handler(matches, handler)
        self._matchers.append((matches, handler))

    def rule(self, *keys: RuleKey) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`register`."""

        def wrap(handler: Handler) -> Handler:
            self.register(list(keys), handler)
            return handler

        return wrap

    def extended(self, extra: Mapping[RuleKey, Handler] | None) -> Registry:
        """A copy with ``extra`` rules added on top (per-call user extension)."""
        out = Registry()
        out._rules = dict(self._rules)
        out._matchers = list(self._matchers)
        for key, handler in (extra or {}).items():
            out.register(key, handler)
        return out

    def lookup(self, op: str, target: Any, module: torch.nn.Module | None = None) -> Handler | None:
        """The handler for an fx node (``op`` and ``target``), or None when the op is unknown."""
        if op == "call_module" and module is not None:
            for cls in type(module).__mro__:
                if cls in self._rules:
                    # A subclass that overrides forward may compute anything: unknown, not guessed.
                    same = getattr(type(module), "forward", None) is getattr(cls, "forward", None)
                    return self._rules[cls] if same else self._rules.get(type(module))
            return None
        if op == "call_method":
            return self._rules.get(target)
        if op == "call_function":
            found = self._rules.get(target)
            if found is None and isinstance(target, torch._ops.OpOverload):
                found = self._rules.get(target.overloadpacket)
            return found or next((handler for matches, handler in self._matchers if matches(target)), None)
        return None

    def __contains__(self, key: RuleKey) -> bool:
        return key in self._rules

    def __len__(self) -> int:
        return len(self._rules)
