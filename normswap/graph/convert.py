"""Build the module a site becomes: pick the layer for the site's layout, transfer
gamma/beta, convert running statistics, and say whether the function is preserved.

Running-statistics conversion from an L2 batch norm (running_var, eps) so that eval
mode gives the original outputs exactly:

    l1bn:    running_mad = sqrt(2/pi) * (sqrt(running_var + eps) - eps)
             => C_L1 * running_mad + eps == sqrt(running_var + eps)
    topkbn:  running_std = sqrt(running_var + eps) - eps
    bn-s:    running_var kept; eval divides by sqrt(running_var + sigma^2 + eps), so the
             function changes unless sigma == 0

(PAPERS.md gives ``running_mad = sqrt(2/pi) * sqrt(running_var + eps)``; the ``- eps``
makes the match exact rather than within eps.)
"""
from __future__ import annotations

import math
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .. import norms as N
from ..norms.base import register_normalizer
from .sites import Site


class LayoutError(ValueError):
    """The site's layout and the requested layer's normalized area do not fit."""


BATCH_CLASSES = {
    "l1bn": {"1d": N.L1BatchNorm1d, "2d": N.L1BatchNorm2d, "3d": N.L1BatchNorm3d},
    "topkbn": {"1d": N.TopKBatchNorm1d, "2d": N.TopKBatchNorm2d, "3d": N.TopKBatchNorm3d},
    "bn-s": {"1d": N.BatchNormStar1d, "2d": N.BatchNormStar2d, "3d": N.BatchNormStar3d},
    "meanonly": {"1d": N.MeanOnlyBatchNorm1d, "2d": N.MeanOnlyBatchNorm2d, "3d": N.MeanOnlyBatchNorm3d},
}

_ACT_CLASSES: Dict[type, type] = {}


def act_class(base: type) -> type:
    """``base`` followed by ``drop`` then ``act``, as timm's *Act norms do (cached)."""
    if base in _ACT_CLASSES:
        return _ACT_CLASSES[base]

    def forward(self, x):
        return self.act(self.drop(base.forward(self, x)))

    name = base.__name__ + "Act"
    cls = type(name, (base,), {"forward": forward, "__module__": __name__, "__qualname__": name,
                               "__doc__": f"{base.__name__}, then the site's drop and activation."})
    register_normalizer(cls)
    setattr(sys.modules[__name__], name, cls)  # importable, so picklable
    _ACT_CLASSES[base] = cls
    return cls


def _share_or_copy(new: nn.Module, attr: str, src: Optional[torch.Tensor]) -> bool:
    """Give ``new.attr`` the source parameter (same object when compatible)."""
    dst = getattr(new, attr, None)
    if dst is None or src is None or tuple(dst.shape) != tuple(src.shape):
        return False
    if isinstance(src, nn.Parameter):
        setattr(new, attr, src)
    else:  # a buffer (frozen batch norm): copy its values into the trainable parameter
        with torch.no_grad():
            dst.copy_(src.detach().to(dst.dtype))
    return True


def attach_act(new: nn.Module, f: Dict[str, Any]) -> nn.Module:
    """Give ``new`` the drop and activation of a timm *Act norm site (if it had them)."""
    if f.get("act") is not None:
        new.__class__ = act_class(type(new))
        new.drop = f["drop"] if f.get("drop") is not None else nn.Identity()
        new.act = f["act"]
    return new


def finish(new: nn.Module, f: Dict[str, Any]) -> nn.Module:
    """Device, dtype, activation and training mode of the site it replaces."""
    new = new.to(device=f["device"])
    if f["dtype"] in (torch.float64, torch.float16, torch.bfloat16):
        new = new.to(dtype=f["dtype"])
    attach_act(new, f)
    new.train(f["training"])
    return new


def _batch_layout(site: Site, f, variant: str) -> Tuple[type, Dict[str, Any]]:
    layout = f["layout"]
    extra: Dict[str, Any] = {}
    if layout == "last":
        if len(f["normalized_shape"]) != 1:
            raise LayoutError(f"{site.name}: {site.original} normalizes {len(f['normalized_shape'])} "
                              f"trailing dims {f['normalized_shape']}; a batch norm needs one channel "
                              f"dim. Exclude this site or send it to 'ln-s' / 'keep'.")
        extra["channel_dim"] = -1
        cls = BATCH_CLASSES[variant]["1d"]
    elif layout == "any":
        cls = BATCH_CLASSES[variant]["2d"]
    else:
        cls = BATCH_CLASSES[variant][layout]
    return cls, extra


def site_momentum(f: Dict[str, Any], kw: Dict[str, Any]):
    """The spec's momentum, else the site's own (batch norms), else 0.1."""
    return kw.get("momentum", f.get("momentum", 0.1) if f["family"] == "batchnorm" else 0.1)


def new_batch_norm(site: Site, f: Dict[str, Any], variant: str, **args) -> nn.Module:
    """The batch-statistics layer of ``variant`` laid out for the site, on its device."""
    cls, extra = _batch_layout(site, f, variant)
    new = cls(f["num_features"], device=f["device"], **args, **extra)
    if f["layout"] == "any":
        new._dims = (2, 3, 4, 5)  # SyncBatchNorm / GroupNorm sites accept any rank
    return new


