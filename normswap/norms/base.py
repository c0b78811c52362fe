"""What every normswap normalizer shares: the L1 activation penalty hook and
input validation.

L1 activation penalty (Ren et al., Eq. 5)::

    L_L1 = l1_alpha * mean(|v|)        v = x - mu, the centered pre-normalization input

Each normalizer with ``l1_alpha > 0`` records this term, as a differentiable tensor,
during its training-mode forward. :func:`normswap.penalty` sums the recorded terms.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn

from . import fused

try:  # timm's registry of modules that fx tracing keeps as leaves
    from timm.layers import register_notrace_module as _register_notrace_module
except Exception:  # pragma: no cover - timm is a dependency, but keep norms importable
    def _register_notrace_module(cls):
        return cls

NORMSWAP_LEAF_MODULES: List[type] = []


def in_input_format(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` in ``x``'s memory format, as the native norms keep it: contiguous for a
    contiguous ``x`` (a layer whose computation ends in a permuted view, e.g. a batch norm
    over tokens with their channels last, would otherwise return a tensor that ``view``
    rejects), channels-last where ``x`` is channels-last (2d or 3d) and ``y``, of the same
    shape, is not: a layer that returned NCHW for a channels-last input would change the
    layout of the rest of the network (a copy at the next layer that wants it back, or
    convolutions run in the slower layout)."""
    if y.shape != x.shape:
        return y
    if x.is_contiguous():
        return y if y.is_contiguous() else y.contiguous()
    if x.dim() not in (4, 5):
        return y
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if x.is_contiguous(memory_format=fmt) and not y.is_contiguous(memory_format=fmt):
        return y.contiguous(memory_format=fmt)
    return y


def register_normalizer(cls):
    """Class decorator: mark a normswap normalizer as an fx leaf (here and in timm)."""
    NORMSWAP_LEAF_MODULES.append(cls)
    return _register_notrace_module(cls)


class NormalizerBase(nn.Module):
    """Base of every normswap normalizer.

    Attributes:
        l1_alpha: coefficient of the L1 penalty on the centered input (0 disables it).
        channels_last_out: return a contiguous NCHW input's result in the channels-last
            memory format, as the module this one replaced did (``transform`` sets it from
            what the original did on a probe, e.g. timm's ``LayerNorm2d``); otherwise the
            output keeps the input's format.
    """

    l1_alpha: float
    channels_last_out: bool = False

    def _output_format(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` in the memory format this layer returns for ``x`` (see the class doc)."""
        if self.channels_last_out and x.dim() == 4 and y.shape == x.shape:
            return y.contiguous(memory_format=torch.channels_last)   # (no copy when it is)
        return in_input_format(x, y)

    def __init__(self, l1_alpha: float = 0.0):
        super().__init__()
        self.l1_alpha = check_number(self, "l1_alpha", l1_alpha, low=0.0)
        self._penalty_terms: List[torch.Tensor] = []
        self._penalty_accumulate = False

    # -- one compiled region per training forward (normswap.norms.fused) ---------------
    def _runs_fused(self, x: torch.Tensor) -> bool:
        """Whether this training forward on ``x`` should run through
        :func:`normswap.norms.fused.fused_call` (on CUDA, outside torch.compile, unsynchronized)."""
        sync_group = getattr(self, "_sync_group", None)
        return self.training and fused.wanted(x) and (sync_group is None or sync_group() is None)

    # -- penalty -----------------------------------------------------------------
    def _wants_penalty(self) -> bool:
        return self.training and self.l1_alpha > 0

    def _record_penalty(self, mean_abs_v: torch.Tensor) -> None:
        """Store ``l1_alpha * mean|v|`` from this forward.

        Overwrites the previous term unless a root hook (installed by
        :func:`normswap.penalty` or ``transform``) clears terms at the start of every
        model forward; then calls of a shared module within one forward add up.
        """
        term = self.l1_alpha * (mean_abs_v.float() if mean_abs_v.dtype in (torch.float16, torch.bfloat16)
                                      else mean_abs_v)
        if self._penalty_accumulate:
            self._penalty_terms.append(term)
        else:
            self._penalty_terms = [term]

    def clear_penalty(self) -> None:
        self._penalty_terms = []

    def penalty_term(self) -> Optional[torch.Tensor]:
        """Sum of the penalty terms recorded since the last clear (None if none)."""
        if not self._penalty_terms:
            return None
        total = self._penalty_terms[0]
        for t in self._penalty_terms[1:]:
            total = total + t
        return total

    def _penalty_repr(self) -> str:
        return f", l1_alpha={self.l1_alpha:g}" if self.l1_alpha else ""

    def __getstate__(self):  # recorded graphs must not be pickled / deep-copied
        state = self.__dict__.copy()
        state["_penalty_terms"] = []
        return state


def check_channels(layer: nn.Module, x: torch.Tensor, dims: tuple, num_channels: Optional[int],
                   channel_dim: int = 1, what: str = "(N, C, ...)") -> None:
    """Raise a ValueError naming the layer and the expected shape.

    Skipped under torch.compile: comparing the input's channel count with a module
    attribute makes dynamo guard on that attribute, so one block class whose instances
    have different widths (EfficientNet's) would recompile per instance and hit the
    recompile limit. A wrong shape still fails there, in the computation itself."""
    if torch.compiler.is_compiling():
        return
    name = type(layer).__name__
    if x.dim() not in dims:
        exp = " or ".join(f"{d}D" for d in dims)
        raise ValueError(f"{name}: expected a {exp} input {what}, got a {x.dim()}D input of shape "
                         f"{tuple(x.shape)}")
    if num_channels is not None and x.shape[channel_dim] != num_channels:
        raise ValueError(f"{name}: expected {num_channels} channels in dim {channel_dim} of the "
                         f"input {what}, got shape {tuple(x.shape)}")


# -- argument checks: a ValueError naming the layer, the argument, the value and what is accepted --
def _owner(layer) -> str:
    return layer if isinstance(layer, str) else type(layer).__name__


def check_bool(layer, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{_owner(layer)}: {name} must be True or False, got {value!r}")
    return value


def check_int(layer, name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        rng = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{_owner(layer)}: {name} must be {rng}, got {value!r}")
    return int(value)


def check_number(layer, name: str, value, low: Optional[float] = None, strict: bool = False) -> float:
    """A real number (not a bool, not a string), ``>= low`` (``> low`` if strict)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if not ok:
        rng = "a finite number" if low is None else f"{'>' if strict else '>='} {low:g} (a finite number)"
        raise ValueError(f"{_owner(layer)}: {name} must be {rng}, got {value!r}")
    return float(value)


def check_momentum(layer, momentum) -> Optional[float]:
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{_owner(layer)}: momentum must be a number in [0, 1] or None, got {momentum!r}")
    return float(momentum)


class _SigmaMixin:
    """The smoothing term ``sigma`` of Ren et al.: a float, or one learned scalar."""

    def _init_sigma(self, sigma: float, learn_sigma: bool):
        sigma = check_number(self, "sigma", sigma, low=0.0)
        self.learn_sigma = check_bool(self, "learn_sigma", learn_sigma)
        if learn_sigma:
            self.sigma = nn.Parameter(torch.tensor(sigma))
        else:
            self.sigma = sigma

    def _sigma_value(self) -> float:
        return float(self.sigma.detach()) if self.learn_sigma else float(self.sigma)

    def _sigma_repr(self) -> str:
        return f"sigma={self._sigma_value():g}" + (", learn_sigma=True" if self.learn_sigma else "")
