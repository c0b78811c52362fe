"""``normswap.transform`` / ``plan`` / ``report``: from a spec to a rewritten model.

Data flows one way::

    spec --plan--> [Site (facts, read once) + Decision (what becomes of it)] --rewrite-->
    model with one TransformState (spec, report, originals, producers) --> train / io

The rewrite is all or nothing: every keyword is checked and every new module built
before the first change, and each change registers its undo, so an exception part-way
leaves the model as it was.
"""
from __future__ import annotations

import copy
import difflib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .graph.bwn import BoundedWeightNormVariant
from .graph.functional import find_functional_sites, prepare_rewrite
from .graph.producers import Producer, norm_producers
from .graph.sites import Site, find_module_sites
from .norms.base import NormalizerBase
from .norms.penalty import install_penalty_hook, unwrap_model, wrapped_inner
from .report import Decision, Report, SiteRecord
from .spec import Spec, SpecError
from .variants import PRESETS, VARIANTS, LayoutError, Original

STATE_ATTR = "_normswap_state"


class TransformError(ValueError):
    """The transform cannot be done as asked; nothing was changed."""


@dataclass
class TransformState:
    """What the rewrite learned, recorded once on the transformed model.

    Training helpers and io read it and never trace again: ``producers`` (norm site ->
    the conv/linear feeding it) is filled by ``bwn`` during the transform, or by the
    first helper that needs it (one tolerant trace), then kept.
    """
    spec: Spec
    report: Report
    originals: Dict[str, Original] = field(default_factory=dict)
    producers: Optional[Dict[str, Producer]] = None
    untraced: List = field(default_factory=list)

    def variant_of(self, site_name: str):
        rec = self.report[site_name]
        return VARIANTS[PRESETS[rec.preset].variant] if rec.preset else None


def state_of(model: nn.Module) -> Optional[TransformState]:
    return getattr(unwrap_model(model), STATE_ATTR, None)


def producers_of(model: nn.Module, leaf_modules: Sequence = ()) -> Dict[str, Producer]:
    """Norm site -> producer, from the recorded state (traced once, then kept)."""
    model = unwrap_model(model)
    state = state_of(model)
    if state is not None and state.producers is not None:
        return state.producers
    producers, failed = norm_producers(model, leaf_modules)
    if state is not None:
        state.producers, state.untraced = producers, failed
    return producers


# -- what a model must not be --------------------------------------------------------------
def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TransformError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TransformError(f"model is a torch.jit.ScriptModule ({type(model).__name__}); scripted code "
                             f"cannot be rewritten: transform the nn.Module first, then torch.jit.script it")
    if wrapped_inner(model) is not None:
        inner = "model.module" if isinstance(getattr(model, "module", None), nn.Module) else "model._orig_mod"
        raise TransformError(
            f"model is wrapped in {type(model).__name__}; transform the inner model before wrapping it "
            f"(e.g. normswap.transform({inner}, spec), then wrap the result), so the wrapper sees the "
            f"new parameters")
    state = getattr(model, STATE_ATTR, None)
    if state is not None:
        raise TransformError(
            f"model was already transformed by normswap (spec {state.spec.to_json()}); transform the "
            f"original model with one Spec (rules can give each site its own variant), or load a "
            f"converted checkpoint with normswap.load")


# -- plan -------------------------------------------------------------------------------
@dataclass
class Plan:
    """Sites with their decisions, the owners of functional calls, the report."""
    sites: List[Site]
    decisions: Dict[str, Decision]
    owners: List
    report: Report
    producers: Optional[Dict[str, Producer]] = None
    untraced: List = field(default_factory=list)


def _decide_site(site: Site, spec: Spec, matched_rules: set) -> Decision:
    if site.skip_reason:
        return Decision("skipped", reason=site.skip_reason)
    excluded_by = spec.excluded_by(site.name)
    if excluded_by:
        matched_rules.update(f"exclude:{p}" for p in excluded_by)
        return Decision("excluded", reason="matches spec.exclude")
    preset, kwargs, matched = spec.resolve(site.name, site.family, site.types)
    matched_rules.update(matched)
    if preset is None:
        return Decision("unmatched", reason=f"no rule applies to a {site.family} site")
    variant = VARIANTS[PRESETS[preset].variant]
    if variant.name == "keep":
        return Decision("kept", preset=preset, variant=variant.name, kwargs=kwargs)
    if variant.rewrites_producer:
        return Decision("pending", preset=preset, variant=variant.name, kwargs=kwargs)
    return _build(site, preset, kwargs)


