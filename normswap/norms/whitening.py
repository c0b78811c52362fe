"""Whitening on the batch area: IterNorm (Huang, Zhou, Zhu, Liu, Shao, CVPR 2019).

The channels are split into groups of ``group_size`` (the last group smaller when
``num_features`` is not a multiple). For a group of ``d`` channels with ``m`` values
per channel and centered values ``V = x - mu`` (``d x m``)::

    Sigma   = V V^T / m + eps * I
    Sigma_N = Sigma / tr(Sigma)
    P_0 = I;   P_k = (3 P_{k-1} - P_{k-1}^3 Sigma_N) / 2,   k = 1..T
    y = P_T / sqrt(tr(Sigma)) * V                  then   y * gamma + beta per channel

``P_T`` approximates ``Sigma_N^{-1/2}``, so ``y`` approximately has identity covariance.
Eval mode uses ``running_mean`` and ``running_wm`` (the whitening matrix
``P_T / sqrt(tr(Sigma))`` per group), kept with PyTorch's momentum convention
``running = (1 - momentum) * running + momentum * batch_value``. The training forward
of equal groups has its backward written out (``_GroupWhitenFn``), with the iteration's
chain rule recomputing the steps; on CPU the iteration and that chain rule run in the
compiled kernels (normswap/kernels/newton.h, in the input's precision) where they are
available, and with groups of 16 channels (the default) in float32 / float64 the whole
layer does, one pass over the data per statistic and per output each way, channels first
or last (``_GroupWhitenKernelFn``, normswap/kernels/whiten.h). Under torch.compile those
kernels are the ``normswap::whiten_forward`` / ``whiten_backward`` operators; elsewhere the
iteration is one custom operator with the same written-out backward (a small graph to
compile). Other cases (unequal groups, synchronized batches, the L1 penalty) keep
autograd through the steps. Computed in float32 for half-precision inputs.
Under ``sync=True`` the mean and covariance are taken over every process.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from .first_order import first_order_only
from .. import kernels
from . import fused
from .areas import BatchArea
from .base import (NormalizerBase, check_bool, check_channels, check_int, check_momentum,
                   check_number)
from .batch import make_ranked
from .functional import stat_dtype
from .rows import _ptr, _threads
from .running import update_running_


@dataclass(frozen=True)
class Whitening:
    """The whitening operation: groups of ``group_size`` channels, ``T`` Newton steps, ``eps``."""
    group_size: int = 16
    T: int = 5
    eps: float = 1e-5

    def validate(self, layer) -> None:
        check_int(layer, "group_size", self.group_size)
        check_int(layer, "T", self.T)
        check_number(layer, "eps", self.eps, low=0.0, strict=True)


def _sizes(num_features: int, group_size: int) -> List[int]:
    d = min(group_size, num_features)
    full, rest = divmod(num_features, d)
    return [d] * full + ([rest] if rest else [])


def _newton_steps(cov: torch.Tensor, T: int):
    """The iteration for a batch of covariance matrices ``Sigma`` (..., d, d): returns
    ``tr(Sigma)``, ``Sigma_N``, ``I``, the ``(P_{k-1}, P_{k-1}^2, P_{k-1}^3)`` of steps
    ``k = 2..T`` (what the written-out backward needs) and ``P_T``."""
    tr = cov.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    sig_n = cov / tr
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    # P_1 = (3 I - I^3 Sigma_N) / 2 without its three products by I (a smaller graph to
    # compile and differentiate); P_k = (3 P - P^3 Sigma_N) / 2 after that
    p = 1.5 * eye - 0.5 * sig_n if T >= 1 else eye.expand_as(cov)
    steps = []
    for _ in range(T - 1):
        pp = torch.matmul(p, p)
        ppp = torch.matmul(pp, p)
        steps.append((p, pp, ppp))
        p = 1.5 * p - 0.5 * torch.matmul(ppp, sig_n)
    return tr, sig_n, eye, steps, p


def _newton_kernel(cov: torch.Tensor, grad: Optional[torch.Tensor], T: int) -> Optional[torch.Tensor]:
    """The compiled kernels' iteration (normswap/kernels/newton.h on CPU,
    triton_newton.py on CUDA): ``P_T / sqrt(tr(Sigma))`` when ``grad`` is None, else
    ``dL/dSigma`` for ``dL/d(P_T / sqrt(tr(Sigma))) = grad``; in the input's precision.
    None where they do not apply (CPU: not float32 / float64, no kernels; CUDA: not
    float32, no Triton): the caller then runs the PyTorch formulation."""
    if cov.device.type in _TRITON_DEVICES:
        return _newton_triton(cov, grad, T)
    if cov.device.type != "cpu" or cov.dtype not in (torch.float32, torch.float64) or cov.dim() < 2:
        return None
    if kernels.library() is None:
        return None
    d = cov.shape[-1]
    cov = cov.contiguous()
    G = cov.numel() // (d * d)
    out = torch.empty_like(cov)
    threads = min(torch.get_num_threads(), G) if G * d ** 3 * max(T, 1) >= 1 << 20 else 1
    if grad is None:
        kernels.call("newton_forward", cov.dtype, cov.data_ptr(), G, d, int(T), out.data_ptr(), threads)
    else:
        grad = grad.to(cov.dtype).contiguous()
        kernels.call("newton_backward", cov.dtype, cov.data_ptr(), grad.data_ptr(), G, d, int(T),
                     out.data_ptr(), threads)
    return out


_TRITON_DEVICES = ("cuda",)   # (the tests add "cpu" under Triton's interpreter)
_triton_failed = []   # the first failure to launch the Triton kernels (then never tried again)


def _triton_applies(cov: torch.Tensor) -> bool:
    """Whether the Triton kernels take ``cov``: float32 on CUDA, Triton importable,
    kernels not switched off, no earlier failure."""
    if cov.device.type not in _TRITON_DEVICES or _triton_failed or kernels.switched_off():
        return False
    from ..kernels import triton_newton
    return triton_newton.available() and triton_newton.applies(cov)


def _newton_triton(cov: torch.Tensor, grad: Optional[torch.Tensor], T: int) -> Optional[torch.Tensor]:
    """The iteration's Triton kernels for float32 CUDA tensors (None: not applicable, or
    they failed once: a warning says why, and the PyTorch formulation runs from then on)."""
    if not _triton_applies(cov):
        return None
    from ..kernels import triton_newton
    try:
        return triton_newton.forward(cov, T) if grad is None else triton_newton.backward(cov, grad, T)
    except Exception as err:  # noqa: BLE001 - a GPU or Triton it cannot compile for: PyTorch path
        _triton_failed.append(err)
        warnings.warn(f"normswap: IterNorm's Triton Newton kernels failed ({type(err).__name__}: {err}); "
                      f"using the PyTorch formulation (slower, same results)", RuntimeWarning)
        return None


def _newton_whitening(cov: torch.Tensor, T: int) -> torch.Tensor:
    """``P_T / sqrt(tr(Sigma))`` for a batch of covariance matrices ``Sigma`` (..., d, d)
    (by the kernels where no gradient is recorded: autograd cannot see through them)."""
    if not (torch.is_grad_enabled() and cov.requires_grad):
        out = _newton_kernel(cov, None, T)
        if out is not None:
            return out
    tr, _, _, _, p = _newton_steps(cov, T)
    return p / torch.sqrt(tr)


# The iteration as one operator of its own (for torch.compile: dynamo and inductor see one
# opaque call, not T unrolled steps of small matrix products and their backward, which made
# a converted model's compile time 2.5-2.8x the original's), with its backward written out:
# for P' = (3 P - P^3 S) / 2 and G = dL/dP',
#     dL/dP = 3/2 G - 1/2 (G (P^2 S)^T + P^T G (P S)^T + (P^2)^T G S^T),   dL/dS += -1/2 (P^3)^T G;
# then S = Sigma / tr(Sigma) and out = P_T / sqrt(tr(Sigma)) by the chain rule. Sigma must be
# symmetric (a covariance, as every caller passes): the C kernel's backward uses S and P_k
# in place of their transposes.
@torch.library.custom_op("normswap::newton_whitening", mutates_args=())
def _newton_whitening_op(cov: torch.Tensor, T: int) -> torch.Tensor:
    return _newton_whitening(cov, T)


@_newton_whitening_op.register_fake
def _(cov: torch.Tensor, T: int) -> torch.Tensor:
    return torch.empty_like(cov)


@torch.library.custom_op("normswap::newton_whitening_backward", mutates_args=())
def _newton_whitening_backward(cov: torch.Tensor, grad: torch.Tensor, T: int) -> torch.Tensor:
    out = _newton_kernel(cov, grad, T)
    if out is not None:
        return out
    tr, s_n, eye, steps, p = _newton_steps(cov, T)   # the forward again, with its products
    rs = torch.rsqrt(tr)
    g_p = grad * rs                                                     # dL/dP_T
    g_tr = -0.5 * (grad * p).sum(dim=(-2, -1), keepdim=True) * rs / tr
    g_s = torch.zeros_like(cov)
    for p, pp, ppp in reversed(steps):                                 # k = T .. 2
        g_s = g_s - 0.5 * torch.matmul(ppp.mT, g_p)
        h = -0.5 * torch.matmul(g_p, s_n.mT)                           # dL/d(P^3)
        g_p = 1.5 * g_p + torch.matmul(h, pp.mT) + torch.matmul(torch.matmul(p.mT, h), p.mT) \
            + torch.matmul(pp.mT, h)
    if T >= 1:                                                          # P_1 = (3 I - Sigma_N) / 2
        g_s = g_s - 0.5 * g_p
    g_tr = g_tr - (g_s * cov).sum(dim=(-2, -1), keepdim=True) / (tr * tr)
    return g_s / tr + g_tr * eye


@_newton_whitening_backward.register_fake
def _(cov: torch.Tensor, grad: torch.Tensor, T: int) -> torch.Tensor:
    return torch.empty_like(cov)


def _save_cov(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.T = inputs[1]


def _newton_backward(ctx, grad):
    (cov,) = ctx.saved_tensors
    return _newton_whitening_backward(cov, grad.contiguous(), ctx.T), None


_newton_whitening_op.register_autograd(_newton_backward, setup_context=_save_cov)


def newton_whitening(cov: torch.Tensor, T: int) -> torch.Tensor:
    """``P_T / sqrt(tr(Sigma))`` for a batch of covariance matrices ``Sigma`` (..., d, d):
    ``Sigma_N = Sigma / tr(Sigma)``, ``P_0 = I``, ``P_k = (3 P_{k-1} - P_{k-1}^3 Sigma_N) / 2``."""
    if torch.compiler.is_compiling():  # one opaque operator: a small graph to compile
        return torch.ops.normswap.newton_whitening(cov.contiguous(), int(T))
    if torch.is_grad_enabled() and cov.requires_grad and _triton_applies(cov):
        # eager on CUDA: the operator too, whose two calls are the Triton kernels (about 130
        # launches of small products otherwise)
        return torch.ops.normswap.newton_whitening(cov.contiguous(), int(T))
    return _newton_whitening(cov, T)   # eager CPU: autograd through the steps (no recomputation)


# -- the training forward of equal groups of 16 channels by the kernels (whiten.h) -----
_KERNEL_GROUP = 16


def _whiten_kernels(x: torch.Tensor, d: int) -> bool:
    """Whether the kernels whiten ``x``: a float32 / float64 CPU tensor in groups of 16
    channels, with the kernels loaded (under torch.compile: already built)."""
    if d != _KERNEL_GROUP or x.device.type != "cpu" or x.dtype not in kernels.SUFFIX or x.shape[1] % d:
        return False
    return kernels.ready() if torch.compiler.is_compiling() else kernels.library() is not None


def _channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` (N, C, *) is laid out (N, *, C) (channels last), not (N, C, *)."""
    return not t.is_contiguous() and t.dim() > 2 and t.movedim(1, -1).is_contiguous()


