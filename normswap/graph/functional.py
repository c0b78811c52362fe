"""Functional norm calls (``F.layer_norm``, ``F.batch_norm``, ``F.group_norm`` and their
``torch.`` forms) inside a module's forward: find them by tracing that module alone
(its children as leaves), and rewrite them into calls of new submodules.

The rewritten module keeps its class and everything else: only its ``forward`` is
replaced, per instance, by the code fx generates for the edited graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..norms.base import NormalizerBase
from .sites import Site, SiteFacts, module_family
from .tracer import _calls_functional_norm, trace

# target -> (family, short name, parameter names in call order)
FUNCTIONAL_TARGETS = {
    F.layer_norm: ("layernorm", "layer_norm", ["input", "normalized_shape", "weight", "bias", "eps"]),
    torch.layer_norm: ("layernorm", "layer_norm", ["input", "normalized_shape", "weight", "bias", "eps",
                                                   "cudnn_enable"]),
    F.batch_norm: ("batchnorm", "batch_norm", ["input", "running_mean", "running_var", "weight", "bias",
                                               "training", "momentum", "eps"]),
    torch.batch_norm: ("batchnorm", "batch_norm", ["input", "weight", "bias", "running_mean", "running_var",
                                                   "training", "momentum", "eps", "cudnn_enabled"]),
    F.group_norm: ("groupnorm", "group_norm", ["input", "num_groups", "weight", "bias", "eps"]),
    torch.group_norm: ("groupnorm", "group_norm", ["input", "num_groups", "weight", "bias", "eps",
                                                   "cudnn_enabled"]),
    F.instance_norm: ("instancenorm", "instance_norm", ["input", "running_mean", "running_var", "weight",
                                                         "bias", "use_input_stats", "momentum", "eps"]),
    torch.instance_norm: ("instancenorm", "instance_norm", ["input", "weight", "bias", "running_mean",
                                                            "running_var", "use_input_stats", "momentum",
                                                            "eps", "cudnn_enabled"]),
}
DEFAULTS = {"weight": None, "bias": None, "eps": 1e-5, "running_mean": None, "running_var": None,
            "training": False, "momentum": 0.1, "use_input_stats": True}


@dataclass
class OwnerRewrite:
    """One module whose forward makes functional norm calls, traced on its own."""
    owner: str
    module: nn.Module
    graph: Optional[fx.Graph]
    nodes: Dict[str, fx.Node] = field(default_factory=dict)   # site name -> node


def _resolve_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _bind(node: fx.Node, names: List[str]) -> Dict[str, Any]:
    bound = dict(DEFAULTS)
    for name, value in zip(names, node.args):
        bound[name] = value
    bound.update(node.kwargs)
    return bound


def _tensor_arg(owner: nn.Module, value) -> Tuple[bool, Optional[torch.Tensor]]:
    """(ok, tensor) for a weight-like argument: None, or an attribute of the owner."""
    if value is None:
        return True, None
    if isinstance(value, fx.Node) and value.op == "get_attr":
        return True, _resolve_attr(owner, value.target)
    return False, None


def _constant(value, what: str) -> Tuple[Any, Optional[str]]:
    if isinstance(value, fx.Node):
        return None, f"its {what} is computed at run time and no parameter shows its value"
    return value, None


def _facts(owner: nn.Module, family: str, short: str, args: Dict[str, Any]) -> Tuple[Optional[SiteFacts], Optional[str]]:
    """Facts of one functional call, or why its arguments cannot be read.

    Arguments computed from the input (``F.layer_norm(x, x.shape[-1:], w, b)``) are
    read from the parameters they must agree with (the weight's shape) when there is one.
    """
    t: Dict[str, Optional[torch.Tensor]] = {}
    for key in ("weight", "bias", "running_mean", "running_var"):
        ok, tensor = _tensor_arg(owner, args.get(key))
        if not ok:
            return None, f"its {key} is computed in forward, not a parameter or buffer of the module"
        t[key] = tensor
    eps, why = _constant(args.get("eps", 1e-5), "eps")
    if why:
        return None, why
    ref = next((x for x in (t["weight"], t["running_mean"], t["bias"]) if x is not None), None)
    if ref is None:
        ref = next(iter(owner.parameters()), None)
    common = dict(family=family, eps=float(eps), weight=t["weight"], bias=t["bias"],
                  affine=t["weight"] is not None,
                  device=ref.device if ref is not None else torch.device("cpu"),
                  dtype=ref.dtype if ref is not None else torch.get_default_dtype(),
                  training=owner.training)
    channels = next((x.shape[0] for x in (t["weight"], t["bias"], t["running_mean"]) if x is not None), None)
    if family == "layernorm":
        shape = args.get("normalized_shape")
        if isinstance(shape, fx.Node):
            known = t["weight"] if t["weight"] is not None else t["bias"]
            if known is None:
                return None, "its normalized_shape is computed at run time and it has no weight to read it from"
            shape = tuple(known.shape)
        shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        return SiteFacts(layout="last", num_features=shape[-1], normalized_shape=shape, **common), None
    if channels is None:
        return None, f"{short} without weight or running statistics: the channel count is unknown before run time"
    if family == "groupnorm":
        groups, why = _constant(args.get("num_groups"), "num_groups")
        if why:
            return None, why
        return SiteFacts(layout="any", num_features=int(channels), num_groups=int(groups), **common), None
    momentum, why = _constant(args.get("momentum", 0.1), "momentum")
    if why:
        return None, why
    if family == "instancenorm":
        if args.get("use_input_stats") is not True:
            return None, "an instance norm call that uses running statistics (use_input_stats is not True)"
        return SiteFacts(layout="any", num_features=int(channels), momentum=momentum,
                         track_running_stats=t["running_mean"] is not None,
                         running_mean=t["running_mean"], running_var=t["running_var"], **common), None
    return SiteFacts(layout="any", num_features=int(channels), momentum=momentum,
                     track_running_stats=t["running_mean"] is not None,
                     running_mean=t["running_mean"], running_var=t["running_var"], **common), None


def _depends_on_placeholder(node) -> bool:
    """Whether a value is computed from the forward's inputs (not from parameters alone)."""
    if not isinstance(node, fx.Node):
        return False
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return True
        stack.extend(n.all_input_nodes)
    return False


def candidate_owners(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Non-norm modules whose forward source mentions a functional norm."""
    out = []
    for name, m in model.named_modules():
        if module_family(m) is not None or isinstance(m, NormalizerBase):
            continue
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            continue  # a norm call in a conv's forward standardizes its weight (StdConv2d...)
        if _calls_functional_norm(m):
            out.append((name, m))
    return out


def _inside_norm(name: str, model: nn.Module) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        try:
            if module_family(model.get_submodule(".".join(parts[:i]))) is not None:
                return True
        except AttributeError:
            return False
    return False


def find_functional_sites(model: nn.Module, leaf_modules: Sequence = ()) -> Tuple[List[Site], List[OwnerRewrite]]:
    sites: List[Site] = []
    owners: List[OwnerRewrite] = []
    for owner_name, owner in candidate_owners(model):
        if _inside_norm(owner_name, model):
            continue
        try:
            graph = trace(owner, leaf_modules, shallow=True)
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
            site_name = f"{owner_name}.<functional>" if owner_name else "<functional>"
            sites.append(Site(name=site_name, kind="functional", family="unknown",
                              original="functional norm call", owner=owner_name,
                              skip_reason=f"forward of {type(owner).__name__} does not trace ({msg}); "
                                          f"its functional norm calls are left as they are"))
            continue
        rewrite = OwnerRewrite(owner_name, owner, graph)
        used = {n for n, _ in owner.named_children()} | set(dir(owner))
        counts: Dict[str, int] = {}
        for node in graph.nodes:
            if node.op != "call_function" or node.target not in FUNCTIONAL_TARGETS:
                continue
            family, short, names = FUNCTIONAL_TARGETS[node.target]
            args = _bind(node, names)
            if not _depends_on_placeholder(args["input"]):
                continue  # normalizes a weight (weight standardization), not an activation
            i = counts.get(short, 0)
            counts[short] = i + 1
            attr = short if i == 0 else f"{short}_{i}"
            while attr in used:
                attr += "_"
            used.add(attr)
            name = f"{owner_name}.{attr}" if owner_name else attr
            try:
                facts, why = _facts(owner, family, short, args)
            except Exception as e:  # noqa: BLE001 - a call we cannot read is skipped, never raised
                facts, why = None, f"its arguments cannot be read ({type(e).__name__}: {e})"
            site = Site(name=name, kind="functional", family=family, original=f"F.{short}",
                        types=[f"F.{short}", family], owner=owner_name, attr=attr,
                        facts=facts, skip_reason=why)
            sites.append(site)
            rewrite.nodes[name] = node
        if rewrite.nodes:
            owners.append(rewrite)
    return sites, owners


class RewrittenForward:
    """The forward of a module whose functional norm calls were rewritten.

    Stored in the module's instance ``__dict__`` (the module keeps its class). It holds
    the fx GraphModule of the edited forward and runs its code with the module as
    ``self``. It pickles with the module (fx regenerates the code on load), so a
    rewritten module keeps its rewrite through ``torch.save`` / ``torch.load``,
    ``copy.deepcopy`` and multiprocessing.
    """

    def __init__(self, owner: nn.Module, gm: fx.GraphModule):
        self.owner = owner
        self.gm = gm

    @property
    def code(self) -> str:
        return self.gm.code

    def __call__(self, *args, **kwargs):
        return type(self.gm).forward(self.owner, *args, **kwargs)


@dataclass
class PreparedRewrite:
    """A rewrite ready to apply: ``apply()`` changes the owner, ``undo()`` restores it."""
    apply: Callable[[], None]
    undo: Callable[[], None]


def prepare_rewrite(rewrite: OwnerRewrite, new_modules: Dict[str, nn.Module]) -> PreparedRewrite:
    """Edit the graph and generate the new forward. Nothing on the model changes until
    ``apply()`` is called."""
    graph = rewrite.graph
    owner = rewrite.module
    attrs: Dict[str, nn.Module] = {}
    for site_name, node in rewrite.nodes.items():
        if site_name not in new_modules:
            continue
        attr = site_name.rsplit(".", 1)[-1]
        attrs[attr] = new_modules[site_name]
        family, _, names = FUNCTIONAL_TARGETS[node.target]
        inp = _bind(node, names)["input"]
        with graph.inserting_before(node):
            new_node = graph.call_module(attr, (inp,))
        node.replace_all_uses_with(new_node)
        graph.erase_node(node)
    if not attrs:
        return PreparedRewrite(lambda: None, lambda: None)
    root: Dict[str, Any] = {}
    missing: Dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            if node.target in attrs:
                root[node.target] = attrs[node.target]
                continue
            try:
                root[node.target] = _resolve_attr(owner, node.target)
            except AttributeError:
                missing[node.target] = None
    gm = fx.GraphModule(root, graph, class_name=type(owner).__name__)
    gm.graph.eliminate_dead_code()   # the weight/bias reads of the old calls
    gm.recompile()
    for target in missing:
        missing[target] = _resolve_attr(gm, target)
    had_forward = "forward" in owner.__dict__
    old_forward = owner.__dict__.get("forward")

    def apply():
        for attr, mod in attrs.items():
            owner.add_module(attr, mod)
        for target, value in missing.items():
            setattr(owner, target, value)
        owner.forward = RewrittenForward(owner, gm)

    def undo():
        for attr in attrs:
            owner._modules.pop(attr, None)
        for target in missing:
            owner.__dict__.pop(target, None)
        if had_forward:
            owner.forward = old_forward
        else:
            owner.__dict__.pop("forward", None)
    return PreparedRewrite(apply, undo)
