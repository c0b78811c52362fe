"""Bounded weight normalization (Hoffer et al. 2018) as a ``torch.nn.utils.parametrize``
parametrization.

Per output channel ``i`` of a conv / linear weight::

    w_i = rho * v_i / ||v_i||_p          p in {1, 2, inf}

``rho`` is a fixed (not learned) per-layer scalar, a buffer, by default the mean over
output channels of ``||w_i||_p`` at the time it is applied. ``v`` (stored as
``parametrizations.weight.original``) is scale invariant: only its direction matters.

With ``learn_gain=True`` (the authors' older variant): ``w_i = g_i * v_i / ||v_i||_p``
with a learned per-channel gain ``g`` (initialised to ``||w_i||_p``) rescaled at every
forward to keep ``||g||_2`` at its initial value ``G0``: ``g <- g * G0 / ||g||_2``.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_SUPPORTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) + _CONV_T


def _p_value(p) -> float:
    if p in ("inf", float("inf"), math.inf):
        return float("inf")
    if p in (1, 2, 1.0, 2.0):
        return float(p)
    raise ValueError(f"bounded_weight_norm: p must be 1, 2 or 'inf', got {p!r}")


def channel_norms(w: torch.Tensor, p: float, transposed: bool = False, groups: int = 1) -> torch.Tensor:
    """``||w_i||_p`` per output channel, shaped to broadcast against ``w``.

    Conv/linear weights have output channels in dim 0. ConvTranspose weights are
    (in, out/groups, *k): output channel (g, j) is ``w[g-th block of in, j]``.
    """
    if not transposed:
        return torch.linalg.vector_norm(w, p, dim=tuple(range(1, w.dim())), keepdim=True)
    cin, cout_g = w.shape[0], w.shape[1]
    wg = w.reshape(groups, cin // groups, cout_g, *w.shape[2:])
    dims = (1,) + tuple(range(3, wg.dim()))
    n = torch.linalg.vector_norm(wg, p, dim=dims, keepdim=True)      # (groups, 1, cout_g, 1...)
    return n.expand_as(wg).reshape(w.shape)


def out_channel_view(w: torch.Tensor, transposed: bool = False, groups: int = 1) -> torch.Tensor:
    """``w`` as (out_channels, rest): one row per output channel."""
    if not transposed:
        return w.reshape(w.shape[0], -1)
    cin, cout_g = w.shape[0], w.shape[1]
    wg = w.reshape(groups, cin // groups, cout_g, -1)
    return wg.permute(0, 2, 1, 3).reshape(groups * cout_g, -1)


class BoundedWeightNorm(nn.Module):
    """Parametrization ``w_i = rho * v_i / ||v_i||_p`` (or the learned-gain variant)."""

    def __init__(self, weight: torch.Tensor, p=2, rho: Optional[float] = None,
                 learn_gain: bool = False, transposed: bool = False, groups: int = 1,
                 gain: Optional[torch.Tensor] = None):
        super().__init__()
        self.p = _p_value(p)
        self.transposed = transposed
        self.groups = groups
        with torch.no_grad():
            norms = out_channel_view(weight.detach(), transposed, groups).norm(self.p, dim=1)
            r = float(norms.mean()) if rho is None and norms.device.type != "meta" else rho
        self.register_buffer("rho", torch.tensor(1.0 if r is None else float(r), dtype=weight.dtype,
                                                 device=weight.device))
        self.learn_gain = learn_gain
        if learn_gain:
            g0 = norms if gain is None else gain.detach().reshape(-1).to(norms)
            self.gain = nn.Parameter(g0.to(weight.dtype).clone())
            self.register_buffer("gain_norm", g0.float().norm(2).reshape(()))

    def _scale(self, v: torch.Tensor) -> torch.Tensor:
        if not self.learn_gain:
            return self.rho.to(v.dtype)
        g = self.gain * (self.gain_norm.to(v.dtype) / self.gain.norm(2).clamp_min(1e-30))
        if not self.transposed:
            return g.view((-1,) + (1,) * (v.dim() - 1))
        cin, cout_g = v.shape[0], v.shape[1]
        gg = g.view(self.groups, 1, cout_g, *([1] * (v.dim() - 2)))
        return gg.expand(self.groups, cin // self.groups, cout_g, *v.shape[2:]).reshape(v.shape)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        norms = channel_norms(v, self.p, self.transposed, self.groups).clamp_min(1e-30)
        return self._scale(v) * v / norms

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w  # v starts as the weight itself (only its direction matters)

    def extra_repr(self) -> str:
        p = "inf" if math.isinf(self.p) else int(self.p)
        return f"p={p}, rho={float(self.rho):.4g}" + (", learn_gain=True" if self.learn_gain else "")


def bounded_weight_norm(module: nn.Module, name: str = "weight", p: Union[int, str] = 2,
                        rho: Optional[float] = None, learn_gain: bool = False,
                        gain: Optional[torch.Tensor] = None) -> nn.Module:
    """Apply bounded weight norm to ``module.<name>`` (Conv1d/2d/3d, ConvTranspose, Linear).

    Returns the module. Its weight becomes ``rho * v / ||v||_p`` per output channel;
    ``v`` is ``module.parametrizations.<name>.original``. ``gain`` (with ``learn_gain``)
    sets the initial per-channel gain instead of ``||w_i||_p``.
    """
    if not isinstance(module, _SUPPORTED):
        raise ValueError(f"bounded_weight_norm supports Conv1d/2d/3d, ConvTranspose1d/2d/3d and "
                         f"Linear, got {type(module).__name__}")
    if parametrize.is_parametrized(module, name):
        raise ValueError(f"{type(module).__name__}.{name} is already parametrized")
    transposed = isinstance(module, _CONV_T)
    groups = getattr(module, "groups", 1) if transposed else 1
    param = BoundedWeightNorm(getattr(module, name), p=p, rho=rho, learn_gain=learn_gain,
                              transposed=transposed, groups=groups, gain=gain)
    parametrize.register_parametrization(module, name, param)
    return module


def is_bounded_weight_norm(module: nn.Module, name: str = "weight") -> bool:
    return parametrize.is_parametrized(module, name) and any(
        isinstance(p, BoundedWeightNorm) for p in module.parametrizations[name])


def remove_bounded_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Fold the parametrization back into a plain weight (same outputs)."""
    if not is_bounded_weight_norm(module, name):
        raise ValueError(f"{type(module).__name__}.{name} has no bounded weight norm")
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return module
