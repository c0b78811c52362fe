"""(area, operation, recovery): the one module behind every standardizing normalizer.

A normalizer is three choices (Huang et al.'s survey):

- :class:`~normswap.norms.areas.Area`: which values share statistics (batch, layer,
  channels at a position, group, instance), laid out as a ``(P, G, Q)`` view;
- :class:`Operation`: what is computed on an area, ``v = x - mu`` and ``y = v / d`` with

      "l2"    d = sqrt(sigma^2 + mean(v^2) + eps)        (sigma optional, may be learned)
      "l1"    d = C_L1 * mean(|v|) + eps                 C_L1 = sqrt(pi / 2)
      "topk"  d = C_inf(n) * (mean of the k largest |v|) + eps
      "mean"  d = 1                                      (mean-only);

- :class:`Recovery`: what restores capacity afterwards: ``y * gamma + beta``, gamma
  only, beta only, or nothing.

:class:`AreaNorm` is the generic module; every named class (``L1BatchNorm2d``,
``GroupNormStar``, ...) is a thin configuration of it::

    AreaNorm(GroupArea(8, 64), Operation("l1"), AFFINE)       # == L1GroupNorm(8, 64)

Running statistics (``running = (1 - momentum) * running + momentum * batch_value``,
``momentum=None``: cumulative average) exist only for areas that mix examples; a
batch whose statistics are not finite leaves them untouched, and they stay float32
when the module is cast to half precision. Each layer records
``l1_alpha * mean|x - mu|`` over its own area in training (the L1 penalty).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import kernels
from . import fused
from .areas import Area, BatchArea
from .base import (NormalizerBase, _SigmaMixin, check_bool, check_int, check_momentum,
                   check_number, register_normalizer)
from .functional import C_L1, STATS, reshape_source, stat_dtype, stat_norm
from .running import copy_running_, update_running_

STAT_BUFFERS = {"l2": "running_var", "l1": "running_mad", "topk": "running_std", "mean": None}
"""Name of the running scale statistic of each operation (what eval mode divides by)."""


@dataclass(frozen=True)
class Operation:
    """What is computed on an area.

    Attributes:
        stat: "l2" (with ``sigma``), "l1", "topk" or "mean" (centering only).
        sigma: smoothing term of "l2" (Ren et al.); its initial value if ``learn_sigma``.
        learn_sigma: learn sigma as one scalar per layer ("l2" only).
        k: how many of the largest ``|v|`` "topk" averages.
        eps: added once: inside the square root for "l2", after the scale otherwise.
    """
    stat: str = "l2"
    sigma: float = 0.0
    learn_sigma: bool = False
    k: int = 10
    eps: float = 1e-5

    def validate(self, layer) -> None:
        name = type(layer).__name__
        if self.stat not in STATS:
            raise ValueError(f"{name}: operation must be one of {STATS}, got {self.stat!r}")
        if self.stat == "mean":
            check_number(layer, "eps", self.eps)
        else:
            check_number(layer, "eps", self.eps, low=0.0, strict=True)
        check_number(layer, "sigma", self.sigma, low=0.0)
        check_bool(layer, "learn_sigma", self.learn_sigma)
        if self.stat != "l2" and (self.sigma or self.learn_sigma):
            raise ValueError(f"{name}: sigma / learn_sigma belong to the 'l2' operation, not {self.stat!r}")
        check_int(layer, "k", self.k)


@dataclass(frozen=True)
class Recovery:
    """Representation recovery after normalizing: ``y * gamma`` (weight), ``+ beta`` (bias)."""
    weight: bool = True
    bias: bool = True


AFFINE = Recovery(True, True)
BIAS_ONLY = Recovery(False, True)
SCALE_ONLY = Recovery(True, False)
NO_RECOVERY = Recovery(False, False)


@register_normalizer
class AreaNorm(_SigmaMixin, NormalizerBase):
    """Generic normalizer: ``y = recovery(operation(x) on area)``. See the module doc.

    Args:
        area, operation, recovery: the three choices.
        momentum: running statistics' momentum (None: cumulative average).
        track_running_stats: keep running statistics and use them in eval mode (only
            for areas with ``batch_stats``; default: True for the batch area, else False).
        sync: batch area only: statistics over every process of ``process_group``
            (default: the world) while training.
        l1_alpha: coefficient of the L1 penalty ``mean|x - mu|`` recorded in training.
    """

    _dims: ClassVar[Optional[tuple]] = None   # accepted input ranks (None: the area decides)

    def __init__(self, area: Area, operation: Operation, recovery: Recovery = AFFINE, *,
                 momentum: Optional[float] = 0.1, track_running_stats: Optional[bool] = None,
                 sync: bool = False, process_group=None, l1_alpha: float = 0.0,
                 device=None, dtype=None):
        super().__init__(l1_alpha=l1_alpha)
        if not isinstance(area, Area) or not isinstance(operation, Operation) \
                or not isinstance(recovery, Recovery):
            raise ValueError(f"{type(self).__name__}: expected (Area, Operation, Recovery), got "
                             f"({type(area).__name__}, {type(operation).__name__}, {type(recovery).__name__})")
        if track_running_stats is None:  # batch norms keep running statistics by default
            track_running_stats = isinstance(area, BatchArea)
        area.validate(self)
        operation.validate(self)
        check_bool(self, "recovery.weight", recovery.weight)
        check_bool(self, "recovery.bias", recovery.bias)
        self.momentum = check_momentum(self, momentum)
        self.track_running_stats = check_bool(self, "track_running_stats", track_running_stats)
        self.sync = check_bool(self, "sync", sync)
        if track_running_stats and not area.batch_stats:
            raise ValueError(f"{type(self).__name__}: track_running_stats=True needs an area whose "
                             f"statistics mix examples (batch, instance), not {area.kind!r}")
        self.area, self.operation, self.recovery = area, operation, recovery
        self.process_group = process_group
        self.eps = float(operation.eps)
        if operation.stat == "topk":
            self.k = operation.k
        if operation.stat == "l2":
            self._init_sigma(operation.sigma, operation.learn_sigma)
        else:
            self.learn_sigma = False
        fk = {"device": device, "dtype": dtype}
        shape = area.param_shape()
        self.register_parameter("weight", nn.Parameter(torch.ones(shape, **fk)) if recovery.weight else None)
        self.register_parameter("bias", nn.Parameter(torch.zeros(shape, **fk)) if recovery.bias else None)
        stat_buffer = STAT_BUFFERS[operation.stat]
        if track_running_stats:
            sk = {"device": device, "dtype": stat_dtype(dtype or torch.get_default_dtype())}
            self.register_buffer("running_mean", torch.zeros(shape, **sk))
            if stat_buffer:
                self.register_buffer(stat_buffer, torch.ones(shape, **sk))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            if stat_buffer:
                self.register_buffer(stat_buffer, None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()
        if operation.stat != "mean":
            kernels.library()  # build the CPU kernels now: torch.compile cannot while tracing

    # -- what the rest of the package reads ---------------------------------------------
    @property
    def _stat(self) -> str:
        return self.operation.stat

    @property
    def _stat_buffer(self) -> Optional[str]:
        return STAT_BUFFERS[self.operation.stat]

    def _k(self) -> int:
        return self.operation.k

    # -- parameters and buffers ----------------------------------------------------------
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
        """``sigma^2 + eps`` (a tensor, differentiable when sigma is learned) for "l2"."""
        if self.operation.stat != "l2":
            return None
        sdt = stat_dtype(ref.dtype)
        if self.learn_sigma:
            return self.sigma.to(sdt) ** 2 + self.eps
        return torch.tensor(self.sigma ** 2 + self.eps, dtype=sdt, device=ref.device)

    def _running_denominator(self) -> torch.Tensor:
        stat = self.operation.stat
        if stat == "l2":
            return torch.sqrt(self.running_var + self._delta(self.running_var))
        if stat == "l1":
            return C_L1 * self.running_mad + self.eps
        if stat == "topk":
            return self.running_std + self.eps
        return torch.ones_like(self.running_mean)

    def _sync_group(self):
        if not (self.sync and self.training and isinstance(self.area, BatchArea)):
            return None
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.area.check(self, x)
        if self.track_running_stats and not self.training:
            y = self._eval_forward(x)
        elif self._runs_fused(x) and self._native_dtype(x) is None:
            # (a layer that is PyTorch's own kernel stays so: compiled, it measured 1.6-1.9x
            # slower on the H200)
            y = fused.fused_call(self._stats_forward, x)
        else:
            y = self._stats_forward(x)
        return self._output_format(x, y)

    def _stats_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize with the statistics of ``x`` itself (training; areas with no running stats)."""
        area, op = self.area, self.operation
        group = self._sync_group()
        n = area.values_per_group(x)
        if area.batch_stats and n <= 1 and group is None and self.training:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel in "
                             f"training, got input of shape {tuple(x.shape)}; use a batch size > 1 "
                             f"or call .eval()")
        update = self.training and self.track_running_stats
        want_pen = self._wants_penalty()
        cdt = self._native_dtype(x)
        if cdt is not None:
            y = self._native_forward(x, update, cdt)
            if y is not None:
                return y
        if op.stat == "topk" and op.k > n and group is None:
            raise ValueError(f"{type(self).__name__}: k={op.k} is larger than the {n} values per "
                             f"{'channel' if area.kind == 'batch' else 'group'} of input shape "
                             f"{tuple(x.shape)}; lower k or use a larger input")
        weight, bias = self.weight, self.bias
        gw = gb = qw = qb = post_shape = None
        if area.fused:
            gw, gb = area.group_params(x, weight, bias)
        elif weight is not None or bias is not None:
            qw, qb, post_shape = area.post_params(x, weight, bias)
        x3 = area.to_pgq(x)
        out_shape = reshape_source(x, x3)
        y3, mu, batch_stat, mad, count = stat_norm(
            x3, gw, gb, op.stat, delta=self._delta(x), k=op.k, eps=self.eps, group=group,
            need_mad=want_pen, qweight=qw, qbias=qb, post_shape=post_shape, out_shape=out_shape,
            kernel_when_compiled=op.stat in area.compiled_kernel_stats, source=area.pgq_source(x))
        y = y3 if out_shape is not None else area.from_pgq(y3, x)
        if update:
            self._update_running(area.per_channel(mu, x),
                                 area.per_channel(batch_stat, x) if self._stat_buffer else None, count)
        if want_pen:
            self._record_penalty(mad.mean())
        return y

    def _native_forward(self, x: torch.Tensor, update: bool, cdt: torch.dtype) -> Optional[torch.Tensor]:
        """The L2 operation with a fixed sigma is PyTorch's own kernel with
        ``eps' = sigma^2 + eps``, computing in ``cdt`` (see :meth:`_native_dtype`). Running
        statistics go through copies, so that a non-finite batch leaves them untouched.
        Half-precision input with float32 parameters and statistics (autocast, or bf16 fed
        to a float32 model) computes in float32, as the general path does: kernels that
        take that mix get it (batch norm everywhere, as ``nn.BatchNorm2d`` under autocast;
        every area on CPU), the others a float32 copy of the input; the output is in the
        input's dtype."""
        xk = x if cdt == x.dtype or self.area.native_takes_mixed(x.device) else x.to(cdt)
        eps = self.sigma ** 2 + self.eps
        rm = rv = None
        if update:
            rm, rv = self.running_mean.clone(), self.running_var.clone()
        y = self.area.native_l2(xk, self.weight, self.bias, eps, rm, rv, self.momentum if update else 0.0)
        if y is None:
            return None
        if update:
            with torch.no_grad():
                copy_running_([self.running_mean, self.running_var], [rm, rv], self.num_batches_tracked)
        return y.to(x.dtype)

    def _native_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """The dtype in which the training forward is PyTorch's own kernel, or None where it
        is not: that takes the L2 operation with a fixed sigma, no penalty, statistics of
        this process, and the input's dtype or float32 for float16 / bfloat16 input with
        float32 parameters and running statistics (a module.half() layer keeps float32
        statistics with half gamma: not a mix the kernels take)."""
        update = self.training and self.track_running_stats
        if self.operation.stat != "l2" or self.learn_sigma or self._wants_penalty() \
                or self._sync_group() is not None or (update and self.momentum is None):
            return None
        others = {t.dtype for t in (self.weight, self.bias) if t is not None}
        if update:
            others.add(self.running_mean.dtype)
        if others <= {x.dtype}:
            return x.dtype
        if others == {torch.float32} and x.dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return None

    @torch.no_grad()
    def _update_running(self, mu: torch.Tensor, batch_stat: Optional[torch.Tensor], count) -> None:
        if batch_stat is not None and self.operation.stat == "l2":
            # running variance is unbiased, as in nn.BatchNorm
            if isinstance(count, torch.Tensor):
                batch_stat = batch_stat * (count / (count - 1).clamp(min=1))
            else:
                batch_stat = batch_stat * (count / max(count - 1, 1))
        buffers, values = [self.running_mean], [mu]
        if batch_stat is not None:
            buffers.append(getattr(self, self._stat_buffer))
            values.append(batch_stat)
        update_running_(buffers, values, self.num_batches_tracked, self.momentum)

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x * scale + shift`` with ``scale = gamma / d``, ``shift = beta - mu * scale``
        from the running statistics."""
        scale = 1.0 / self._running_denominator()
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        bshape = self.area.bshape(x) if isinstance(self.area, BatchArea) else (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.to(x.dtype).view(bshape), x, scale.to(x.dtype).view(bshape))

    # -- repr ----------------------------------------------------------------------------
    def extra_repr(self) -> str:
        op = self.operation
        s = f"area={self.area}, operation={op.stat}, eps={self.eps:g}"
        if op.stat == "l2":
            s += ", " + self._sigma_repr()
        if op.stat == "topk":
            s += f", k={op.k}"
        s += f", recovery={self.recovery}"
        if self.track_running_stats:
            s += f", momentum={self.momentum}, track_running_stats=True"
        if self.sync:
            s += ", sync=True"
        return s + self._penalty_repr()

    def _op_repr(self) -> str:
        """The operation's own arguments, for the named classes' repr."""
        op = self.operation
        if op.stat == "l2" and (self._sigma_value() or self.learn_sigma):
            return ", " + self._sigma_repr()
        if op.stat == "topk":
            return f", k={op.k}"
        return ""


def supports_sync(module: nn.Module) -> bool:
    """Whether ``module`` takes batch statistics that ``sync`` can gather over processes."""
    return isinstance(getattr(module, "area", None), BatchArea)
