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

from .variants import PRESETS, VARIANTS, VariantError

SPEC_FORMAT = 1


def presets() -> Dict[str, str]:
    """Preset name -> one-line description with formula and defaults."""
    return {p.name: f"{p.summary}. {p.formula}. defaults: {dict(p.defaults) or '-'}; "
                    f"applies to: {', '.join(p.applies_to())}" for p in PRESETS.values()}


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


def check_kwargs(preset: str, kwargs: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """The keywords checked (names and values) by the variant of ``preset``."""
    if not isinstance(kwargs, Mapping):
        raise SpecError(f"{where}: kwargs must be a dict of keyword -> value, got {type(kwargs).__name__}")
    try:
        return VARIANTS[PRESETS[preset].variant].check(kwargs, where)
    except VariantError as e:
        raise SpecError(str(e)) from None


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
        """Check every field's type and every keyword's name and value (SpecError)."""
        if self.preset is not None and not isinstance(self.preset, str):
            raise SpecError(f"preset={self.preset!r}: expected a preset name (str) or None")
        if not isinstance(self.kwargs, Mapping):
            raise SpecError(f"kwargs={self.kwargs!r}: expected a dict of keyword -> value")
        for kind in ("types", "regex", "names"):
            rules = getattr(self, kind)
            if not isinstance(rules, Mapping) or not all(isinstance(k, str) for k in rules):
                raise SpecError(f"{kind}={rules!r}: expected a dict whose keys are strings and values "
                                f"preset names or dicts like {{'to': 'l1bn', 'k': 5}}")
        if isinstance(self.exclude, str) or not isinstance(self.exclude, (list, tuple)) or \
                not all(isinstance(p, str) for p in self.exclude):
            hint = f" (did you mean exclude=[{self.exclude!r}]?)" if isinstance(self.exclude, str) else ""
            raise SpecError(f"exclude={self.exclude!r}: expected a list of names or regular "
                            f"expressions{hint}")
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise _unknown_preset(self.preset)
            check_kwargs(self.preset, self.kwargs, f"spec kwargs for {self.preset!r}")
        elif self.kwargs:
            raise SpecError("spec kwargs need a preset to apply to; set Spec(preset=...)")
        if not (self.preset or self.types or self.regex or self.names):
            raise SpecError("empty spec: give a preset (one of " + ", ".join(PRESETS) + ") or rules")
        for kind in ("types", "regex", "names"):
            for key, value in getattr(self, kind).items():
                rule = _norm_rule(value, f"{kind}[{key!r}]")
                to = rule.pop("to", None)
                if to is not None:
                    check_kwargs(to, rule, f"{kind}[{key!r}]")
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
        """(preset, checked kwargs with the preset's defaults, matched rule keys) for a site;
        preset None = no rule applies."""
        preset, kwargs, matched = None, {}, []
        if self.preset and family in PRESETS[self.preset].applies_to():
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
        if preset is None:
            return None, {}, matched
        checked = check_kwargs(preset, {**PRESETS[preset].defaults, **kwargs}, f"site {name!r}")
        return preset, checked, matched

    def rule_keys(self) -> List[str]:
        return ([f"types:{k}" for k in self.types] + [f"regex:{k}" for k in self.regex]
                + [f"names:{k}" for k in self.names] + [f"exclude:{k}" for k in self.exclude])
