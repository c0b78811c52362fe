"""What counts as a normalization site, and the facts about it (computed once per site).

A module is a site when it is an instance of a registered site type (torch's batch,
layer, group and instance norms, torchvision's and timm's frozen batch norms; more with
:func:`register_site_type`). Its **layout** (which axes it normalizes) comes from torch's
class hierarchy where torch fixes it (``nn.BatchNorm2d`` normalizes dim 1 of a 4-D
input), and from what the module does where a subclass overrides ``forward``
(:mod:`normswap.graph.layout` probes it); never from its class name.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..norms.base import NormalizerBase

FAMILIES = ("batchnorm", "layernorm", "groupnorm", "instancenorm")

# base class -> family; the first match in this order wins
SITE_TYPES: List[Tuple[type, str]] = [
    (nn.modules.batchnorm._BatchNorm, "batchnorm"),
    (nn.modules.instancenorm._InstanceNorm, "instancenorm"),
    (nn.LayerNorm, "layernorm"),
    (nn.GroupNorm, "groupnorm"),
]
_frozen: List[type] = []   # batch norms whose statistics and affine are buffers
try:
    from torchvision.ops.misc import FrozenBatchNorm2d as _TvFrozenBN
    _frozen.append(_TvFrozenBN)
except Exception:  # pragma: no cover - torchvision comes with timm
    pass
try:
    from timm.layers import FrozenBatchNorm2d as _TimmFrozenBN
    _frozen.append(_TimmFrozenBN)
except Exception:  # pragma: no cover
    pass
FROZEN_TYPES = tuple(_frozen)
SITE_TYPES += [(t, "batchnorm") for t in FROZEN_TYPES]


def register_site_type(cls: type, family: str) -> None:
    """Treat instances of ``cls`` (a norm module of your own) as sites of ``family``.

    Its facts are read like those of the torch class of that family (``weight``,
    ``bias``, ``eps``, ``num_features`` / ``normalized_shape`` / ``num_groups``...).
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: expected one of {', '.join(FAMILIES)}")
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"cls={cls!r}: expected an nn.Module subclass")
    SITE_TYPES.insert(0, (cls, family))


def module_family(m: nn.Module) -> Optional[str]:
    """'batchnorm' / 'layernorm' / 'groupnorm' / 'instancenorm' for a norm module, else None."""
    if isinstance(m, NormalizerBase):
        return None
    for cls, fam in SITE_TYPES:
        if isinstance(m, cls):
            return fam
    return None


def type_names(m: nn.Module) -> List[str]:
    """Class names a type rule may use for this module: its class and its bases."""
    names = []
    for cls in type(m).__mro__:
        if cls in (nn.Module, object):
            break
        names.append(cls.__name__)
    return names


@dataclass(frozen=True)
class SiteFacts:
    """Everything a variant needs to know about a site, read once.

    ``layout`` says which axes the site normalizes:
    batch norms ``"1d"`` (N, C[, L]), ``"2d"`` (N, C, H, W), ``"3d"``, or ``"any"`` rank
    with channels in dim 1; layer norms ``"last"`` (the trailing ``normalized_shape``)
    or ``"2d"`` (the channels of an NCHW input at each position); group norms ``"any"``;
    instance norms ``"1d"`` / ``"2d"`` / ``"3d"``.
    """
    family: str
    layout: str
    num_features: int
    eps: float = 1e-5
    affine: bool = False
    normalized_shape: Optional[Tuple[int, ...]] = None
    num_groups: Optional[int] = None
    momentum: Optional[float] = 0.1
    track_running_stats: bool = False
    frozen: bool = False
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    running_mean: Optional[torch.Tensor] = None
    running_var: Optional[torch.Tensor] = None
    num_batches_tracked: Optional[torch.Tensor] = None
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    training: bool = True
    act: Optional[nn.Module] = None        # timm's *Act norms: drop, then activation
    drop: Optional[nn.Module] = None
    channels_last_out: bool = False        # NCHW in, channels-last out (graph/layout.py's Probed)

    @property
    def channel_dim(self) -> int:
        return -1 if self.layout == "last" else 1

    def with_layout(self, layout: str) -> "SiteFacts":
        return replace(self, layout=layout)


@dataclass
class Site:
    """One normalization in a model: a module, or a functional call inside a forward."""
    name: str                               # qualified name of the (new) module
    kind: str                               # "module" | "functional"
    family: str                             # one of FAMILIES, or "unknown"
    original: str                           # class name, or "F.layer_norm" ...
    types: List[str] = field(default_factory=list)
    facts: Optional[SiteFacts] = None       # None when skip_reason is set
    module: Optional[nn.Module] = None      # the original module (module sites)
    aliases: List[str] = field(default_factory=list)   # other names of the same module
    owner: Optional[str] = None             # functional: module whose forward makes the call
    attr: Optional[str] = None              # functional: attribute the new module gets
    skip_reason: Optional[str] = None       # set when the site cannot be rewritten at all


