"""The report of a plan or a transform: every normalization site and what became of it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .graph.sites import Site
    from .variants import Built

STATUSES = ("converted", "kept", "skipped", "excluded", "unmatched")


@dataclass
class Decision:
    """What the plan decided for one site (separate from the site's facts)."""
    status: str                        # converted | kept | skipped | excluded | unmatched | pending
    preset: Optional[str] = None
    variant: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    reason: Optional[str] = None
    built: Optional["Built"] = None    # the new module (converted sites)
    becomes: Optional[str] = None
    preserves_function: Optional[bool] = None
    note: Optional[str] = None
    producer_rewrite: Any = None       # bwn: the change of the conv/linear feeding the site

    @classmethod
    def converted(cls, preset: str, variant: str, kwargs: Dict[str, Any], built: "Built",
                  note: Optional[str], producer_rewrite: Any = None) -> "Decision":
        return cls("converted", preset=preset, variant=variant, kwargs=kwargs, built=built,
                   becomes=type(built.module).__name__, preserves_function=built.preserves_function,
                   note=note, producer_rewrite=producer_rewrite)


@dataclass
class SiteRecord:
    """One line of the report: a site and what became of it."""
    name: str
    kind: str                 # module | functional
    original: str
    family: str
    status: str               # converted | kept | skipped | excluded | unmatched
    becomes: Optional[str] = None
    preset: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    reason: Optional[str] = None
    preserves_function: Optional[bool] = None
    note: Optional[str] = None
    aliases: List[str] = field(default_factory=list)

    @classmethod
    def of(cls, site: "Site", d: Decision) -> "SiteRecord":
        note = d.note
        if site.aliases:
            shared = f"shared module, also reachable as {', '.join(site.aliases)}"
            note = f"{note}; {shared}" if note else shared
        return cls(name=site.name, kind=site.kind, original=site.original, family=site.family,
                   status=d.status, becomes=d.becomes, preset=d.preset, kwargs=dict(d.kwargs),
                   reason=d.reason, preserves_function=d.preserves_function, note=note,
                   aliases=list(site.aliases))

    def to_dict(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        d["kwargs"] = {k: (v if isinstance(v, (int, float, str, bool, type(None), list)) else repr(v))
                       for k, v in self.kwargs.items()}
        return d


@dataclass
class Report:
    """What a spec does (or did) to a model. ``print(report)`` gives a table."""
    spec: Dict[str, Any]
    sites: List[SiteRecord] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    applied: bool = False

    def by_status(self, status: str) -> List[SiteRecord]:
        return [s for s in self.sites if s.status == status]

    @property
    def converted(self) -> List[SiteRecord]:
        return self.by_status("converted")

    @property
    def skipped(self) -> List[SiteRecord]:
        return self.by_status("skipped")

    def __getitem__(self, name: str) -> SiteRecord:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site named {name!r}; sites: {[s.name for s in self.sites][:20]}")

    def counts(self) -> Dict[str, int]:
        return {st: len(self.by_status(st)) for st in STATUSES}

    def to_dict(self) -> Dict[str, Any]:
        return {"spec": self.spec, "applied": self.applied, "counts": self.counts(),
                "sites": [s.to_dict() for s in self.sites],
                "warnings": list(self.warnings)}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def __str__(self) -> str:
        head = ("site", "kind", "original", "becomes / why not", "kwargs")
        rows = []
        for s in self.sites:
            if s.status == "converted":
                what = s.becomes + ("" if s.preserves_function in (None, False) else "  (eval outputs kept)")
                if s.note:
                    what += f"  [{s.note}]"
            elif s.status == "kept":
                what = "kept"
            else:
                what = f"{s.status}: {s.reason or ''}"
            kw = ", ".join(f"{k}={v}" for k, v in s.kwargs.items())
            rows.append((s.name, s.kind, s.original, what, kw))
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head[:3])]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head[:3], widths)) + "  " + head[3] + "  |  " + head[4]]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3]
                         + (f"  |  {r[4]}" if r[4] else ""))
        c = self.counts()
        lines.append(", ".join(f"{v} {k}" for k, v in c.items() if v) or "no sites")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)

    __repr__ = __str__
