"""Typed keyword arguments of variants: a default and a check of the value.

Every value a user passes (in a Spec, a rule, a preset's defaults) goes through the
check of the argument it names before anything is changed, so a bad value is an error
that names the argument, the value and what is accepted, never a silently wrong layer.

    >>> SIGMA.check(0.5)
    0.5
    >>> SIGMA.check(-1)
    Traceback (most recent call last):
    ...
    ValueError: sigma=-1: expected a number >= 0
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence


@dataclass(frozen=True)
class Arg:
    """One keyword a variant accepts.

    Attributes:
        name: the keyword.
        check: returns the value to use (possibly normalized, e.g. ``"inf"`` -> ``inf``)
            or raises ``ValueError`` whose text says what is accepted.
        doc: one line for ``normswap presets`` and error messages.
    """
    name: str
    check_value: Callable[[Any], Any]
    accepted: str
    doc: str = ""

    def check(self, value: Any) -> Any:
        try:
            return self.check_value(value)
        except (ValueError, TypeError):
            raise ValueError(f"{self.name}={value!r}: expected {self.accepted}") from None


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def number(lo: Optional[float] = None, *, strict: bool = False, allow_none: bool = False):
    def check(v):
        if v is None and allow_none:
            return None
        if not _is_number(v) or math.isnan(float(v)):
            raise ValueError
        v = float(v)
        if lo is not None and (v < lo or (strict and v == lo)):
            raise ValueError
        return v
    return check


def integer(lo: int = 1, *, odd: bool = False, allow_none: bool = False):
    def check(v):
        if v is None and allow_none:
            return None
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo or (odd and v % 2 == 0):
            raise ValueError
        return int(v)
    return check


def boolean(v):
    if not isinstance(v, bool):
        raise ValueError
    return v


def momentum_value(v):
    if v is None:
        return None
    if not _is_number(v) or not 0.0 <= float(v) <= 1.0:
        raise ValueError
    return float(v)


def p_norm(v):
    if isinstance(v, str) and v.lower() in ("inf", "infinity"):
        return math.inf
    if _is_number(v) and float(v) in (1.0, 2.0, math.inf):
        return float(v) if float(v) == math.inf else int(v)
    raise ValueError


def choice(options: Sequence[Any]):
    def check(v):
        if v not in options:
            raise ValueError
        return v
    return check


EPS = Arg("eps", number(0.0, strict=True), "a number > 0", "added once to the denominator")
MOMENTUM = Arg("momentum", momentum_value, "a number in [0, 1] or None (cumulative average)",
               "running statistics: running = (1 - momentum) * running + momentum * batch")
AFFINE = Arg("affine", boolean, "True or False", "learned per-channel gamma/beta")
TRACK = Arg("track_running_stats", boolean, "True or False", "keep running statistics for eval mode")
L1_ALPHA = Arg("l1_alpha", number(0.0), "a number >= 0",
               "coefficient of the L1 penalty alpha * mean|x - mu| (0: off)")
SYNC = Arg("sync", boolean, "True or False", "statistics over all processes (batch area)")
SIGMA = Arg("sigma", number(0.0), "a number >= 0", "smoothing term: sqrt(sigma^2 + var + eps)")
LEARN_SIGMA = Arg("learn_sigma", boolean, "True or False", "learn sigma as one scalar per layer")
K = Arg("k", integer(1), "an int >= 1", "number of largest |x - mu| averaged")
BIAS = Arg("bias", boolean, "True or False", "learned per-channel bias")