def _tensor(m: nn.Module, name: str) -> Optional[torch.Tensor]:
    t = getattr(m, name, None)
    return t if isinstance(t, torch.Tensor) else None


def act_and_drop(m: nn.Module) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
    """timm's norm+activation layers hold ``drop`` and ``act`` modules applied after the norm."""
    act, drop = getattr(m, "act", None), getattr(m, "drop", None)
    if isinstance(act, nn.Module):
        return act, drop if isinstance(drop, nn.Module) else None
    return None, None


def module_facts(m: nn.Module, family: str, layout: str) -> SiteFacts:
    """Facts of a norm module of ``family`` whose layout is known."""
    ref = next((t for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
                if t is not None and t.is_floating_point()), None)
    w, b = _tensor(m, "weight"), _tensor(m, "bias")
    act, drop = act_and_drop(m)
    common = dict(family=family, layout=layout, eps=float(getattr(m, "eps", 1e-5)), weight=w, bias=b,
                  device=ref.device if ref is not None else torch.device("cpu"),
                  dtype=ref.dtype if ref is not None else torch.get_default_dtype(),
                  training=m.training, act=act, drop=drop)
    if family in ("batchnorm", "instancenorm"):
        rm, rv = _tensor(m, "running_mean"), _tensor(m, "running_var")
        num = getattr(m, "num_features", None) or (w.shape[0] if w is not None else rm.shape[0])
        return SiteFacts(num_features=int(num), momentum=getattr(m, "momentum", 0.1),
                         affine=isinstance(w, nn.Parameter) or (isinstance(m, FROZEN_TYPES) and w is not None),
                         track_running_stats=rm is not None, frozen=isinstance(m, FROZEN_TYPES),
                         running_mean=rm, running_var=rv,
                         num_batches_tracked=_tensor(m, "num_batches_tracked"), **common)
    if family == "layernorm":
        shape = tuple(int(s) for s in m.normalized_shape)
        affine = bool(getattr(m, "elementwise_affine", True)) and w is not None
        return SiteFacts(num_features=shape[-1] if layout == "last" else shape[0], normalized_shape=shape,
                         affine=affine, **common)
    if family == "groupnorm":
        return SiteFacts(num_features=int(m.num_channels), num_groups=int(m.num_groups),
                         affine=bool(getattr(m, "affine", w is not None)), **common)
    raise ValueError(f"family={family!r}: expected one of {', '.join(FAMILIES)}")


def torch_layout(m: nn.Module, family: str) -> Optional[str]:
    """The layout torch's own class fixes, or None when it must be probed."""
    if family == "batchnorm":
        for cls, layout in ((nn.BatchNorm1d, "1d"), (nn.BatchNorm2d, "2d"), (nn.BatchNorm3d, "3d")):
            if isinstance(m, cls):
                return layout
        return "2d" if isinstance(m, FROZEN_TYPES) else "any"
    if family == "instancenorm":
        for cls, layout in ((nn.InstanceNorm1d, "1d"), (nn.InstanceNorm2d, "2d"), (nn.InstanceNorm3d, "3d")):
            if isinstance(m, cls):
                return layout
        return None
    if family == "groupnorm":
        return "any"
    if family == "layernorm":
        return "last" if type(m).forward is nn.LayerNorm.forward else None
    return None


def find_module_sites(model: nn.Module) -> List[Site]:
    """Every norm module of ``model`` (not descending into a norm module).

    A module reachable under several names is one site; its other names are
    ``aliases`` (all of them end on the one new module).
    """
    from .layout import probe_layout
    by_id: Dict[int, Site] = {}
    sites: List[Site] = []
    skip_prefixes: List[str] = []
    for name, m in model.named_modules(remove_duplicate=False):
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        fam = module_family(m)
        if fam is None:
            continue
        skip_prefixes.append(name + ".")
        if id(m) in by_id:
            by_id[id(m)].aliases.append(name)
            continue
        site = Site(name=name, kind="module", family=fam, original=type(m).__name__,
                    types=type_names(m), module=m)
        layout, channels_last_out = torch_layout(m, fam), False   # (torch's norms keep the input's format)
        if layout is None:
            probed = probe_layout(m, fam)
            layout, site.skip_reason, channels_last_out = probed.layout, probed.reason, probed.channels_last_out
        if layout is not None:
            site.facts = replace(module_facts(m, fam, layout), channels_last_out=channels_last_out)
        by_id[id(m)] = site
        sites.append(site)
    return sites
