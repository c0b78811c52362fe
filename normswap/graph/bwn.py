"""The ``bwn`` / ``bwn-g`` variant: a rewrite of two nodes at once.

For each matched norm site whose input is produced by a conv/linear with no other
user: put :func:`bounded_weight_norm` on the producer and replace the norm with
mean-only batch norm (bias from the old beta). Other sites are skipped with the
reason, or sent to ``fallback`` (a preset name or ``{"to": preset, **kwargs}``, e.g.
``"l1"`` for every family); keywords given to ``bwn`` that the fallback accepts pass
through to it.

``bwn-g`` (``learn_gain=True``) folds the old batch norm's eval-mode scale
``s = gamma / sqrt(running_var + eps)`` into the learned gain (``g_i = s_i * ||w_i||_p``,
conv bias ``s * b``, running mean ``s * running_mean``), so the converted model in eval
mode gives the original outputs. With the fixed-rho ``bwn`` every output channel gets the same
norm ``rho``, so the function necessarily changes (the report says so).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import args as A
from ..norms.bwn import _CONV_T, _p_value, bounded_weight_norm, out_channel_view
from ..variants import (PRESETS, VARIANTS, Built, LayoutError, MeanOnlyBatch, Preset, Variant,
                        VariantError, finish, register_preset, register_variant, site_momentum)
from .producers import _out_channels
from .sites import SiteFacts


def _fallback_value(v):
    if isinstance(v, str):
        to, kw = v, {}
    elif isinstance(v, Mapping) and isinstance(v.get("to"), str):
        kw = dict(v)
        to = kw.pop("to")
    else:
        raise ValueError
    if to not in PRESETS or PRESETS[to].variant == "bwn":
        raise ValueError
    return {"to": to, **kw}


FALLBACK = A.Arg("fallback", _fallback_value,
                 "a preset name other than bwn/bwn-g, or {'to': preset, **kwargs}",
                 "where sites that bwn cannot rewrite go")


@dataclass
class ProducerRewrite:
    """The change bwn makes to a site's producer: ``apply`` then, on failure, ``undo``."""
    producer: str
    apply: Callable[[], None]
    undo: Callable[[], None]