def _build(site: Site, preset: str, kwargs, note_prefix: Optional[str] = None) -> Decision:
    variant = VARIANTS[PRESETS[preset].variant]
    if site.family not in variant.families:
        return Decision("skipped", preset=preset, variant=variant.name, kwargs=kwargs,
                        reason=f"{preset!r} does not apply to a {site.family} site (it takes "
                               f"{', '.join(variant.families)})")
    try:
        built = variant.build(site.facts, kwargs)
    except LayoutError as e:
        reason = f"{site.name}: {e}"
        return Decision("skipped", preset=preset, variant=variant.name, kwargs=kwargs,
                        reason=f"{note_prefix}; {reason}" if note_prefix else reason)
    note = built.note
    if note_prefix:
        note = f"{note_prefix}" + (f"; {note}" if note else "")
    return Decision.converted(preset, variant.name, kwargs, built, note)


def _decide_producer_sites(model: nn.Module, sites: List[Site], decisions: Dict[str, Decision],
                           leaf_modules: Sequence, plan: Plan) -> None:
    """Sites whose variant also rewrites the conv/linear feeding them (bwn)."""
    pending = [s for s in sites if decisions[s.name].status == "pending"]
    if not pending:
        return
    producers, failed = norm_producers(model, leaf_modules)
    plan.producers, plan.untraced = producers, failed
    used = set()
    for site in pending:
        d = decisions[site.name]
        variant: BoundedWeightNormVariant = VARIANTS[d.variant]
        prod = producers.get(site.name)
        reason = None
        if site.kind != "module":
            reason = "bwn rewrites norm modules only, not functional calls"
        elif prod is None:
            reason = "not reached by a traced forward (" + (
                "; ".join(f"{n or 'model'}: {e}" for n, e in failed[:2]) or "never called") + ")"
        elif prod.producer is None:
            reason = prod.reason
        elif prod.producer in used:
            reason = f"{prod.producer} already feeds another converted norm"
        if reason is None:
            try:
                built, rewrite = variant.plan_site(model, site.facts, d.kwargs, prod.producer)
            except LayoutError as e:
                reason = str(e)
        if reason is None:
            used.add(prod.producer)
            decisions[site.name] = Decision.converted(d.preset, d.variant, d.kwargs, built, built.note,
                                                      producer_rewrite=rewrite)
            continue
        fallback = d.kwargs.get("fallback")
        if fallback is None:
            decisions[site.name] = Decision("skipped", preset=d.preset, variant=d.variant, kwargs=d.kwargs,
                                            reason=reason)
            continue
        fkw = variant.fallback_kwargs(d.kwargs)
        to = fallback["to"]
        if VARIANTS[PRESETS[to].variant].name == "keep":
            decisions[site.name] = Decision("kept", preset=to, variant="keep", kwargs=fkw,
                                            reason=f"bwn fallback keep ({reason})")
        else:
            decisions[site.name] = _build(site, to, fkw, note_prefix=f"bwn fallback ({reason})")


def _unmatched_rule_warnings(spec: Spec, sites: List[Site], matched_rules: set, strict: bool) -> List[str]:
    out = []
    for key in spec.rule_keys():
        if key in matched_rules:
            continue
        kind, pattern = key.split(":", 1)
        pool = [s.name for s in sites] if kind != "types" else sorted(
            {t for s in sites for t in s.types} | {s.family for s in sites})
        close = difflib.get_close_matches(pattern, pool, n=5, cutoff=0.4)
        msg = (f"rule {kind}[{pattern!r}] matches no normalization site"
               + (f"; close names: {', '.join(close)}" if close else
                  f"; {kind} that exist: {', '.join(pool[:8])}{' ...' if len(pool) > 8 else ''}"))
        if strict:
            raise SpecError(msg)
        warnings.warn(msg, stacklevel=4)
        out.append(msg)
    return out


def make_plan(model: nn.Module, spec: Spec, leaf_modules: Sequence, strict: bool,
              raise_on_empty: bool = True) -> Plan:
    """Find the sites and decide each one; builds the new modules, changes nothing."""
    sites = find_module_sites(model)
    if any(s.name == "" for s in sites):
        raise TransformError(f"the model itself is a {type(model).__name__}; transform a model "
                             f"that contains it (e.g. nn.Sequential(layer))")
    fsites, owners = find_functional_sites(model, leaf_modules)
    sites += fsites
    if not sites:
        raise TransformError(f"no normalization layers found in {type(model).__name__} (looked for "
                             f"BatchNorm*, LayerNorm*, GroupNorm*, InstanceNorm* modules and "
                             f"F.layer_norm / F.batch_norm / F.group_norm / F.instance_norm calls)")
    matched_rules: set = set()
    decisions = {s.name: _decide_site(s, spec, matched_rules) for s in sites}
    plan = Plan(sites, decisions, owners, Report(spec=spec.to_dict()))
    _decide_producer_sites(model, sites, decisions, leaf_modules, plan)
    plan.report.warnings = _unmatched_rule_warnings(spec, sites, matched_rules, strict)
    plan.report.sites = [SiteRecord.of(s, decisions[s.name]) for s in sites]
    if raise_on_empty and not any(d.status in ("converted", "kept") for d in decisions.values()):
        fams = sorted({s.family for s in sites})
        skipped = [s for s in sites if decisions[s.name].status == "skipped" and decisions[s.name].preset]
        if skipped:
            raise TransformError(f"spec {spec.preset or spec.to_dict()} matched {len(skipped)} site(s) "
                                 f"but none can be converted:\n" + "\n".join(
                                     f"  {s.name}: {decisions[s.name].reason}" for s in skipped[:10]))
        raise SpecError(f"spec {spec.preset or spec.to_dict()} matches none of the {len(sites)} "
                        f"normalization sites of {type(model).__name__} (families: {', '.join(fams)}); "
                        f"pick a preset for those families (normswap.presets()) or add a type rule")
    if strict:
        bad = [s for s in sites if decisions[s.name].status == "skipped"]
        if bad:
            raise TransformError("strict=True and these sites cannot be rewritten:\n" + "\n".join(
                f"  {s.name}: {decisions[s.name].reason}" for s in bad))
    return plan


