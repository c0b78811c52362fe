"""Per-example normalizers on the area of ``nn.LayerNorm`` (the trailing
``normalized_shape``) and of timm's ``LayerNorm2d`` (the channels at each position of
``(N, C, H, W)``), each a configuration of :class:`~normswap.norms.core.AreaNorm`.

No batch dependence: train and eval compute the same thing.

- LN-s / LN* (Ren et al. 2017): ``y = v / sqrt(sigma^2 + mean(v^2) + eps)``, ``v = x - mean(x)``;
  no affine by default (paper Table 1); ``sigma = 0`` with an affine is ``nn.LayerNorm``.
- L1 (Hoffer et al. 2018 on this area): ``y = v / (C_L1 * mean|v| + eps)``.
- top-k: ``y = v / (C_inf(n) * s_k + eps)``, ``s_k`` the mean of the k largest ``|v|``
  of the n values of the area.
"""
from __future__ import annotations

from typing import Sequence, Union

from .areas import ChannelsArea, LayerArea
from .base import _SigmaMixin, check_bool, register_normalizer  # noqa: F401  (_SigmaMixin: re-export)
from .core import NO_RECOVERY, AreaNorm, Operation, Recovery


def _shape(normalized_shape) -> tuple:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


class _LayerNorm(AreaNorm):
    """Shared constructor of the ``normalized_shape`` classes (nn.LayerNorm's arguments)."""

    def __init__(self, normalized_shape, operation: Operation, elementwise_affine: bool, bias: bool,
                 l1_alpha: float, device, dtype):
        check_bool(self, "elementwise_affine", elementwise_affine)
        check_bool(self, "bias", bias)
        shape = _shape(normalized_shape)
        recovery = Recovery(True, bias) if elementwise_affine else NO_RECOVERY
        super().__init__(LayerArea(shape), operation, recovery, l1_alpha=l1_alpha, device=device, dtype=dtype)
        self.normalized_shape = shape
        self.elementwise_affine = elementwise_affine

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps:g}, elementwise_affine={self.elementwise_affine}"
                + ("" if self.bias is not None or not self.elementwise_affine else ", bias=False")
                + self._op_repr() + self._penalty_repr())


class _LayerNorm2d(AreaNorm):
    """Shared constructor of the channels-at-each-position classes (timm LayerNorm2d's arguments)."""

    _dims = (4,)

    def __init__(self, num_channels: int, operation: Operation, affine: bool, bias: bool,
                 l1_alpha: float, device, dtype):
        check_bool(self, "affine", affine)
        check_bool(self, "bias", bias)
        recovery = Recovery(True, bias) if affine else NO_RECOVERY
        super().__init__(ChannelsArea(num_channels), operation, recovery, l1_alpha=l1_alpha,
                         device=device, dtype=dtype)
        self.num_channels = num_channels
        self.affine = affine

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, eps={self.eps:g}, affine={self.affine}"
                + ("" if self.bias is not None or not self.affine else ", bias=False")
                + self._op_repr() + self._penalty_repr())


@register_normalizer
class LayerNormStar(_LayerNorm):
    """LN-s / LN* over the trailing ``normalized_shape`` dims (the area of nn.LayerNorm).

    ``y = (x - mu) / sqrt(sigma^2 + mean((x - mu)^2) + eps)``, statistics per example over
    ``normalized_shape``; optional per-element affine (``elementwise_affine``).
    """

    def __init__(self, normalized_shape: Union[int, Sequence[int]], sigma: float = 0.5,
                 elementwise_affine: bool = False, eps: float = 1e-5, bias: bool = True,
                 learn_sigma: bool = False, l1_alpha: float = 0.0, device=None, dtype=None):
        super().__init__(normalized_shape, Operation("l2", sigma=sigma, learn_sigma=learn_sigma, eps=eps),
                         elementwise_affine, bias, l1_alpha, device, dtype)

    def _op_repr(self) -> str:
        return ", " + self._sigma_repr()


@register_normalizer
class L1LayerNorm(_LayerNorm):
    """L1 layer norm: per example over ``normalized_shape``,
    ``y = (x - mu) / (C_L1 * mean|x - mu| + eps) * gamma + beta``, ``C_L1 = sqrt(pi / 2)``."""

    def __init__(self, normalized_shape: Union[int, Sequence[int]], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, *, l1_alpha: float = 0.0,
                 device=None, dtype=None):
        super().__init__(normalized_shape, Operation("l1", eps=eps), elementwise_affine, bias,
                         l1_alpha, device, dtype)


@register_normalizer
class TopKLayerNorm(_LayerNorm):
    """Top-k layer norm: per example over the n values of ``normalized_shape``,
    ``y = (x - mu) / (C_inf(n) * s_k + eps) * gamma + beta``, ``s_k`` the mean of the k
    largest ``|x - mu|``, ``C_inf(n) = 0.5 (1 + sqrt(pi ln 4)) / sqrt(2 ln n)``."""

    def __init__(self, normalized_shape: Union[int, Sequence[int]], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, *, k: int = 10,
                 l1_alpha: float = 0.0, device=None, dtype=None):
        super().__init__(normalized_shape, Operation("topk", k=k, eps=eps), elementwise_affine, bias,
                         l1_alpha, device, dtype)


@register_normalizer
class LayerNormStar2d(_LayerNorm2d):
    """LN-s / LN* over the channels at each position of an NCHW tensor (the area of
    timm's ``LayerNorm2d``).

    ``y[n, :, h, w] = v / sqrt(sigma^2 + mean_c(v^2) + eps)``, ``v = x[n, :, h, w] - mean_c``;
    optional per-channel affine.
    """

    def __init__(self, num_channels: int, sigma: float = 0.5, affine: bool = False,
                 eps: float = 1e-5, bias: bool = True, learn_sigma: bool = False,
                 l1_alpha: float = 0.0, device=None, dtype=None):
        super().__init__(num_channels, Operation("l2", sigma=sigma, learn_sigma=learn_sigma, eps=eps),
                         affine, bias, l1_alpha, device, dtype)

    def _op_repr(self) -> str:
        return ", " + self._sigma_repr()


@register_normalizer
class L1LayerNorm2d(_LayerNorm2d):
    """L1 norm over the channels at each position of ``(N, C, H, W)``:
    ``y[n, :, h, w] = v / (C_L1 * mean_c|v| + eps) * gamma + beta``, ``v = x[n, :, h, w] - mean_c``."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, *, bias: bool = True,
                 l1_alpha: float = 0.0, device=None, dtype=None):
        super().__init__(num_channels, Operation("l1", eps=eps), affine, bias, l1_alpha, device, dtype)


@register_normalizer
class TopKLayerNorm2d(_LayerNorm2d):
    """Top-k norm over the C channels at each position of ``(N, C, H, W)``:
    ``y[n, :, h, w] = v / (C_inf(C) * s_k + eps) * gamma + beta``, ``s_k`` the mean of the
    k largest ``|v|`` over the channels."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, *, k: int = 10,
                 bias: bool = True, l1_alpha: float = 0.0, device=None, dtype=None):
        super().__init__(num_channels, Operation("topk", k=k, eps=eps), affine, bias, l1_alpha,
                         device, dtype)
