"""Instance-area normalizers (the area of ``nn.InstanceNorm*``): statistics per
(example, channel) over the positions. As in torch: no affine and no running
statistics by default; with ``track_running_stats=True`` the running statistics are
the batch average of the per-instance ones (the running variance unbiased) and eval
mode uses them. Configurations of :class:`~normswap.norms.core.AreaNorm`.
"""
from __future__ import annotations

from typing import Optional

from .areas import InstanceArea
from .base import check_bool
from .batch import make_ranked
from .core import AFFINE, NO_RECOVERY, AreaNorm, Operation


class _InstanceNorm(AreaNorm):
    """Shared constructor (nn.InstanceNorm's arguments)."""

    def __init__(self, num_features: int, operation: Operation, momentum: Optional[float], affine: bool,
                 track_running_stats: bool, l1_alpha: float, device, dtype):
        check_bool(self, "affine", affine)
        super().__init__(InstanceArea(num_features), operation, AFFINE if affine else NO_RECOVERY,
                         momentum=momentum, track_running_stats=track_running_stats, l1_alpha=l1_alpha,
                         device=device, dtype=dtype)
        self.num_features, self.affine = num_features, affine

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps:g}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}" + self._op_repr() + self._penalty_repr())


class _InstanceNormStar(_InstanceNorm):
    """IN-s / IN* (Ren et al.'s smoothing term on the instance area):
    ``y = (x - mu) / sqrt(sigma^2 + mean((x - mu)^2) + eps) * gamma + beta``, statistics per
    (example, channel). ``sigma = 0`` is ``nn.InstanceNorm``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = False, track_running_stats: bool = False, *, sigma: float = 0.5,
                 learn_sigma: bool = False, l1_alpha: float = 0.0, device=None, dtype=None):
        super().__init__(num_features, Operation("l2", sigma=sigma, learn_sigma=learn_sigma, eps=eps),
                         momentum, affine, track_running_stats, l1_alpha, device, dtype)

    def _op_repr(self) -> str:
        return ", " + self._sigma_repr()


class _L1InstanceNorm(_InstanceNorm):
    """L1 instance norm: ``y = (x - mu) / (C_L1 * mean|x - mu| + eps) * gamma + beta``,
    statistics per (example, channel); running statistic ``running_mad``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = False, track_running_stats: bool = False, *, l1_alpha: float = 0.0,
                 device=None, dtype=None):
        super().__init__(num_features, Operation("l1", eps=eps), momentum, affine, track_running_stats,
                         l1_alpha, device, dtype)


class _TopKInstanceNorm(_InstanceNorm):
    """Top-k instance norm: ``y = (x - mu) / (C_inf(n) * s_k + eps) * gamma + beta``, ``s_k``
    the mean of the k largest ``|x - mu|`` over the n positions of an (example, channel);
    running statistic ``running_std`` tracks ``C_inf(n) * s_k``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = False, track_running_stats: bool = False, *, k: int = 10,
                 l1_alpha: float = 0.0, device=None, dtype=None):
        super().__init__(num_features, Operation("topk", k=k, eps=eps), momentum, affine,
                         track_running_stats, l1_alpha, device, dtype)


InstanceNormStar1d = make_ranked(_InstanceNormStar, "InstanceNormStar1d", (3,), __name__)
InstanceNormStar2d = make_ranked(_InstanceNormStar, "InstanceNormStar2d", (4,), __name__)
InstanceNormStar3d = make_ranked(_InstanceNormStar, "InstanceNormStar3d", (5,), __name__)
L1InstanceNorm1d = make_ranked(_L1InstanceNorm, "L1InstanceNorm1d", (3,), __name__)
L1InstanceNorm2d = make_ranked(_L1InstanceNorm, "L1InstanceNorm2d", (4,), __name__)
L1InstanceNorm3d = make_ranked(_L1InstanceNorm, "L1InstanceNorm3d", (5,), __name__)
TopKInstanceNorm1d = make_ranked(_TopKInstanceNorm, "TopKInstanceNorm1d", (3,), __name__)
TopKInstanceNorm2d = make_ranked(_TopKInstanceNorm, "TopKInstanceNorm2d", (4,), __name__)
TopKInstanceNorm3d = make_ranked(_TopKInstanceNorm, "TopKInstanceNorm3d", (5,), __name__)
