"""What the user asks for: presets, rules, and their (de)serialization.

A spec is a global preset plus rules, resolved per site with the precedence of
torch.ao's QConfigMapping: global < type < regex < exact name. ``exclude`` wins over
everything. A rule's value is a preset name or ``{"to": preset, **kwargs}``; a rule
without ``to`` adjusts the kwargs of what the site already becomes.

    Spec("l1bn")
    Spec("bn*", kwargs={"sigma": 2.0}, types={"LayerNorm": "ln*"},
         regex={r"stem\\..*": "keep"}, names={"head.norm": {"to": "dn", "sum_window": 3}},
         exclude=["layers.3.*"])
"""
from __future__ import annotations

import copy
import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

SPEC_FORMAT = 1


@dataclass(frozen=True)
class Preset:
    """A named conversion: which layer a site becomes, on which families, defaults."""
    name: str
    variant: str
    families: Tuple[str, ...]
    defaults: Mapping[str, Any]
    formula: str
    summary: str


BN_KW = ("eps", "momentum", "affine", "track_running_stats", "l1_alpha", "sync")
VARIANT_KWARGS: Dict[str, Tuple[str, ...]] = {
    "l1bn": BN_KW,
    "topkbn": BN_KW + ("k",),
    "bn-s": BN_KW + ("sigma", "learn_sigma"),
    "meanonly": ("momentum", "bias", "track_running_stats", "l1_alpha", "sync"),
    "ln-s": ("sigma", "learn_sigma", "affine", "eps", "l1_alpha"),
    "dn": ("sum_window", "sup_window", "radius", "sup_radius", "sigma", "learn_sigma", "affine",
           "eps", "l1_alpha"),
    "keep": (),
    "bwn": ("p", "rho", "learn_gain", "momentum", "l1_alpha", "sync", "fallback"),
}

ALL = ("batchnorm", "layernorm", "groupnorm")
ALPHA = 0.005  # Ren et al.'s CIFAR-10 coefficient for BN*, LN*, DN*

_PRESETS = [
    Preset("l1bn", "l1bn", ("batchnorm",), {},
           "y = gamma * (x - mu) / (sqrt(pi/2) * mean|x - mu| + eps) + beta",
           "L1 batch norm (Hoffer et al. 2018): no squares, finite in fp16"),
    Preset("topkbn", "topkbn", ("batchnorm",), {"k": 10},
           "y = gamma * (x - mu) / (C_inf(n) * mean(top-k |x - mu|) + eps) + beta",
           "L-inf / top-k batch norm (Hoffer et al. 2018), k=10"),
    Preset("bn-s", "bn-s", ("batchnorm",), {"sigma": 1.0},
           "y = gamma * (x - mu) / sqrt(sigma^2 + E[(x - mu)^2] + eps) + beta",
           "batch norm with smoothing term sigma (Ren et al. 2017), sigma=1"),
    Preset("bn*", "bn-s", ("batchnorm",), {"sigma": 1.0, "l1_alpha": ALPHA},
           "BN-s + L1 penalty alpha * mean|x - mu|",
           "BN-s plus the L1 activation penalty (alpha=0.005)"),
    Preset("ln-s", "ln-s", ("layernorm",), {"sigma": 0.5, "affine": False},
           "y = (x - mu) / sqrt(sigma^2 + mean((x - mu)^2) + eps), per example, no affine",
           "layer norm with smoothing term sigma (Ren et al. 2017), sigma=0.5, no affine"),
    Preset("ln*", "ln-s", ("layernorm",), {"sigma": 0.5, "affine": False, "l1_alpha": ALPHA},
           "LN-s + L1 penalty alpha * mean|x - mu|",
           "LN-s plus the L1 activation penalty (alpha=0.005)"),
    Preset("dn", "dn", ALL, {"sigma": 0.5},
           "v = x - box_A(mean_c x);  y = v / sqrt(sigma^2 + box_B(mean_c v^2) + eps)",
           "divisive normalization (Ren et al. 2017): 5x5 windows, sigma=0.5"),
    Preset("dn*", "dn", ALL, {"sigma": 0.5, "l1_alpha": ALPHA},
           "DN + L1 penalty alpha * mean|x - local mean|",
           "DN plus the L1 activation penalty (alpha=0.005)"),
    Preset("meanonly", "meanonly", ("batchnorm",), {},
           "y = x - mu + beta", "mean-only batch norm (no scaling)"),
    Preset("keep", "keep", ALL, {}, "unchanged", "leave the site as it is"),
]
PRESETS: Dict[str, Preset] = {p.name: p for p in _PRESETS}


def register_preset(preset: Preset) -> None:
    """Add a preset (used by the bwn module)."""
    PRESETS[preset.name] = preset


def presets() -> Dict[str, str]:
    """Preset name -> one-line description with formula and defaults."""
    return {p.name: f"{p.summary}. {p.formula}. defaults: {dict(p.defaults) or '-'}; "
                    f"applies to: {', '.join(p.families)}" for p in PRESETS.values()}


class SpecError(ValueError):
    """A spec that cannot be used; the message says what to change."""


def _unknown_preset(name) -> SpecError:
    close = difflib.get_close_matches(str(name), list(PRESETS), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return SpecError(f"unknown preset {name!r}{hint}; presets: {', '.join(PRESETS)}")


RuleValue = Union[str, Dict[str, Any]]


def _norm_rule(value: RuleValue, where: str) -> Dict[str, Any]:
    if isinstance(value, str):
        value = {"to": value}
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: a rule is a preset name or a dict like {{'to': 'l1bn', 'k': 5}}, "
                        f"got {value!r}")
    rule = dict(value)
    to = rule.get("to")
    if to is not None and to not in PRESETS:
        raise _unknown_preset(to).__class__(f"{where}: {_unknown_preset(to)}")
    return rule


