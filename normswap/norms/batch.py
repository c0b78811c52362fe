"""Batch-area normalizers: L1, top-k (L-inf), smoothed L2 (BN-s / BN*) and mean-only
batch norm, each a configuration of :class:`~normswap.norms.core.AreaNorm` on a
:class:`~normswap.norms.areas.BatchArea`.

All of them compute, per channel over the batch and spatial positions,
``y = gamma * (x - mu) / d + beta`` and keep running statistics with PyTorch's
convention ``running = (1 - momentum) * running + momentum * batch_value``
(``momentum=None``: cumulative average). A batch whose statistics are not finite (an
overflowed fp16 step) leaves the running statistics untouched.

Design choice: these classes do **not** subclass ``torch.nn.modules.batchnorm._BatchNorm``.
``nn.SyncBatchNorm.convert_sync_batchnorm`` turns every ``_BatchNorm`` subclass into a
plain (L2) ``SyncBatchNorm``, which would silently undo the conversion. Cross-process
statistics come from their own ``sync`` option instead (see :func:`convert_sync`),
which works on any backend, gloo on CPU included.
"""
from __future__ import annotations

from typing import ClassVar, Optional

from torch import nn

from .areas import BatchArea
from .base import check_bool, register_normalizer
from .core import AFFINE, BIAS_ONLY, NO_RECOVERY, AreaNorm, Operation, supports_sync


class BatchStatNorm(AreaNorm):
    """Base of the batch-area classes, with nn.BatchNorm's arguments.

    ``channel_dim``: where the channels are (1 for ``(N, C, *)``, -1 for the tokens
    ``(N, L, C)`` of a transformer: same statistics per channel over every other dim).
    ``_dims``: accepted input ranks (a class default; may be widened per instance).
    """

    _op: ClassVar[str] = "l2"
    _dims: tuple = (4,)
    _weight: ClassVar[bool] = True   # the affine has a gamma (mean-only: a bias only)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, sync: bool = False,
                 process_group=None, l1_alpha: float = 0.0, channel_dim: int = 1,
                 device=None, dtype=None, sigma: float = 0.0, learn_sigma: bool = False, k: int = 10):
        check_bool(self.__class__.__name__, "affine", affine)
        recovery = (AFFINE if self._weight else BIAS_ONLY) if affine else NO_RECOVERY
        super().__init__(BatchArea(num_features, channel_dim),
                         Operation(self._op, sigma=sigma, learn_sigma=learn_sigma, k=k, eps=eps),
                         recovery, momentum=momentum, track_running_stats=track_running_stats,
                         sync=sync, process_group=process_group, l1_alpha=l1_alpha,
                         device=device, dtype=dtype)
        self.num_features = num_features
        self.channel_dim = channel_dim
        self.affine = affine

    def extra_repr(self) -> str:
        s = (f"{self.num_features}, eps={self.eps:g}, momentum={self.momentum}, affine={self.affine}, "
             f"track_running_stats={self.track_running_stats}")
        s += self._op_repr()
        if self.sync:
            s += ", sync=True"
        if self.channel_dim != 1:
            s += f", channel_dim={self.channel_dim}"
        return s + self._penalty_repr()


class _L1BatchNorm(BatchStatNorm):
    """L1 batch norm (Hoffer et al. 2018).

    ``y = gamma * (x - mu) / (C_L1 * mean|x - mu| + eps) + beta``, ``C_L1 = sqrt(pi/2)``,
    statistics per channel over the batch and spatial dims. Running statistics:
    ``running_mean`` and ``running_mad`` (mean absolute deviation). No squares and no
    square root, so it stays finite in float16.
    """
    _op = "l1"


class _TopKBatchNorm(BatchStatNorm):
    """L-infinity ("top-k") batch norm (Hoffer et al. 2018).

    ``s_k = mean of the k largest |x - mu|`` over the channel's n values,
    ``y = gamma * (x - mu) / (C_inf(n) * s_k + eps) + beta``,
    ``C_inf(n) = 0.5 * (1 + sqrt(pi * ln 4)) / sqrt(2 * ln n)``.

    Running statistic ``running_std`` tracks ``C_inf(n) * s_k`` (not raw ``s_k``): raw
    ``s_k`` grows with the batch size n, so its running average would be biased by the
    last smaller batch or a different per-device batch; the calibrated value estimates
    the standard deviation whatever n is, and is what eval mode divides by.
    """
    _op = "topk"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, k: int = 10, **kw):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, k=k, **kw)