def _original(site: Site) -> Original:
    f = site.facts
    return Original(family=site.family, cls=site.original, eps=f.eps, affine=f.affine,
                    num_batches_tracked=f.num_batches_tracked is not None)


# -- rewrite ----------------------------------------------------------------------------
class _Journal:
    """Changes applied so far, each with its undo; ``rollback`` undoes them in reverse."""

    def __init__(self):
        self._undo: List[Callable[[], None]] = []

    def do(self, apply: Callable[[], None], undo: Callable[[], None]) -> None:
        self._undo.append(undo)   # registered first: a half-done apply is undone too
        apply()

    def set_child(self, root: nn.Module, qualname: str, new: nn.Module) -> None:
        parent_name, _, child = qualname.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        old = parent._modules[child]
        self.do(lambda: setattr(parent, child, new), lambda: setattr(parent, child, old))

    def rollback(self) -> None:
        while self._undo:
            self._undo.pop()()


def _rewrite(target: nn.Module, plan: Plan) -> None:
    new_modules = {name: d.built.module for name, d in plan.decisions.items() if d.status == "converted"}
    for site in plan.sites:   # the original's output memory format (graph/layout.py's Probed)
        if site.name in new_modules and site.facts is not None and site.facts.channels_last_out \
                and isinstance(new_modules[site.name], NormalizerBase):
            new_modules[site.name].channels_last_out = True
    prepared = [prepare_rewrite(o, new_modules) for o in plan.owners]
    journal = _Journal()
    try:
        for site in plan.sites:
            if site.kind == "module" and site.name in new_modules:
                for name in [site.name] + site.aliases:
                    journal.set_child(target, name, new_modules[site.name])
        for p in prepared:
            journal.do(p.apply, p.undo)
        for d in plan.decisions.values():
            if d.producer_rewrite is not None:
                journal.do(d.producer_rewrite.apply, d.producer_rewrite.undo)
    except BaseException:
        journal.rollback()
        raise


def plan(model: nn.Module, spec: Union[str, Spec, dict], *, strict: bool = False,
         leaf_modules: Sequence = ()) -> Report:
    """Dry run: what ``transform`` would do, as a Report. The model is not changed.

    Unlike ``transform`` it does not raise when nothing would be converted: the report
    says why for each site.
    """
    spec = Spec.coerce(spec)
    _check_model(model)
    return make_plan(model, spec, leaf_modules, strict, raise_on_empty=False).report


def transform(model: nn.Module, spec: Union[str, Spec, dict], *, inplace: bool = False,
              strict: bool = False, leaf_modules: Sequence = ()) -> nn.Module:
    """Rewrite the normalizations of ``model`` as ``spec`` asks.

    Module sites are swapped in place (same qualified name, every alias of a shared
    module); functional norm calls are rewritten into calls of new submodules. The
    model keeps its class, methods, attributes, device, dtype, training mode and every
    untouched parameter and buffer. With ``inplace=False`` (default) the input model is
    left untouched. Raises (SpecError / TransformError) before changing anything when
    the spec cannot be applied; ``strict=True`` also raises when a matched site would
    be skipped. If anything fails while the model is being changed, every change made
    so far is undone before the exception propagates.
    """
    spec = Spec.coerce(spec)
    _check_model(model)
    target = model if inplace else copy.deepcopy(model)
    p = make_plan(target, spec, leaf_modules, strict)
    _rewrite(target, p)
    p.report.applied = True
    state = TransformState(spec=spec, report=p.report, producers=p.producers, untraced=p.untraced,
                           originals={s.name: _original(s) for s in p.sites
                                      if p.decisions[s.name].status == "converted"})
    object.__setattr__(target, STATE_ATTR, state)
    install_penalty_hook(target)
    return target


def report(model: nn.Module) -> Report:
    """The report recorded by ``transform`` on this model."""
    state = state_of(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} was not transformed by normswap.transform; "
                         f"use normswap.plan(model, spec) for a dry run")
    return state.report


def spec_of(model: nn.Module) -> Optional[Spec]:
    state = state_of(model)
    return state.spec if state is not None else None
