"""Group-area normalizers (the area of ``nn.GroupNorm``): statistics per example and
group of ``num_channels / num_groups`` channels, over those channels and every
position; per-channel affine. Configurations of :class:`~normswap.norms.core.AreaNorm`.
"""
from __future__ import annotations

from .areas import GroupArea
from .base import check_bool, register_normalizer
from .core import AFFINE, NO_RECOVERY, AreaNorm, Operation


class _GroupNorm(AreaNorm):
    """Shared constructor (nn.GroupNorm's arguments). Input ``(N, C, *)``."""

    def __init__(self, num_groups: int, num_channels: int, operation: Operation, affine: bool,
                 l1_alpha: float, device, dtype):
        check_bool(self, "affine", affine)
        super().__init__(GroupArea(num_groups, num_channels), operation, AFFINE if affine else NO_RECOVERY,
                         l1_alpha=l1_alpha, device=device, dtype=dtype)
        self.num_groups, self.num_channels, self.affine = num_groups, num_channels, affine

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps:g}, affine={self.affine}"
                + self._op_repr() + self._penalty_repr())


@register_normalizer
class GroupNormStar(_GroupNorm):
    """GN-s / GN* (Ren et al.'s smoothing term on the group area):
    ``y = (x - mu) / sqrt(sigma^2 + mean((x - mu)^2) + eps) * gamma + beta``, statistics
    per (example, group). ``sigma = 0`` is ``nn.GroupNorm``."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, *,
                 sigma: float = 0.5, learn_sigma: bool = False, l1_alpha: float = 0.0,
                 device=None, dtype=None):
        super().__init__(num_groups, num_channels, Operation("l2", sigma=sigma, learn_sigma=learn_sigma, eps=eps),
                         affine, l1_alpha, device, dtype)

    def _op_repr(self) -> str:
        return ", " + self._sigma_repr()


@register_normalizer
class L1GroupNorm(_GroupNorm):
    """L1 group norm: ``y = (x - mu) / (C_L1 * mean|x - mu| + eps) * gamma + beta``,
    statistics per (example, group), ``C_L1 = sqrt(pi / 2)``."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, *,
                 l1_alpha: float = 0.0, device=None, dtype=None):
        super().__init__(num_groups, num_channels, Operation("l1", eps=eps), affine, l1_alpha, device, dtype)


@register_normalizer
class TopKGroupNorm(_GroupNorm):
    """Top-k group norm: ``y = (x - mu) / (C_inf(n) * s_k + eps) * gamma + beta``, ``s_k``
    the mean of the k largest ``|x - mu|`` of the n values of an (example, group)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, *,
                 k: int = 10, l1_alpha: float = 0.0, device=None, dtype=None):
        super().__init__(num_groups, num_channels, Operation("topk", k=k, eps=eps), affine, l1_alpha,
                         device, dtype)
