"""Functional core of the batch-statistics normalizers.

One autograd Function, :class:`BatchStatNormFn`, computes every batch-statistics
normalizer of normswap. For an input ``x`` of shape ``(N, C, *)`` and each channel
``c`` (statistics over the ``M = N * prod(*)`` values of the channel, across all
processes when a process group is given)::

    mu = mean(x)                 v = x - mu
    y  = gamma * v / d + beta

with the denominator ``d`` chosen by ``stat``:

    "l2"    d = sqrt(mean(v^2) + delta)          delta = sigma^2 + eps   (BN, BN-s, BN*)
    "l1"    d = C_L1 * mean(|v|) + eps            C_L1 = sqrt(pi / 2)
    "topk"  d = C_inf(M) * s_k + eps              s_k = mean of the k largest |v|
    "mean"  d = 1                                 (mean-only batch norm)

It also returns ``mean(|v|)`` per channel as a differentiable output, the quantity
the L1 activation penalty of Ren et al. needs, without a second pass.

Only the centered input ``v`` and per-channel vectors are saved for backward. The
backward pass is written out by hand (derivation in the docstring of
:meth:`BatchStatNormFn.backward`); per-channel sums come from one fused reduction
(``native_batch_norm_backward`` with the input-gradient disabled), and under a process
group they are all-reduced like ``nn.SyncBatchNorm`` does.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

C_L1 = math.sqrt(math.pi / 2.0)
"""Makes ``C_L1 * mean|v|`` equal the standard deviation for Gaussian ``v``."""

STATS = ("l2", "l1", "topk", "mean")


def c_inf(n: int) -> float:
    """``C_inf(n) = 0.5 * (1 + sqrt(pi * ln 4)) / sqrt(2 * ln n)`` (Hoffer et al.).

    The scale constant of Hoffer et al.'s L-inf batch norm, exactly as PAPERS.md gives
    it. Note: for n = 2e5 Gaussian values ``C_inf(n) * max|v|`` comes out near 1.5 std
    (measured), so top-k BN is not a drop-in scale match for L2 BN the way L1 BN is.
    """
    if n < 2:
        raise ValueError(f"C_inf(n) needs n >= 2 values, got n={n}")
    return 0.5 * (1.0 + math.sqrt(math.pi * math.log(4.0))) / math.sqrt(2.0 * math.log(n))


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which per-channel statistics are accumulated and kept."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


def _channel_sums(dy3: torch.Tensor, v3: torch.Tensor, sdt: torch.dtype):
    """Per-channel ``sum(dy * v)`` and ``sum(dy)`` in one fused pass."""
    C = v3.shape[1]
    zeros = torch.zeros(C, dtype=sdt, device=v3.device)
    ones = torch.ones(C, dtype=sdt, device=v3.device)
    _, sdyv, sdy = torch.ops.aten.native_batch_norm_backward(
        dy3, v3, None, None, None, zeros, ones, True, 0.0, [False, True, True])
    return sdyv.to(sdt), sdy.to(sdt)


def _topk_select(v3: torch.Tensor, k: int, group, world: int):
    """Positions of the k largest |v| of each channel (over all processes).

    Returns (values (C, k) of the global top-k, flat indices into v3 of the ones this
    process holds, their channel index).
    """
    N, C, L = v3.shape
    # |v| laid out as (C, N * L): one contiguous row per channel makes topk fast on CPU
    a = torch.empty((C, N, L), dtype=v3.dtype, device=v3.device)
    torch.abs(v3.transpose(0, 1), out=a)
    loc_vals, loc_pos = a.view(C, N * L).topk(k, dim=1, sorted=False)   # (C, k)
    if group is not None and world > 1:
        gathered = [torch.empty_like(loc_vals) for _ in range(world)]
        dist.all_gather(gathered, loc_vals.contiguous(), group=group)
        allv = torch.cat(gathered, dim=1)                         # (C, world * k)
        glob_vals, glob_pos = allv.topk(k, dim=1, sorted=False)
        rank = dist.get_rank(group)
        mine = (glob_pos >= rank * k) & (glob_pos < (rank + 1) * k)
        ch, slot = mine.nonzero(as_tuple=True)
        pos = loc_pos[ch, glob_pos[ch, slot] - rank * k]
    else:
        glob_vals = loc_vals
        ch = torch.arange(C, device=v3.device).repeat_interleave(k)
        pos = loc_pos.reshape(-1)
    n, l = pos // L, pos % L
    flat = (n * C + ch) * L + l
    return glob_vals, flat, ch


class BatchStatNormFn(torch.autograd.Function):
    """Batch-statistics normalization with a hand-written backward. See module doc."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, stat: str, k: int, eps: float,
                group, need_mad: bool):
        ctx.set_materialize_grads(False)
        N, C = x.shape[0], x.shape[1]
        x3 = x.reshape(N, C, -1)
        sdt = stat_dtype(x.dtype)
        world = dist.get_world_size(group) if group is not None else 1
        local_m = x3.shape[0] * x3.shape[2]

        # mean: one all-reduce of the per-channel sums and the count (batches may differ)
        s1 = x3.sum(dim=(0, 2), dtype=sdt)
        if group is not None:
            packed = _all_reduce(torch.cat([s1, s1.new_tensor([float(local_m)])]), group)
            s1, m = packed[:C], int(round(packed[C].item()))
        else:
            m = local_m
        mu = s1 / m
        if stat == "mean" and not need_mad:
            # y = x - mu + beta in one pass; backward needs only sum(dy)
            shift = bias.to(sdt) - mu if bias is not None else -mu
            bshape = (1, C) + (1,) * (x.dim() - 2)
            y = x + shift.to(x.dtype).view(bshape)  # a fresh tensor, not a view
            ctx.save_for_backward()
            ctx.meta = ("mean-lite", k, group, m, x.shape, False, bias is not None, False, sdt)
            outs = (y, mu, mu.new_zeros(0), mu.new_zeros(0), torch.tensor(m))
            ctx.mark_non_differentiable(outs[1], outs[2], outs[4])
            return outs
        v3 = x3 - mu.to(x.dtype)[None, :, None]

        sq = None
        if stat == "l2":
            sq = torch.linalg.vector_norm(v3, 2, dim=(0, 2), dtype=sdt).square_()
        mad = None
        if stat == "l1" or need_mad:
            mad = torch.linalg.vector_norm(v3, 1, dim=(0, 2), dtype=sdt)
        red = [t for t in (sq, mad) if t is not None]
        if group is not None and red:
            packed = _all_reduce(torch.cat(red), group)
            parts = list(packed.split(C))
            sq = parts.pop(0) if sq is not None else None
            mad = parts.pop(0) if mad is not None else None
        mad = mad / m if mad is not None else None

        topk_flat = topk_ch = None
        topk_sign_sum = None
        if stat == "l2":
            var = sq / m
            d = torch.sqrt(var + delta.to(sdt))
            batch_stat = var
        elif stat == "l1":
            d = C_L1 * mad + eps
            batch_stat = mad.clone()  # a distinct tensor: mad itself stays differentiable
        elif stat == "topk":
            if k > local_m:
                raise ValueError(f"top-k batch norm: k={k} is larger than the {local_m} values per "
                                 f"channel (on this process)")
            vals, topk_flat, topk_ch = _topk_select(v3, k, group, world)
            s_k = vals.to(sdt).mean(dim=1)
            cinf = c_inf(m)
            d = cinf * s_k + eps
            batch_stat = cinf * s_k
            sgn = torch.sign(v3.reshape(-1)[topk_flat]).to(sdt)
            topk_sign_sum = torch.zeros(C, dtype=sdt, device=x.device).index_add_(0, topk_ch, sgn)
            topk_sign_sum = _all_reduce(topk_sign_sum, group)
            ctx.cinf = cinf
        elif stat == "mean":
            d = torch.ones(C, dtype=sdt, device=x.device)
            batch_stat = None
        else:
            raise ValueError(f"unknown statistic {stat!r}; expected one of {STATS}")

        gamma = weight.to(sdt) if weight is not None else torch.ones(C, dtype=sdt, device=x.device)
        scale = gamma / d
        shift = bias.to(sdt) if bias is not None else torch.zeros(C, dtype=sdt, device=x.device)
        bshape = (1, C) + (1,) * (x.dim() - 2)
        y = torch.addcmul(shift.to(x.dtype).view(bshape), v3.view(x.shape), scale.to(x.dtype).view(bshape))

        ctx.save_for_backward(v3, d, gamma, topk_flat, topk_ch, topk_sign_sum)
        ctx.meta = (stat, k, group, m, x.shape, weight is not None, bias is not None,
                    delta is not None and delta.requires_grad, sdt)
        if delta is not None:
            ctx.delta_shape = delta.shape
        outs = [y, mu, batch_stat if batch_stat is not None else mu.new_zeros(0),
                mad if mad is not None else mu.new_zeros(0), torch.tensor(m)]
        ctx.mark_non_differentiable(outs[1], outs[2], outs[4])
        return tuple(outs)

    @staticmethod
    def backward(ctx, dy, _gmu, _gstat, gmad, _gcount):
        """Gradients, for each channel over the M values of the (global) batch.

        With ``g = dy``, ``k1 = gamma / d``, ``S_dy = sum(dy)``, ``S_dyv = sum(dy * v)``
        and ``dL/dd = -gamma * S_dyv / d^2``::

            dx = k1 * (dy - S_dy / M) + dL/dd * (dd/dv - mean(dd/dv))
                 + gmad / M * (sign(v) - mean(sign(v)))

        ``dd/dv``: "l2" ``v / (M d)``; "l1" ``C_L1 sign(v) / M``; "topk"
        ``C_inf sign(v) / k`` on the top-k positions, 0 elsewhere; "mean" 0.
        ``dL/dgamma = S_dyv / d`` and ``dL/dbeta = S_dy`` are local (DDP averages them);
        ``dL/ddelta = sum_c dL/dd / (2 d)``.
        """
        stat, k, group, m, shape, has_w, has_b, delta_grad, sdt = ctx.meta
        if stat == "mean-lite":
            return BatchStatNormFn._mean_only_backward(ctx, dy)
        v3, d, gamma, topk_flat, topk_ch, topk_sign_sum = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(shape, dtype=v3.dtype, device=v3.device)
        dy3 = dy.reshape(v3.shape)
        C = v3.shape[1]
        sdyv_loc, sdy_loc = _channel_sums(dy3, v3, sdt)
        need_sign = stat == "l1" or gmad is not None and gmad.numel() > 0
        sign = torch.sign(v3) if need_sign else None
        if group is not None:
            parts = [sdyv_loc, sdy_loc]
            if gmad is not None and gmad.numel() > 0:
                parts.append(gmad.to(sdt))
            if need_sign:
                parts.append(sign.sum(dim=(0, 2), dtype=sdt))
            packed = _all_reduce(torch.cat(parts), group).split(C)
            sdyv, sdy = packed[0], packed[1]
            gmad_g = packed[2] if len(parts) > 2 + need_sign else None
            ssign = packed[-1] if need_sign else None
        else:
            sdyv, sdy = sdyv_loc, sdy_loc
            gmad_g = gmad.to(sdt) if gmad is not None and gmad.numel() > 0 else None
            ssign = sign.sum(dim=(0, 2), dtype=sdt) if need_sign else None

        k1 = gamma / d
        c0 = -k1 * sdy / m
        dldd = -gamma * sdyv / (d * d)
        coef_sign = torch.zeros_like(d)
        coef_v = None
        if stat == "l2":
            coef_v = dldd / (m * d)
        elif stat == "l1":
            coef_sign = coef_sign + dldd * C_L1 / m
        if gmad_g is not None:
            coef_sign = coef_sign + gmad_g / m
        if need_sign:
            c0 = c0 - coef_sign * ssign / m
        topk_coef = None
        if stat == "topk":
            topk_coef = dldd * ctx.cinf / k
            c0 = c0 - topk_coef * topk_sign_sum / m

        dt = dy.dtype
        dx = torch.addcmul(c0.to(dt)[None, :, None], dy3, k1.to(dt)[None, :, None])
        if coef_v is not None:
            dx.addcmul_(v3, coef_v.to(dt)[None, :, None])
        if need_sign:
            dx.addcmul_(sign, coef_sign.to(dt)[None, :, None])
        if topk_coef is not None:
            sgn = torch.sign(v3.reshape(-1)[topk_flat])
            dx.view(-1).index_add_(0, topk_flat, (topk_coef[topk_ch] * sgn.to(sdt)).to(dt))

        gw = (sdyv_loc / d).to(gamma.dtype) if has_w and ctx.needs_input_grad[1] else None
        gb = sdy_loc if has_b and ctx.needs_input_grad[2] else None
        gdelta = None
        if delta_grad:
            gdelta = (dldd / (2 * d)).sum().reshape(ctx.delta_shape)
        return dx.view(shape), gw, gb, gdelta, None, None, None, None, None

    @staticmethod
    def _mean_only_backward(ctx, dy):
        """Mean-only: ``dx = dy - mean(dy)``, ``dbeta = sum(dy)``."""
        _, _, group, m, shape, _, has_b, _, sdt = ctx.meta
        if dy is None:
            return (None,) * 9
        C = shape[1]
        dy3 = dy.reshape(shape[0], C, -1)
        sdy_loc = dy3.sum(dim=(0, 2), dtype=sdt)
        sdy = _all_reduce(sdy_loc.clone(), group) if group is not None else sdy_loc
        dx = dy3 - (sdy / m).to(dy.dtype)[None, :, None]
        gb = sdy_loc if has_b and ctx.needs_input_grad[2] else None
        return dx.view(shape), None, gb, None, None, None, None, None, None


def batch_stat_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    stat: str, *, delta: Optional[torch.Tensor] = None, k: int = 1, eps: float = 1e-5,
                    group=None, need_mad: bool = False):
    """Training-mode batch-statistics normalization: returns (y, mu, batch_stat, mad, count).

    ``batch_stat`` is what the running statistic tracks: the biased variance ("l2"),
    ``mean|v|`` ("l1"), ``C_inf(M) * s_k`` ("topk"); empty for "mean". ``mad`` is
    ``mean|v|`` per channel (differentiable) when ``need_mad`` or ``stat == "l1"``,
    else empty.
    """
    if stat == "l2" and delta is None:
        delta = torch.tensor(eps, dtype=stat_dtype(x.dtype), device=x.device)
    return BatchStatNormFn.apply(x, weight, bias, delta, stat, k, eps, group, need_mad)
