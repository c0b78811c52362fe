"""Bounded weight normalization (Hoffer et al. 2018) as a ``torch.nn.utils.parametrize``
parametrization.

Per output channel ``i`` of a conv / linear weight::

    w_i = rho * v_i / ||v_i||_p          p in {1, 2, inf}

``rho`` is a fixed (not learned) per-layer scalar, a buffer, by default the mean over
output channels of ``||w_i||_p`` at the time it is applied. ``v`` (stored as
``parametrizations.weight.original``) is scale invariant: only its direction matters.

The weight is computed by one fused autograd Function (:class:`BoundedWeightFn`: one
norm reduction and one multiply forward, a hand-written backward) every time the
module reads it. Evaluation loops that do not change ``v`` can compute it once for all
forwards with PyTorch's parametrization cache::

    from torch.nn.utils import parametrize
    with torch.no_grad(), parametrize.cached():
        for x in loader:
            model(x)      # each bounded weight computed on first use, then reused

With ``learn_gain=True`` (the authors' older variant): ``w_i = g_i * v_i / ||v_i||_p``
with a learned per-channel gain ``g`` (initialised to ``||w_i||_p``) rescaled at every
forward to keep ``||g||_2`` at its initial value ``G0``: ``g <- g * G0 / ||g||_2``.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import kernels
from .first_order import first_order_only
from .rows import _threads

_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_SUPPORTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) + _CONV_T


def _p_value(p) -> float:
    if p in ("inf", float("inf"), math.inf):
        return float("inf")
    if p in (1, 2, 1.0, 2.0):
        return float(p)
    raise ValueError(f"bounded_weight_norm: p must be 1, 2 or 'inf', got {p!r}")


def channel_norms(w: torch.Tensor, p: float, transposed: bool = False, groups: int = 1) -> torch.Tensor:
    """``||w_i||_p`` per output channel, shaped to broadcast against ``w``.

    Conv/linear weights have output channels in dim 0. ConvTranspose weights are
    (in, out/groups, *k): output channel (g, j) is ``w[g-th block of in, j]``.
    """
    if not transposed:
        return torch.linalg.vector_norm(w, p, dim=tuple(range(1, w.dim())), keepdim=True)
    cin, cout_g = w.shape[0], w.shape[1]
    wg = w.reshape(groups, cin // groups, cout_g, *w.shape[2:])
    dims = (1,) + tuple(range(3, wg.dim()))
    n = torch.linalg.vector_norm(wg, p, dim=dims, keepdim=True)      # (groups, 1, cout_g, 1...)
    return n.expand_as(wg).reshape(w.shape)


def out_channel_view(w: torch.Tensor, transposed: bool = False, groups: int = 1) -> torch.Tensor:
    """``w`` as (out_channels, rest): one row per output channel."""
    if not transposed:
        return w.reshape(w.shape[0], -1)
    cin, cout_g = w.shape[0], w.shape[1]
    wg = w.reshape(groups, cin // groups, cout_g, -1)
    return wg.permute(0, 2, 1, 3).reshape(groups * cout_g, -1)


_TINY = 1e-30  # floor of ||v_i||_p (an all-zero channel gives w_i = 0, not NaN)


def _kernel_applies(v: torch.Tensor, s: torch.Tensor, p: float, dims) -> bool:
    """Whether the compiled CPU kernels (``kernels/bwn.h``) compute this call: p = 2 over every
    dim but the first of a contiguous float32 / float64 CPU weight, in eager mode (under
    torch.compile inductor fuses the PyTorch form), with one scale or one per output channel."""
    return (p == 2.0 and v.device.type == "cpu" and v.dtype in kernels.SUFFIX and v.dim() > 1
            and tuple(dims) == tuple(range(1, v.dim())) and v.is_contiguous() and s.dtype == v.dtype
            and s.device == v.device and s.numel() in (1, v.shape[0]) and v.numel() > 0
            and not torch.compiler.is_compiling() and kernels.library() is not None)


def _kernel_forward(v: torch.Tensor, s: torch.Tensor):
    """``(w, norms, k)`` by the kernels; ``norms`` and ``k`` one value per output channel."""
    R = v.shape[0]
    w, n, k = torch.empty_like(v), v.new_empty(R), v.new_empty(R)
    sc = s.detach().contiguous()
    kernels.call("bwn_forward", v.dtype, v.data_ptr(), R, v.numel() // R, sc.data_ptr(), int(sc.numel() > 1),
                 _TINY, w.data_ptr(), n.data_ptr(), k.data_ptr(), _threads(v.numel()))
    return w, n, k


def _kernel_backward(g: torch.Tensor, v: torch.Tensor, n: torch.Tensor, k: torch.Tensor, want_gv: bool):
    """``(dL/dv or None, dot)`` by the kernels, ``dot`` shaped like ``n``."""
    R = v.shape[0]
    gv = torch.empty_like(v) if want_gv else None
    dot = v.new_empty(R)
    kernels.call("bwn_backward", v.dtype, g.data_ptr(), v.data_ptr(), R, v.numel() // R, n.data_ptr(),
                 k.data_ptr(), gv.data_ptr() if gv is not None else None, dot.data_ptr(), _threads(v.numel()))
    return gv, dot.view(n.shape)


class BoundedWeightFn(torch.autograd.Function):
    """Fused ``w = v * (s / n)`` with ``n = max(||v_i||_p, tiny)`` per output channel.

    ``v`` is the weight laid out so that each output channel is the slice over ``dims``
    (the weight itself with ``dims = (1, ..., v.dim() - 1)`` for conv / linear;
    ``(G, C_in/G, C_out/G, K)`` with ``dims=(1, 3)`` for grouped transposed convs). ``s`` is a 0-d scale (``rho``)
    or one value per channel shaped like ``n`` (the learned gain).

    Forward: one reduction for ``n`` and one multiply. Only ``v`` (the parameter
    itself), ``n`` and ``k = s / n`` are saved. Backward, with ``g = dL/dw`` and
    ``dot_i = g_i . v_i`` (from one ``g * v`` buffer, which then receives ``dL/dv``)::

        dL/dv_i = k_i * g_i - (k_i * dot_i / n_i) * dn_i/dv_i
        dL/ds_i = dot_i / n_i

    where ``dn/dv`` is ``v / n`` (p = 2; this gives ``(s/n)(g - w_hat (w_hat . g))``
    with ``w_hat = v / n``), ``sign(v)`` (p = 1), and for p = inf ``sign(v)`` at the
    entries with ``|v| = n`` shared equally among ties (the subgradient autograd uses).

    On CPU in eager mode, p = 2 over a contiguous float32 / float64 conv or linear weight
    (:func:`_kernel_applies`), both directions run in the compiled kernels
    (``normswap/kernels/bwn.h``), an output channel at a time while it is in cache: the
    weight is read once each way instead of two (forward) and four (backward) times.
    """

    @staticmethod
    def forward(ctx, v, s, p: float, dims):
        ctx.p, ctx.dims, ctx.s_shape = p, dims, s.shape
        ctx.kernel = _kernel_applies(v, s, p, dims)
        if ctx.kernel:
            w, n, k = _kernel_forward(v, s)
            ctx.save_for_backward(v, n, k)
            return w
        n = torch.linalg.vector_norm(v, p, dim=dims, keepdim=True).clamp_min_(_TINY)
        k = s / n
        ctx.save_for_backward(v, n, k)
        return v * k

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        v, n, k = ctx.saved_tensors
        p, dims = ctx.p, ctx.dims
        if ctx.kernel:   # (n and k one value per output channel; a strided g takes the form below)
            n, k = (t.view((-1,) + (1,) * (v.dim() - 1)) for t in (n, k))
            if g.is_contiguous() and g.dtype == v.dtype:
                gv, dot = _kernel_backward(g, v, n, k, ctx.needs_input_grad[0])
                gs = None
                if ctx.needs_input_grad[1]:
                    gs = dot / n
                    if gs.shape != ctx.s_shape:
                        gs = gs.sum().reshape(ctx.s_shape)
                return gv, gs, None, None
        buf = torch.mul(g, v)                  # g * v, then reused for dL/dv
        dot = buf.sum(dims, keepdim=True)
        gv = gs = None
        if ctx.needs_input_grad[0]:
            gv = torch.mul(g, k, out=buf)
            if p == 2.0:
                gv.addcmul_(v, -k * dot / (n * n))
            else:
                dn = torch.sign(v)
                if math.isinf(p):
                    at_max = v.abs() == n
                    dn = dn * at_max / at_max.sum(dims, keepdim=True)
                gv.addcmul_(dn, -k * dot / n)
        if ctx.needs_input_grad[1]:
            gs = dot / n
            if gs.shape != ctx.s_shape:  # one scalar scale for every channel
                gs = gs.sum().reshape(ctx.s_shape)
        return gv, gs, None, None


class BoundedWeightNorm(nn.Module):
    """Parametrization ``w_i = rho * v_i / ||v_i||_p`` (or the learned-gain variant
    ``w_i = g_i * G0 / ||g||_2 * v_i / ||v_i||_p``), computed by :class:`BoundedWeightFn`."""

    def __init__(self, weight: torch.Tensor, p=2, rho: Optional[float] = None,
                 learn_gain: bool = False, transposed: bool = False, groups: int = 1,
                 gain: Optional[torch.Tensor] = None):
        super().__init__()
        self.p = _p_value(p)
        self.transposed = transposed
        self.groups = groups
        with torch.no_grad():
            norms = out_channel_view(weight.detach(), transposed, groups).norm(self.p, dim=1)
            r = float(norms.mean()) if rho is None and norms.device.type != "meta" else rho
        self.register_buffer("rho", torch.tensor(1.0 if r is None else float(r), dtype=weight.dtype,
                                                 device=weight.device))
        self.learn_gain = learn_gain
        if learn_gain:
            g0 = norms if gain is None else gain.detach().reshape(-1).to(norms)
            self.gain = nn.Parameter(g0.to(weight.dtype).clone())
            self.register_buffer("gain_norm", g0.float().norm(2).reshape(()))

    def _channel_layout(self, v: torch.Tensor):
        """``v`` laid out with one output channel per slice over ``dims``, and ``dims``.

        Conv / linear weights keep their own shape (output channel = slice over every dim
        but the first): no reshape, so that under torch.compile inductor can give the
        weight the layout the convolution wants (it converts conv weights to channels-last
        on CPU) inside the same loop; with a ``(C_out, K)`` view its kernel wrote the weight
        through a transpose (compiled resnet18 ``bwn`` step 1.53x -> 1.19x the original)."""
        if not self.transposed:
            return v, tuple(range(1, v.dim()))
        cin, cout_g = v.shape[0], v.shape[1]
        return v.reshape(self.groups, cin // self.groups, cout_g, -1), (1, 3)

    def _scale(self, vv: torch.Tensor) -> torch.Tensor:
        """``rho`` (0-d), or the rescaled gain ``g * G0 / ||g||_2`` shaped like the norms."""
        if not self.learn_gain:
            return self.rho.to(vv.dtype)
        g = self.gain * (self.gain_norm.to(vv.dtype) / self.gain.norm(2).clamp_min(_TINY))
        if not self.transposed:
            return g.view((-1,) + (1,) * (vv.dim() - 1))
        return g.view(vv.shape[0], 1, vv.shape[2], 1)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        vv, dims = self._channel_layout(v)
        return BoundedWeightFn.apply(vv, self._scale(vv), self.p, dims).view(v.shape)


    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w  # v starts as the weight itself (only its direction matters)

    def extra_repr(self) -> str:
        p = "inf" if math.isinf(self.p) else int(self.p)
        return f"p={p}, rho={float(self.rho):.4g}" + (", learn_gain=True" if self.learn_gain else "")


def bounded_weight_norm(module: nn.Module, name: str = "weight", p: Union[int, str] = 2,
                        rho: Optional[float] = None, learn_gain: bool = False,
                        gain: Optional[torch.Tensor] = None) -> nn.Module:
    """Apply bounded weight norm to ``module.<name>`` (Conv1d/2d/3d, ConvTranspose, Linear).

    Returns the module. Its weight becomes ``rho * v / ||v||_p`` per output channel;
    ``v`` is ``module.parametrizations.<name>.original``. ``gain`` (with ``learn_gain``)
    sets the initial per-channel gain instead of ``||w_i||_p``.
    """
    if not isinstance(module, _SUPPORTED):
        raise ValueError(f"bounded_weight_norm supports Conv1d/2d/3d, ConvTranspose1d/2d/3d and "
                         f"Linear, got {type(module).__name__}")
    if parametrize.is_parametrized(module, name):
        raise ValueError(f"{type(module).__name__}.{name} is already parametrized")
    transposed = isinstance(module, _CONV_T)
    groups = getattr(module, "groups", 1) if transposed else 1
    param = BoundedWeightNorm(getattr(module, name), p=p, rho=rho, learn_gain=learn_gain,
                              transposed=transposed, groups=groups, gain=gain)
    parametrize.register_parametrization(module, name, param)
    return module


def is_bounded_weight_norm(module: nn.Module, name: str = "weight") -> bool:
    return parametrize.is_parametrized(module, name) and any(
        isinstance(p, BoundedWeightNorm) for p in module.parametrizations[name])


def remove_bounded_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Fold the parametrization back into a plain weight (same outputs)."""
    if not is_bounded_weight_norm(module, name):
        raise ValueError(f"{type(module).__name__}.{name} has no bounded weight norm")
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return module
