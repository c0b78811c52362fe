"""Batch-statistics normalizers: L1, top-k (L-inf), smoothed L2 (BN-s / BN*) and
mean-only batch norm.

All of them compute, per channel over the batch and spatial positions,
``y = gamma * (x - mu) / d + beta`` with ``d`` from :mod:`normswap.norms.functional`,
and keep running statistics with PyTorch's convention
``running = (1 - momentum) * running + momentum * batch_value`` (``momentum=None``:
cumulative average). A batch whose statistics are not finite (an overflowed fp16
step) leaves the running statistics untouched.

Design choice: these classes do **not** subclass ``torch.nn.modules.batchnorm._BatchNorm``.
``nn.SyncBatchNorm.convert_sync_batchnorm`` turns every ``_BatchNorm`` subclass into a
plain (L2) ``SyncBatchNorm``, which would silently undo the conversion. Cross-process
statistics come from their own ``sync`` option instead (see :func:`convert_sync`),
which works on any backend, gloo on CPU included.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .base import NormalizerBase, check_channels, register_normalizer
from .functional import C_L1, batch_stat_norm, stat_dtype


class _BatchStatNorm(NormalizerBase):
    """Shared machinery: parameters, running statistics, sync, eval-mode affine."""

    _stat: str = "l2"                    # which denominator (see functional.py)
    _stat_buffer: Optional[str] = None   # name of the running scale statistic
    _dims: tuple = (4,)                  # accepted input ranks
    _has_weight: bool = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, sync: bool = False,
                 process_group=None, l1_alpha: float = 0.0, channel_dim: int = 1,
                 device=None, dtype=None):
        super().__init__(l1_alpha=l1_alpha)
        self.channel_dim = channel_dim
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int, got {num_features!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{type(self).__name__}: momentum must be in [0, 1] or None, got {momentum}")
        fk = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.sync = sync
        self.process_group = process_group
        if affine and self._has_weight:
            self.weight = nn.Parameter(torch.ones(num_features, **fk))
        else:
            self.register_parameter("weight", None)
        if affine:
            self.bias = nn.Parameter(torch.zeros(num_features, **fk))
        else:
            self.register_parameter("bias", None)
        if track_running_stats:
            sk = {"device": device, "dtype": stat_dtype(dtype or torch.get_default_dtype())}
            self.register_buffer("running_mean", torch.zeros(num_features, **sk))
            if self._stat_buffer:
                self.register_buffer(self._stat_buffer, torch.ones(num_features, **sk))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            if self._stat_buffer:
                self.register_buffer(self._stat_buffer, None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # -- parameters and buffers ----------------------------------------------------
    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            if self._stat_buffer:
                getattr(self, self._stat_buffer).fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _apply(self, fn, *args, **kwargs):
        # Running statistics stay float32 when the module is cast to half precision.
        super()._apply(fn, *args, **kwargs)
        for name in ("running_mean", self._stat_buffer):
            buf = getattr(self, name, None) if name else None
            if buf is not None and buf.dtype in (torch.float16, torch.bfloat16):
                setattr(self, name, buf.float())
        return self

    def _delta(self, ref: torch.Tensor) -> Optional[torch.Tensor]:
        """``sigma^2 + eps`` for the L2 family; None otherwise."""
        return None

    def _k(self) -> int:
        return 1

    # -- the denominator from running statistics (eval mode) -------------------------
    def _running_denominator(self) -> torch.Tensor:
        raise NotImplementedError

    def _sync_group(self):
        if not (self.sync and self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _check_input(self, x: torch.Tensor) -> None:
        check_channels(self, x, self._dims, self.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_dim != 1:
            # channels elsewhere (e.g. the last dim of (N, L, C) tokens): same statistics
            # per channel over every other dim
            check_channels(self, x, tuple(range(2, 9)), self.num_features, self.channel_dim,
                           what=f"with channels in dim {self.channel_dim}")
            return self._forward(x.movedim(self.channel_dim, 1)).movedim(1, self.channel_dim)
        self._check_input(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats:
            return self._eval_forward(x)
        per_channel = x.numel() // max(x.shape[1], 1)
        if per_channel <= 1 and self._sync_group() is None:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel in "
                             f"training, got input of shape {tuple(x.shape)}; use a batch size > 1 "
                             f"or call .eval()")
        want_pen = self._wants_penalty()
        y = self._fast_forward(x, want_pen)
        if y is not None:
            return y
        if self._stat == "topk" and self._k() > per_channel and self._sync_group() is None:
            raise ValueError(f"{type(self).__name__}: k={self._k()} is larger than the {per_channel} "
                             f"values per channel of input shape {tuple(x.shape)}; lower k or use "
                             f"a larger batch")
        y, mu, batch_stat, mad, count = batch_stat_norm(
            x, self.weight, self.bias, self._stat, delta=self._delta(x), k=self._k(),
            eps=self.eps, group=self._sync_group(), need_mad=want_pen)
        if self.training and self.track_running_stats:
            self._update_running(mu, batch_stat, int(count))
        if want_pen:
            self._record_penalty(mad.mean())
        return y

    def _fast_forward(self, x: torch.Tensor, want_penalty: bool) -> Optional[torch.Tensor]:
        """Hook for a native kernel when it computes exactly the same thing."""
        return None

    @torch.no_grad()
    def _update_running(self, mu: torch.Tensor, batch_stat: torch.Tensor, count: int) -> None:
        finite = torch.isfinite(mu).all()
        if self._stat_buffer:
            if self._stat == "l2":  # running variance is unbiased, as in nn.BatchNorm
                batch_stat = batch_stat * (count / max(count - 1, 1))
            finite = finite & torch.isfinite(batch_stat).all()
        self.num_batches_tracked.add_(finite.to(self.num_batches_tracked.dtype))
        if self.momentum is None:
            factor = 1.0 / self.num_batches_tracked.clamp(min=1).to(mu.dtype)
        else:
            factor = self.momentum
        rm = self.running_mean
        rm.copy_(torch.where(finite, torch.lerp(rm, mu.to(rm.dtype), factor), rm))
        if self._stat_buffer:
            rs = getattr(self, self._stat_buffer)
            rs.copy_(torch.where(finite, torch.lerp(rs, batch_stat.to(rs.dtype), factor), rs))

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x * scale + shift`` with ``scale = gamma / d``, ``shift = beta - mu * scale``."""
        rm = self.running_mean
        scale = 1.0 / self._running_denominator()
        if self.weight is not None:
            scale = scale * self.weight
        shift = -rm * scale
        if self.bias is not None:
            shift = shift + self.bias
        bshape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.to(x.dtype).view(bshape), x, scale.to(x.dtype).view(bshape))

    def extra_repr(self) -> str:
        s = (f"{self.num_features}, eps={self.eps:g}, momentum={self.momentum}, affine={self.affine}, "
             f"track_running_stats={self.track_running_stats}")
        s += self._variant_repr()
        if self.sync:
            s += ", sync=True"
        if self.channel_dim != 1:
            s += f", channel_dim={self.channel_dim}"
        return s + self._penalty_repr()

    def _variant_repr(self) -> str:
        return ""


