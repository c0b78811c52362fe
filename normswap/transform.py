"""``normswap.transform`` / ``plan`` / ``report``: from a spec to a rewritten model."""
from __future__ import annotations

import copy
import difflib
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

from torch import nn

from .graph.convert import LayoutError, build
from .graph.functional import find_functional_sites, prepare_rewrite
from .graph.sites import Site, find_module_sites
from .norms.penalty import install_penalty_hook
from .report import Report, SiteRecord
from .spec import PRESETS, Spec, SpecError

REPORT_ATTR = "_normswap_report"
SPEC_ATTR = "_normswap_spec"

from .graph.bwn import bwn_hook  # noqa: E402  (registers the bwn presets)

# variants rewritten by a graph-level hook instead of one module at a time
SITE_HOOKS: Dict[str, Callable] = {"bwn": bwn_hook}


class TransformError(ValueError):
    """The transform cannot be done as asked; nothing was changed."""


def _record(site: Site) -> SiteRecord:
    return SiteRecord(name=site.name, kind=site.kind, original=site.original, family=site.family,
                      status=site.status, becomes=site.becomes, preset=site.preset,
                      kwargs=dict(site.kwargs), reason=site.reason,
                      preserves_function=site.preserves_function, note=site.note)


def _decide(model: nn.Module, spec: Spec, leaf_modules: Sequence, strict: bool, build_modules: bool,
            raise_on_empty: bool = True):
    """Find the sites and decide each one. Returns (sites, new modules, owner rewrites, report)."""
    sites = find_module_sites(model)
    if any(s.name == "" for s in sites):
        raise TransformError(f"the model itself is a {type(model).__name__}; transform a model "
                             f"that contains it (e.g. nn.Sequential(layer))")
    fsites, owners = find_functional_sites(model, leaf_modules)
    sites += fsites
    if not sites:
        raise TransformError(f"no normalization layers found in {type(model).__name__} (looked for "
                             f"BatchNorm*, LayerNorm*, GroupNorm* modules and F.layer_norm / "
                             f"F.batch_norm / F.group_norm calls)")
    matched_rules = set()
    new_modules: Dict[str, nn.Module] = {}
    graph_jobs = []
    for site in sites:
        if site.skip_reason:
            site.status, site.reason = "skipped", site.skip_reason
            continue
        excluded_by = spec.excluded_by(site.name)
        if excluded_by:
            site.status, site.reason = "excluded", "matches spec.exclude"
            matched_rules.update(f"exclude:{p}" for p in excluded_by)
            continue
        preset, kw, matched = spec.resolve(site.name, site.family, site.types)
        matched_rules.update(matched)
        if preset is None:
            site.status, site.reason = "unmatched", f"no rule applies to a {site.family} site"
            continue
        p = PRESETS[preset]
        kwargs = {**p.defaults, **kw}
        site.preset, site.kwargs = preset, kwargs
        if p.variant == "keep":
            site.status = "kept"
            continue
        if p.variant in SITE_HOOKS:
            graph_jobs.append((site, p.variant, kwargs))
            continue
        _build_site(site, p.variant, kwargs, new_modules, build_modules)
    post_apply: List[Callable[[], None]] = []
    for variant, hook in SITE_HOOKS.items():
        jobs = [j for j in graph_jobs if j[1] == variant]
        if jobs:
            post_apply += hook(model, jobs, new_modules, build_modules, leaf_modules)

    report = Report(spec=spec.to_dict(), sites=[])
    for key in spec.rule_keys():
        if key not in matched_rules:
            kind, pattern = key.split(":", 1)
            pool = [s.name for s in sites] if kind != "types" else sorted(
                {t for s in sites for t in s.types} | {s.family for s in sites})
            close = difflib.get_close_matches(pattern, pool, n=5, cutoff=0.4)
            msg = (f"rule {kind}[{pattern!r}] matches no normalization site"
                   + (f"; close names: {', '.join(close)}" if close else
                      f"; {kind} that exist: {', '.join(pool[:8])}{' ...' if len(pool) > 8 else ''}"))
            if strict:
                raise SpecError(msg)
            warnings.warn(msg, stacklevel=3)
            report.warnings.append(msg)
    if raise_on_empty and not any(s.status in ("converted", "kept") for s in sites):
        fams = sorted({s.family for s in sites})
        skipped = [s for s in sites if s.status == "skipped" and s.preset]
        if skipped:
            raise TransformError(f"spec {spec.preset or spec.to_dict()} matched {len(skipped)} site(s) "
                                 f"but none can be converted:\n" + "\n".join(
                                     f"  {s.name}: {s.reason}" for s in skipped[:10]))
        raise SpecError(f"spec {spec.preset or spec.to_dict()} matches none of the {len(sites)} "
                        f"normalization sites of {type(model).__name__} (families: {', '.join(fams)}); "
                        f"pick a preset for those families (normswap.presets()) or add a type rule")
    if strict:
        bad = [s for s in sites if s.status == "skipped"]
        if bad:
            raise TransformError("strict=True and these sites cannot be rewritten:\n" + "\n".join(
                f"  {s.name}: {s.reason}" for s in bad))
    for site in sites:
        if site.name in new_modules:
            record_original(new_modules[site.name], site)
    report.sites = [_record(s) for s in sites]
    return sites, new_modules, owners, report, post_apply


