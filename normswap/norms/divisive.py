"""Divisive normalization (DN), Ren et al. 2017, Eqs. 3-4 with local windows.

For conv features ``x`` of shape (N, C, H, W) (:class:`DivisiveNorm2d`)::

    m(n, p)  = box_A( mean_c x(n, c, .) )(p)          local mean, sum window A
    v        = x - m
    q(n, p)  = box_B( mean_c v(n, c, .)^2 )(p)        local variance, suppression window B
    y        = v / sqrt(sigma^2 + q + eps)            [* gamma + beta]

``box_W`` averages over the **valid** positions of a W-sized window centred on p
(stride 1, same output size, no zero-padding bias at borders); each window is
normalized by its own area (normswap's fixes of the original TF code, PAPERS.md).
It is computed as a zero-padded box sum divided by the count map ``box_sum(1)``,
which also gives its adjoint for backward, ``box_sum(u / count)``.

Both layers run one fused autograd Function, :class:`DivisiveNormFn`, with a
hand-written backward that saves only the input and per-position maps. DN along rows
(DivisiveNorm1d; one channel with windows along W) runs on CPU the compiled kernel of
normswap/kernels/divisive.h instead (:class:`DivisiveRowsFn`, the ``normswap::dn_rows_*``
operators under torch.compile), which saves the input alone.

For fully-connected / recurrent pre-activations (:class:`DivisiveNorm1d`) the window
slides over the hidden-unit index of the last dim, width ``2 * radius + 1``.
"""
from __future__ import annotations

import ctypes
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .first_order import first_order_only
from .. import kernels
from . import fused
from .base import NormalizerBase, check_channels, register_normalizer
from .functional import compiling_on_cpu, recomputable_affine, stat_dtype
from .layer import _SigmaMixin
from .rows import _threads


def _pair(w: Union[int, Tuple[int, int]], layer: str, arg: str) -> Tuple[int, int]:
    pair = (w, w) if isinstance(w, int) else tuple(w)
    if len(pair) != 2 or any((not isinstance(a, int)) or a < 1 or a % 2 == 0 for a in pair):
        raise ValueError(f"{layer}: {arg} must be an odd positive int or a pair of them "
                         f"(so the output keeps its size), got {w!r}")
    return pair


_SHIFT_SUM_MAX = 9  # windows up to this width are summed as shifted slices, wider ones by prefix sums