def check_kwargs(variant: str, kwargs: Mapping[str, Any], where: str) -> None:
    accepted = VARIANT_KWARGS[variant]
    bad = sorted(set(kwargs) - set(accepted))
    if bad:
        raise SpecError(f"{where}: unknown argument(s) {', '.join(bad)} for {variant!r}; accepted: "
                        f"{', '.join(accepted) or 'none'}")


@dataclass
class Spec:
    """What to convert: a preset applied globally, plus per-type/regex/name rules."""
    preset: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    types: Dict[str, RuleValue] = field(default_factory=dict)
    regex: Dict[str, RuleValue] = field(default_factory=dict)
    names: Dict[str, RuleValue] = field(default_factory=dict)
    exclude: List[str] = field(default_factory=list)

    def __post_init__(self):
        self.validate()

    # -- validation ------------------------------------------------------------------
    def validate(self) -> None:
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise _unknown_preset(self.preset)
            check_kwargs(PRESETS[self.preset].variant, self.kwargs, f"spec kwargs for {self.preset!r}")
        elif self.kwargs:
            raise SpecError("spec kwargs need a preset to apply to; set Spec(preset=...)")
        if not (self.preset or self.types or self.regex or self.names):
            raise SpecError("empty spec: give a preset (one of " + ", ".join(PRESETS) + ") or rules")
        for kind in ("types", "regex", "names"):
            for key, value in getattr(self, kind).items():
                rule = _norm_rule(value, f"{kind}[{key!r}]")
                if rule.get("to"):
                    kw = {k: v for k, v in rule.items() if k != "to"}
                    check_kwargs(PRESETS[rule["to"]].variant, kw, f"{kind}[{key!r}]")
        for pattern in list(self.regex) + list(self.exclude):
            try:
                re.compile(pattern)
            except re.error as e:
                raise SpecError(f"bad regular expression {pattern!r}: {e}") from None

    # -- (de)serialization --------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {"format": SPEC_FORMAT, "preset": self.preset, "kwargs": copy.deepcopy(self.kwargs),
                "types": copy.deepcopy(self.types), "regex": copy.deepcopy(self.regex),
                "names": copy.deepcopy(self.names), "exclude": list(self.exclude)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Spec":
        d = dict(d)
        fmt = d.pop("format", SPEC_FORMAT)
        if not isinstance(fmt, int) or fmt > SPEC_FORMAT:
            raise SpecError(f"spec format {fmt!r} is newer than this normswap understands "
                            f"(format {SPEC_FORMAT}); upgrade normswap")
        allowed = {"preset", "kwargs", "types", "regex", "names", "exclude"}
        bad = sorted(set(d) - allowed)
        if bad:
            raise SpecError(f"unknown spec field(s) {', '.join(bad)}; fields: {', '.join(sorted(allowed))}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "Spec":
        try:
            return cls.from_dict(json.loads(s))
        except json.JSONDecodeError as e:
            raise SpecError(f"spec is not valid JSON: {e}") from None

    @classmethod
    def coerce(cls, spec: Union[str, "Spec", Mapping[str, Any]]) -> "Spec":
        """A preset name, a JSON string, a dict or a Spec -> Spec."""
        if isinstance(spec, Spec):
            return spec
        if isinstance(spec, str):
            text = spec.strip()
            if text.startswith("{"):
                return cls.from_json(text)
            if text not in PRESETS:
                raise _unknown_preset(text)
            return cls(preset=text)
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        raise SpecError(f"spec must be a preset name, a dict, JSON or a normswap.Spec; got {type(spec).__name__}")

    # -- resolution -----------------------------------------------------------------------
    def excluded_by(self, name: str) -> List[str]:
        """The ``exclude`` patterns (exact names or regexes) that match ``name``."""
        return [p for p in self.exclude if name == p or re.fullmatch(p, name)]

    def is_excluded(self, name: str) -> bool:
        return bool(self.excluded_by(name))

    def resolve(self, name: str, family: str, types: List[str]) -> Tuple[Optional[str], Dict[str, Any], List[str]]:
        """(preset, kwargs, matched rule keys) for a site; preset None = no rule applies."""
        preset, kwargs, matched = None, {}, []
        if self.preset and family in PRESETS[self.preset].families:
            preset, kwargs = self.preset, dict(self.kwargs)
        layers = [("types", [k for k in self.types if k in types or k == family])]
        layers.append(("regex", [k for k in self.regex if re.fullmatch(k, name)]))
        layers.append(("names", [k for k in self.names if k == name]))
        for kind, keys in layers:
            # within a level, a class rule beats a family rule; later keys beat earlier ones
            if kind == "types":
                keys = sorted(keys, key=lambda k: (k in types, types.index(k) * -1 if k in types else 0))
            for key in keys:
                rule = _norm_rule(getattr(self, kind)[key], f"{kind}[{key!r}]")
                matched.append(f"{kind}:{key}")
                to = rule.pop("to", None)
                if to is not None and to != preset:
                    preset, kwargs = to, {}
                kwargs.update(rule)
        if preset is not None:
            check_kwargs(PRESETS[preset].variant, kwargs, f"site {name!r}")
        return preset, kwargs, matched

    def rule_keys(self) -> List[str]:
        return ([f"types:{k}" for k in self.types] + [f"regex:{k}" for k in self.regex]
                + [f"names:{k}" for k in self.names] + [f"exclude:{k}" for k in self.exclude])
