"""Functional core: one autograd Function for every standardizing normalizer.

Every area (batch, layer, channels at a position, group, instance) is laid out as a
``(P, G, Q)`` view of the input; statistics are taken per group ``g`` over the
``n = P * Q`` values ``x[:, g, :]`` (across all processes when a process group is
given, which only the batch area uses). For each ``g``::

    mu = mean(x)                 v = x - mu
    y  = gamma * v / d + beta    (gamma, beta per g; optional)

with the denominator ``d`` chosen by ``stat``:

    "l2"    d = sqrt(mean(v^2) + delta)          delta = sigma^2 + eps   (BN, BN-s, LN-s, ...)
    "l1"    d = C_L1 * mean(|v|) + eps            C_L1 = sqrt(pi / 2)
    "topk"  d = C_inf(n) * s_k + eps              s_k = mean of the k largest |v|
    "mean"  d = 1                                 (mean-only)

It also returns ``mean(|v|)`` per group as a differentiable output, the quantity the
L1 activation penalty of Ren et al. needs, without a second pass.

Only the centered input ``v`` (for half-precision inputs: the input itself, ``v`` is
recomputed in float32 so that it cannot overflow) and per-group vectors are saved for
backward. The backward pass is written out by hand (see :meth:`StatNormFn.backward`);
per-group sums come from one fused reduction (``native_batch_norm_backward`` with the
input-gradient disabled), and under a process group they are all-reduced like
``nn.SyncBatchNorm`` does.

Nothing here reads a tensor value on the host, so that the layers compile without a
graph break: the count ``n`` is a Python int from the shape (a tensor only when it
comes from other processes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist

from .areas import BatchArea
from .first_order import first_order_only

C_L1 = math.sqrt(math.pi / 2.0)
"""Makes ``C_L1 * mean|v|`` equal the standard deviation for Gaussian ``v``."""

STATS = ("l2", "l1", "topk", "mean")
_C_INF_NUM = 0.5 * (1.0 + math.sqrt(math.pi * math.log(4.0)))


def c_inf(n: int) -> float:
    """``C_inf(n) = 0.5 * (1 + sqrt(pi * ln 4)) / sqrt(2 * ln n)`` (Hoffer et al.).

    The scale constant of Hoffer et al.'s L-inf batch norm. Note: for n = 2e5
    Gaussian values ``C_inf(n) * max|v|`` comes out near 1.5 std (measured), so top-k
    BN is not a drop-in scale match for L2 BN the way L1 BN is.
    """
    if n < 2:
        raise ValueError(f"C_inf(n) needs n >= 2 values, got n={n}")
    return _C_INF_NUM / math.sqrt(2.0 * math.log(n))


def _c_inf_any(n: Union[int, torch.Tensor]):
    """``c_inf`` of a Python count or of a count tensor (synchronized batches).

    A symbolic count (torch.compile with dynamic shapes) goes through tensor ops, so
    that ``math.log`` does not specialize the graph on the batch size (one recompile
    per input shape otherwise)."""
    if isinstance(n, torch.SymInt):
        n = torch.scalar_tensor(n, dtype=torch.float64)
    if isinstance(n, torch.Tensor):
        return _C_INF_NUM / torch.sqrt(2.0 * torch.log(n))
    return c_inf(n)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which statistics are accumulated and kept."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    """Sum over the processes of ``group``. Under torch.compile the functional
    collective (returns a new tensor): inductor's handling of the in-place one on a
    ``cat`` output gave wrong local sums (gamma gradients) in the compiled backward."""
    if group is None:
        return t
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol
        return funcol.all_reduce(t, "sum", group)
    dist.all_reduce(t, group=group)
    return t


_CONSTANTS: dict = {}


def _constant(value: float, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A read-only vector of ``n`` copies of ``value``, made once per (value, n, dtype,
    device) in eager mode (a fill is a kernel launch on a GPU; these are only read)."""
    if torch.compiler.is_compiling():
        return torch.full((n,), value, dtype=dtype, device=device)
    key = (value, n, dtype, device)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) >= 256:
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = torch.full((n,), value, dtype=dtype, device=device)
    return t