def _box_sum_by_prefix(t: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """The centred box sum of radius ``r`` along ``dim`` (-1 or -2) of a 4-d ``t`` from its
    prefix sums ``S``: ``S[min(i + r, n - 1)] - S[i - r - 1]`` (0 before the start), two
    operations per value whatever the width. The prefix sums are taken in float64, so that
    the difference of two long sums keeps the window's own precision (pooling a window of
    61 hidden units, as DivisiveNorm1d's default does, cost 61 additions per value)."""
    n = t.shape[dim]
    s = t.to(torch.float64).cumsum(dim)
    before, after = list(s.shape), list(s.shape)
    before[dim], after[dim] = r + 1, r
    padded = torch.cat([s.new_zeros(before), s, s.narrow(dim, n - 1, 1).expand(after)], dim)
    return (padded.narrow(dim, 2 * r + 1, n) - padded.narrow(dim, 0, n)).to(t.dtype)


def _box_sum_along(t: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Sum over ``k`` (odd) neighbours centred at each index of ``dim`` (-1 or -2), zeros outside."""
    if k == 1:
        return t
    r = k // 2
    if k > _SHIFT_SUM_MAX:
        return _box_sum_by_prefix(t, r, dim)
    n = t.shape[dim]
    p = F.pad(t, (r, r) if dim == -1 else (0, 0, r, r))
    out = p.narrow(dim, 0, n) + p.narrow(dim, 1, n)
    for i in range(2, k):
        out = out.add_(p.narrow(dim, i, n))
    return out


def box_sum_2d(t: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """Sum over a ``window`` centred at each position (stride 1, zeros outside); separable."""
    return _box_sum_along(_box_sum_along(t, window[1], -1), window[0], -2)


def box_count_2d(like: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """``|W(p)|``: how many valid positions the window centred at ``p`` covers, (1, 1, H, W)."""
    return box_sum_2d(like.new_ones((1, 1) + tuple(like.shape[-2:])), window)


_POOL_MAX_WORK = 1 << 17   # values x window area up to which one pooling call is faster


def _pooled(t: torch.Tensor, window: Tuple[int, int]) -> bool:
    """Whether the box sums of the map ``t`` are one ``avg_pool2d`` call: eager mode (under
    torch.compile the shifted slices, which inductor fuses), small maps. The shifted slices
    (a pad, ``k`` slices and adds per direction, twice for the count map) cost about 77 us
    a box whatever the map on one CPU thread; the pooling sums each window on its own
    (about 0.6 ns a value and window position): (32, 1, 8, 8) with 5 x 5 windows 27.6
    against 79.7 us, (32, 1, 16, 16) 113 against 85 us, (32, 1, 56, 56) 1,986 against 229 us.
    The crossover is near ``numel * window area = 2^17``. Off the CPU (a GPU; the meta
    device of ``scripts/count_ops.py``) always pooling: one kernel launch where the
    shifted slices or prefix sums are 5 to 20, and a launch, not the window's arithmetic,
    is what a GPU waits for at these sizes (``DivisiveNorm1d(30)`` fwd+bwd: 43
    operations, with its backward computing the maps again; 82 with prefix sums when it
    kept them)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type != "cpu" or t.numel() * window[0] * window[1] <= _POOL_MAX_WORK


def _pool_sum(t: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """Zero-padded box sum by ``avg_pool2d`` (one call instead of a pad, slices and adds)."""
    return F.avg_pool2d(t, window, 1, (window[0] // 2, window[1] // 2),
                        count_include_pad=True) * (window[0] * window[1])


def box_mean_2d(t: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """Mean over the valid positions of a ``window`` centred at each position (stride 1)."""
    if window == (1, 1):
        return t
    if _pooled(t, window):
        return F.avg_pool2d(t, window, 1, (window[0] // 2, window[1] // 2), count_include_pad=False)
    return box_sum_2d(t, window) / box_count_2d(t, window)


def box_mean_2d_adjoint(u: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """Adjoint of :func:`box_mean_2d`: ``sum over p whose window holds q of u(p) / |W(p)|``,
    i.e. ``box_sum(u / |W|)`` (a centred box sum is its own adjoint)."""
    if window == (1, 1):
        return u
    if _pooled(u, window):
        count = _pool_sum(u.new_ones((1, 1) + tuple(u.shape[-2:])), window)
        return _pool_sum(u / count, window)
    return box_sum_2d(u / box_count_2d(u, window), window)


def _chan_sum(t: torch.Tensor) -> torch.Tensor:
    """``sum_c t`` over dim 1, kept as a size-1 dim."""
    return t if t.shape[1] == 1 else t.sum(1, keepdim=True)


def _chan_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_c a * b`` over dim 1, kept as a size-1 dim."""
    return a * b if a.shape[1] == 1 else torch.linalg.vecdot(a, b, dim=1).unsqueeze(1)


def _abs_sum(v: torch.Tensor) -> torch.Tensor:
    """``sum |v|``: on CPU by ``abs`` and ``sum`` (``vector_norm(v, 1)`` is about 5x slower
    there: 0.46 against 0.09 ms on (32, 64, 16, 16)), elsewhere one ``vector_norm`` kernel."""
    if v.device.type == "cpu":
        return v.abs().sum()
    return torch.linalg.vector_norm(v, 1)


def _local_maps(x: torch.Tensor, s, sum_window, sup_window):
    """DN's maps of ``x`` (N, C, H, W), ``s = sigma^2 + eps``: ``(mbar, m, v, r)`` with
    ``mbar = mean_c x``, ``m = box_A(mbar)``, ``v = x - m``, ``r = (box_B(mean_c v^2) + s)^(-1/2)``
    (the channel means are no operations for one channel)."""
    C = x.shape[1]
    mbar = _chan_sum(x) / C if C > 1 else x
    m = box_mean_2d(mbar, sum_window)
    v = x - m
    q = _chan_dot(v, v) / C if C > 1 else v * v
    return mbar, m, v, torch.rsqrt(box_mean_2d(q, sup_window) + s)


class DivisiveNormFn(torch.autograd.Function):
    """Fused DN on (N, C, H, W) with windows A (mean) and B (variance).

    Forward, with per-position maps of shape (N, 1, H, W)::

        m = box_A(sum_c x / C)      v = x - m      q = box_B(sum_c v^2 / C)
        r = (q + sigma^2 + eps)^(-1/2)             y = v * r   (written over v)

    Saved for backward: the input ``x`` and the small maps ``m``, ``r`` and
    ``d = mean_c v`` (for ``C = 1`` the maps are as large as ``x``: then ``x`` alone, and
    backward computes them again by :func:`_local_maps`, so the layer keeps what
    ``nn.LayerNorm`` keeps). Backward, with ``box^T`` the adjoint of a box mean::

        dq  = -r^3 / 2 * sum_c(dy * v)           sum_c(dy * v) = sum_c(dy * x) - m sum_c(dy)
        c_v = 2 / C * box_B^T(dq)                dv = dy * r + c_v * v  [+ g_mad sign(v) / numel]
        dx  = dv - box_A^T(sum_c dv) / C         sum_c(dv) = r sum_c(dy) + c_v C d [+ ...]
        dL/dsigma = 2 sigma * sum(dq)

    so backward needs two channel reductions of ``dy`` and ``dy * x`` and writes
    ``dx = x c_v + dy r + (t - m c_v)`` (per-position ``t``) into the buffer of
    ``dy * x``. ``need_mad`` also
    returns ``mean|v|`` (the L1 penalty's quantity) as a differentiable scalar.
    DivisiveNorm1d runs it on (B, 1, 1, H) with windows (1, w).
    """

    @staticmethod
    def forward(ctx, x, sigma, sum_window, sup_window, eps: float, need_mad: bool):
        ctx.set_materialize_grads(False)
        C = x.shape[1]
        mbar, m, v, r = _local_maps(x, sigma * sigma + eps, sum_window, sup_window)
        mad = _abs_sum(v) / v.numel() if need_mad else x.new_zeros(())
        if compiling_on_cpu(x):
            y = recomputable_affine(x, r, -(m * r))   # recomputable after the box sums (see there)
        else:
            y = v.mul_(r)
        sig = sigma if isinstance(sigma, torch.Tensor) else None
        if C == 1:   # the maps are as large as x: recomputed in backward, x alone is kept
            ctx.save_for_backward(x, None, None, None, sig)
            ctx.s = None if sig is not None else sigma * sigma + eps
        else:
            ctx.save_for_backward(x, m, r, mbar - m, sig)
        ctx.windows, ctx.need_mad, ctx.eps = (sum_window, sup_window), need_mad, eps
        return y, mad

    @staticmethod
    @first_order_only
    def backward(ctx, dy, gmad):
        x, m, r, d, sigma = ctx.saved_tensors
        sum_window, sup_window = ctx.windows
        C = x.shape[1]
        if m is None:   # one channel: the forward's maps again (d = mbar - m = v)
            s = ctx.s if sigma is None else sigma.detach() * sigma.detach() + ctx.eps
            _, m, d, r = _local_maps(x, s, sum_window, sup_window)
        if dy is None:
            dy = torch.zeros_like(x)
        s_dy = _chan_sum(dy)
        buf = torch.mul(dy, x)                 # dy * x, then reused for dx
        dq = -0.5 * r * r * r * (_chan_sum(buf) - m * s_dy)
        c_v = box_mean_2d_adjoint(dq, sup_window) * (2.0 / C)
        s_dv = r * s_dy + c_v * (C * d)
        use_mad = ctx.need_mad and gmad is not None
        if use_mad:
            sign = torch.sub(x, m).sign_()
            g = gmad / x.numel()
            s_dv = s_dv + g * _chan_sum(sign)
        t = box_mean_2d_adjoint(s_dv, sum_window) * (-1.0 / C) - c_v * m
        dx = torch.addcmul(t, x, c_v, out=buf).addcmul_(dy, r)
        if use_mad:
            dx.addcmul_(sign, g)
        gsigma = None
        if sigma is not None and ctx.needs_input_grad[1]:
            gsigma = (2.0 * sigma * dq.sum()).reshape(sigma.shape)
        return dx, gsigma, None, None, None, None


def rows_kernel_shape(x: torch.Tensor, sum_window, sup_window) -> Optional[Tuple[int, int]]:
    """``(rows, n)`` when DN of ``x`` (N, C, H, W) is DN along the rows of its last dim that
    the kernels run (normswap/kernels/divisive.h): one channel, windows along W alone (or
    H = 1: DivisiveNorm1d's view), a float32 / float64 CPU tensor; else None. Under
    torch.compile only when the kernels are already loaded (nothing is built while tracing)."""
    n_, c, h, w = x.shape
    if c != 1 or not (h == 1 or (sum_window[0] == 1 and sup_window[0] == 1)) or x.numel() == 0:
        return None
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    if not (kernels.ready() if torch.compiler.is_compiling() else kernels.library() is not None):
        return None
    return n_ * h, w


def _dn_rows_call(x2: torch.Tensor, dy2: Optional[torch.Tensor], radii: Tuple[int, int], s: float,
                  g: float) -> Tuple[torch.Tensor, float]:
    """One call of ``ns_dn_rows``: ``(y, sum |v|)`` (``dy2`` None) or ``(dx, sum dq)``."""
    out = torch.empty_like(x2)
    total = ctypes.c_double(0.0)
    kernels.call("dn_rows", x2.dtype, x2.data_ptr(), None if dy2 is None else dy2.data_ptr(), x2.shape[0],
                 x2.shape[1], radii[0], radii[1], s, g, out.data_ptr(), ctypes.byref(total), _threads(x2.numel()))
    return out, total.value


def _dn_rows_forward(x2: torch.Tensor, s: float, radii: Tuple[int, int], need_mad: bool):
    """``(y, mean|v|)`` (the latter a zero scalar unless ``need_mad``)."""
    y, abs_sum = _dn_rows_call(x2.contiguous(), None, radii, s, 0.0)
    return y, x2.new_tensor(abs_sum / x2.numel()) if need_mad else x2.new_zeros(())


def _dn_rows_backward(x2: torch.Tensor, dy: Optional[torch.Tensor], s: float, radii: Tuple[int, int],
                      gmad: Optional[torch.Tensor]) -> Tuple[torch.Tensor, float]:
    """``(dx, sum dq)`` for ``dL/dy = dy`` and ``dL/d mean|v| = gmad``."""
    dy = torch.zeros_like(x2) if dy is None else dy.to(x2.dtype).contiguous()
    g = float(gmad) / x2.numel() if gmad is not None else 0.0
    return _dn_rows_call(x2.contiguous(), dy, radii, s, g)


def _smoothing(sigma, eps: float) -> float:
    """``s = sigma^2 + eps`` as a Python float (``sigma`` a float or a learned scalar)."""
    return float(sigma) ** 2 + eps


def _sigma_grad(sigma: torch.Tensor, dq_sum) -> torch.Tensor:
    """``dL/dsigma = 2 sigma sum(dq)`` in sigma's shape (``dq_sum`` a float or a 0-d tensor;
    backwards run without a graph: see first_order_only)."""
    return 2.0 * dq_sum * sigma


class DivisiveRowsFn(torch.autograd.Function):
    """DN along the rows of a (rows, n) tensor by the compiled kernels (eager mode): the
    C = 1 case of :class:`DivisiveNormFn` with windows of radius ``a`` (mean) and ``b``
    (variance) along each row::

        m = box_a(x) / cnt_a    v = x - m    r = (box_b(v^2) / cnt_b + sigma^2 + eps)^(-1/2)
        y = v r
        dq = -r^3 / 2 dy v      dv = dy r + 2 box_b(dq / cnt_b) v [+ g_mad sign(v) / numel]
        dx = dv - box_a(dv / cnt_a)          dL/dsigma = 2 sigma sum(dq)

    It saves only ``x`` (the backward computes ``m``, ``v`` and ``r`` again while a row is
    in cache). ``need_mad`` also returns ``mean|v|`` as a differentiable scalar. Under
    torch.compile the same kernel is the ``normswap::dn_rows_forward`` operator."""

    @staticmethod
    def forward(ctx, x2, sigma, a: int, b: int, eps: float, need_mad: bool):
        ctx.set_materialize_grads(False)
        s = _smoothing(sigma, eps)
        y, mad = _dn_rows_forward(x2, s, (a, b), need_mad)
        ctx.save_for_backward(x2, sigma if isinstance(sigma, torch.Tensor) else None)
        ctx.radii, ctx.s, ctx.need_mad = (a, b), s, need_mad
        return y, mad

    @staticmethod
    @first_order_only
    def backward(ctx, dy, gmad):
        x2, sigma = ctx.saved_tensors
        dx, dq_sum = _dn_rows_backward(x2, dy, ctx.s, ctx.radii, gmad if ctx.need_mad else None)
        gsigma = _sigma_grad(sigma, dq_sum) if sigma is not None and ctx.needs_input_grad[1] else None
        return dx, gsigma, None, None, None, None


# The kernel as operators for torch.compile (one opaque call each way; inductor's code from
# the PyTorch formulation took 1.3x their time on a ViT-sized input, 1.0-1.08 against
# 0.75-0.83 ms fwd+bwd on (32, 17, 192)). ``sigma`` is a learned scalar or None with its
# value in ``sigma_value``.
@torch.library.custom_op("normswap::dn_rows_forward", mutates_args=(), device_types="cpu")
def _dn_rows_op(x2: torch.Tensor, sigma: Optional[torch.Tensor], sigma_value: float, a: int, b: int,
                eps: float, need_mad: bool) -> List[torch.Tensor]:
    y, mad = _dn_rows_forward(x2, _smoothing(sigma if sigma is not None else sigma_value, eps), (a, b), need_mad)
    return [y, mad]


@_dn_rows_op.register_fake
def _(x2, sigma, sigma_value, a, b, eps, need_mad):
    return [x2.new_empty(x2.shape), x2.new_empty(())]


@torch.library.custom_op("normswap::dn_rows_backward", mutates_args=(), device_types="cpu")
def _dn_rows_backward_op(x2: torch.Tensor, dy: torch.Tensor, sigma: Optional[torch.Tensor], sigma_value: float,
                         a: int, b: int, eps: float, gmad: Optional[torch.Tensor]) -> List[torch.Tensor]:
    dx, dq_sum = _dn_rows_backward(x2, dy, _smoothing(sigma if sigma is not None else sigma_value, eps),
                                   (a, b), gmad)
    return [dx, x2.new_tensor(dq_sum)]


@_dn_rows_backward_op.register_fake
def _(x2, dy, sigma, sigma_value, a, b, eps, gmad):
    return [x2.new_empty(x2.shape), x2.new_empty(())]


def _dn_op_setup(ctx, inputs, output):
    x2, sigma, sigma_value, a, b, eps, need_mad = inputs
    ctx.save_for_backward(x2, sigma)
    ctx.setup = (sigma_value, a, b, eps, need_mad)


def _dn_op_backward(ctx, grads):
    dy, gmad = grads
    x2, sigma = ctx.saved_tensors
    sigma_value, a, b, eps, need_mad = ctx.setup
    if dy is None:
        dy = torch.zeros_like(x2)
    dx, dq_sum = _dn_rows_backward_op(x2, dy, sigma, sigma_value, a, b, eps, gmad if need_mad else None)
    gsigma = _sigma_grad(sigma, dq_sum) if sigma is not None and ctx.needs_input_grad[1] else None
    return dx, gsigma, None, None, None, None, None


_dn_rows_op.register_autograd(_dn_op_backward, setup_context=_dn_op_setup)


def dn_rows(x2: torch.Tensor, sigma, a: int, b: int, eps: float, need_mad: bool):
    """DN along the rows of ``x2`` (rows, n) by the kernels: ``(y, mean|v|)``. Eager:
    :class:`DivisiveRowsFn`; under torch.compile the ``normswap::dn_rows_forward`` operator."""
    if torch.compiler.is_compiling():
        learned = sigma if isinstance(sigma, torch.Tensor) else None
        y, mad = _dn_rows_op(x2, learned, 0.0 if learned is not None else float(sigma), a, b, eps, need_mad)
        return y, mad
    return DivisiveRowsFn.apply(x2, sigma, a, b, eps, need_mad)


class _DivisiveBase(_SigmaMixin, NormalizerBase):
    def __init__(self, l1_alpha: float = 0.0):
        super().__init__(l1_alpha=l1_alpha)
        kernels.library()  # build the CPU kernels now: torch.compile cannot while tracing

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

    def _normalize(self, x4: torch.Tensor, sum_window, sup_window, bshape) -> torch.Tensor:
        """DN of ``x4`` (N, C, H, W) in the statistics dtype, penalty, affine."""
        if self._runs_fused(x4):
            return fused.fused_call(self._normalize, x4, sum_window, sup_window, bshape)
        need_mad = self._wants_penalty()
        xs = x4.to(stat_dtype(x4.dtype))
        rows = rows_kernel_shape(xs, sum_window, sup_window)
        if rows is not None:
            y, mad = dn_rows(xs.reshape(rows).contiguous(), self.sigma, sum_window[1] // 2,
                             sup_window[1] // 2, self.eps, need_mad)
            y = y.view(xs.shape)
        else:
            y, mad = DivisiveNormFn.apply(xs, self.sigma, sum_window, sup_window, self.eps, need_mad)
        if need_mad:
            self._record_penalty(mad)
        if self.weight is not None:
            y = torch.addcmul(self.bias.view(bshape), y, self.weight.view(bshape))
        return y.to(x4.dtype)


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
        return self._output_format(x, self._normalize(x, self.sum_window, self.sup_window, (1, -1, 1, 1)))

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
        h = x.shape[-1]
        y = self._normalize(x.reshape(-1, 1, 1, h), (1, 2 * self.radius + 1),
                            (1, 2 * self.sup_radius + 1), (-1,))
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        s = f"radius={self.radius}, sup_radius={self.sup_radius}, {self._sigma_repr()}, eps={self.eps:g}"
        if self.dim != -1:
            s += f", dim={self.dim}"
        if self.affine:
            s += f", num_features={self.num_channels}, affine=True"
        return s + self._penalty_repr()
