"""What counts as a normalization site, and its facts (family, layout, sizes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..norms.base import NormalizerBase

FAMILIES = ("batchnorm", "layernorm", "groupnorm")

try:
    from torchvision.ops.misc import FrozenBatchNorm2d as _TvFrozenBN
except Exception:  # pragma: no cover - torchvision comes with timm
    _TvFrozenBN = None


def module_family(m: nn.Module) -> Optional[str]:
    """'batchnorm' / 'layernorm' / 'groupnorm' for a norm module, else None."""
    if isinstance(m, NormalizerBase):
        return None
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    if _TvFrozenBN is not None and isinstance(m, _TvFrozenBN):
        return "batchnorm"
    name = type(m).__name__
    if name.startswith("FrozenBatchNorm"):
        return "batchnorm"
    if isinstance(m, nn.LayerNorm):
        return "layernorm"
    if isinstance(m, nn.GroupNorm):
        return "groupnorm"
    return None


def type_names(m: nn.Module) -> List[str]:
    """Class names a type rule may use for this module: its class and its bases."""
    names = []
    for cls in type(m).__mro__:
        if cls in (nn.Module, object):
            break
        names.append(cls.__name__)
    return names


@dataclass
class Site:
    """One normalization in a model: a module, or a functional call inside a forward."""
    name: str                       # qualified name of the (new) module
    kind: str                       # "module" | "functional"
    family: str                     # batchnorm | layernorm | groupnorm
    original: str                   # class name, or "F.layer_norm" ...
    types: List[str] = field(default_factory=list)
    module: Optional[nn.Module] = None      # the original module (module sites)
    owner: Optional[str] = None             # functional: module whose forward makes the call
    call: Optional[Dict[str, Any]] = None   # functional: the call's arguments (see functional.py)
    skip_reason: Optional[str] = None       # set when the site cannot be rewritten at all

    # decided by the plan
    becomes: Optional[str] = None
    preset: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    status: str = "pending"                 # converted | kept | skipped | excluded | unmatched
    reason: Optional[str] = None
    preserves_function: Optional[bool] = None
    note: Optional[str] = None

    def facts(self) -> Dict[str, Any]:
        """Shape facts a builder needs, from the module or the functional call."""
        if self.kind == "module":
            return module_facts(self.module)
        return dict(self.call["facts"])


def module_facts(m: nn.Module) -> Dict[str, Any]:
    fam = module_family(m)
    name = type(m).__name__
    f: Dict[str, Any] = {"family": fam, "class": name}
    w = getattr(m, "weight", None)
    ref = next((t for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
                if t is not None and t.is_floating_point()), None)
    f["device"] = ref.device if ref is not None else torch.device("cpu")
    f["dtype"] = ref.dtype if ref is not None else torch.get_default_dtype()
    f["training"] = m.training
    f["act"] = getattr(m, "act", None) if "Act" in name else None
    f["drop"] = getattr(m, "drop", None) if "Act" in name else None
    f["weight"] = w if isinstance(w, torch.Tensor) else None
    b = getattr(m, "bias", None)
    f["bias"] = b if isinstance(b, torch.Tensor) else None
    f["eps"] = float(getattr(m, "eps", 1e-5))
    if fam == "batchnorm":
        f["num_features"] = int(getattr(m, "num_features", None) or m.weight.shape[0])
        f["momentum"] = getattr(m, "momentum", 0.1)
        f["affine"] = isinstance(getattr(m, "weight", None), nn.Parameter)
        f["running_mean"] = getattr(m, "running_mean", None)
        f["running_var"] = getattr(m, "running_var", None)
        f["track_running_stats"] = f["running_mean"] is not None
        f["frozen"] = name.startswith("FrozenBatchNorm")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            dims = {"BatchNorm1d": "1d", "BatchNorm2d": "2d", "BatchNorm3d": "3d"}
            f["layout"] = next((dims[t] for t in type_names(m) if t in dims), "any")
        else:
            f["layout"] = "2d"
        f["channel_dim"] = 1
    elif fam == "layernorm":
        shape = tuple(m.normalized_shape)
        f["normalized_shape"] = shape
        f["affine"] = bool(getattr(m, "elementwise_affine", True)) and f["weight"] is not None
        # timm's *2d layer norms normalize the channels of an NCHW tensor
        f["layout"] = "2d" if name.endswith("2d") else "last"
        f["num_features"] = shape[-1] if f["layout"] == "last" else int(shape[0])
        f["channel_dim"] = 1 if f["layout"] == "2d" else -1
    elif fam == "groupnorm":
        f["num_features"] = int(m.num_channels)
        f["num_groups"] = int(m.num_groups)
        f["affine"] = bool(m.affine)
        f["layout"] = "any"
        f["channel_dim"] = 1
    return f


def find_module_sites(model: nn.Module) -> List[Site]:
    """Every norm module of ``model`` (not descending into a norm module)."""
    sites: List[Site] = []
    skip_prefixes: List[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        fam = module_family(m)
        if fam is None:
            continue
        sites.append(Site(name=name, kind="module", family=fam, original=type(m).__name__,
                          types=type_names(m), module=m))
        skip_prefixes.append(name + ".")
    return sites
