"""Functional norm calls (``F.layer_norm``, ``F.batch_norm``, ``F.group_norm`` and their
``torch.`` forms) inside a module's forward: find them by tracing that module alone
(its children as leaves), and rewrite them into calls of new submodules.

The rewritten module keeps its class and everything else: only its ``forward`` is
replaced, per instance, by the code fx generates for the edited graph.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..norms.base import NormalizerBase
from .sites import Site, module_family
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
}
DEFAULTS = {"weight": None, "bias": None, "eps": 1e-5, "running_mean": None, "running_var": None,
            "training": False, "momentum": 0.1}


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


def _facts(owner: nn.Module, family: str, short: str, args: Dict[str, Any]) -> Tuple[Optional[Dict], Optional[str]]:
    f: Dict[str, Any] = {"family": family, "class": f"F.{short}", "act": None, "drop": None}
    for key in ("weight", "bias", "running_mean", "running_var"):
        ok, t = _tensor_arg(owner, args.get(key))
        if not ok:
            return None, f"its {key} is computed in forward, not a parameter or buffer of the module"
        f[key] = t
    eps = args.get("eps", 1e-5)
    if isinstance(eps, fx.Node):
        return None, "its eps is computed at run time"
    f["eps"] = float(eps)
    ref = next((t for t in (f["weight"], f["running_mean"], f["bias"]) if t is not None), None)
    if ref is None:
        ref = next(iter(owner.parameters()), None)
    f["device"] = ref.device if ref is not None else torch.device("cpu")
    f["dtype"] = ref.dtype if ref is not None else torch.get_default_dtype()
    f["training"] = owner.training
    f["affine"] = f["weight"] is not None
    if family == "layernorm":
        shape = args.get("normalized_shape")
        if isinstance(shape, fx.Node) or not isinstance(shape, (tuple, list, int, torch.Size)):
            return None, "its normalized_shape is computed at run time"
        shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        f.update(normalized_shape=shape, layout="last", num_features=shape[-1], channel_dim=-1)
    elif family == "groupnorm":
        if f["weight"] is None:
            return None, "group norm without weight: the channel count is unknown before run time"
        f.update(num_features=int(f["weight"].shape[0]), num_groups=args.get("num_groups"),
                 layout="any", channel_dim=1)
    else:
        ref_c = f["running_mean"] if f["running_mean"] is not None else f["weight"]
        if ref_c is None:
            return None, "batch norm without weight or running stats: the channel count is unknown"
        f.update(num_features=int(ref_c.shape[0]), momentum=args.get("momentum", 0.1),
                 track_running_stats=f["running_mean"] is not None, layout="any", channel_dim=1,
                 frozen=False)
        if not isinstance(f["momentum"], (float, int, type(None))):
            return None, "its momentum is computed at run time"
    return f, None


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
            facts, why = _facts(owner, family, short, args)
            site = Site(name=name, kind="functional", family=family, original=f"F.{short}",
                        types=[f"F.{short}", family], owner=owner_name,
                        call={"facts": facts or {}, "attr": attr}, skip_reason=why)
            sites.append(site)
            rewrite.nodes[name] = node
        if rewrite.nodes:
            owners.append(rewrite)
    return sites, owners


def prepare_rewrite(rewrite: OwnerRewrite, new_modules: Dict[str, nn.Module]):
    """Edit the graph and generate the new forward; returns an ``apply()`` closure.

    Nothing on the model changes until ``apply()`` is called.
    """
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
        return lambda: None
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
    forward = type(gm).forward

    def apply():
        for attr, mod in attrs.items():
            owner.add_module(attr, mod)
        for target, value in missing.items():
            setattr(owner, target, value)
        owner.forward = types.MethodType(forward, owner)
        owner._normswap_forward_code = gm.code
    return apply