def build_batch(site: Site, variant: str, kw: Dict[str, Any]) -> Tuple[nn.Module, bool, Optional[str]]:
    f = site.facts()
    from_bn = f["family"] == "batchnorm"
    args: Dict[str, Any] = {}
    if variant == "meanonly":
        args["bias"] = kw.get("bias", True)
    else:
        args["eps"] = kw.get("eps", f["eps"])
        args["affine"] = kw.get("affine", f.get("affine", True))
    args["momentum"] = site_momentum(f, kw)
    track = kw.get("track_running_stats", f.get("track_running_stats", True) if from_bn else True)
    args["track_running_stats"] = track
    for key in ("k", "sigma", "learn_sigma", "l1_alpha", "sync"):
        if key in kw:
            args[key] = kw[key]
    new = new_batch_norm(site, f, variant, **args)
    _share_or_copy(new, "weight", f.get("weight"))
    _share_or_copy(new, "bias", f.get("bias"))

    preserves, note = False, None
    rm, rv = f.get("running_mean"), f.get("running_var")
    if not from_bn:
        note = f"per-example statistics of {site.original} replaced by batch statistics"
    elif track and rm is not None and rv is not None:
        eps = f["eps"]
        with torch.no_grad():
            new.running_mean.copy_(rm.to(new.running_mean.dtype))
            std = torch.sqrt(rv.to(torch.float64) + eps)
            if variant == "l1bn":
                new.running_mad.copy_(math.sqrt(2 / math.pi) * (std - args["eps"]))
                preserves = True
            elif variant == "topkbn":
                new.running_std.copy_(std - args["eps"])
                preserves = True
            elif variant == "bn-s":
                new.running_var.copy_(rv)
                sigma = float(args.get("sigma", 1.0))
                preserves = sigma == 0.0 and args["eps"] == eps
                if not preserves:
                    note = f"sigma={sigma:g} > 0 adds to the variance: eval outputs change"
            else:
                note = "mean-only batch norm drops the scaling: outputs change"
            if hasattr(new, "num_batches_tracked") and hasattr(site.module, "num_batches_tracked") \
                    and site.module is not None and site.module.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(site.module.num_batches_tracked)
        if preserves and f.get("frozen"):
            note = "was frozen: now a trainable batch norm (eval outputs preserved)"
    else:
        note = "no running statistics to convert"
    return finish(new, f), preserves, note


def build_ln(site: Site, variant: str, kw: Dict[str, Any]) -> Tuple[nn.Module, bool, Optional[str]]:
    f = site.facts()
    sigma = float(kw.get("sigma", 0.5))
    affine = bool(kw.get("affine", False))
    common = dict(sigma=sigma, eps=kw.get("eps", f["eps"]), learn_sigma=kw.get("learn_sigma", False),
                  l1_alpha=kw.get("l1_alpha", 0.0), device=f["device"])
    fam, layout = f["family"], f["layout"]
    if fam == "layernorm" and layout == "last":
        new = N.LayerNormStar(f["normalized_shape"], elementwise_affine=affine,
                              bias=f.get("bias") is not None or not affine, **common)
    elif layout == "2d" and fam in ("layernorm", "batchnorm"):
        new = N.LayerNormStar2d(f["num_features"], affine=affine, **common)
    else:
        raise LayoutError(f"{site.name}: 'ln-s' normalizes per example over the channels; a "
                          f"{site.original} site ({fam}, layout {layout}) has no matching area "
                          f"(its input may be (N, C, L) or grouped). Send it to 'dn', a batch "
                          f"norm preset, or 'keep'.")
    if affine:
        _share_or_copy(new, "weight", f.get("weight"))
        _share_or_copy(new, "bias", f.get("bias"))
    preserves = fam == "layernorm" and sigma == 0.0 and (affine or f.get("weight") is None)
    note = None if preserves else (
        f"sigma={sigma:g}" + ("" if affine or not f.get("affine") else ", affine dropped")
        + ("" if fam == "layernorm" else f", per-example statistics replace {fam}")
        + ": outputs change")
    return finish(new, f), preserves, note


def build_dn(site: Site, variant: str, kw: Dict[str, Any]) -> Tuple[nn.Module, bool, Optional[str]]:
    f = site.facts()
    affine = bool(kw.get("affine", False))
    common = dict(sigma=float(kw.get("sigma", 0.5)), learn_sigma=kw.get("learn_sigma", False),
                  affine=affine, eps=kw.get("eps", 1e-5), l1_alpha=kw.get("l1_alpha", 0.0),
                  device=f["device"])
    layout = f["layout"]
    if layout in ("2d", "any"):
        new = N.DivisiveNorm2d(kw.get("sum_window", 5), kw.get("sup_window", 5),
                               num_channels=f["num_features"], **common)
    elif layout == "1d":
        new = N.DivisiveNorm1d(kw.get("radius", 30), sup_radius=kw.get("sup_radius"),
                               num_features=f["num_features"], dim=1, **common)
    elif layout == "last" and len(f["normalized_shape"]) == 1:
        new = N.DivisiveNorm1d(kw.get("radius", 30), sup_radius=kw.get("sup_radius"),
                               num_features=f["num_features"], dim=-1, **common)
    else:
        raise LayoutError(f"{site.name}: 'dn' has 2d (N, C, H, W) and 1d (window over units) forms; "
                          f"a {site.original} site with layout {layout} fits neither. Exclude it or "
                          f"send it to another preset.")
    if affine:
        _share_or_copy(new, "weight", f.get("weight"))
        _share_or_copy(new, "bias", f.get("bias"))
    return finish(new, f), False, "local statistics replace the original area: outputs change"


BUILDERS: Dict[str, Callable[[Site, str, Dict[str, Any]], Tuple[nn.Module, bool, Optional[str]]]] = {
    "l1bn": build_batch, "topkbn": build_batch, "bn-s": build_batch, "meanonly": build_batch,
    "ln-s": build_ln, "dn": build_dn,
}


def build(site: Site, variant: str, kw: Dict[str, Any]):
    """(new module, eval function preserved?, note). Raises LayoutError."""
    return BUILDERS[variant](site, variant, kw)
