"""Every area through the compiled CPU kernels (:mod:`normswap.kernels`).

An area's ``(P, G, Q)`` layout is ``G`` groups ("rows") of ``n = P * Q`` values, each the
values that share statistics: ``P`` slices of ``Q`` contiguous values (``P = 1`` for the
layer, channels, group and instance areas; ``P = N`` for the batch area). The formulas
are those of :class:`~normswap.norms.functional.StatNormFn` (its docstring has them);
:func:`row_plan` decides whether a call can take this path, :class:`RowNormFn` runs it
eagerly and the ``normswap::rows_forward`` operator under torch.compile. A batch area whose
channels are the input's last dim in memory (channels-last maps, tokens with their channels
last: :func:`columns_layout`) runs the column kernels (``kernels/cols_impl.h``), which read
each group's values down a column of the ``(N * H * W, C)`` array, in place.

The recovery is one ``gamma``, ``beta`` pair indexed, for value ``i`` of row ``r`` when
``P = 1``, by ``c = ((r * n + i) // S) % Cq``: along the row (``S = 1``, ``Cq = n``: layer
norm), per segment of ``S`` values (group norm: ``S`` = positions per channel), per row
(``S = n``: instance norm); when ``P > 1`` per row (batch norm).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from .. import kernels
from .first_order import first_order_only
from .functional import c_inf

_STAT_CODE = {"l2": 0, "l1": 1, "topk": 2}
_HALF = (torch.float16, torch.bfloat16)   # eager only: computed in float32 (converted on the way)
_SMALL = 1 << 15   # below this many values one thread (OpenMP's start-up costs more)


@dataclass(frozen=True)
class RowPlan:
    """How a call maps onto the row kernels: the recovery vectors and their indexing."""
    gamma: Optional[torch.Tensor]   # flat (Cq,) view of the caller's parameter
    beta: Optional[torch.Tensor]
    seg: int                        # S
    channels: int                   # Cq


def _post_index(post_shape: tuple, pshape: tuple, n: int) -> Optional[tuple]:
    """(S, Cq) for parameters of shape ``pshape`` broadcast against ``post_shape``, or None
    when the dims they vary along are not one contiguous block."""
    pshape = (1,) * (len(post_shape) - len(pshape)) + tuple(pshape)
    varying = [i for i, s in enumerate(pshape) if s != 1]
    if not varying or varying != list(range(varying[0], varying[-1] + 1)):
        return None
    if any(pshape[i] != post_shape[i] for i in varying):
        return None
    seg = cq = 1
    for size in post_shape[varying[-1] + 1:]:
        seg *= size
    for i in varying:
        cq *= post_shape[i]
    if seg == 1:
        return (1, cq) if cq == n else None
    return (seg, cq) if n % seg == 0 else None


def row_plan(x3: torch.Tensor, weight, bias, qweight, qbias, post_shape, stat: str,
             group, delta, kernel_when_compiled: bool = True) -> Optional[RowPlan]:
    """A :class:`RowPlan` when the compiled kernels can run this call, else None (under
    torch.compile only if ``kernel_when_compiled``, the area's choice for the statistic:
    :attr:`~normswap.norms.areas.Area.compiled_kernel_stats`)."""
    if group is not None or stat not in _STAT_CODE:
        return None
    P, G, n = x3.shape
    compiling = torch.compiler.is_compiling()
    half = x3.dtype in _HALF and not compiling
    if x3.device.type != "cpu" or not (x3.dtype in kernels.SUFFIX or half) or x3.numel() == 0 \
            or P * n >= 2 ** 31:
        return None
    columns = not compiling and columns_layout(x3)   # (the column kernels: per-group recovery only)
    if not compiling and not x3.is_contiguous() and not columns:
        return None
    cdt = torch.float32 if half else x3.dtype   # the dtype the kernels compute in
    params = [t for t in (weight, bias, qweight, qbias) if t is not None]
    if any(t.dtype not in (cdt, x3.dtype) or t.device != x3.device for t in params):
        return None
    if delta is not None and delta.dtype != cdt:
        return None
    if qweight is not None or qbias is not None:
        if weight is not None or bias is not None or P != 1 or columns:
            return None
        shapes = {tuple(t.shape) for t in (qweight, qbias) if t is not None}
        if len(shapes) != 1:
            return None
        index = _post_index(tuple(post_shape), shapes.pop(), n)
        if index is None:
            return None
        seg, cq = index
        gamma, beta = qweight, qbias
    else:
        seg, cq = n, G
        gamma, beta = weight, bias
        if P == 1 and n == 1 and G != 1:
            return None   # (one value per row: seg = 1 would read gamma along the row)
    if torch.compiler.is_compiling():
        # (nothing is built while tracing; layers build the kernels at __init__)
        if not (kernel_when_compiled and kernels.ready()):
            return None
    elif kernels.library() is None:
        return None
    flat = [t.reshape(-1) if t is not None else None for t in (gamma, beta)]
    if not torch.compiler.is_compiling() and any(t is not None and not t.is_contiguous() for t in flat):
        return None
    return RowPlan(flat[0], flat[1], seg, cq)


def columns_layout(x3: torch.Tensor) -> bool:
    """Whether the ``(P, G, Q)`` view ``x3`` is a contiguous ``(P, Q, G)`` array (its groups'
    values one column each, the groups side by side: a channels-last batch-norm input, or
    tokens with their channels last), which the column kernels (``kernels/cols_impl.h``)
    read in place."""
    P, G, Q = x3.shape
    return (not x3.is_contiguous() and G > 1 and x3.stride(1) == 1 and x3.stride(2) == G
            and (P == 1 or x3.stride(0) == G * Q))   # (Q = 1 there would be contiguous)


def rows_in_place(x3: torch.Tensor, stat: str, group) -> torch.Tensor:
    """``x3`` in a layout the kernels read where they would run it (eager, CPU, loaded, a
    statistic they compute, one process): a strided ``(P, G, Q)`` view that is not
    :func:`columns_layout` is copied once, which costs less than the PyTorch formulation's
    passes over it."""
    if x3.is_contiguous() or columns_layout(x3) or x3.device.type != "cpu" \
            or torch.compiler.is_compiling() or group is not None or stat not in _STAT_CODE \
            or not (x3.dtype in kernels.SUFFIX or x3.dtype in _HALF) or kernels.library() is None:
        return x3
    return x3.contiguous()


def _ptr(t: Optional[torch.Tensor]):
    return t.data_ptr() if t is not None else None


def _threads(numel: int) -> int:
    return 1 if numel < _SMALL else max(torch.get_num_threads(), 1)


class RowNormFn(torch.autograd.Function):
    """Standardization of the rows of a contiguous ``(P, G, Q)`` tensor by the kernels.

    Returns ``(y, mu, batch_stat, mad)`` as :func:`~normswap.norms.functional.stat_norm`
    does (``mad`` empty unless ``need_mad`` or "l1")."""

    @staticmethod
    def forward(ctx, x3, gamma, beta, delta, stat: str, k: int, eps: float, need_mad: bool,
                seg: int, channels: int, out_shape):
        ctx.set_materialize_grads(False)
        # float16 / bfloat16 input: computed in float32 (parameters too), y in the input's dtype
        half = x3.dtype in _HALF
        param_dtypes = tuple(t.dtype if t is not None else None for t in (gamma, beta))
        if half:
            gamma, beta = (t.float() if t is not None else None for t in (gamma, beta))
        y, mu, d, bstat, mad, thr = _forward_kernel(x3.float() if half else x3, gamma, beta, delta, stat, k,
                                                    eps, need_mad, seg, channels, out_shape)
        if half:
            y = y.to(x3.dtype)
        # (half: x itself, converted again in backward; top-k rows: their means are
        # computed again there, see _kept_mean)
        ctx.save_for_backward(x3, _kept_mean(x3, mu, stat), d, gamma, thr)
        ctx.setup = (stat, k, seg, channels, beta is not None,
                     delta is not None and delta.requires_grad, delta.shape if delta is not None else None)
        ctx.param_dtypes = param_dtypes
        ctx.mark_non_differentiable(mu, bstat)
        return y, mu, bstat, mad if mad is not None else mu.new_zeros(0)

    @staticmethod
    @first_order_only
    def backward(ctx, dy, _gmu, _gstat, gmad):
        stat, k, seg, channels, has_beta, delta_grad, delta_shape = ctx.setup
        x3, mu, d, gamma, thr = ctx.saved_tensors
        if gmad is not None and gmad.numel() == 0:
            gmad = None
        if dy is None and gmad is None:
            return (None,) * 11
        dy = torch.zeros_like(x3) if dy is None else dy.reshape(x3.shape)
        want_g = gamma is not None and ctx.needs_input_grad[1]
        want_b = has_beta and ctx.needs_input_grad[2]
        xc = x3.float() if x3.dtype in _HALF else x3
        dx, dgamma, dbeta, dldd = _backward_kernel(xc, dy, mu, d, gamma, thr, gmad, stat, k, seg, channels,
                                                   want_g, want_b, delta_grad)
        gdt, bdt = ctx.param_dtypes
        dx, dgamma, dbeta = _as_dtype(dx, x3.dtype), _as_dtype(dgamma, gdt), _as_dtype(dbeta, bdt)
        gdelta = (dldd / (2 * d)).sum().reshape(delta_shape) if delta_grad else None
        return (dx, dgamma, dbeta, gdelta, None, None, None, None, None, None, None)


_MEAN_AGAIN_MAX = 128   # top-k rows up to this long: the backward computes their means again


def _as_dtype(t: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _kept_mean(x3: torch.Tensor, mu: torch.Tensor, stat: str) -> Optional[torch.Tensor]:
    """The means the backward is given, or None where it computes them again: top-k on
    short contiguous rows (P = 1, at most ``_MEAN_AGAIN_MAX`` values) keeps d and the k-th
    largest ``|v|`` per row, so that, like the native layers (mean and 1 / sd), it keeps two
    numbers per row besides its input; the backward then computes each mean bit for bit as
    the forward did (measured: about 7% more backward time on rows of 64 values, 22-36% on
    group-norm rows of 392 and 1,568 values, where the third number is 0.1-0.8% of the
    memory; on an AVX2 machine later, with the rows' reads requested ahead and 16 means
    computed side by side, the backward of rows of 64 values took 0.88-0.90x of its time
    with the means handed in). Elsewhere the means are kept."""
    if stat == "topk" and x3.shape[0] == 1 and x3.shape[2] <= _MEAN_AGAIN_MAX and x3.is_contiguous():
        return None
    return mu


def _forward_kernel(x3, gamma, beta, delta, stat, k, eps, need_mad, seg, channels, out_shape):
    """(y, mu, d, batch_stat, mad or None, thr or None) of a contiguous or
    :func:`columns_layout` x3 (``y`` in x3's layout); ``thr`` (top-k only): each row's k-th
    largest ``|v|``, from which the backward finds the k positions."""
    P, G, Q = x3.shape
    n = P * Q
    dt = x3.dtype
    mu, d, bstat = (torch.empty(G, dtype=dt) for _ in range(3))
    mad = torch.empty(G, dtype=dt) if need_mad or stat == "l1" else None
    thr = torch.empty(G, dtype=dt) if stat == "topk" else None
    cinf = c_inf(n) if stat == "topk" else 0.0
    dval = float(delta) if delta is not None else 0.0
    if not x3.is_contiguous():   # columns (per-group recovery: gamma, beta of G values)
        y = torch.empty_like(x3)
        kernels.call("cols_forward", dt, x3.data_ptr(), n, G, _STAT_CODE[stat], k, cinf, eps, dval, _ptr(gamma),
                     _ptr(beta), int(need_mad), y.data_ptr(), mu.data_ptr(), d.data_ptr(), _ptr(mad),
                     bstat.data_ptr(), _ptr(thr), _threads(x3.numel()))
        return y, mu, d, bstat, mad, thr
    y = torch.empty(out_shape if out_shape is not None else x3.shape, dtype=dt)
    kernels.call("forward", dt, x3.data_ptr(), P, G, Q, _STAT_CODE[stat], k, cinf, eps, dval, _ptr(gamma),
                 _ptr(beta), seg, channels, int(need_mad), y.data_ptr(), mu.data_ptr(), d.data_ptr(),
                 _ptr(mad), bstat.data_ptr(), _ptr(thr), _threads(x3.numel()))
    return y, mu, d, bstat, mad, thr


def _backward_kernel(x3, dy, mu, d, gamma, thr, gmad, stat, k, seg, channels, want_g, want_b, want_dldd):
    """(dx, dgamma, dbeta, dL/dd per row): each None where not wanted."""
    P, G, Q = x3.shape
    n = P * Q
    dt = x3.dtype
    columns = not x3.is_contiguous()
    # dy in x3's layout (no copy when it is)
    dy = dy.to(dt).transpose(1, 2).contiguous().transpose(1, 2) if columns else dy.to(dt).contiguous()
    gmad = gmad.to(dt).contiguous() if gmad is not None else None
    dx = torch.empty_like(x3)
    dgamma = torch.empty(channels, dtype=dt) if want_g else None   # (summed in double by the kernel)
    dbeta = torch.empty(channels, dtype=dt) if want_b else None
    dldd = torch.empty(G, dtype=dt) if want_dldd else None
    cinf = c_inf(n) if stat == "topk" else 0.0
    if columns:
        kernels.call("cols_backward", dt, x3.data_ptr(), dy.data_ptr(), n, G, _STAT_CODE[stat], k, cinf,
                     mu.data_ptr(), d.data_ptr(), _ptr(gamma), _ptr(thr), _ptr(gmad), dx.data_ptr(),
                     _ptr(dgamma), _ptr(dbeta), _ptr(dldd), _threads(x3.numel()))
        return dx, dgamma, dbeta, dldd
    kernels.call("backward", dt, x3.data_ptr(), dy.data_ptr(), P, G, Q, _STAT_CODE[stat], k, cinf, _ptr(mu),
                 d.data_ptr(), _ptr(gamma), seg, channels, _ptr(thr), _ptr(gmad), dx.data_ptr(),
                 _ptr(dgamma), _ptr(dbeta), _ptr(dldd), _threads(x3.numel()))
    return dx, dgamma, dbeta, dldd


# -- the same kernels as operators, for torch.compile ----------------------------------------
# Under torch.compile the row kernels are one opaque operator each way (inductor calls them
# as it calls an ATen kernel), so a compiled model computes what the eager one does.
# (An operator's outputs are part of what inductor's on-disk cache assumes and not of its
# key: when they change, the operator gets a new name, here from normswap::row_norm, whose
# sixth output was the top-k positions.)
def _kernel_input(x3: torch.Tensor, seg: int, channels: int) -> torch.Tensor:
    """``x3`` as the kernels read it inside the operators: in place when contiguous, or in the
    :func:`columns_layout` with a recovery per group (what the column kernels do); else a
    contiguous copy."""
    P, G, Q = x3.shape
    if x3.is_contiguous() or (columns_layout(x3) and seg == Q and channels == G):
        return x3
    return x3.contiguous()


def _like(t3: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t3`` (a fresh ``(P, G, Q)`` result) in ``x``'s shape and with the strides of
    ``torch.empty_like(x)``, as the operators' fake functions give it. (A fresh tensor with
    ``x``'s strides is dense, so ``x`` is too and ``empty_like`` keeps them: the usual case,
    without allocating one to compare.)"""
    t = t3.reshape(x.shape)
    if t.stride() == x.stride():
        return t
    out = torch.empty_like(x)
    return t if t.stride() == out.stride() else out.copy_(t)


# The operators take the caller's tensor x (of which the (P, G, Q) view is x.reshape(shape3)),
# not the view: inductor then hands x over in the layout it chose for the convolution before
# it (channels last), where a (P, G, Q) view as the operator's input made it copy x into a
# contiguous layout, and the output and the gradient back (four passes a layer and step).
# The backward operator also takes y, which it does not read: an opaque operator's output
# cannot be recomputed, so without it AOT autograd's partitioner keeps a following ReLU's
# mask as a bool tensor (stored one value at a time by inductor's CPU code); the layer
# returns a clone of y (fused into the next pointwise kernel), since an in-place ReLU must
# not modify the saved y. (As normswap::whiten_forward / whiten_backward do.)
@torch.library.custom_op("normswap::rows_forward", mutates_args=(), device_types="cpu",
                         tags=(torch.Tag.flexible_layout,))
def _row_norm_op(x: torch.Tensor, shape3: List[int], gamma: Optional[torch.Tensor],
                 beta: Optional[torch.Tensor], delta: Optional[torch.Tensor], stat: str, k: int, eps: float,
                 need_mad: bool, seg: int, channels: int) -> List[torch.Tensor]:
    gamma, beta = (t.contiguous() if t is not None else None for t in (gamma, beta))
    y, mu, d, bstat, mad, thr = _forward_kernel(_kernel_input(x.reshape(shape3), seg, channels), gamma, beta,
                                                delta, stat, k, eps, need_mad, seg, channels, None)
    return [_like(y, x), mu, d, bstat, mad if mad is not None else mu.new_zeros(0),
            thr if thr is not None else mu.new_zeros(0)]


@_row_norm_op.register_fake
def _(x, shape3, gamma, beta, delta, stat, k, eps, need_mad, seg, channels):
    G = shape3[1]
    vec = x.new_empty(G)
    mad = x.new_empty(G) if need_mad or stat == "l1" else x.new_empty(0)
    thr = x.new_empty(G if stat == "topk" else 0)
    return [torch.empty_like(x), vec, x.new_empty(G), x.new_empty(G), mad, thr]


@torch.library.custom_op("normswap::rows_backward", mutates_args=(), device_types="cpu",
                         tags=(torch.Tag.flexible_layout,))
def _row_norm_backward_op(x: torch.Tensor, shape3: List[int], y: torch.Tensor, dy: torch.Tensor,
                          mu: Optional[torch.Tensor], d: torch.Tensor, gamma: Optional[torch.Tensor],
                          thr: torch.Tensor, gmad: Optional[torch.Tensor], stat: str, k: int, seg: int,
                          channels: int, want_g: bool, want_b: bool, want_dldd: bool) -> List[torch.Tensor]:
    gamma = gamma.contiguous() if gamma is not None else None
    dx, dgamma, dbeta, dldd = _backward_kernel(_kernel_input(x.reshape(shape3), seg, channels),
                                               dy.reshape(shape3), mu, d, gamma, thr if thr.numel() else None,
                                               gmad, stat, k, seg, channels, want_g, want_b, want_dldd)
    def given(t):   # (an empty tensor of its own for each: an operator's outputs must not alias)
        return t if t is not None else x.new_zeros(0)
    return [_like(dx, x), given(dgamma), given(dbeta), given(dldd)]


@_row_norm_backward_op.register_fake
def _(x, shape3, y, dy, mu, d, gamma, thr, gmad, stat, k, seg, channels, want_g, want_b, want_dldd):
    G = shape3[1]
    return [torch.empty_like(x), x.new_empty(channels if want_g else 0),
            x.new_empty(channels if want_b else 0), x.new_empty(G if want_dldd else 0)]


def _op_setup(ctx, inputs, output):
    x, shape3, gamma, beta, delta, stat, k, eps, need_mad, seg, channels = inputs
    y, mu, d, bstat, mad, thr = output
    ctx.save_for_backward(x, y, _kept_mean(x.reshape(shape3), mu, stat), d, gamma, thr, delta)
    ctx.setup = (list(shape3), stat, k, seg, channels, beta is not None)


def _op_backward(ctx, grads):
    dy, _gmu, _gd, _gstat, gmad, _gthr = grads
    x, y, mu, d, gamma, thr, delta = ctx.saved_tensors
    shape3, stat, k, seg, channels, has_beta = ctx.setup
    if dy is None:
        dy = torch.zeros_like(x)
    want_g = gamma is not None and ctx.needs_input_grad[2]
    want_b = has_beta and ctx.needs_input_grad[3]
    want_dldd = delta is not None and ctx.needs_input_grad[4]
    gmad = gmad if gmad is not None and gmad.numel() else None
    dx, dgamma, dbeta, dldd = _row_norm_backward_op(x, shape3, y, dy, mu, d, gamma, thr, gmad, stat, k, seg,
                                                    channels, want_g, want_b, want_dldd)
    gdelta = (dldd / (2 * d)).sum().reshape(delta.shape) if want_dldd else None
    return (dx, None, dgamma if want_g else None, dbeta if want_b else None, gdelta,
            None, None, None, None, None, None)


_row_norm_op.register_autograd(_op_backward, setup_context=_op_setup)


def row_norm(x3, plan: RowPlan, stat: str, delta, k: int, eps: float, need_mad: bool, out_shape,
             source: Optional[torch.Tensor] = None):
    """Run the row kernels: returns ``(y, mu, batch_stat, mad)``. Eager: :class:`RowNormFn`
    (ctypes, output in the caller's shape); under torch.compile: the ``normswap::rows_forward``
    operator, given ``source`` (``x3 = source.reshape(x3.shape)``) where there is one."""
    if torch.compiler.is_compiling():
        x = source if source is not None else x3
        y, mu, _d, bstat, mad, _thr = _row_norm_op(x, list(x3.shape), plan.gamma, plan.beta, delta, stat, k,
                                                   eps, need_mad, plan.seg, plan.channels)
        return y.clone().reshape(x3.shape), mu, bstat, mad   # (the clone: see the operators above)
    return RowNormFn.apply(x3, plan.gamma, plan.beta, delta, stat, k, eps, need_mad,
                           plan.seg, plan.channels, out_shape)