def _build_site(site: Site, variant: str, kwargs, new_modules, build_modules: bool) -> None:
    try:
        mod, preserves, note = build(site, variant, kwargs)
    except LayoutError as e:
        site.status, site.reason = "skipped", str(e)
        return
    site.status, site.becomes = "converted", type(mod).__name__
    site.preserves_function, site.note = preserves, note
    if build_modules:
        new_modules[site.name] = mod


def record_original(mod: nn.Module, site: Site) -> None:
    """Remember what the site was (for folding back to the original architecture)."""
    f = site.facts()
    orig = site.module
    object.__setattr__(mod, "_normswap_original", {
        "family": site.family, "class": site.original, "eps": f.get("eps", 1e-5),
        "affine": bool(f.get("affine", False)),
        "num_batches_tracked": getattr(orig, "num_batches_tracked", None) is not None if orig is not None else False,
    })


def plan(model: nn.Module, spec: Union[str, Spec, dict], *, strict: bool = False,
         leaf_modules: Sequence = ()) -> Report:
    """Dry run: what ``transform`` would do, as a Report. The model is not changed.

    Unlike ``transform`` it does not raise when nothing would be converted: the report
    says why for each site.
    """
    spec = Spec.coerce(spec)
    report = _decide(model, spec, leaf_modules, strict, build_modules=False, raise_on_empty=False)[3]
    return report


def transform(model: nn.Module, spec: Union[str, Spec, dict], *, inplace: bool = False,
              strict: bool = False, leaf_modules: Sequence = ()) -> nn.Module:
    """Rewrite the normalizations of ``model`` as ``spec`` asks.

    Module sites are swapped in place (same qualified name); functional norm calls are
    rewritten into calls of new submodules. The model keeps its class, methods,
    attributes, device, dtype, training mode and every untouched parameter and buffer.
    With ``inplace=False`` (default) the input model is left untouched. Raises
    (SpecError / TransformError) before changing anything when the spec cannot be
    applied; ``strict=True`` also raises when a matched site would be skipped.
    """
    spec = Spec.coerce(spec)
    target = model if inplace else copy.deepcopy(model)
    sites, new_modules, owners, report, post_apply = _decide(target, spec, leaf_modules, strict,
                                                             build_modules=True)
    # prepare everything that can fail before changing the model
    applies = [prepare_rewrite(o, new_modules) for o in owners]
    for site in sites:
        if site.kind == "module" and site.name in new_modules:
            parent_name, _, child = site.name.rpartition(".")
            parent = target.get_submodule(parent_name) if parent_name else target
            setattr(parent, child, new_modules[site.name])
    for fn in applies:
        fn()
    for fn in post_apply:
        fn()
    report.applied = True
    object.__setattr__(target, REPORT_ATTR, report)
    object.__setattr__(target, SPEC_ATTR, spec)
    install_penalty_hook(target)
    return target


def report(model: nn.Module) -> Report:
    """The report recorded by ``transform`` on this model."""
    from .norms.penalty import unwrap_model
    rep = getattr(unwrap_model(model), REPORT_ATTR, None)
    if rep is None:
        raise ValueError(f"{type(model).__name__} was not transformed by normswap.transform; "
                         f"use normswap.plan(model, spec) for a dry run")
    return rep


def spec_of(model: nn.Module) -> Optional[Spec]:
    from .norms.penalty import unwrap_model
    return getattr(unwrap_model(model), SPEC_ATTR, None)
