"""Divisive normalization (DN), Ren et al. 2017, Eqs. 3-4 with local windows.

For conv features ``x`` of shape (N, C, H, W) (:class:`DivisiveNorm2d`)::

    m(n, p)  = box_A( mean_c x(n, c, .) )(p)          local mean, sum window A
    v        = x - m
    q(n, p)  = box_B( mean_c v(n, c, .)^2 )(p)        local variance, suppression window B
    y        = v / sqrt(sigma^2 + q + eps)            [* gamma + beta]

``box_W`` averages over the **valid** positions of a W-sized window centred on p
(stride 1, same output size, no zero-padding bias at borders); each window is
normalized by its own area (normswap's fixes of the original TF code, PAPERS.md).

For fully-connected / recurrent pre-activations (:class:`DivisiveNorm1d`) the window
slides over the hidden-unit index of the last dim, width ``2 * radius + 1``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .base import NormalizerBase, check_channels, register_normalizer
from .functional import stat_dtype
from .layer import _SigmaMixin


def _pair(w: Union[int, Tuple[int, int]], layer: str, arg: str) -> Tuple[int, int]:
    pair = (w, w) if isinstance(w, int) else tuple(w)
    if len(pair) != 2 or any((not isinstance(a, int)) or a < 1 or a % 2 == 0 for a in pair):
        raise ValueError(f"{layer}: {arg} must be an odd positive int or a pair of them "
                         f"(so the output keeps its size), got {w!r}")
    return pair


def box_mean_2d(t: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """Mean over the valid positions of a ``window`` centred at each position (stride 1)."""
    if window == (1, 1):
        return t
    return F.avg_pool2d(t, window, 1, (window[0] // 2, window[1] // 2), count_include_pad=False)


def box_mean_1d(t: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the valid positions of ``[j - radius, j + radius]`` along the last dim."""
    if radius == 0:
        return t
    shp = t.shape
    out = F.avg_pool1d(t.reshape(-1, 1, shp[-1]), 2 * radius + 1, 1, radius, count_include_pad=False)
    return out.reshape(shp)


class _DivisiveBase(_SigmaMixin, NormalizerBase):
    def _init_affine(self, num_channels, affine, device, dtype):
        self.num_channels = num_channels
        self.affine = affine
        if affine:
            if num_channels is None:
                raise ValueError(f"{type(self).__name__}: affine=True needs num_channels")
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def _finish(self, y, v, x, bshape):
        if self._wants_penalty():
            self._record_penalty(v.abs().mean())
        if self.weight is not None:
            y = y * self.weight.view(bshape) + self.bias.view(bshape)
        return y.to(x.dtype)


@register_normalizer
class DivisiveNorm2d(_DivisiveBase):
    """DN for conv features (N, C, H, W); see the module docstring for the formula.

    Args:
        sum_window: window A of the local mean (odd int or pair); 1 = per-position mean.
        sup_window: window B of the local variance (suppression field).
        sigma: smoothing term; ``learn_sigma`` learns it as one scalar.
        num_channels, affine: optional per-channel gamma/beta (DN has none in the paper).
    """

    def __init__(self, sum_window: Union[int, Tuple[int, int]] = 5,
                 sup_window: Union[int, Tuple[int, int]] = 5, sigma: float = 0.5,
                 learn_sigma: bool = False, num_channels: Optional[int] = None,
                 affine: bool = False, eps: float = 1e-5, l1_alpha: float = 0.0,
                 device=None, dtype=None):
        super().__init__(l1_alpha=l1_alpha)
        name = type(self).__name__
        self.sum_window = _pair(sum_window, name, "sum_window")
        self.sup_window = _pair(sup_window, name, "sup_window")
        self.eps = float(eps)
        self._init_sigma(sigma, learn_sigma)
        self._init_affine(num_channels, affine, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_channels(self, x, (4,), self.num_channels, what="(N, C, H, W)")
        xf = x.to(stat_dtype(x.dtype))
        local_mean = box_mean_2d(xf.mean(1, keepdim=True), self.sum_window)
        v = xf - local_mean
        # mean over channels of v^2 without a full-size temporary
        chan_var = torch.linalg.vector_norm(v, 2, dim=1, keepdim=True).square() / v.shape[1]
        local_var = box_mean_2d(chan_var, self.sup_window)
        y = v * torch.rsqrt(local_var + self.sigma * self.sigma + self.eps)
        return self._finish(y, v, x, (1, -1, 1, 1))

    def extra_repr(self) -> str:
        s = f"sum_window={self.sum_window}, sup_window={self.sup_window}, {self._sigma_repr()}, eps={self.eps:g}"
        if self.affine:
            s += f", num_channels={self.num_channels}, affine=True"
        return s + self._penalty_repr()


@register_normalizer
class DivisiveNorm1d(_DivisiveBase):
    """DN over the hidden units (last dim) of (N, H) or (N, T, H) pre-activations.

    Window of width ``2 * radius + 1`` for the mean and ``2 * sup_radius + 1`` for the
    variance (default: the same), averaging over valid units only (Eqs. 6-7). In an
    RNN, apply it to each time step's summed input: (N, T, H) does exactly that.
    """

    def __init__(self, radius: int = 30, sigma: float = 0.5, sup_radius: Optional[int] = None,
                 learn_sigma: bool = False, num_features: Optional[int] = None,
                 affine: bool = False, eps: float = 1e-5, l1_alpha: float = 0.0, dim: int = -1,
                 device=None, dtype=None):
        super().__init__(l1_alpha=l1_alpha)
        self.dim = dim
        sup_radius = radius if sup_radius is None else sup_radius
        for arg, r in (("radius", radius), ("sup_radius", sup_radius)):
            if not isinstance(r, int) or r < 0:
                raise ValueError(f"{type(self).__name__}: {arg} must be an int >= 0, got {r!r}")
        self.radius, self.sup_radius = radius, sup_radius
        self.eps = float(eps)
        self._init_sigma(sigma, learn_sigma)
        self._init_affine(num_features, affine, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim not in (-1, x.dim() - 1):
            check_channels(self, x, tuple(range(2, 9)), self.num_channels, self.dim,
                           what=f"with units in dim {self.dim}")
            return self._normalize_last(x.movedim(self.dim, -1)).movedim(-1, self.dim)
        check_channels(self, x, tuple(range(2, 9)), self.num_channels, channel_dim=-1,
                       what="(N, H), (N, T, H) or (..., H)")
        return self._normalize_last(x)

    def _normalize_last(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(stat_dtype(x.dtype))
        v = xf - box_mean_1d(xf, self.radius)
        local_var = box_mean_1d(v.square(), self.sup_radius)
        y = v * torch.rsqrt(local_var + self.sigma * self.sigma + self.eps)
        return self._finish(y, v, x, (-1,))

    def extra_repr(self) -> str:
        s = f"radius={self.radius}, sup_radius={self.sup_radius}, {self._sigma_repr()}, eps={self.eps:g}"
        if self.dim != -1:
            s += f", dim={self.dim}"
        if self.affine:
            s += f", num_features={self.num_channels}, affine=True"
        return s + self._penalty_repr()
