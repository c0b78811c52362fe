"""What feeds each normalizer: the conv/linear whose output is the norm's input.

A weight whose output channels are each normalized by a per-channel batch statistic
is scale invariant per output channel (PAPERS.md section 2). The training helpers use
:func:`scale_invariant_params` for parameter groups and the LR correction; the ``bwn``
preset uses :func:`norm_producers` to rewrite the conv and the norm together.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from ..norms.base import NormalizerBase
from ..norms.bwn import BoundedWeightNorm, _CONV_T, _SUPPORTED
from .sites import module_family
from .tracer import trace_tolerant


@dataclass
class Producer:
    """The module that produces a norm's input, or why there is none."""
    norm: str
    producer: Optional[str]
    reason: Optional[str] = None


def _is_norm(m: nn.Module) -> bool:
    return module_family(m) is not None or isinstance(m, NormalizerBase)


def norm_producers(model: nn.Module, leaf_modules: Sequence = ()) -> Tuple[Dict[str, Producer], List[Tuple[str, str]]]:
    """For every norm module called in traced code: its conv/linear producer (or why not).

    Returns (norm qualname -> Producer, untraced (qualname, error) list).
    """
    result = trace_tolerant(model, leaf_modules)
    out: Dict[str, Producer] = {}
    for prefix, graph in result.graphs:
        calls: Dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            qual = f"{prefix}.{node.target}" if prefix else node.target
            mod = model.get_submodule(qual)
            if not _is_norm(mod):
                continue
            if calls[node.target] > 1:
                out[qual] = Producer(qual, None, "the norm module is called more than once")
                continue
            inp = node.args[0] if node.args else None
            if not isinstance(inp, fx.Node) or inp.op != "call_module":
                what = inp.target if isinstance(inp, fx.Node) and inp.op == "call_function" else \
                    (inp.op if isinstance(inp, fx.Node) else type(inp).__name__)
                name = getattr(what, "__name__", str(what))
                out[qual] = Producer(qual, None, f"its input comes from {name}, not from a conv/linear "
                                                 f"module (e.g. a residual add)")
                continue
            pq = f"{prefix}.{inp.target}" if prefix else inp.target
            pm = model.get_submodule(pq)
            if not isinstance(pm, _SUPPORTED):
                out[qual] = Producer(qual, None, f"its input comes from {type(pm).__name__} ({pq}), "
                                                 f"not a conv/linear")
            elif len(inp.users) != 1:
                out[qual] = Producer(qual, None, f"the output of {pq} has {len(inp.users)} users, "
                                                 f"not only this norm")
            elif calls[inp.target] > 1:
                out[qual] = Producer(qual, None, f"{pq} is called more than once")
            else:
                out[qual] = Producer(qual, pq)
    return out, result.failed


def _out_channels(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    return m.out_channels


def _per_channel_scale_invariant(norm_name: str, norm: nn.Module, state) -> bool:
    """Whether scaling one input channel of the norm leaves its output unchanged.

    For a converted site the variant says (``Variant.scale_invariant``); an untouched
    torch batch or instance norm is (its statistics are per channel).
    """
    if state is not None:
        rec = next((r for r in state.report.sites if r.name == norm_name), None)
        if rec is not None and rec.status == "converted":
            return state.variant_of(norm_name).scale_invariant(rec.kwargs, rec.family)
    return isinstance(norm, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm))


@dataclass
class ScaleInvariant:
    """A weight that is scale invariant per output channel."""
    name: str              # qualified parameter name
    module: str            # qualified module name
    param: nn.Parameter
    transposed: bool
    groups: int
    why: str


def scale_invariant_params(model: nn.Module, leaf_modules: Sequence = ()) -> List[ScaleInvariant]:
    """Weights whose output channels are each normalized (so only their direction
    matters): conv/linear weights feeding a per-channel batch normalizer, and the
    direction ``v`` of every bounded-weight-norm weight.

    On a transformed model the producers come from its recorded state (traced at most
    once, during ``transform`` or on the first call)."""
    found: Dict[str, ScaleInvariant] = {}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight") and any(
                isinstance(p, BoundedWeightNorm) for p in m.parametrizations["weight"]):
            bwn = next(p for p in m.parametrizations["weight"] if isinstance(p, BoundedWeightNorm))
            pname = f"{name}.parametrizations.weight.original" if name else "parametrizations.weight.original"
            found[pname] = ScaleInvariant(pname, name, m.parametrizations["weight"].original,
                                          bwn.transposed, bwn.groups, "bounded weight norm direction")
    from ..transform import producers_of, state_of
    state = state_of(model)
    for norm_name, prod in producers_of(model, leaf_modules).items():
        if prod.producer is None:
            continue
        norm = model.get_submodule(norm_name)
        conv = model.get_submodule(prod.producer)
        if not _per_channel_scale_invariant(norm_name, norm, state) or parametrize.is_parametrized(conv, "weight"):
            continue
        if _out_channels(conv) != getattr(norm, "num_features", getattr(norm, "num_channels", -1)):
            continue
        pname = f"{prod.producer}.weight"
        found[pname] = ScaleInvariant(pname, prod.producer, conv.weight, isinstance(conv, _CONV_T),
                                      getattr(conv, "groups", 1), f"feeds {type(norm).__name__} {norm_name}")
    return list(found.values())