def _group_sums(dy3: torch.Tensor, v3: torch.Tensor, sdt: torch.dtype):
    """Per-group ``sum(dy * v)`` and ``sum(dy)`` of ``(P, G, Q)`` tensors in one pass."""
    G = v3.shape[1]
    zeros = _constant(0.0, G, sdt, v3.device)
    ones = _constant(1.0, G, sdt, v3.device)
    # weight = ones (unused by these two sums): the CUDA kernel needs a defined weight
    # tensor ("tensor does not have a device" with None), the CPU one accepts either
    _, sdyv, sdy = torch.ops.aten.native_batch_norm_backward(
        dy3, v3, ones, None, None, zeros, ones, True, 0.0, [False, True, True])
    return sdyv.to(sdt), sdy.to(sdt)


def _affine_g(t3: torch.Tensor, scale: torch.Tensor, shift: Optional[torch.Tensor],
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``t3 * scale[g] + shift[g]`` for a ``(P, G, Q)`` tensor and per-group ``(G,)`` vectors.

    In eager mode on CPU this is the native eval-mode batch-norm transform (mean 0, variance
    1, eps 0: exactly ``t * scale + shift``), whose kernel runs each contiguous row with
    scalar coefficients; ``addcmul`` with two broadcast operands falls back to an
    unvectorized loop there (about 2x slower). Under torch.compile, and on other devices,
    ``addcmul`` (inductor fuses it). ``out``: a buffer of the caller's to write into (may be
    ``t3`` itself; eager CPU only), one full-size allocation fewer."""
    G = t3.shape[1]
    if shift is None:
        shift = torch.zeros(G, dtype=t3.dtype, device=t3.device)
    if t3.device.type != "cpu" or torch.compiler.is_compiling() or t3.dtype not in (torch.float32, torch.float64):
        if out is not None and not torch.compiler.is_compiling():
            return torch.addcmul(shift[None, :, None], t3, scale[None, :, None], out=out)
        return torch.addcmul(shift[None, :, None], t3, scale[None, :, None])
    zeros = torch.zeros(G, dtype=t3.dtype, device=t3.device)
    ones = torch.ones(G, dtype=t3.dtype, device=t3.device)
    if out is None:
        return torch.batch_norm(t3, scale, shift, zeros, ones, False, 0.0, 0.0, False)
    empty = t3.new_empty(0)
    return torch.ops.aten.native_batch_norm.out(t3, scale, shift, zeros, ones, False, 0.0, 0.0,
                                                 out=out, save_mean=empty, save_invstd=empty.clone())[0]


def compiling_on_cpu(x: torch.Tensor) -> bool:
    """Under torch.compile with ``x`` on CPU: where inductor's CPU code stores a saved bool
    mask one value at a time, so the layers shape what AOT autograd's partitioner saves
    (:func:`_input_dependence`, :func:`recomputable_affine`)."""
    return torch.compiler.is_compiling() and x.device.type == "cpu"


def _input_dependence(x: torch.Tensor) -> torch.Tensor:
    """Zeros computed from ``x``: added to the mean-only backward under torch.compile on CPU.

    The mean-only backward needs no activation, so AOT autograd's partitioner saves the
    bool mask of a ReLU that follows the layer (``y <= 0``) instead of a float tensor it
    could recompute the mask from; inductor's CPU code stores such a mask one value at a
    time (about 10 ns per value: on resnet18's stem, 12 ms of a forward in which the batch
    norm's whole kernel takes 2 ms). With ``x`` used in the backward, ``x`` is saved (as
    ``nn.BatchNorm2d``'s backward saves it) and the mask is recomputed from it in the fused
    backward kernel. Exactly zero for every ``x`` (``nan_to_num`` of ``x * 0``), so the
    gradient is unchanged."""
    return torch.nan_to_num(x * 0, 0.0, 0.0, 0.0)


def recomputable_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` (``scale``, ``shift`` broadcast against ``x``); under
    torch.compile on CPU computed from a view of ``x`` of its own.

    For a layer whose statistics pass ``x`` through an operation inductor cannot fuse
    (``torch.topk``, a pooling), and whose output is then an elementwise function of
    ``x``: AOT autograd's partitioner does not recompute an elementwise use of a tensor
    that comes after such an operation ("used far apart"), so it cannot recompute the
    output in the backward and keeps the mask of a following ReLU as bool, whose store
    inductor's CPU code does one value at a time (resnet18's stem with top-k batch norm: 43
    ms a step against 13.5 ms with nn.BatchNorm2d). On a view that nothing else uses, the
    output can be recomputed from ``x`` (which the backward keeps anyway), ``scale`` and
    ``shift``. Callers fold their centering into ``shift`` (``(x - mu) * s + b`` as
    ``x * s + (b - mu * s)``, as ATen's CPU batch norm computes it), since a centered
    ``x - mu`` computed before the unfusible operation would be such a use again; the
    result then differs from eager mode's ``(x - mu) * s + b`` by rounding, relative to
    ``|mu * s|`` rather than to ``|y|`` (as nn.BatchNorm2d's does on CPU)."""
    if compiling_on_cpu(x):
        return torch.addcmul(shift, x.unsqueeze(0), scale).squeeze(0).clone()
    return torch.addcmul(shift, x, scale)


def _rows(v3: torch.Tensor) -> torch.Tensor:
    """``|v|`` laid out as (G, P * Q): one contiguous row per group (fast topk on CPU)."""
    P, G, Q = v3.shape
    if P == 1:
        return v3.reshape(G, Q).abs()
    if torch.compiler.is_compiling():  # inductor fuses these (and mis-lays out `out=` below)
        return v3.transpose(0, 1).abs().reshape(G, P * Q)
    a = torch.empty((G, P, Q), dtype=v3.dtype, device=v3.device)
    torch.abs(v3.transpose(0, 1), out=a)  # one pass into the (G, P, Q) layout
    return a.view(G, P * Q)


def _topk_select(v3: torch.Tensor, k: int, group, world: int):
    """The k largest |v| of each group (over all processes).

    Returns (values (G, k) of the global top-k, flat indices (G * k,) into v3 of this
    process's local top-k, their group index, and a (G * k,) 0/1 weight that is 1 where
    the local value is one of the global top-k).
    """
    P, G, Q = v3.shape
    loc_vals, loc_pos = _rows(v3).topk(k, dim=1, sorted=False)   # (G, k)
    gidx = torch.arange(G, device=v3.device).repeat_interleave(k)
    pos = loc_pos.reshape(-1)
    flat = ((pos // Q) * G + gidx) * Q + pos % Q
    if v3.numel() < 2 ** 31:
        flat = flat.to(torch.int32)  # saved for backward: half the bytes of int64
    if group is not None and world > 1:
        gathered = [torch.empty_like(loc_vals) for _ in range(world)]
        dist.all_gather(gathered, loc_vals.contiguous(), group=group)
        allv = torch.cat(gathered, dim=1)                         # (G, world * k)
        glob_vals, glob_pos = allv.topk(k, dim=1, sorted=False)
        rank = dist.get_rank(group)
        mine = torch.zeros(G, world * k, dtype=v3.dtype, device=v3.device)
        mine.scatter_(1, glob_pos, 1.0)
        keep = mine[:, rank * k:(rank + 1) * k].reshape(-1)
        return glob_vals, flat, gidx, keep
    return loc_vals, flat, gidx, None


@dataclass(frozen=True)
class _Meta:
    """What backward needs besides tensors."""
    stat: str
    k: int
    group: object
    shape: tuple
    has_w: bool
    has_b: bool
    delta_grad: bool
    recompute: bool       # v is recomputed from the saved input (half precision)
    sdt: torch.dtype
    has_qb: bool = False  # a recovery on the post_shape view
    qdt: Optional[torch.dtype] = None
    qb_shape: Optional[tuple] = None
    post_shape: Optional[tuple] = None
    input_for_partitioner: bool = False  # mean-only: x kept under compile (see _input_dependence)


class StatNormFn(torch.autograd.Function):
    """Standardization of a ``(P, G, Q)`` tensor per group. See the module doc."""

    @staticmethod
    def forward(ctx, x3, weight, bias, qweight, qbias, delta, stat: str, k: int, eps: float, group,
                need_mad: bool, post_shape, out_shape=None):
        ctx.set_materialize_grads(False)
        P, G, Q = x3.shape
        # out_shape: x3 is a reshape of the caller's tensor of that shape, and y is returned in
        # it as a tensor of its own, not as a view: an in-place op on a view of a Function's
        # output (the usual ReLU(inplace=True) after a norm) makes autograd clone and copy
        # the gradient in backward. Eager only (under compile views cost nothing).
        if out_shape is not None and torch.compiler.is_compiling():
            out_shape = None
        ybase = torch.empty(out_shape, dtype=x3.dtype, device=x3.device) if out_shape is not None else None
        sdt = stat_dtype(x3.dtype)
        world = dist.get_world_size(group) if group is not None else 1

        # mean: one all-reduce of the per-group sums and the count (batches may differ)
        if group is not None:
            s1 = x3.sum(dim=(0, 2), dtype=sdt)
            packed = _all_reduce(torch.cat([s1, s1.new_full((1,), float(P * Q))]), group)
            s1, m = packed[:G], packed[G]
            mu = s1 / m
        else:
            m = P * Q
            mu = x3.mean(dim=(0, 2), dtype=sdt)   # one kernel (each one is a launch on a GPU)
        empty = mu.new_zeros(0)
        post = qweight is not None or qbias is not None
        if stat == "mean" and not need_mad and not post:
            # y = x - mu + beta in one pass; backward needs only sum(dy)
            shift = bias.to(sdt) - mu if bias is not None else -mu
            y = torch.add(x3, shift.to(x3.dtype)[None, :, None],  # a fresh tensor, not a view
                          **({"out": ybase.view(x3.shape)} if ybase is not None else {}))
            y = ybase if ybase is not None else y
            keep_x = compiling_on_cpu(x3)
            ctx.meta = _Meta("mean-lite", k, group, x3.shape, False, bias is not None, False, False, sdt,
                             input_for_partitioner=keep_x)
            ctx.m = m
            ctx.linear_backward = True   # dx = dy - mean(dy): nothing saved enters it
            if keep_x:
                ctx.save_for_backward(x3)
            outs = (y, mu, empty, mu.new_zeros(0), m if group is not None else mu.new_zeros(0))
            ctx.mark_non_differentiable(outs[1], outs[2], outs[4])
            return outs
        recompute = sdt != x3.dtype
        v3 = (x3.to(sdt) if recompute else x3) - mu.to(sdt if recompute else x3.dtype)[None, :, None]

        # the buffer y is written into (eager): the caller's-shape output when there is one
        eager = not torch.compiler.is_compiling()
        ybuf = ybase.view(v3.shape) if ybase is not None and not recompute else None
        sq = None
        if stat == "l2":
            sq = torch.linalg.vector_norm(v3, 2, dim=(0, 2), dtype=sdt).square_()
        mad = None
        if stat == "l1" or need_mad:
            # (vector_norm's ord=1 path is ~10x slower on CPU; elsewhere it is one kernel
            # where abs + sum are two launches)
            # |v| into the buffer that will hold y (eager): one full-size allocation fewer
            if v3.device.type != "cpu":
                mad = torch.linalg.vector_norm(v3, 1, dim=(0, 2), dtype=sdt)
            elif eager:
                ybuf = ybuf if ybuf is not None else torch.empty_like(v3)
                mad = torch.abs(v3, out=ybuf).sum(dim=(0, 2), dtype=sdt)
            else:
                mad = v3.abs().sum(dim=(0, 2), dtype=sdt)
        red = [t for t in (sq, mad) if t is not None]
        if group is not None and red:
            parts = list(_all_reduce(torch.cat(red), group).split(G))
            sq = parts.pop(0) if sq is not None else None
            mad = parts.pop(0) if mad is not None else None
        mad = mad / m if mad is not None else None

        topk = None
        ctx.cinf = None
        if stat == "l2":
            var = sq / m
            d = torch.sqrt(var + delta.to(sdt))
            batch_stat = var
        elif stat == "l1":
            d = C_L1 * mad + eps
            batch_stat = None   # mean|v| itself: stat_norm returns mad.detach() (no copy)
        elif stat == "topk":
            cinf = _c_inf_any(m)
            vals, flat, gidx, keep = _topk_select(v3, k, group, world)
            s_k = vals.to(sdt).mean(dim=1)
            sgn = torch.sign(v3.reshape(-1)[flat]).to(sdt)
            if keep is not None:
                sgn = sgn * keep.to(sdt)
            sign_sum = _all_reduce(torch.zeros(G, dtype=sdt, device=x3.device).index_add_(0, gidx, sgn), group)
            topk = (flat, None, sign_sum, keep)  # flat is in (G, k) order: no group index needed
            d = cinf * s_k + eps
            batch_stat = cinf * s_k
            ctx.cinf = cinf
        elif stat == "mean":
            d = torch.ones(G, dtype=sdt, device=x3.device)
            batch_stat = None
        else:
            raise ValueError(f"unknown statistic {stat!r}; expected one of {STATS}")

        gamma = weight.to(sdt) if weight is not None else torch.ones(G, dtype=sdt, device=x3.device)
        scale = gamma / d
        ydt = v3.dtype
        if stat == "topk" and not recompute and compiling_on_cpu(x3):
            sc = scale.to(x3.dtype)
            shift = (bias.to(x3.dtype) if bias is not None else 0) - mu.to(x3.dtype) * sc
            y = recomputable_affine(x3, sc[None, :, None], shift[None, :, None])
        else:
            y = _affine_g(v3, scale.to(ydt), bias.to(ydt) if bias is not None else None, out=ybuf)
        if post:  # the recovery on the post_shape view, in place: y * w + b
            yv = y.view(post_shape)
            if qweight is not None and qbias is not None and eager:
                torch.addcmul(qbias.to(ydt), yv, qweight.to(ydt), out=yv)  # one pass, not two
            else:
                if qweight is not None:
                    yv.mul_(qweight.to(ydt))
                if qbias is not None:
                    yv.add_(qbias.to(ydt))
        if recompute:
            y = ybase.view(x3.shape).copy_(y) if ybase is not None else y.to(x3.dtype)
        if ybase is not None:
            y = ybase

        saved_topk = topk if topk is not None else (None,) * 4
        ctx.save_for_backward(x3 if recompute else v3, mu if recompute else None, d, gamma, qweight,
                              *saved_topk)
        ctx.meta = _Meta(stat, k, group, x3.shape, weight is not None, bias is not None,
                         delta is not None and delta.requires_grad, recompute, sdt,
                         qbias is not None, qbias.dtype if qbias is not None else None,
                         tuple(qbias.shape) if qbias is not None else None, post_shape)
        ctx.m = m
        if delta is not None:
            ctx.delta_shape = delta.shape
        outs = (y, mu, batch_stat if batch_stat is not None else empty,
                mad if mad is not None else mu.new_zeros(0), m if group is not None else mu.new_zeros(0))
        ctx.mark_non_differentiable(outs[1], outs[2], outs[4])
        return outs

    @staticmethod
    @first_order_only
    def backward(ctx, dy, _gmu, _gstat, gmad, _gcount):
        """Gradients, for each group over its n values (of the global batch).

        With ``k1 = gamma / d``, ``S_dy = sum(dy)``, ``S_dyv = sum(dy * v)`` and
        ``dL/dd = -gamma * S_dyv / d^2``::

            dx = k1 * (dy - S_dy / n) + dL/dd * (dd/dv - mean(dd/dv))
                 + gmad / n * (sign(v) - mean(sign(v)))

        ``dd/dv``: "l2" ``v / (n d)``; "l1" ``C_L1 sign(v) / n``; "topk"
        ``C_inf sign(v) / k`` on the top-k positions, 0 elsewhere; "mean" 0.
        ``dL/dgamma = S_dyv / d`` and ``dL/dbeta = S_dy`` are local (DDP averages them);
        ``dL/ddelta = sum_g dL/dd / (2 d)``.
        """
        meta, m = ctx.meta, ctx.m
        stat, k, group, shape, sdt = meta.stat, meta.k, meta.group, meta.shape, meta.sdt
        if stat == "mean-lite":
            return StatNormFn._mean_only_backward(ctx, dy)
        saved, mu, d, gamma, qweight, topk_flat, topk_g, topk_sign_sum, topk_keep = ctx.saved_tensors
        if meta.recompute:
            v3 = saved.to(sdt) - mu[None, :, None]
        else:
            v3 = saved
        out_dt = saved.dtype
        if dy is not None and dy.shape != shape:  # the output was returned in the caller's shape
            dy = dy.reshape(shape)
        if dy is None:
            dy = torch.zeros(shape, dtype=v3.dtype, device=v3.device)
        dy3 = dy.to(v3.dtype)
        G = v3.shape[1]
        gqw = gqb = None
        post_shape = meta.post_shape
        if meta.has_qb and ctx.needs_input_grad[4]:
            gqb = dy3.view(post_shape).sum_to_size(meta.qb_shape).to(meta.qdt)
        if qweight is not None:
            # dL/dw = sum of dy * v * gamma / d over the dims w is broadcast along; then
            # dy becomes dy * w (in the same buffer in eager mode)
            t = dy3 * v3
            if ctx.needs_input_grad[3]:
                k1g = (gamma / d).to(t.dtype)
                if post_shape == tuple(v3.shape) and v3.shape[0] == 1 and qweight.numel() == v3.shape[2]:
                    # recovery along Q of a (1, G, Q) layout (layer norm): sum_g k1_g t_gq is
                    # one matrix-vector product (no scaled copy of t)
                    gqw = torch.mv(t[0].t(), k1g).view(qweight.shape).to(qweight.dtype)
                else:
                    gqw = t.mul_(k1g[None, :, None]).view(post_shape) \
                        .sum_to_size(qweight.shape).to(qweight.dtype)
            w = qweight.to(dy3.dtype)
            if torch.compiler.is_compiling():
                dy3 = (dy3.view(post_shape) * w).view(v3.shape)
            else:
                dy3 = torch.mul(dy3.view(post_shape), w, out=t.view(post_shape)).view(v3.shape)
        sdyv_loc, sdy_loc = _group_sums(dy3, v3, sdt)
        has_gmad = gmad is not None and gmad.numel() > 0
        need_sign = stat == "l1" or has_gmad
        sign = torch.sign(v3) if need_sign else None
        if group is not None:
            parts = [sdyv_loc, sdy_loc]
            if has_gmad:
                parts.append(gmad.to(sdt))
            if need_sign:
                parts.append(sign.sum(dim=(0, 2), dtype=sdt))
            if torch.compiler.is_compiling():
                # one all-reduce per part: inductor writes the parts of a cat straight into
                # the cat's buffer and runs the all-reduce in place on it, so the local sums
                # used for gw and gb below read the global ones (gamma gradients ~1% off)
                packed = [_all_reduce(t, group) for t in parts]
            else:
                packed = _all_reduce(torch.cat(parts), group).split(G)
            sdyv, sdy = packed[0], packed[1]
            gmad_g = packed[2] if has_gmad else None
            ssign = packed[-1] if need_sign else None
        else:
            sdyv, sdy = sdyv_loc, sdy_loc
            gmad_g = gmad.to(sdt) if has_gmad else None
            ssign = sign.sum(dim=(0, 2), dtype=sdt) if need_sign else None

        # the per-group coefficients in as few operations as possible (on a GPU in eager mode
        # each is a kernel launch, and these vectors are tiny):
        #   k1 = gamma / d, dL/dd = -k1 S_dyv / d,
        #   c0 = -(k1 S_dy + coef_sign S_sign + topk_coef S_topk_sign) / n
        k1 = gamma / d
        dldd = (k1 * sdyv).div_(d).neg_()
        coef_v = coef_sign = topk_coef = None
        if stat == "l2":
            coef_v = (dldd / d).mul_(1.0 / m)
        elif stat == "l1":
            coef_sign = dldd * (C_L1 / m)
        if gmad_g is not None:
            coef_sign = gmad_g / m if coef_sign is None else coef_sign.add_(gmad_g / m)
        c0 = k1 * sdy
        if need_sign:
            c0.addcmul_(coef_sign, ssign)
        if stat == "topk":
            topk_coef = dldd * (ctx.cinf / k)
            c0.addcmul_(topk_coef, topk_sign_sum)
        c0.mul_(-1.0 / m)

        dt = v3.dtype
        # dy3 is this backward's own buffer when the post recovery made it (eager): dx goes there
        own = qweight is not None and not torch.compiler.is_compiling()
        dx = _affine_g(dy3, k1.to(dt), c0.to(dt), out=dy3 if own else None)
        if coef_v is not None:
            dx.addcmul_(v3, coef_v.to(dt)[None, :, None])
        if need_sign:
            dx.addcmul_(sign, coef_sign.to(dt)[None, :, None])
        if topk_coef is not None:
            sgn = (torch.sign(v3.reshape(-1)[topk_flat]).to(sdt).view(G, -1) * topk_coef[:, None]).reshape(-1)
            if topk_keep is not None:
                sgn = sgn * topk_keep.to(sdt)
            dx.view(-1).index_add_(0, topk_flat, sgn.to(dt))

        gw = (sdyv_loc / d).to(gamma.dtype) if meta.has_w and ctx.needs_input_grad[1] else None
        gb = sdy_loc if meta.has_b and ctx.needs_input_grad[2] else None
        gdelta = None
        if meta.delta_grad:
            gdelta = (dldd / (2 * d)).sum().reshape(ctx.delta_shape)
        return dx.to(out_dt), gw, gb, gqw, gqb, gdelta, None, None, None, None, None, None, None

    @staticmethod
    def _mean_only_backward(ctx, dy):
        """Mean-only: ``dx = dy - mean(dy)``, ``dbeta = sum(dy)``."""
        meta, m = ctx.meta, ctx.m
        if dy is None:
            return (None,) * 13
        dy = dy.reshape(meta.shape)
        sdy_loc = dy.sum(dim=(0, 2), dtype=meta.sdt)
        if meta.group is not None:
            sdy = _all_reduce(sdy_loc.clone(), meta.group)
            dx = dy - (sdy / m).to(dy.dtype)[None, :, None]
        else:   # dy - S_dy / n in one kernel
            dx = torch.sub(dy, sdy_loc.to(dy.dtype)[None, :, None], alpha=1.0 / m)
        if meta.input_for_partitioner:
            dx = dx + _input_dependence(ctx.saved_tensors[0])
        gb = sdy_loc if meta.has_b and ctx.needs_input_grad[2] else None
        return dx, None, gb, None, None, None, None, None, None, None, None, None, None


def stat_norm(x3: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
              stat: str, *, delta: Optional[torch.Tensor] = None, k: int = 1, eps: float = 1e-5,
              group=None, need_mad: bool = False, qweight: Optional[torch.Tensor] = None,
              qbias: Optional[torch.Tensor] = None, post_shape: Optional[tuple] = None,
              out_shape: Optional[tuple] = None, kernel_when_compiled: bool = True,
              source: Optional[torch.Tensor] = None):
    """Standardize a ``(P, G, Q)`` tensor per group: returns (y, mu, batch_stat, mad, count).

    ``weight``, ``bias``: a recovery per group ``g`` (G,). ``qweight``, ``qbias``: a
    recovery applied after it on the view ``y.view(post_shape)`` (default ``(P, G, Q)``),
    shaped to broadcast against that view (e.g. ``(1, 1, Q)``: along Q).

    ``batch_stat`` is what a running statistic tracks: the biased variance ("l2"),
    ``mean|v|`` ("l1"), ``C_inf(n) * s_k`` ("topk"); empty for "mean". ``mad`` is
    ``mean|v|`` per group (differentiable) when ``need_mad`` or ``stat == "l1"``, else
    empty. ``count`` is ``n`` (a Python int; a tensor when summed over ``group``).

    ``out_shape``: ``x3`` is a reshape of the caller's contiguous tensor of this shape (see
    :func:`reshape_source`); ``y`` then comes back in that shape, as a tensor of its own.

    On CPU, in float32 / float64, the compiled kernels of :mod:`normswap.kernels` run the
    call (:mod:`normswap.norms.rows`); under torch.compile only if ``kernel_when_compiled``
    (the area's choice for the statistic, :class:`~normswap.norms.areas.Area`), as an
    operator given ``source`` where the caller has one: the tensor ``x3`` is
    ``source.reshape(x3.shape)`` of.
    """
    if stat == "l2" and delta is None:
        delta = torch.tensor(eps, dtype=stat_dtype(x3.dtype), device=x3.device)
    if stat == "topk" and group is None and k > x3.shape[0] * x3.shape[2]:
        raise ValueError(f"top-k: k={k} is larger than the {x3.shape[0] * x3.shape[2]} values per group")
    if (qweight is not None or qbias is not None) and post_shape is None:
        post_shape = tuple(x3.shape)
    from .rows import row_norm, row_plan, rows_in_place  # (rows imports this module)
    x3 = rows_in_place(x3, stat, group)
    plan = row_plan(x3, weight, bias, qweight, qbias, post_shape, stat, group, delta, kernel_when_compiled)
    if plan is not None:  # the compiled CPU kernels (eager, contiguous rows)
        y, mu, batch_stat, mad = row_norm(x3, plan, stat, delta, k, eps, need_mad, out_shape, source)
        return y, mu, batch_stat, mad, x3.shape[0] * x3.shape[2]
    y, mu, batch_stat, mad, count = StatNormFn.apply(x3, weight, bias, qweight, qbias, delta, stat, k, eps,
                                                     group, need_mad, post_shape, out_shape)
    if stat == "l1":
        batch_stat = mad.detach()
    if group is None:
        count = x3.shape[0] * x3.shape[2]
    return y, mu, batch_stat, mad, count


def reshape_source(x: torch.Tensor, x3: torch.Tensor) -> Optional[tuple]:
    """``x``'s shape when ``x3`` is nothing but a reshape of the contiguous ``x`` (same memory,
    same order), else None: then :func:`stat_norm` can return ``y`` in ``x``'s shape.
    Always None under torch.compile (no data pointers there, and views cost nothing)."""
    if torch.compiler.is_compiling():
        return None
    if x.is_contiguous() and x3.is_contiguous() and x3.numel() == x.numel() and \
            (x.numel() == 0 or x3.data_ptr() == x.data_ptr()):
        return tuple(x.shape)
    return None


def batch_stat_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    stat: str, *, delta: Optional[torch.Tensor] = None, k: int = 1, eps: float = 1e-5,
                    group=None, need_mad: bool = False):
    """Training-mode batch normalization of ``(N, C, *)``: statistics per channel over
    ``(N, *)``. Returns (y, mu, batch_stat, mad, count) as :func:`stat_norm` does."""
    N, C = x.shape[0], x.shape[1]
    x3 = x.reshape(N, C, -1)
    out_shape = reshape_source(x, x3)
    y, mu, batch_stat, mad, count = stat_norm(x3, weight, bias, stat, delta=delta, k=k, eps=eps, group=group,
                                              need_mad=need_mad, out_shape=out_shape,
                                              kernel_when_compiled=stat in BatchArea.compiled_kernel_stats,
                                              source=x)
    return y if out_shape is not None else y.view(x.shape), mu, batch_stat, mad, count
