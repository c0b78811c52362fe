"""The ``bwn`` / ``bwn-g`` presets: a rewrite of two nodes at once.

For each matched norm site whose input is produced by a conv/linear with no other
user: put :func:`bounded_weight_norm` on the producer and replace the norm with
mean-only batch norm (bias from the old beta). Other sites are skipped with the
reason, or sent to ``fallback`` (a preset name, e.g. ``"l1bn"``).

``bwn-g`` (``learn_gain=True``) folds the old batch norm's eval-mode scale
``s = gamma / sqrt(running_var + eps)`` into the learned gain (``g_i = s_i * ||w_i||_p``,
conv bias ``s * b``, running mean ``s * running_mean``), so the converted model in eval
mode gives the original outputs. With the fixed-rho ``bwn`` every output channel gets the same
norm ``rho``, so the function necessarily changes (the report says so).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from .. import norms as N
from ..norms.bwn import bounded_weight_norm
from ..spec import PRESETS, Preset, register_preset
from .convert import LayoutError, build, finish, new_batch_norm, site_momentum
from .producers import _out_channels, norm_producers
from .sites import Site

register_preset(Preset(
    "bwn", "bwn", ("batchnorm", "layernorm", "groupnorm"), {"p": 2},
    "w_i = rho * v_i / ||v_i||_p (rho fixed per layer); then y = x - mu + beta",
    "bounded weight norm on the producing conv/linear + mean-only batch norm (Hoffer et al. 2018)"))
register_preset(Preset(
    "bwn-g", "bwn", ("batchnorm", "layernorm", "groupnorm"), {"p": 2, "learn_gain": True},
    "w_i = g_i * v_i / ||v_i||_p with ||g||_2 fixed; then y = x - mu + beta",
    "bounded weight norm with a learned gain of fixed L2 norm; folds a pretrained BN (eval outputs kept)"))

def _plan_site(model: nn.Module, site: Site, kw: Dict[str, Any], producer: str):
    """Build (not apply) the mean-only norm and the conv change for one site."""
    f = site.facts()
    conv = model.get_submodule(producer)
    C = f["num_features"]
    if _out_channels(conv) != C:
        raise LayoutError(f"{producer} has {_out_channels(conv)} output channels, the norm {C}")
    norm = new_batch_norm(site, f, "meanonly", momentum=site_momentum(f, kw), bias=True,
                          l1_alpha=kw.get("l1_alpha", 0.0), sync=kw.get("sync", False))
    learn_gain = bool(kw.get("learn_gain", False))
    rm, rv, eps = f.get("running_mean"), f.get("running_var"), f["eps"]
    gamma, beta = f.get("weight"), f.get("bias")
    with torch.no_grad():
        if beta is not None:
            norm.bias.copy_(beta.detach())
        scale = None
        if learn_gain and f["family"] == "batchnorm" and rm is not None and rv is not None:
            scale = torch.rsqrt(rv.detach().double() + eps)
            if gamma is not None:
                scale = scale * gamma.detach().double()
            norm.running_mean.copy_(rm.double() * scale)
            preserves, note = True, "BN scale folded into the weight (eval outputs kept)"
        else:
            if rm is not None:
                norm.running_mean.copy_(rm)
            preserves = False
            note = ("every output channel gets the fixed norm rho: outputs change" if not learn_gain
                    else "no running statistics to fold: outputs change")
    norm = finish(norm, f)

    def apply_conv():
        gain = None
        if scale is not None:
            # fold the BN scale into the gain (not into v, which may then be 0):
            # g_i = s_i * ||w_i||_p, so g_i * v_i / ||v_i|| = s_i * w_i
            from ..norms.bwn import _p_value, out_channel_view
            transposed = isinstance(conv, N.bwn._CONV_T)
            groups = getattr(conv, "groups", 1) if transposed else 1
            with torch.no_grad():
                norms = out_channel_view(conv.weight.detach(), transposed, groups).double().norm(
                    _p_value(kw.get("p", 2)), dim=1)
                gain = (scale * norms).to(conv.weight.dtype)
                if conv.bias is not None:
                    conv.bias.mul_(scale.to(conv.bias.dtype))
        bounded_weight_norm(conv, p=kw.get("p", 2), rho=kw.get("rho"), learn_gain=learn_gain, gain=gain)
    return norm, preserves, note, apply_conv


def bwn_hook(model: nn.Module, jobs: List[Tuple[Site, str, Dict[str, Any]]], new_modules: Dict[str, nn.Module],
             build_modules: bool, leaf_modules) -> List[Callable[[], None]]:
    producers, failed = norm_producers(model, leaf_modules)
    applies: List[Callable[[], None]] = []
    used_producers = set()
    for site, _, kw in jobs:
        prod = producers.get(site.name)
        reason = None
        if site.kind != "module":
            reason = "bwn rewrites norm modules only, not functional calls"
        elif prod is None:
            reason = "not reached by a traced forward (" + (
                "; ".join(f"{n or 'model'}: {e}" for n, e in failed[:2]) or "never called") + ")"
        elif prod.producer is None:
            reason = prod.reason
        elif prod.producer in used_producers:
            reason = f"{prod.producer} already feeds another converted norm"
        if reason is None:
            try:
                norm, preserves, note, apply_conv = _plan_site(model, site, kw, prod.producer)
            except LayoutError as e:
                reason = str(e)
        if reason is not None:
            fallback = kw.get("fallback")
            if fallback:
                fp = PRESETS[fallback]
                if site.family in fp.families and fp.variant not in ("bwn", "keep"):
                    fkw = {**fp.defaults, **{k: v for k, v in kw.items() if k in ("l1_alpha", "sync")}}
                    try:
                        mod, pres, fnote = build(site, fp.variant, fkw)
                        site.status, site.becomes, site.preset, site.kwargs = "converted", type(mod).__name__, fallback, fkw
                        site.preserves_function = pres
                        site.note = f"bwn fallback ({reason})" + (f"; {fnote}" if fnote else "")
                        if build_modules:
                            new_modules[site.name] = mod
                        continue
                    except LayoutError as e:
                        reason += f"; fallback {fallback!r}: {e}"
                if fp.variant == "keep":
                    site.status, site.reason = "kept", f"bwn fallback keep ({reason})"
                    continue
            site.status, site.reason = "skipped", reason
            continue
        used_producers.add(prod.producer)
        site.status, site.becomes = "converted", type(norm).__name__
        site.preserves_function, site.note = preserves, f"{note}; weight norm on {prod.producer}"
        if build_modules:
            new_modules[site.name] = norm
            applies.append(apply_conv)
    return applies
