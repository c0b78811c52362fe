"""Layer normalization with a smoothing term (LN-s; LN* with ``l1_alpha > 0``).

Ren et al. 2017, on the area of Ba et al.'s layer norm (all normalized dims of one
example)::

    mu = mean(x)   v = x - mu   y = v / sqrt(sigma^2 + mean(v^2) + eps)   [* gamma + beta]

No batch dependence: train and eval compute the same thing. LN-s has no affine by
default (paper Table 1). ``sigma = 0`` with an affine is exactly ``nn.LayerNorm``.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .base import NormalizerBase, check_channels, register_normalizer
from .functional import stat_dtype


class _SigmaMixin:
    def _init_sigma(self, sigma: float, learn_sigma: bool):
        if sigma < 0:
            raise ValueError(f"{type(self).__name__}: sigma must be >= 0, got {sigma}")
        self.learn_sigma = learn_sigma
        if learn_sigma:
            self.sigma = nn.Parameter(torch.tensor(float(sigma)))
        else:
            self.sigma = float(sigma)

    def _sigma_value(self) -> float:
        return float(self.sigma.detach()) if self.learn_sigma else float(self.sigma)

    def _sigma_repr(self) -> str:
        return f"sigma={self._sigma_value():g}" + (", learn_sigma=True" if self.learn_sigma else "")


def smoothed_layer_norm(x: torch.Tensor, ndim: int, sigma, eps: float):
    """Composed LN-s on the last ``ndim`` dims; returns ``(y_hat, v)`` in the stats dtype."""
    dims = tuple(range(x.dim() - ndim, x.dim()))
    xf = x.to(stat_dtype(x.dtype))
    mu = xf.mean(dims, keepdim=True)
    v = xf - mu
    var = v.square().mean(dims, keepdim=True)
    return v * torch.rsqrt(var + sigma * sigma + eps), v


@register_normalizer
class LayerNormStar(_SigmaMixin, NormalizerBase):
    """LN-s / LN* over the trailing ``normalized_shape`` dims (the area of nn.LayerNorm).

    ``y = (x - mu) / sqrt(sigma^2 + mean((x - mu)^2) + eps)``, statistics per example over
    ``normalized_shape``; optional per-element affine (``elementwise_affine``).
    """

    def __init__(self, normalized_shape: Union[int, Sequence[int]], sigma: float = 0.5,
                 elementwise_affine: bool = False, eps: float = 1e-5, bias: bool = True,
                 learn_sigma: bool = False, l1_alpha: float = 0.0, device=None, dtype=None):
        super().__init__(l1_alpha=l1_alpha)
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(s) for s in normalized_shape)
        self.eps = float(eps)
        self.elementwise_affine = elementwise_affine
        self._init_sigma(sigma, learn_sigma)
        fk = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **fk))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **fk)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = len(self.normalized_shape)
        if x.dim() < nd or tuple(x.shape[-nd:]) != self.normalized_shape:
            raise ValueError(f"{type(self).__name__}: expected an input whose last {nd} dims are "
                             f"{self.normalized_shape}, got shape {tuple(x.shape)}")
        want_pen = self._wants_penalty()
        if not self.learn_sigma and not want_pen:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias,
                                self.sigma ** 2 + self.eps)
        y, v = smoothed_layer_norm(x, nd, self.sigma, self.eps)
        if want_pen:
            self._record_penalty(v.abs().mean())
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, {self._sigma_repr()}, eps={self.eps:g}, "
                f"elementwise_affine={self.elementwise_affine}" + self._penalty_repr())


@register_normalizer
class LayerNormStar2d(_SigmaMixin, NormalizerBase):
    """LN-s / LN* over the channels at each position of an NCHW tensor (the area of
    timm's ``LayerNorm2d``).

    ``y[n, :, h, w] = v / sqrt(sigma^2 + mean_c(v^2) + eps)``, ``v = x[n, :, h, w] - mean_c``;
    optional per-channel affine.
    """

    def __init__(self, num_channels: int, sigma: float = 0.5, affine: bool = False,
                 eps: float = 1e-5, bias: bool = True, learn_sigma: bool = False,
                 l1_alpha: float = 0.0, device=None, dtype=None):
        super().__init__(l1_alpha=l1_alpha)
        self.num_channels = num_channels
        self.eps = float(eps)
        self.affine = affine
        self._init_sigma(sigma, learn_sigma)
        fk = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, **fk))
            self.bias = nn.Parameter(torch.zeros(num_channels, **fk)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_channels(self, x, (4,), self.num_channels, what="(N, C, H, W)")
        xl = x.permute(0, 2, 3, 1)
        want_pen = self._wants_penalty()
        if not self.learn_sigma and not want_pen:
            y = F.layer_norm(xl, (self.num_channels,), self.weight, self.bias, self.sigma ** 2 + self.eps)
            return y.permute(0, 3, 1, 2)
        y, v = smoothed_layer_norm(xl, 1, self.sigma, self.eps)
        if want_pen:
            self._record_penalty(v.abs().mean())
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, {self._sigma_repr()}, eps={self.eps:g}, affine={self.affine}"
                + self._penalty_repr())
