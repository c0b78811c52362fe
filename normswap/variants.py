"""The variant registry: one object per normalization a site can become.

A :class:`Variant` owns everything about one target normalization: its name, the
keywords it accepts (with defaults and value checks, :mod:`normswap.args`), which site
families and layouts it can replace, how it builds the new module from a site's
:class:`~normswap.graph.sites.SiteFacts` (including the exact conversion of running
statistics from an L2 batch norm where one exists), whether and how it folds back into
a vanilla ``BatchNorm`` for ``export``, and whether the conv/linear feeding it becomes
scale invariant per output channel.

A :class:`Preset` names a variant plus default keywords and the site families the
global preset applies to. Add your own normalizer from outside the package with one
call::

    import normswap
    from normswap.variants import Variant, Built

    class MyVariant(Variant):
        name = "mynorm"
        families = ("batchnorm",)
        def build(self, facts, kw):
            return Built(MyNorm(facts.num_features))

    normswap.register_variant(MyVariant())      # also registers preset "mynorm"
    model = normswap.transform(model, "mynorm")
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import args as A
from . import norms as N
from .graph.act import attach_act
from .graph.sites import FAMILIES, SiteFacts


class LayoutError(ValueError):
    """The site's layout and the variant's normalized area do not fit (the site is skipped)."""


class FoldError(ValueError):
    """A converted site that cannot be written as the original vanilla layer."""


class VariantError(ValueError):
    """Bad keywords for a variant, or an unknown variant; says what is accepted."""


@dataclass
class Built:
    """What a variant made for one site."""
    module: nn.Module
    preserves_function: bool = False   # eval outputs equal the original's
    note: Optional[str] = None         # where the function changes, and why


class Variant:
    """One target normalization. Subclass and set the class attributes, then
    :func:`register_variant` an instance.

    Attributes:
        name: registry key (also the preset registered with it by default).
        summary, formula: one line each, for ``normswap presets`` and the docs.
        families: the site families it can replace.
        args: the keywords it accepts (:class:`normswap.args.Arg`).
        defaults: keyword defaults of the preset registered with it.
        rewrites_producer: it also rewrites the conv/linear feeding the site (bwn).
    """
    name: str = ""
    summary: str = ""
    formula: str = ""
    families: Tuple[str, ...] = FAMILIES
    args: Tuple[A.Arg, ...] = ()
    defaults: Mapping[str, Any] = {}
    rewrites_producer: bool = False

    # -- keywords ------------------------------------------------------------------
    def accepted(self) -> Dict[str, A.Arg]:
        return {a.name: a for a in self.args}

    def check(self, kwargs: Mapping[str, Any], where: str) -> Dict[str, Any]:
        """Validated keywords (names and values); raises VariantError naming ``where``."""
        accepted = self.accepted()
        bad = sorted(set(kwargs) - set(accepted))
        if bad:
            raise VariantError(f"{where}: unknown argument(s) {', '.join(bad)} for {self.name!r}; "
                               f"accepted: {', '.join(accepted) or 'none'}")
        out = {}
        for key, value in kwargs.items():
            try:
                out[key] = accepted[key].check(value)
            except ValueError as e:
                raise VariantError(f"{where}: {self.name!r}: {e}") from None
        return out

    # -- what it does to a site -------------------------------------------------------
    def build(self, facts: SiteFacts, kw: Dict[str, Any]) -> Built:
        """The new module for a site (on the site's device, dtype, training mode)."""
        raise NotImplementedError

    def scale_invariant(self, kw: Dict[str, Any], family: str) -> bool:
        """Whether a conv/linear feeding this variant (at a site of ``family``) is scale
        invariant per output channel: its statistics are per channel and unsmoothed."""
        return False

    def fold(self, module: nn.Module, original: "Original") -> Dict[str, torch.Tensor]:
        """Tensors of the original vanilla layer computing the eval-mode function."""
        raise FoldError(f"{type(module).__name__} ({self.name}) does not fold into a "
                        f"{original.cls}: per-example or local statistics have no BatchNorm form")

    def __repr__(self) -> str:
        return f"<variant {self.name}>"


@dataclass(frozen=True)
class Original:
    """What a converted site was, recorded for folding back (``export``)."""
    family: str
    cls: str
    eps: float
    affine: bool
    num_batches_tracked: bool


@dataclass(frozen=True)
class Preset:
    """A named conversion: a variant, default keywords, the families it applies to."""
    name: str
    variant: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    families: Optional[Tuple[str, ...]] = None   # None: the variant's families
    summary: str = ""
    formula: str = ""

    def applies_to(self) -> Tuple[str, ...]:
        return self.families if self.families is not None else VARIANTS[self.variant].families


VARIANTS: Dict[str, Variant] = {}
PRESETS: Dict[str, Preset] = {}


def register_variant(variant: Variant, *, preset: bool = True, replace: bool = False) -> Variant:
    """Add a variant to the registry (and a preset of the same name with its defaults).

    Raises VariantError if the name is taken (``replace=True`` to override).
    """
    if not isinstance(variant, Variant):
        raise VariantError(f"variant={variant!r}: expected a normswap.variants.Variant instance")
    if not variant.name or not isinstance(variant.name, str):
        raise VariantError(f"variant {type(variant).__name__} needs a non-empty string name")
    bad = [f for f in variant.families if f not in FAMILIES]
    if bad:
        raise VariantError(f"variant {variant.name!r}: unknown families {bad}; expected among {FAMILIES}")
    if variant.name in VARIANTS and not replace:
        raise VariantError(f"variant {variant.name!r} is already registered (pass replace=True)")
    variant.check(variant.defaults, f"defaults of {variant.name!r}")
    VARIANTS[variant.name] = variant
    if preset:
        register_preset(Preset(variant.name, variant.name, dict(variant.defaults),
                               summary=variant.summary, formula=variant.formula), replace=True)
    return variant


def register_preset(preset: Preset, *, replace: bool = False) -> Preset:
    """Add a preset naming a registered variant; its defaults are checked now."""
    if preset.variant not in VARIANTS:
        raise VariantError(f"preset {preset.name!r}: unknown variant {preset.variant!r}; "
                           f"registered: {', '.join(VARIANTS)}")
    if preset.name in PRESETS and not replace:
        raise VariantError(f"preset {preset.name!r} is already registered (pass replace=True)")
    VARIANTS[preset.variant].check(preset.defaults, f"defaults of preset {preset.name!r}")
    PRESETS[preset.name] = preset
    return preset


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise VariantError(f"unknown variant {name!r}; registered in this process: "
                           f"{', '.join(VARIANTS)} (register yours with normswap.register_variant)") from None


# -- helpers shared by the built-in variants -------------------------------------------
def share_or_copy(new: nn.Module, attr: str, src: Optional[torch.Tensor]) -> bool:
    """Give ``new.attr`` the source parameter (the same object when the shape fits)."""
    dst = getattr(new, attr, None)
    if dst is None or src is None or tuple(dst.shape) != tuple(src.shape):
        return False
    if isinstance(src, nn.Parameter):
        setattr(new, attr, src)
    else:  # a buffer (frozen batch norm): copy its values into the trainable parameter
        with torch.no_grad():
            dst.copy_(src.detach().to(dst.dtype))
    return True


def finish(new: nn.Module, f: SiteFacts, share_affine: bool = True) -> nn.Module:
    """Shared gamma/beta, device, dtype, activation and training mode of the site."""
    if share_affine:
        share_or_copy(new, "weight", f.weight)
        share_or_copy(new, "bias", f.bias)
    new = new.to(device=f.device)
    if f.dtype in (torch.float64, torch.float16, torch.bfloat16):
        new = new.to(dtype=f.dtype)
    attach_act(new, f.act, f.drop)
    new.train(f.training)
    return new


def site_momentum(f: SiteFacts, kw: Dict[str, Any]):
    """The spec's momentum, else the site's own (batch/instance norms), else 0.1."""
    if "momentum" in kw:
        return kw["momentum"]
    return f.momentum if f.family in ("batchnorm", "instancenorm") else 0.1


# per layout, the torch rank of a batch class
_BATCH_LAYOUT = {"1d": 0, "2d": 1, "3d": 2}


def batch_class(classes: Sequence[str], f: SiteFacts) -> Tuple[type, Dict[str, Any], bool]:
    """(class, extra kwargs, accepts any rank) of a batch-area layer laid out for ``f``."""
    if f.layout == "last":
        if len(f.normalized_shape or ()) != 1:
            raise LayoutError(f"{f.family} over {len(f.normalized_shape)} trailing dims "
                              f"{f.normalized_shape}: a batch norm needs one channel dim")
        return getattr(N, classes[0]), {"channel_dim": -1}, False
    if f.layout in _BATCH_LAYOUT:
        return getattr(N, classes[_BATCH_LAYOUT[f.layout]]), {}, False
    return getattr(N, classes[1]), {}, True   # "any": channels in dim 1, any rank


def copy_num_batches(new: nn.Module, f: SiteFacts) -> None:
    nbt = getattr(new, "num_batches_tracked", None)
    if isinstance(nbt, torch.Tensor) and f.num_batches_tracked is not None:
        nbt.copy_(f.num_batches_tracked)


# -- operations on the batch area --------------------------------------------------------
class BatchVariant(Variant):
    """Batch-statistics normalization (per channel over the batch and positions).

    ``stat`` picks the operation; the running statistics of an L2 batch norm site are
    converted so that eval outputs stay exactly the same where the operation allows:

        l1:    running_mad = sqrt(2/pi) * (sqrt(running_var + eps) - eps')
        topk:  running_std = sqrt(running_var + eps) - eps'
        l2:    running_var kept (eval outputs change unless sigma == 0 and eps' == eps)

    (``eps'`` is the new layer's eps; the ``- eps'`` makes the match exact.)
    """
    families = FAMILIES
    classes: Tuple[str, str, str] = ()
    stat: str = "l2"
    extra_args: Tuple[A.Arg, ...] = ()

    @property
    def args(self):  # type: ignore[override]
        base = (A.EPS, A.MOMENTUM, A.AFFINE, A.TRACK, A.L1_ALPHA, A.SYNC)
        if self.stat == "mean":
            base = (A.EPS, A.MOMENTUM, A.AFFINE, A.BIAS, A.TRACK, A.L1_ALPHA, A.SYNC)
        return base + self.extra_args

    def layer_kwargs(self, f: SiteFacts, kw: Dict[str, Any]) -> Dict[str, Any]:
        from_bn = f.family == "batchnorm"
        out = {"momentum": site_momentum(f, kw),
               "track_running_stats": kw.get("track_running_stats",
                                             f.track_running_stats if from_bn else True)}
        if self.stat == "mean":
            out["affine"] = kw.get("affine", kw.get("bias", True))
        else:
            out["eps"] = kw.get("eps", f.eps)
            out["affine"] = kw.get("affine", f.affine)
        for key in ("k", "sigma", "learn_sigma", "l1_alpha", "sync"):
            if key in kw:
                out[key] = kw[key]
        return out

    def build(self, f: SiteFacts, kw: Dict[str, Any]) -> Built:
        cls, extra, any_rank = batch_class(self.classes, f)
        args = self.layer_kwargs(f, kw)
        new = cls(f.num_features, device=f.device, **args, **extra)
        if any_rank:
            new._dims = (2, 3, 4, 5)
        preserves, note = self.convert_running_stats(new, f, args)
        return Built(finish(new, f), preserves, note)

    def convert_running_stats(self, new: nn.Module, f: SiteFacts, args) -> Tuple[bool, Optional[str]]:
        if f.family != "batchnorm":
            return False, f"per-example statistics of a {f.family} replaced by batch statistics"
        if not (args["track_running_stats"] and f.running_mean is not None and f.running_var is not None):
            return False, "no running statistics to convert"
        with torch.no_grad():
            new.running_mean.copy_(f.running_mean.to(new.running_mean.dtype))
            copy_num_batches(new, f)
            preserves, note = self.scale_from_variance(new, f, args)
        if preserves and f.frozen:
            note = "was frozen: now a trainable batch norm (eval outputs preserved)"
        return preserves, note

    def scale_from_variance(self, new, f: SiteFacts, args) -> Tuple[bool, Optional[str]]:
        return False, None

    def scale_invariant(self, kw, family):
        return True

    def fold(self, module: nn.Module, original: Original) -> Dict[str, torch.Tensor]:
        """``y = gamma (x - running_mean) / d + beta`` is a BatchNorm with
        ``running_var = d^2 - eps`` (``eps`` the original's)."""
        if original.family != "batchnorm":
            raise FoldError(f"{type(module).__name__} replaced a {original.cls}, not a batch norm")
        if not getattr(module, "track_running_stats", False):
            raise FoldError(f"{type(module).__name__} without running statistics cannot fold")
        with torch.no_grad():
            d = module._running_denominator().double()
            var = d * d - original.eps
            if (var < 0).any():
                raise FoldError("a scale below sqrt(eps) cannot be written as a BatchNorm variance")
            out = {"running_mean": module.running_mean.detach().clone().float(), "running_var": var.float()}
            w, b = getattr(module, "weight", None), getattr(module, "bias", None)
            gamma = w.detach().float() if w is not None else torch.ones_like(out["running_mean"])
            beta = b.detach().float() if b is not None else torch.zeros_like(out["running_mean"])
            if original.affine:
                out["weight"], out["bias"] = gamma.clone(), beta.clone()
            elif not (torch.all(gamma == 1) and torch.all(beta == 0)):
                raise FoldError("the original BatchNorm had no affine; the learned gamma/beta cannot fold")
            if original.num_batches_tracked:
                out["num_batches_tracked"] = module.num_batches_tracked.detach().clone()
        return out


class L1Batch(BatchVariant):
    name, stat = "l1bn", "l1"
    classes = ("L1BatchNorm1d", "L1BatchNorm2d", "L1BatchNorm3d")
    summary = "L1 batch norm (Hoffer et al. 2018): no squares, finite in fp16"
    formula = "y = gamma * (x - mu) / (sqrt(pi/2) * mean|x - mu| + eps) + beta"

    def scale_from_variance(self, new, f, args):
        std = torch.sqrt(f.running_var.double() + f.eps)
        new.running_mad.copy_(math.sqrt(2 / math.pi) * (std - args["eps"]))
        return True, None


class TopKBatch(BatchVariant):
    name, stat = "topkbn", "topk"
    classes = ("TopKBatchNorm1d", "TopKBatchNorm2d", "TopKBatchNorm3d")
    extra_args = (A.K,)
    defaults = {"k": 10}
    summary = "L-inf / top-k batch norm (Hoffer et al. 2018), k=10"
    formula = "y = gamma * (x - mu) / (C_inf(n) * mean(top-k |x - mu|) + eps) + beta"

    def scale_from_variance(self, new, f, args):
        new.running_std.copy_(torch.sqrt(f.running_var.double() + f.eps) - args["eps"])
        return True, None


class SigmaBatch(BatchVariant):
    name, stat = "bn-s", "l2"
    classes = ("BatchNormStar1d", "BatchNormStar2d", "BatchNormStar3d")
    extra_args = (A.SIGMA, A.LEARN_SIGMA)
    defaults = {"sigma": 1.0}
    summary = "batch norm with smoothing term sigma (Ren et al. 2017), sigma=1"
    formula = "y = gamma * (x - mu) / sqrt(sigma^2 + E[(x - mu)^2] + eps) + beta"

    def scale_from_variance(self, new, f, args):
        new.running_var.copy_(f.running_var)
        sigma = float(args.get("sigma", 1.0))
        if sigma == 0.0 and args["eps"] == f.eps:
            return True, None
        return False, f"sigma={sigma:g} > 0 adds to the variance: eval outputs change"

    def scale_invariant(self, kw, family):
        return float(kw.get("sigma", 1.0)) == 0.0


class MeanOnlyBatch(BatchVariant):
    name, stat = "meanonly", "mean"
    classes = ("MeanOnlyBatchNorm1d", "MeanOnlyBatchNorm2d", "MeanOnlyBatchNorm3d")
    summary = "mean-only batch norm (no scaling)"
    formula = "y = x - mu + beta"

    def scale_from_variance(self, new, f, args):
        return False, "mean-only batch norm drops the scaling: outputs change"

    def scale_invariant(self, kw, family):
        return False


# -- one operation on every site's own area -------------------------------------------------
class OwnArea(Variant):
    """An operation applied to each site's own area: a batch norm stays a batch norm,
    a layer norm a layer norm (trailing dims or channels-first), a group norm a group
    norm, an instance norm an instance norm; the operation changes.
    """
    op_prefix: str = "L1"
    batch: BatchVariant
    extra_args: Tuple[A.Arg, ...] = ()

    @property
    def args(self):  # type: ignore[override]
        return (A.EPS, A.MOMENTUM, A.AFFINE, A.TRACK, A.L1_ALPHA, A.SYNC) + self.extra_args

    def build(self, f: SiteFacts, kw: Dict[str, Any]) -> Built:
        if f.family == "batchnorm":
            return self.batch.build(f, kw)
        p = self.op_prefix
        extra = {k: kw[k] for k in ("k", "sigma", "learn_sigma") if k in kw}
        common = dict(eps=kw.get("eps", f.eps), l1_alpha=kw.get("l1_alpha", 0.0), device=f.device, **extra)
        affine = kw.get("affine", f.affine)
        if f.family == "layernorm" and f.layout == "last":
            new = getattr(N, f"{p}LayerNorm")(f.normalized_shape, elementwise_affine=affine,
                                              bias=f.bias is not None or not f.affine, **common)
        elif f.family == "layernorm" and f.layout == "2d":
            new = getattr(N, f"{p}LayerNorm2d")(f.num_features, affine=affine, **common)
        elif f.family == "groupnorm":
            new = getattr(N, f"{p}GroupNorm")(f.num_groups, f.num_features, affine=affine, **common)
        elif f.family == "instancenorm":
            new = getattr(N, f"{p}InstanceNorm{f.layout}")(
                f.num_features, momentum=site_momentum(f, kw), affine=affine,
                track_running_stats=kw.get("track_running_stats", f.track_running_stats), **common)
        else:
            raise LayoutError(f"{self.name!r} has no form for a {f.family} with layout {f.layout}")
        return Built(finish(new, f), False, f"{self.name} statistic replaces the L2 one: outputs change")

    def scale_invariant(self, kw, family):
        return family in ("batchnorm", "instancenorm")   # per-channel areas

    def fold(self, module, original):
        return self.batch.fold(module, original)


class L1Area(OwnArea):
    name, op_prefix, batch = "l1", "L1", L1Batch()
    summary = "L1 normalization on each site's own area (batch, layer, group, instance)"
    formula = "y = gamma * (x - mu) / (sqrt(pi/2) * mean_A|x - mu| + eps) + beta"


class TopKArea(OwnArea):
    name, op_prefix, batch = "topk", "TopK", TopKBatch()
    extra_args = (A.K,)
    defaults = {"k": 10}
    summary = "top-k (L-inf) normalization on each site's own area, k=10"
    formula = "y = gamma * (x - mu) / (C_inf(n_A) * mean(top-k_A |x - mu|) + eps) + beta"


# -- divisive normalization with sigma on per-example areas -------------------------------------
class SigmaVariant(Variant):
    """Shared keywords of the sigma (divisive normalization) family."""
    args = (A.SIGMA, A.LEARN_SIGMA, A.AFFINE, A.EPS, A.L1_ALPHA)

    def common(self, f: SiteFacts, kw) -> Dict[str, Any]:
        return dict(sigma=kw.get("sigma", 0.5), eps=kw.get("eps", f.eps),
                    learn_sigma=kw.get("learn_sigma", False), l1_alpha=kw.get("l1_alpha", 0.0),
                    device=f.device)


class LayerSigma(SigmaVariant):
    name = "ln-s"
    families = ("layernorm", "batchnorm")
    defaults = {"sigma": 0.5, "affine": False}
    summary = "layer norm with smoothing term sigma (Ren et al. 2017), sigma=0.5, no affine"
    formula = "y = (x - mu) / sqrt(sigma^2 + mean((x - mu)^2) + eps), per example, no affine"

    def build(self, f, kw):
        affine = kw.get("affine", False)
        c = self.common(f, kw)
        if f.family == "layernorm" and f.layout == "last":
            new = N.LayerNormStar(f.normalized_shape, elementwise_affine=affine,
                                  bias=f.bias is not None or not affine, **c)
        elif f.layout == "2d" and f.family in ("layernorm", "batchnorm"):
            new = N.LayerNormStar2d(f.num_features, affine=affine, **c)
        else:
            raise LayoutError(f"'ln-s' normalizes per example over the channels; a {f.family} with "
                              f"layout {f.layout} has no matching area. Send it to 'dn', 'gn-s', "
                              f"'in-s', a batch norm preset, or 'keep'.")
        sigma = c["sigma"]
        preserves = f.family == "layernorm" and sigma == 0.0 and (affine or f.weight is None)
        note = None if preserves else (
            f"sigma={sigma:g}" + ("" if affine or not f.affine else ", affine dropped")
            + ("" if f.family == "layernorm" else f", per-example statistics replace {f.family}")
            + ": outputs change")
        return Built(finish(new, f, share_affine=affine), preserves, note)


class GroupSigma(SigmaVariant):
    """GN-s: group norm with sigma. Keeps the site's affine (a group norm's gamma/beta
    are per channel), so sigma=0 gives the original function exactly."""
    name = "gn-s"
    families = ("groupnorm",)
    defaults = {"sigma": 0.5}
    summary = "group norm with smoothing term sigma, sigma=0.5, affine kept"
    formula = "y = gamma * (x - mu_g) / sqrt(sigma^2 + mean_g((x - mu_g)^2) + eps) + beta"

    def build(self, f, kw):
        c = self.common(f, kw)
        new = N.GroupNormStar(f.num_groups, f.num_features, affine=kw.get("affine", f.affine), **c)
        preserves = c["sigma"] == 0.0 and c["eps"] == f.eps
        return Built(finish(new, f), preserves, None if preserves else f"sigma={c['sigma']:g}: outputs change")


class InstanceSigma(SigmaVariant):
    """IN-s: instance norm with sigma; affine and running statistics as the site's."""
    name = "in-s"
    families = ("instancenorm",)
    args = SigmaVariant.args + (A.MOMENTUM, A.TRACK)
    defaults = {"sigma": 0.5}
    summary = "instance norm with smoothing term sigma, sigma=0.5"
    formula = "y = (x - mu_nc) / sqrt(sigma^2 + mean_nc((x - mu_nc)^2) + eps) [* gamma + beta]"

    def build(self, f, kw):
        if f.layout not in ("1d", "2d", "3d"):
            raise LayoutError(f"'in-s' needs an instance norm of known rank, got layout {f.layout}")
        c = self.common(f, kw)
        new = getattr(N, f"InstanceNormStar{f.layout}")(
            f.num_features, momentum=site_momentum(f, kw), affine=kw.get("affine", f.affine),
            track_running_stats=kw.get("track_running_stats", f.track_running_stats), **c)
        preserves = c["sigma"] == 0.0 and c["eps"] == f.eps
        return Built(finish(new, f), preserves, None if preserves else f"sigma={c['sigma']:g}: outputs change")


class Divisive(SigmaVariant):
    name = "dn"
    args = (A.Arg("sum_window", A.integer(1, odd=True), "an odd int >= 1", "summation window (2d)"),
            A.Arg("sup_window", A.integer(1, odd=True), "an odd int >= 1", "suppression window (2d)"),
            A.Arg("radius", A.integer(0), "an int >= 0", "summation half-width over units (1d)"),
            A.Arg("sup_radius", A.integer(0, allow_none=True), "an int >= 0 or None",
                  "suppression half-width (1d; None: radius)"),
            ) + SigmaVariant.args
    defaults = {"sigma": 0.5}
    summary = "divisive normalization (Ren et al. 2017): 5x5 windows, sigma=0.5"
    formula = "v = x - box_A(mean_c x);  y = v / sqrt(sigma^2 + box_B(mean_c v^2) + eps)"

    def build(self, f, kw):
        affine = kw.get("affine", False)
        c = self.common(f, kw)
        c["eps"] = kw.get("eps", 1e-5)
        if f.layout in ("2d", "any"):
            new = N.DivisiveNorm2d(kw.get("sum_window", 5), kw.get("sup_window", 5),
                                   num_channels=f.num_features, affine=affine, **c)
        elif f.layout in ("1d", "last") and len(f.normalized_shape or (1,)) == 1:
            new = N.DivisiveNorm1d(kw.get("radius", 30), sup_radius=kw.get("sup_radius"),
                                   num_features=f.num_features, dim=1 if f.layout == "1d" else -1,
                                   affine=affine, **c)
        else:
            raise LayoutError(f"'dn' has 2d (N, C, H, W) and 1d (window over units) forms; a {f.family} "
                              f"with layout {f.layout} fits neither. Exclude it or send it elsewhere.")
        return Built(finish(new, f, share_affine=affine), False,
                     "local statistics replace the original area: outputs change")


class Whitening(Variant):
    """IterNorm whitening on the batch area (Huang et al. 2019)."""
    name = "iternorm"
    families = ("batchnorm",)
    args = (A.Arg("group_size", A.integer(1), "an int >= 1", "channels whitened together"),
            A.Arg("T", A.integer(1), "an int >= 1", "Newton iterations"),
            A.EPS, A.MOMENTUM, A.AFFINE, A.SYNC)
    defaults = {"group_size": 16, "T": 5}
    summary = "IterNorm whitening (Huang et al. 2019): groups of 16 channels, T=5"
    formula = "Sigma_N = Sigma/tr(Sigma); P_k = (3P - P^3 Sigma_N)/2; y = P_T/sqrt(tr(Sigma)) (x - mu)"

    def build(self, f, kw):
        if f.layout not in _BATCH_LAYOUT:
            raise LayoutError(f"'iternorm' needs channels in dim 1 of a batch norm of known rank, "
                              f"got layout {f.layout}")
        cls = getattr(N, f"IterNorm{f.layout}")
        new = cls(f.num_features, group_size=kw.get("group_size", 16), T=kw.get("T", 5),
                  eps=kw.get("eps", f.eps), momentum=site_momentum(f, kw),
                  affine=kw.get("affine", True), sync=kw.get("sync", False), device=f.device)
        preserves, note = False, "whitening across channels replaces per-channel scaling"
        if f.running_mean is not None and f.running_var is not None:
            # a BatchNorm is whitening with a diagonal matrix: running_wm = diag(1/sqrt(var + eps))
            with torch.no_grad():
                new.running_mean.copy_(f.running_mean.to(new.running_mean.dtype))
                inv_std = torch.rsqrt(f.running_var.double() + f.eps)
                start = 0
                for g, size in enumerate(new._sizes):
                    new.running_wm[g].zero_()
                    new.running_wm[g, :size, :size] = torch.diag(inv_std[start:start + size])
                    start += size
                copy_num_batches(new, f)
            preserves = True
            note = "eval outputs kept (diagonal whitening from the BN statistics); training whitens"
        return Built(finish(new, f), preserves, note)


class Keep(Variant):
    name = "keep"
    summary = "leave the site as it is"
    formula = "unchanged"


for _v in (L1Batch(), TopKBatch(), SigmaBatch(), MeanOnlyBatch(), L1Area(), TopKArea(), LayerSigma(),
           GroupSigma(), InstanceSigma(), Divisive(), Whitening(), Keep()):
    register_variant(_v, preset=False)

ALPHA = 0.005  # Ren et al.'s CIFAR-10 coefficient for BN*, LN*, DN*
_BN = ("batchnorm",)
for _p in (
    Preset("l1bn", "l1bn", {}, _BN, L1Batch.summary, L1Batch.formula),
    Preset("topkbn", "topkbn", {"k": 10}, _BN, TopKBatch.summary, TopKBatch.formula),
    Preset("bn-s", "bn-s", {"sigma": 1.0}, _BN, SigmaBatch.summary, SigmaBatch.formula),
    Preset("bn*", "bn-s", {"sigma": 1.0, "l1_alpha": ALPHA}, _BN,
           "BN-s plus the L1 activation penalty (alpha=0.005)", "BN-s + L1 penalty alpha * mean|x - mu|"),
    Preset("l1", "l1", {}, None, L1Area.summary, L1Area.formula),
    Preset("topk", "topk", {"k": 10}, None, TopKArea.summary, TopKArea.formula),
    Preset("ln-s", "ln-s", {"sigma": 0.5, "affine": False}, ("layernorm",), LayerSigma.summary,
           LayerSigma.formula),
    Preset("ln*", "ln-s", {"sigma": 0.5, "affine": False, "l1_alpha": ALPHA}, ("layernorm",),
           "LN-s plus the L1 activation penalty (alpha=0.005)", "LN-s + L1 penalty alpha * mean|x - mu|"),
    Preset("gn-s", "gn-s", {"sigma": 0.5}, None, GroupSigma.summary, GroupSigma.formula),
    Preset("gn*", "gn-s", {"sigma": 0.5, "l1_alpha": ALPHA}, None,
           "GN-s plus the L1 activation penalty (alpha=0.005)", "GN-s + L1 penalty alpha * mean|x - mu|"),
    Preset("in-s", "in-s", {"sigma": 0.5}, None, InstanceSigma.summary, InstanceSigma.formula),
    Preset("in*", "in-s", {"sigma": 0.5, "l1_alpha": ALPHA}, None,
           "IN-s plus the L1 activation penalty (alpha=0.005)", "IN-s + L1 penalty alpha * mean|x - mu|"),
    Preset("dn", "dn", {"sigma": 0.5}, None, Divisive.summary, Divisive.formula),
    Preset("dn*", "dn", {"sigma": 0.5, "l1_alpha": ALPHA}, None,
           "DN plus the L1 activation penalty (alpha=0.005)", "DN + L1 penalty alpha * mean|x - local mean|"),
    Preset("meanonly", "meanonly", {}, _BN, MeanOnlyBatch.summary, MeanOnlyBatch.formula),
    Preset("iternorm", "iternorm", {"group_size": 16, "T": 5}, None, Whitening.summary, Whitening.formula),
    Preset("keep", "keep", {}, None, Keep.summary, Keep.formula),
):
    register_preset(_p)