# ----------------------------------------------------------------------------------
class _L1BatchNorm(_BatchStatNorm):
    """L1 batch norm (Hoffer et al. 2018).

    ``y = gamma * (x - mu) / (C_L1 * mean|x - mu| + eps) + beta``, ``C_L1 = sqrt(pi/2)``,
    statistics per channel over the batch and spatial dims. Running statistics:
    ``running_mean`` and ``running_mad`` (mean absolute deviation). No squares and no
    square root, so it stays finite in float16.
    """
    _stat = "l1"
    _stat_buffer = "running_mad"

    def _running_denominator(self):
        return C_L1 * self.running_mad + self.eps


class _TopKBatchNorm(_BatchStatNorm):
    """L-infinity ("top-k") batch norm (Hoffer et al. 2018).

    ``s_k = mean of the k largest |x - mu|`` over the channel's n values,
    ``y = gamma * (x - mu) / (C_inf(n) * s_k + eps) + beta``,
    ``C_inf(n) = 0.5 * (1 + sqrt(pi * ln 4)) / sqrt(2 * ln n)``.

    Running statistic ``running_std`` tracks ``C_inf(n) * s_k`` (not raw ``s_k``): raw
    ``s_k`` grows with the batch size n, so its running average would be biased by the
    last smaller batch or a different per-device batch; the calibrated value estimates
    the standard deviation whatever n is, and is what eval mode divides by.
    """
    _stat = "topk"
    _stat_buffer = "running_std"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, k: int = 10, **kw):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"{type(self).__name__}: k must be a positive int, got {k!r}")
        self.k = k
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kw)

    def _k(self):
        return self.k

    def _running_denominator(self):
        return self.running_std + self.eps

    def _variant_repr(self):
        return f", k={self.k}"