def _in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` laid out (N, *, C) when ``channels_last``, else (N, C, *) (no copy when it is)."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if channels_last else t.contiguous()


def _kernel_layout(x: torch.Tensor, out: torch.Tensor):
    """``(x, out, channels_last)`` for the kernels: ``x`` in ``out``'s layout when that is one
    they read ((N, C, L) or (N, L, C)), else both as contiguous copies (``out`` then to be
    copied back)."""
    if out.is_contiguous():
        return x.contiguous(), out, False
    if _channels_last(out):
        return _in_layout(x, True), out, True
    return x.contiguous(), torch.empty(out.shape, dtype=out.dtype), False


def _whiten_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], T: int,
                    eps: float) -> List[torch.Tensor]:
    """The kernels' training forward: ``[y, mu, Sigma, W, W']``, ``y`` in ``x``'s layout
    (channels first or last, as ``torch.empty_like``)."""
    N, C = x.shape[0], x.shape[1]
    L, dt, d = math.prod(x.shape[2:]), x.dtype, _KERNEL_GROUP
    y = torch.empty_like(x)   # a tensor of its own (see _GroupWhitenFn)
    xk, yk, cl = _kernel_layout(x, y)
    gamma = weight.to(dt).contiguous() if weight is not None else None
    beta = bias.to(dt).contiguous() if bias is not None else None
    mu = torch.empty(C, dtype=dt)
    cov, W, Wg = (torch.empty((C // d, d, d), dtype=dt) for _ in range(3))
    kernels.call("whiten_forward", dt, xk.data_ptr(), N, C, L, int(cl), int(T), float(eps), _ptr(gamma),
                 _ptr(beta), mu.data_ptr(), cov.data_ptr(), W.data_ptr(), Wg.data_ptr(), yk.data_ptr(),
                 _threads(x.numel()))
    if yk is not y:
        y.copy_(yk)
    return [y, mu, cov, W, Wg]


def _whiten_backward(x: torch.Tensor, dy: torch.Tensor, weight: Optional[torch.Tensor], mu: torch.Tensor,
                     cov: torch.Tensor, W: torch.Tensor, Wg: torch.Tensor, T: int, want_gamma: bool,
                     want_beta: bool) -> List[Optional[torch.Tensor]]:
    """The kernels' backward: ``[dx, dgamma, dbeta]`` (in ``x``'s dtype, ``dx`` in its layout;
    None where not wanted)."""
    N, C = x.shape[0], x.shape[1]
    L, dt = math.prod(x.shape[2:]), x.dtype
    dx = torch.empty_like(x)
    xk, dxk, cl = _kernel_layout(x, dx)
    dyk = _in_layout(dy.to(dt), cl)
    gamma = weight.to(dt).contiguous() if weight is not None else None
    dgamma = torch.empty(C, dtype=dt) if want_gamma else None
    dbeta = torch.empty(C, dtype=dt) if want_beta else None
    kernels.call("whiten_backward", dt, xk.data_ptr(), dyk.data_ptr(), N, C, L, int(cl), int(T), _ptr(gamma),
                 mu.data_ptr(), cov.data_ptr(), W.data_ptr(), Wg.data_ptr(), dxk.data_ptr(), _ptr(dgamma),
                 _ptr(dbeta), _threads(x.numel()))
    if dxk is not dx:
        dx.copy_(dxk)
    return [dx, dgamma, dbeta]


class _GroupWhitenKernelFn(torch.autograd.Function):
    """:class:`_GroupWhitenFn` by the compiled kernels (normswap/kernels/whiten.h) on a
    float32 / float64 CPU input with groups of 16 channels, one call each way: per group
    the statistics (one pass over the data), the Newton iteration, ``y = W' (x - mu) + beta``
    (one pass); backward ``dW'`` and ``dbeta`` (one pass), the iteration's backward, and
    ``dx = W'^T (dy - mean(dy)) + S (x - mu)`` (one pass: the other Function's
    ``dx = dV - mean(dV)`` with ``mean(V) = 0``). In the input's precision, the sums of
    products in double. Saves ``x`` (not a centred copy), ``mu``, ``Sigma``, ``W``, ``W'``.
    Returns ``(y, mu, W)``. Under torch.compile the same kernels are the
    ``normswap::whiten_forward`` / ``whiten_backward`` operators."""

    @staticmethod
    def forward(ctx, x, weight, bias, T: int, eps: float):
        y, mu, cov, W, Wg = _whiten_forward(x, weight, bias, T, eps)
        ctx.save_for_backward(x, mu, cov, W, Wg, weight)
        ctx.setup = (T, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(mu, W)
        return y, mu, W

    @staticmethod
    @first_order_only
    def backward(ctx, dy, _gmu, _gw):
        x, mu, cov, W, Wg, weight = ctx.saved_tensors
        T, bdt = ctx.setup
        dx, dgamma, dbeta = _whiten_backward(x, dy, weight, mu, cov, W, Wg, T,
                                             weight is not None and ctx.needs_input_grad[1],
                                             bdt is not None and ctx.needs_input_grad[2])
        return (dx, dgamma.to(weight.dtype) if dgamma is not None else None,
                dbeta.to(bdt) if dbeta is not None else None, None, None)


# The kernels as operators for torch.compile (one opaque call each way; inductor's code from
# the PyTorch formulation runs the products as bmm calls with passes of their own around
# them). Outputs [y, mu, Sigma, W, W']; backward [dx, dgamma, dbeta] (zero-size where the
# layer has no gamma / beta). The backward operator also takes y, which it does not read:
# an opaque operator's output cannot be recomputed, so without it AOT autograd's
# partitioner kept a following ReLU's mask as a bool tensor (whose store inductor's CPU code
# does one value at a time: 11 ms of a compiled resnet18 step's stem, 2 ms with y kept and
# the mask recomputed from it). The layer returns a clone of y (fused into the next
# pointwise kernel), since an in-place ReLU must not modify the saved y.
@torch.library.custom_op("normswap::whiten_forward", mutates_args=(), device_types="cpu",
                         tags=(torch.Tag.flexible_layout,))
def _whiten_forward_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], T: int,
                       eps: float) -> List[torch.Tensor]:
    return _whiten_forward(x, weight, bias, T, eps)


@_whiten_forward_op.register_fake
def _(x, weight, bias, T, eps):
    C, d = x.shape[1], _KERNEL_GROUP
    return [torch.empty_like(x), x.new_empty(C)] + [x.new_empty((C // d, d, d)) for _ in range(3)]


@torch.library.custom_op("normswap::whiten_backward", mutates_args=(), device_types="cpu",
                         tags=(torch.Tag.flexible_layout,))
def _whiten_backward_op(x: torch.Tensor, y: torch.Tensor, dy: torch.Tensor, weight: Optional[torch.Tensor],
                        mu: torch.Tensor, cov: torch.Tensor, W: torch.Tensor, Wg: torch.Tensor, T: int,
                        has_bias: bool) -> List[torch.Tensor]:
    dx, dgamma, dbeta = _whiten_backward(x, dy, weight, mu, cov, W, Wg, T, weight is not None, has_bias)
    return [dx, dgamma if dgamma is not None else x.new_empty(0), dbeta if dbeta is not None else x.new_empty(0)]


@_whiten_backward_op.register_fake
def _(x, y, dy, weight, mu, cov, W, Wg, T, has_bias):
    C = x.shape[1]
    return [torch.empty_like(x), x.new_empty(C if weight is not None else 0), x.new_empty(C if has_bias else 0)]


def _whiten_op_setup(ctx, inputs, output):
    x, weight, bias, T, eps = inputs
    y, mu, cov, W, Wg = output
    ctx.save_for_backward(x, y, weight, mu, cov, W, Wg)
    ctx.setup = (T, bias is not None)


def _whiten_op_backward(ctx, grads):
    dy = grads[0]
    x, y, weight, mu, cov, W, Wg = ctx.saved_tensors
    T, has_bias = ctx.setup
    if dy is None:
        dy = torch.zeros_like(x)
    dx, dgamma, dbeta = _whiten_backward_op(x, y, dy, weight, mu, cov, W, Wg, T, has_bias)
    return (dx, dgamma.to(weight.dtype) if weight is not None else None,
            dbeta.to(dy.dtype) if has_bias else None, None, None)


_whiten_forward_op.register_autograd(_whiten_op_backward, setup_context=_whiten_op_setup)


def group_whiten_kernels(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], T: int,
                         eps: float):
    """IterNorm's training forward by the kernels (see :func:`_whiten_kernels`):
    ``(y, mu, W)``. Eager: :class:`_GroupWhitenKernelFn`; under torch.compile the
    ``normswap::whiten_forward`` operator."""
    if torch.compiler.is_compiling():
        y, mu, _, W, _ = _whiten_forward_op(x, weight, bias, int(T), float(eps))
        return y.clone(), mu.detach(), W.detach()   # (the clone: see the operators above)
    return _GroupWhitenKernelFn.apply(x, weight, bias, T, eps)


def _whitening_grads(dWg: torch.Tensor, W: torch.Tensor, weight: Optional[torch.Tensor], cov: torch.Tensor,
                     T: int, m: int, want_gw: bool):
    """From ``dW' = sum_n dy_n V_n^T``: ``dgamma = rowsum(dW' * W)`` (None unless wanted) and
    ``S = (dSigma + dSigma^T) / m`` with ``dSigma`` the Newton iteration's backward of
    ``diag(gamma) dW'``."""
    G, d = W.shape[0], W.shape[1]
    gw = None
    if weight is not None:
        if want_gw:
            gw = (dWg * W).sum(-1).reshape(G * d).to(weight.dtype)
        dW = dWg * weight.to(dWg.dtype).view(G, d, 1)
    else:
        dW = dWg
    dcov = _newton_whitening_backward(cov, dW.contiguous(), T)
    return gw, (dcov + dcov.mT) / m


_GROUPED_MAX_L = 16
"""Positions per channel (``L = H W``) up to which :class:`_GroupWhitenFn` lays ``V`` out as
``(G, d, N L)``: one product per group over the whole batch instead of ``N G`` products of
``d x L`` (measured on CPU, one thread, a (32, 672, 4, 4) layer: see docs/performance.md)."""


class _GroupWhitenFn(torch.autograd.Function):
    """Training-mode IterNorm of ``(N, C, *)`` with equal groups (``C = G d``), with its
    backward written out. With ``V = x - mu`` per group ``(N, d, L)``,
    ``Sigma = sum_n V_n V_n^T / m + eps I``, ``W = newton(Sigma)``, ``W' = diag(gamma) W``
    and ``y = W' V + beta``::

        dbeta = sum(dy)        dW' = sum_n dy_n V_n^T        dgamma = rowsum(dW' * W)
        dSigma = newton_backward(Sigma, diag(gamma) dW')     S = (dSigma + dSigma^T) / m
        dV = W'^T dy + S V     dx = dV - mean(dV)

    ``V`` is kept in the input's layout ``(N, G, d, L)`` (``N G`` products of ``d x L`` per
    step, no transposed copies) or, for ``L <= _GROUPED_MAX_L``, as ``(G, d, N L)`` (``G``
    products, at the price of copying ``y``, ``dy`` and ``dx`` between the layouts), where
    ``N G`` products of a few columns each cost more than the copies.

    Saves ``V`` (in the statistics' dtype), ``Sigma``, ``W``: one full-size tensor, as
    nn.BatchNorm2d saves its input. Returns ``(y, mu, W)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, d: int, T: int, eps: float):
        N, C = x.shape[0], x.shape[1]
        L = x[0, 0].numel()
        G, m = C // d, N * L
        cdt = stat_dtype(x.dtype)
        xs = x.to(cdt).reshape(N, C, L)
        mu = xs.sum(dim=(0, 2)) / m
        grouped = L <= _GROUPED_MAX_L
        # the output is a tensor of its own, not a view (an in-place activation after the
        # layer may modify it)
        y = torch.empty(x.shape, dtype=cdt, device=x.device)
        y4 = y.view(N, G, d, L)
        if grouped:   # V as (G, d, N L)
            V = torch.empty((G, d, N, L), dtype=cdt, device=x.device)
            torch.sub(xs.view(N, G, d, L).permute(1, 2, 0, 3), mu.view(G, d, 1, 1), out=V)
            V = V.view(G, d, m)
            cov = torch.bmm(V, V.mT) / m
        else:         # V as (N, G, d, L), contiguous whatever the input's layout
            V = torch.sub(xs, mu[None, :, None], out=torch.empty((N, C, L), dtype=cdt, device=x.device))
            V = V.view(N, G, d, L)
            cov = torch.matmul(V, V.transpose(-1, -2)).sum(0) / m
        cov = cov + eps * torch.eye(d, dtype=cdt, device=x.device)
        W = _newton_whitening(cov, T)   # (eager only: see IterNorm.forward)
        Wg = W * weight.to(cdt).view(G, d, 1) if weight is not None else W
        if grouped:
            yg = torch.bmm(Wg, V).view(G, d, N, L).permute(2, 0, 1, 3)
            if bias is not None:
                torch.add(yg, bias.to(cdt).view(1, G, d, 1), out=y4)
            else:
                y4.copy_(yg)
        else:
            torch.matmul(Wg, V, out=y4)
            if bias is not None:
                y4.add_(bias.to(cdt).view(1, G, d, 1))
        ctx.save_for_backward(V, cov, W, Wg, weight)
        ctx.setup = (T, m, bias is not None, x.dtype, x.shape, grouped)
        ctx.mark_non_differentiable(mu, W)
        return (y if cdt == x.dtype else y.to(x.dtype)), mu, W

    @staticmethod
    @first_order_only
    def backward(ctx, dy, _gmu, _gw):
        V, cov, W, Wg, weight = ctx.saved_tensors
        T, m, has_bias, xdt, shape, grouped = ctx.setup
        N, G, d = shape[0], Wg.shape[0], Wg.shape[1]
        L = m // N
        dy4 = dy.to(V.dtype).reshape(N, G, d, L)
        if grouped:
            dyv = torch.empty((G, d, N, L), dtype=V.dtype, device=V.device)
            dyv.copy_(dy4.permute(1, 2, 0, 3))
            dyv = dyv.view(G, d, m)
            gb = dyv.sum(-1).reshape(G * d).to(xdt) if has_bias and ctx.needs_input_grad[2] else None
            dWg = torch.bmm(dyv, V.mT)
        else:
            gb = dy4.sum(dim=(0, 3)).reshape(G * d).to(xdt) if has_bias and ctx.needs_input_grad[2] else None
            dWg = torch.matmul(dy4, V.transpose(-1, -2)).sum(0)
        gw, S = _whitening_grads(dWg, W, weight, cov, T, m, ctx.needs_input_grad[1])
        if grouped:
            dV = torch.baddbmm(torch.bmm(Wg.mT, dyv), S, V)
            dV.sub_(dV.mean(dim=-1, keepdim=True))
            dx = torch.empty(shape, dtype=V.dtype, device=V.device)
            dx.view(N, G, d, L).copy_(dV.view(G, d, N, L).permute(2, 0, 1, 3))
            return dx.to(xdt), gw, gb, None, None, None
        # into a buffer of its own, with W'^T contiguous: matmul's broadcast (G, d, d) @ (N, G, d, L)
        # without `out` was 1.3-4x slower on CPU (1.69 against 0.39 ms for (32, 672, 4, 4))
        dV = torch.matmul(Wg.mT.contiguous(), dy4, out=torch.empty_like(V))
        dV.view(N * G, d, L).baddbmm_(S.expand(N, G, d, d).reshape(N * G, d, d), V.view(N * G, d, L))
        dV.sub_(dV.mean(dim=(0, 3), keepdim=True))
        return dV.view(shape).to(xdt), gw, gb, None, None, None


def _all_reduce_grad(t: torch.Tensor, group) -> torch.Tensor:
    """Sum over processes, differentiable (the gradient is summed back)."""
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(t, group=group)


class _IterNorm(NormalizerBase):
    """IterNorm: group whitening by Newton's iteration on the batch area (see module doc).

    Args:
        num_features: channels C of the ``(N, C, *)`` input.
        group_size: channels per whitened group (the last group may be smaller).
        T: Newton iterations.
        eps: added to the covariance's diagonal.
        momentum: of ``running_mean`` and ``running_wm`` (None: cumulative average).
        affine: per-channel gamma and beta after whitening.
        sync: mean and covariance over every process of ``process_group`` in training.
    Buffers: ``running_mean`` (C), ``running_wm`` (groups, d, d) (the last group, when
    smaller, in the top-left block), ``num_batches_tracked``.
    """

    _dims: tuple = (4,)

    def __init__(self, num_features: int, group_size: int = 16, T: int = 5, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, *, sync: bool = False,
                 process_group=None, l1_alpha: float = 0.0, device=None, dtype=None):
        super().__init__(l1_alpha=l1_alpha)
        self.area = BatchArea(check_int(self, "num_features", num_features))
        self.operation = Whitening(group_size, T, eps)
        self.operation.validate(self)
        self.momentum = check_momentum(self, momentum)
        self.affine = check_bool(self, "affine", affine)
        self.sync = check_bool(self, "sync", sync)
        self.process_group = process_group
        self.num_features, self.group_size, self.T, self.eps = num_features, group_size, T, float(eps)
        self.track_running_stats = True
        self._sizes = _sizes(num_features, group_size)
        fk = {"device": device, "dtype": dtype}
        self.register_parameter("weight", nn.Parameter(torch.ones(num_features, **fk)) if affine else None)
        self.register_parameter("bias", nn.Parameter(torch.zeros(num_features, **fk)) if affine else None)
        sk = {"device": device, "dtype": stat_dtype(dtype or torch.get_default_dtype())}
        d = self._sizes[0]
        self.register_buffer("running_mean", torch.zeros(num_features, **sk))
        self.register_buffer("running_wm", torch.zeros(len(self._sizes), d, d, **sk))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.reset_parameters()
        kernels.library()  # build the CPU kernels now: torch.compile cannot while tracing

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_wm.zero_()
        for i, s in enumerate(self._sizes):
            self.running_wm[i, :s, :s] = torch.eye(s)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for name in ("running_mean", "running_wm"):
            buf = getattr(self, name)
            if buf.dtype in (torch.float16, torch.bfloat16):
                setattr(self, name, buf.float())
        return self

    def _sync_group(self):
        if not (self.sync and self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _whiten(self, v: torch.Tensor, wms: List[torch.Tensor]) -> torch.Tensor:
        """Apply one whitening matrix per group to the centered ``v`` (C, m)."""
        d, full = self._sizes[0], len(self._sizes) - (self._sizes[-1] != self._sizes[0])
        out = [torch.matmul(wms[0], v[:full * d].view(full, d, -1)).reshape(full * d, -1)]
        if len(wms) > 1:
            out.append(torch.matmul(wms[1], v[full * d:]))
        return torch.cat(out) if len(out) > 1 else out[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_channels(self, x, self._dims, self.num_features)
        if self._runs_fused(x):
            return fused.fused_call(self.forward, x)
        return self._output_format(x, self._forward(x))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C = x.shape[0], x.shape[1]
        cdt = stat_dtype(x.dtype)
        d, full = self._sizes[0], len(self._sizes) - (self._sizes[-1] != self._sizes[0])
        fast = self.training and full == len(self._sizes) and self._sync_group() is None \
            and not self._wants_penalty() and math.prod(x.shape[2:]) * N > 1
        if fast and _whiten_kernels(x, d):
            # equal groups of 16 channels, one process, no penalty, CPU: the kernels, eager or
            # compiled
            y, mu, wm = group_whiten_kernels(x, self.weight, self.bias, self.T, self.eps)
            self._update_running(mu, [wm])
            return y
        if fast and not torch.compiler.is_compiling():
            # other equal groups, eager: the written-out Function (under torch.compile the
            # form below measured faster: compiled resnet18 step 1.17-1.20x the original
            # against 1.26x with the Function)
            y, mu, wm = _GroupWhitenFn.apply(x, self.weight, self.bias, d, self.T, self.eps)
            self._update_running(mu, [wm])
            return y
        xc = x.to(cdt).transpose(0, 1).reshape(C, -1)                    # (C, m)
        if self.training:
            group = self._sync_group()
            if group is None and xc.shape[1] <= 1:
                raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel in "
                                 f"training, got input of shape {tuple(x.shape)}; use a batch size > 1 "
                                 f"or call .eval()")
            s = xc.sum(1)
            if group is not None:
                s = _all_reduce_grad(s, group)
                m = _all_reduce_grad(torch.tensor(float(xc.shape[1]), dtype=cdt, device=x.device), group)
            else:
                m = xc.shape[1]
            mu = s / m
            v = xc - mu[:, None]
            vf = v[:full * d].view(full, d, -1)
            covs = [torch.matmul(vf, vf.transpose(1, 2))]
            if full < len(self._sizes):
                vl = v[full * d:]
                covs.append(torch.matmul(vl, vl.t()))
            if group is not None:
                covs = [_all_reduce_grad(c, group) for c in covs]
            wms = []
            for c in covs:
                eye = torch.eye(c.shape[-1], dtype=cdt, device=x.device)
                wms.append(newton_whitening(c / m + self.eps * eye, self.T))
            self._update_running(mu.detach(), [w.detach() for w in wms])
            if self._wants_penalty():  # mean|x - mu| over the (global) batch
                pen = v.abs().sum()
                if group is not None:
                    pen = _all_reduce_grad(pen, group)
                self._record_penalty(pen / (m * C))
        else:
            v = xc - self.running_mean.to(cdt)[:, None]
            wms = [self.running_wm[:full].to(cdt)]
            if full < len(self._sizes):
                r = self._sizes[-1]
                wms.append(self.running_wm[full, :r, :r].to(cdt))
        y = self._whiten(v, wms)
        if self.affine:
            y = torch.addcmul(self.bias.to(cdt)[:, None], y, self.weight.to(cdt)[:, None])
        shape = (C, N) + tuple(x.shape[2:])
        return y.view(shape).transpose(0, 1).to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mu: torch.Tensor, wms: List[torch.Tensor]) -> None:
        rw = self.running_wm
        if len(wms) == 1 and wms[0].shape == rw.shape:   # equal groups: no copy to assemble
            new = wms[0]
        else:
            new = rw.clone()
            full = wms[0].shape[0]
            new[:full] = wms[0].to(rw.dtype)
            if len(wms) > 1:
                r = wms[1].shape[-1]
                new[full, :r, :r] = wms[1].to(rw.dtype)
        # (the finiteness test covers the new matrices through `new`)
        update_running_([self.running_mean, rw], [mu, new], self.num_batches_tracked, self.momentum)

    def extra_repr(self) -> str:
        s = (f"{self.num_features}, group_size={self.group_size}, T={self.T}, eps={self.eps:g}, "
             f"momentum={self.momentum}, affine={self.affine}")
        if self.sync:
            s += ", sync=True"
        return s + self._penalty_repr()


IterNorm1d = make_ranked(_IterNorm, "IterNorm1d", (2, 3), __name__)
IterNorm2d = make_ranked(_IterNorm, "IterNorm2d", (4,), __name__)
IterNorm3d = make_ranked(_IterNorm, "IterNorm3d", (5,), __name__)