class BoundedWeightNormVariant(Variant):
    name = "bwn"
    rewrites_producer = True
    args = (A.Arg("p", A.p_norm, "1, 2 or 'inf'", "the weight's norm"),
            A.Arg("rho", A.number(0.0, strict=True, allow_none=True), "a number > 0 or None",
                  "fixed norm per output channel (None: mean initial norm)"),
            A.Arg("learn_gain", A.boolean, "True or False", "learned gain of fixed L2 norm (bwn-g)"),
            A.MOMENTUM, A.L1_ALPHA, A.SYNC, FALLBACK)
    defaults = {"p": 2}
    summary = "bounded weight norm on the producing conv/linear + mean-only batch norm (Hoffer et al. 2018)"
    formula = "w_i = rho * v_i / ||v_i||_p (rho fixed per layer); then y = x - mu + beta"

    def check(self, kwargs, where):
        """Own keywords, plus those the fallback accepts (kept, passed through to it)."""
        own = {k: v for k, v in kwargs.items() if k in self.accepted()}
        out = super().check(own, where)
        rest = {k: v for k, v in kwargs.items() if k not in own}
        if rest and out.get("fallback") is None:
            raise VariantError(f"{where}: unknown argument(s) {', '.join(sorted(rest))} for 'bwn'; "
                               f"accepted: {', '.join(self.accepted())} (or any keyword of the "
                               f"fallback preset when 'fallback' is given)")
        if out.get("fallback") is not None:
            fkw = self.fallback_kwargs({**out, **rest}, where)
            unused = sorted(set(rest) - set(fkw))
            if unused:
                raise VariantError(f"{where}: argument(s) {', '.join(unused)} are accepted neither by "
                                   f"'bwn' nor by its fallback {out['fallback']['to']!r}")
            out.update({k: fkw[k] for k in rest})
        return out

    def fallback_kwargs(self, kw: Dict[str, Any], where: str = "bwn") -> Dict[str, Any]:
        """The fallback's checked keywords: its preset's defaults, then the keywords given
        to bwn that it accepts, then those of the fallback rule itself."""
        rule = dict(kw["fallback"])
        preset = PRESETS[rule.pop("to")]
        variant = VARIANTS[preset.variant]
        passed = {k: v for k, v in kw.items() if k in variant.accepted() and k != "fallback"}
        return variant.check({**preset.defaults, **passed, **rule}, f"{where} fallback {preset.name!r}")

    def fold(self, module, original):
        """The mean-only norm folds like any batch norm (the weight norm folds into the
        conv's plain weight separately)."""
        return MeanOnlyBatch().fold(module, original)

    def scale_invariant(self, kw, family):
        return False   # the direction v is scale invariant; handled through the parametrization

    def plan_site(self, model: nn.Module, f: SiteFacts, kw: Dict[str, Any],
                  producer: str) -> Tuple[Built, ProducerRewrite]:
        """Build (not apply) the mean-only norm and the change of the producer."""
        conv = model.get_submodule(producer)
        if _out_channels(conv) != f.num_features:
            raise LayoutError(f"{producer} has {_out_channels(conv)} output channels, the norm {f.num_features}")
        if parametrize.is_parametrized(conv, "weight"):
            raise LayoutError(f"{producer}'s weight is already parametrized")
        norm = MeanOnlyBatch().build(f, {"momentum": site_momentum(f, kw), "affine": True,
                                         "l1_alpha": kw.get("l1_alpha", 0.0), "sync": kw.get("sync", False),
                                         "track_running_stats": True}).module
        learn_gain = bool(kw.get("learn_gain", False))
        rm, rv, eps = f.running_mean, f.running_var, f.eps
        p = kw.get("p", 2)
        transposed = isinstance(conv, _CONV_T)
        groups = getattr(conv, "groups", 1) if transposed else 1
        scale = gain = new_bias = None
        with torch.no_grad():
            if f.bias is not None:
                norm.bias.copy_(f.bias.detach())
            else:
                norm.bias.zero_()
            if learn_gain and f.family == "batchnorm" and rm is not None and rv is not None:
                scale = torch.rsqrt(rv.detach().double() + eps)
                if f.weight is not None:
                    scale = scale * f.weight.detach().double()
                norm.running_mean.copy_(rm.double() * scale)
                preserves, note = True, "BN scale folded into the weight (eval outputs kept)"
                # g_i = s_i * ||w_i||_p, so g_i * v_i / ||v_i|| = s_i * w_i (not folded into v,
                # which may then be 0)
                norms = out_channel_view(conv.weight.detach(), transposed, groups).double().norm(
                    _p_value(p), dim=1)
                gain = (scale * norms).to(conv.weight.dtype)
                if conv.bias is not None:
                    new_bias = conv.bias.detach() * scale.to(conv.bias.dtype)
            else:
                if rm is not None:
                    norm.running_mean.copy_(rm)
                preserves = False
                note = ("every output channel gets the fixed norm rho: outputs change" if not learn_gain
                        else "no running statistics to fold: outputs change")
        weight, old_bias = conv.weight, conv.bias.detach().clone() if conv.bias is not None else None

        def apply():
            if new_bias is not None:
                with torch.no_grad():
                    conv.bias.copy_(new_bias)
            bounded_weight_norm(conv, p=p, rho=kw.get("rho"), learn_gain=learn_gain, gain=gain)

        def undo():
            if parametrize.is_parametrized(conv, "weight"):
                parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)
            conv.weight = weight
            if old_bias is not None:
                with torch.no_grad():
                    conv.bias.copy_(old_bias)

        return (Built(norm, preserves, f"{note}; weight norm on {producer}"),
                ProducerRewrite(producer, apply, undo))


register_variant(BoundedWeightNormVariant(), preset=False)
register_preset(Preset("bwn", "bwn", {"p": 2}, None, BoundedWeightNormVariant.summary,
                       BoundedWeightNormVariant.formula))
register_preset(Preset(
    "bwn-g", "bwn", {"p": 2, "learn_gain": True}, None,
    "bounded weight norm with a learned gain of fixed L2 norm; folds a pretrained BN (eval outputs kept)",
    "w_i = g_i * v_i / ||v_i||_p with ||g||_2 fixed; then y = x - mu + beta"))