class _BatchNormStar(_BatchStatNorm):
    """Batch norm with a smoothing term (BN-s; BN* with ``l1_alpha > 0``), Ren et al. 2017.

    ``y = gamma * (x - mu) / sqrt(sigma^2 + E[(x - mu)^2] + eps) + beta``.
    ``sigma = 0`` is exactly ``nn.BatchNorm``. ``learn_sigma=True`` learns ``sigma`` as
    one scalar per layer. Running statistic: ``running_var`` (unbiased, as nn.BatchNorm).
    """
    _stat = "l2"
    _stat_buffer = "running_var"

    def __init__(self, num_features: int, sigma: float = 1.0, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, learn_sigma: bool = False, **kw):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kw)
        self.learn_sigma = learn_sigma
        if learn_sigma:
            self.sigma = nn.Parameter(torch.tensor(float(sigma)))
        else:
            self.sigma = float(sigma)

    def _delta(self, ref):
        if self.learn_sigma:
            return self.sigma.to(stat_dtype(ref.dtype)) ** 2 + self.eps
        return torch.tensor(self.sigma ** 2 + self.eps, dtype=stat_dtype(ref.dtype), device=ref.device)

    def _running_denominator(self):
        return torch.sqrt(self.running_var + self._delta(self.running_var))

    def _fast_forward(self, x, want_penalty):
        # Same formula as native batch norm with eps' = sigma^2 + eps: use its kernel when
        # nothing else (sync, learned sigma, penalty) is needed. Running stats go through
        # copies so that a non-finite batch leaves them untouched.
        if self.learn_sigma or want_penalty or self._sync_group() is not None:
            return None
        stats_dtype = self.running_mean.dtype if self.track_running_stats else None
        if self.weight is not None and stats_dtype is not None and self.weight.dtype != stats_dtype:
            return None  # a module.half() model: native kernel wants one dtype for all
        if not self.track_running_stats:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0,
                                self.sigma ** 2 + self.eps)
        rm, rv = self.running_mean.clone(), self.running_var.clone()
        nbt = self.num_batches_tracked
        momentum = self.momentum if self.momentum is not None else 1.0 / float(nbt.item() + 1)
        y = F.batch_norm(x, rm, rv, self.weight, self.bias, True, momentum, self.sigma ** 2 + self.eps)
        with torch.no_grad():
            finite = torch.isfinite(rm).all() & torch.isfinite(rv).all()
            self.running_mean.copy_(torch.where(finite, rm, self.running_mean))
            self.running_var.copy_(torch.where(finite, rv, self.running_var))
            nbt.add_(finite.to(nbt.dtype))
        return y

    def _variant_repr(self):
        sigma = float(self.sigma) if not self.learn_sigma else float(self.sigma.detach())
        return f", sigma={sigma:g}" + (", learn_sigma=True" if self.learn_sigma else "")


class _MeanOnlyBatchNorm(_BatchStatNorm):
    """Mean-only batch norm (Salimans & Kingma; used with bounded weight norm).

    ``y = x - mu + beta``: subtract the per-channel batch mean (``running_mean`` in eval
    mode) and add a learned bias. No scaling.
    """
    _stat = "mean"
    _stat_buffer = None
    _has_weight = False

    def __init__(self, num_features: int, momentum: Optional[float] = 0.1, bias: bool = True,
                 track_running_stats: bool = True, **kw):
        kw.pop("eps", None)
        kw.pop("affine", None)
        super().__init__(num_features, 0.0, momentum, bias, track_running_stats, **kw)

    def _running_denominator(self):
        return torch.ones_like(self.running_mean)

    def extra_repr(self):
        s = f"{self.num_features}, momentum={self.momentum}, bias={self.bias is not None}"
        if self.sync:
            s += ", sync=True"
        return s + self._penalty_repr()


def _dims_doc(dims):
    return {(2, 3): "(N, C) or (N, C, L)", (4,): "(N, C, H, W)", (5,): "(N, C, D, H, W)"}[dims]


def _make(base, name, dims):
    cls = type(name, (base,), {"_dims": dims, "__module__": __name__,
                               "__doc__": (base.__doc__ or "") + f"\n    Input: {_dims_doc(dims)}.\n"})
    return register_normalizer(cls)


L1BatchNorm1d = _make(_L1BatchNorm, "L1BatchNorm1d", (2, 3))
L1BatchNorm2d = _make(_L1BatchNorm, "L1BatchNorm2d", (4,))
L1BatchNorm3d = _make(_L1BatchNorm, "L1BatchNorm3d", (5,))
TopKBatchNorm1d = _make(_TopKBatchNorm, "TopKBatchNorm1d", (2, 3))
TopKBatchNorm2d = _make(_TopKBatchNorm, "TopKBatchNorm2d", (4,))
TopKBatchNorm3d = _make(_TopKBatchNorm, "TopKBatchNorm3d", (5,))
BatchNormStar1d = _make(_BatchNormStar, "BatchNormStar1d", (2, 3))
BatchNormStar2d = _make(_BatchNormStar, "BatchNormStar2d", (4,))
BatchNormStar3d = _make(_BatchNormStar, "BatchNormStar3d", (5,))
MeanOnlyBatchNorm1d = _make(_MeanOnlyBatchNorm, "MeanOnlyBatchNorm1d", (2, 3))
MeanOnlyBatchNorm2d = _make(_MeanOnlyBatchNorm, "MeanOnlyBatchNorm2d", (4,))
MeanOnlyBatchNorm3d = _make(_MeanOnlyBatchNorm, "MeanOnlyBatchNorm3d", (5,))

BatchStatNorm = _BatchStatNorm


def convert_sync(model: nn.Module, process_group=None) -> nn.Module:
    """Make every normswap batch-statistics layer of ``model`` compute its statistics
    over all processes of ``process_group`` (default: the world) while training.

    The variant is kept (unlike ``nn.SyncBatchNorm.convert_sync_batchnorm``, which
    would turn a ``_BatchNorm`` subclass into plain L2 batch norm). Works on any
    torch.distributed backend. Returns ``model`` (changed in place).
    """
    for m in model.modules():
        if isinstance(m, _BatchStatNorm):
            m.sync = True
            m.process_group = process_group
    return model
