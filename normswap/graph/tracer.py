"""A timm-aware torch.fx tracer, and tolerant tracing of models that do not trace whole.

Leaves: timm's registered no-trace modules, every norm module (so that it stays one
``call_module`` node, a module site), normswap's own normalizers, and what the user
lists. timm's registered no-trace functions are auto-wrapped.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import torch.fx as fx
from torch import nn

from ..norms.base import NORMSWAP_LEAF_MODULES, NormalizerBase
from .sites import module_family


def _timm_notrace():
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
        return list(get_notrace_modules()), list(get_notrace_functions())
    except Exception:  # pragma: no cover
        return [], []


class NormswapTracer(fx.Tracer):
    """fx tracer that keeps norm modules, timm no-trace modules and user leaves whole."""

    def __init__(self, leaf_modules: Sequence = (), shallow: bool = False):
        timm_modules, timm_functions = _timm_notrace()
        fns = tuple(f for f in timm_functions if callable(f) and not isinstance(f, str))
        super().__init__(autowrap_functions=fns)
        self._leaf_types = tuple(set(timm_modules) | set(NORMSWAP_LEAF_MODULES)
                                 | {t for t in leaf_modules if isinstance(t, type)})
        self._leaf_names = {t for t in leaf_modules if isinstance(t, str)}
        self.shallow = shallow

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.shallow:
            return True  # every child is a leaf: we only read this module's own forward
        if isinstance(m, self._leaf_types) or isinstance(m, NormalizerBase):
            return True
        if module_family(m) is not None:
            return True
        if qualname in self._leaf_names or type(m).__name__ in self._leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


def trace(module: nn.Module, leaf_modules: Sequence = (), shallow: bool = False) -> fx.Graph:
    """Trace ``module``; raises whatever the tracer raises when it does not trace."""
    tracer = NormswapTracer(leaf_modules, shallow=shallow)
    return tracer.trace(module)


@dataclass
class TraceResult:
    """Graphs of the parts of a model that trace, and the parts that do not."""
    graphs: List[Tuple[str, fx.Graph]] = field(default_factory=list)   # (prefix, graph)
    failed: List[Tuple[str, str]] = field(default_factory=list)         # (qualname, error)


def trace_tolerant(model: nn.Module, leaf_modules: Sequence = ()) -> TraceResult:
    """Trace the model; where it fails, trace its children instead, recursively.

    A module whose forward does not trace is recorded in ``failed`` (with the error);
    its children are tried one by one, so everything that traces is covered.
    """
    result = TraceResult()

    def visit(prefix: str, m: nn.Module):
        try:
            graph = trace(m, leaf_modules)
            result.graphs.append((prefix, graph))
            return
        except Exception as e:  # noqa: BLE001 - any tracing failure means "does not trace"
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            result.failed.append((prefix, msg))
        for name, child in m.named_children():
            if module_family(child) is not None or isinstance(child, NormalizerBase):
                continue  # a norm module is a module site whatever its parent does
            if next(child.children(), None) is None and not _calls_functional_norm(child):
                continue  # a leaf with nothing of ours inside
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return result


FUNCTIONAL_NAMES = ("layer_norm", "batch_norm", "group_norm", "instance_norm")


def _calls_functional_norm(m: nn.Module) -> bool:
    """Whether ``type(m).forward`` names a functional norm (read from its code object)."""
    return _forward_names_norm(type(m))


@functools.lru_cache(maxsize=None)
def _forward_names_norm(cls: type) -> bool:
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    if code is None:
        return False
    names = set(code.co_names)
    for const in code.co_consts:  # nested functions / comprehensions
        if hasattr(const, "co_names"):
            names.update(const.co_names)
    return any(n in names for n in FUNCTIONAL_NAMES)