class _BatchNormStar(BatchStatNorm):
    """Batch norm with a smoothing term (BN-s; BN* with ``l1_alpha > 0``), Ren et al. 2017.

    ``y = gamma * (x - mu) / sqrt(sigma^2 + E[(x - mu)^2] + eps) + beta``.
    ``sigma = 0`` is exactly ``nn.BatchNorm``. ``learn_sigma=True`` learns ``sigma`` as
    one scalar per layer. Running statistic: ``running_var`` (unbiased, as nn.BatchNorm).
    """
    _op = "l2"

    def __init__(self, num_features: int, sigma: float = 1.0, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, learn_sigma: bool = False, **kw):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         sigma=sigma, learn_sigma=learn_sigma, **kw)

    def _op_repr(self) -> str:
        return ", " + self._sigma_repr()


class _MeanOnlyBatchNorm(BatchStatNorm):
    """Mean-only batch norm (Salimans & Kingma; used with bounded weight norm).

    ``y = x - mu + beta``: subtract the per-channel batch mean (``running_mean`` in eval
    mode) and, with ``affine=True``, add a learned bias (no weight). ``eps`` is accepted
    for nn.BatchNorm's argument order and unused. ``bias=`` is an alias of ``affine``.
    """
    _op = "mean"
    _weight = False

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, bias: Optional[bool] = None,
                 **kw):
        if bias is not None:
            check_bool(self.__class__.__name__, "bias", bias)
            if not affine and bias:
                raise ValueError(f"{type(self).__name__}: bias={bias} and affine={affine} disagree; "
                                 f"bias is an alias of affine, give one of them")
            affine = bias
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kw)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, momentum={self.momentum}, affine={self.affine}"
        if not self.track_running_stats:
            s += ", track_running_stats=False"
        if self.sync:
            s += ", sync=True"
        if self.channel_dim != 1:
            s += f", channel_dim={self.channel_dim}"
        return s + self._penalty_repr()


_INPUTS = {(2, 3): "(N, C) or (N, C, L)", (3,): "(N, C, L)", (4,): "(N, C, H, W)", (5,): "(N, C, D, H, W)"}


def make_ranked(base, name: str, dims: tuple, module: str):
    """A named subclass of ``base`` accepting inputs of rank ``dims`` (registered as an fx leaf)."""
    cls = type(name, (base,), {"_dims": dims, "__module__": module, "__qualname__": name,
                               "__doc__": (base.__doc__ or "") + f"\n    Input: {_INPUTS[dims]}.\n"})
    return register_normalizer(cls)


L1BatchNorm1d = make_ranked(_L1BatchNorm, "L1BatchNorm1d", (2, 3), __name__)
L1BatchNorm2d = make_ranked(_L1BatchNorm, "L1BatchNorm2d", (4,), __name__)
L1BatchNorm3d = make_ranked(_L1BatchNorm, "L1BatchNorm3d", (5,), __name__)
TopKBatchNorm1d = make_ranked(_TopKBatchNorm, "TopKBatchNorm1d", (2, 3), __name__)
TopKBatchNorm2d = make_ranked(_TopKBatchNorm, "TopKBatchNorm2d", (4,), __name__)
TopKBatchNorm3d = make_ranked(_TopKBatchNorm, "TopKBatchNorm3d", (5,), __name__)
BatchNormStar1d = make_ranked(_BatchNormStar, "BatchNormStar1d", (2, 3), __name__)
BatchNormStar2d = make_ranked(_BatchNormStar, "BatchNormStar2d", (4,), __name__)
BatchNormStar3d = make_ranked(_BatchNormStar, "BatchNormStar3d", (5,), __name__)
MeanOnlyBatchNorm1d = make_ranked(_MeanOnlyBatchNorm, "MeanOnlyBatchNorm1d", (2, 3), __name__)
MeanOnlyBatchNorm2d = make_ranked(_MeanOnlyBatchNorm, "MeanOnlyBatchNorm2d", (4,), __name__)
MeanOnlyBatchNorm3d = make_ranked(_MeanOnlyBatchNorm, "MeanOnlyBatchNorm3d", (5,), __name__)


def convert_sync(model: nn.Module, process_group=None) -> nn.Module:
    """Make every normswap batch-area layer of ``model`` (IterNorm included) compute its
    statistics over all processes of ``process_group`` (default: the world) while training.

    The variant is kept (unlike ``nn.SyncBatchNorm.convert_sync_batchnorm``, which
    would turn a ``_BatchNorm`` subclass into plain L2 batch norm). Works on any
    torch.distributed backend. Returns ``model`` (changed in place).
    """
    for m in model.modules():
        if supports_sync(m):
            m.sync = True
            m.process_group = process_group
    return model
