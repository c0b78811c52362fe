"""IterNorm's Newton iteration on the GPU as one Triton kernel each way.

For a batch of covariance matrices ``Sigma`` (G, d, d), with ``tr = tr(Sigma)`` and
``S = Sigma / tr``::

    P_0 = I,   P_k = (3 P_{k-1} - P_{k-1}^3 S) / 2   (k = 1..T),   W = P_T / sqrt(tr)

and backward, for ``Gr = dL/dW``, the chain rule through the steps (the same as
``normswap.norms.whitening._newton_whitening_backward``)::

    g_P = Gr / sqrt(tr),   g_tr = -1/2 <Gr, P_T> / tr^(3/2),   g_S = 0
    for k = T .. 2 (P = P_{k-1}):  g_S -= 1/2 (P^3)^T g_P,   h = -1/2 g_P S^T,
                                   g_P = 3/2 g_P + h (P^2)^T + P^T h P^T + (P^2)^T h
    g_S -= 1/2 g_P   (P_1 = (3 I - S) / 2),   g_tr -= <g_S, Sigma> / tr^2
    dL/dSigma = g_S / tr + g_tr I

Written in PyTorch operations this is 33 kernels forward and about 100 backward for T = 5
(``scripts/count_ops.py``'s count), each a launch of a 16 x 16 product; here one program
per matrix keeps the matrices in registers and the backward computes the ``P_{k-1}``
again (T^2 / 2 small products, no scratch memory). Matrices of ``d`` up to 32 are padded
to 16 or 32 (``tl.dot`` takes at least 16) with zeros in ``Sigma`` and ``Gr``: the padded
block of every ``P_k`` stays the identity and contributes nothing. Larger groups run the
PyTorch formulation: padded to 64, the T = 5 backward took 69 s to compile and 224 KiB of
shared memory (more than an A100 has), against 11 s and 56 KiB at 32 and 1 s and 14 KiB at
16 (the default group size). float32 only, products in IEEE float32 (no TF32). The tests
compile both kernels for sm_80 and sm_90 with Triton's own ptxas, no GPU needed.

``forward`` / ``backward`` launch on any device Triton runs on: CUDA tensors, or CPU
tensors when ``TRITON_INTERPRET=1`` was set before Triton was imported (the tests run the
kernels that way against a float64 re-computation). :func:`available` says whether
Triton can be imported; callers fall back to the PyTorch formulation where it cannot, or
where launching fails (see ``normswap.norms.whitening._newton_kernel``).
"""
from __future__ import annotations

from typing import Optional

import torch

MAX_D = 32


try:   # imported by normswap only when a CUDA tensor is whitened (see the module docstring)
    import triton
    import triton.language as tl
except Exception:   # not installed, or a platform it does not load on
    triton = None

if triton is not None:
    @triton.jit
    def _load(ptr, d, BLOCK: tl.constexpr):
        g = tl.program_id(0).to(tl.int64)
        r = tl.arange(0, BLOCK)
        mask = (r[:, None] < d) & (r[None, :] < d)
        offs = g * d * d + r[:, None] * d + r[None, :]
        return tl.load(ptr + offs, mask=mask, other=0.0), offs, mask

    @triton.jit
    def _eye(BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        return tl.where(r[:, None] == r[None, :], 1.0, 0.0)

    @triton.jit
    def _step(p, s):
        pp = tl.dot(p, p, input_precision="ieee")
        ppp = tl.dot(pp, p, input_precision="ieee")
        return 1.5 * p - 0.5 * tl.dot(ppp, s, input_precision="ieee")

    @triton.jit
    def _p_k(s, eye, K: tl.constexpr):
        """P_K from S (K >= 0)."""
        p = eye
        if K >= 1:
            p = 1.5 * eye - 0.5 * s
        for _ in tl.static_range(K - 1):
            p = _step(p, s)
        return p

    @triton.jit
    def forward_kernel(cov_ptr, out_ptr, d, T: tl.constexpr, BLOCK: tl.constexpr):
        cov, offs, mask = _load(cov_ptr, d, BLOCK)
        eye = _eye(BLOCK)
        tr = tl.sum(tl.sum(cov * eye, axis=1), axis=0)
        p = _p_k(cov / tr, eye, T)
        tl.store(out_ptr + offs, p / tl.sqrt(tr), mask=mask)

    @triton.jit
    def backward_kernel(cov_ptr, grad_ptr, out_ptr, d, T: tl.constexpr, BLOCK: tl.constexpr):
        cov, offs, mask = _load(cov_ptr, d, BLOCK)
        grad, _, _ = _load(grad_ptr, d, BLOCK)
        eye = _eye(BLOCK)
        tr = tl.sum(tl.sum(cov * eye, axis=1), axis=0)
        s = cov / tr
        rs = 1.0 / tl.sqrt(tr)
        p_t = _p_k(s, eye, T)
        g_p = grad * rs
        g_tr = -0.5 * tl.sum(tl.sum(grad * p_t, axis=1), axis=0) * rs / tr
        g_s = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for j in tl.static_range(T - 1):      # k = T - j .. 2, with P = P_{k-1}
            p = _p_k(s, eye, T - j - 1)
            pp = tl.dot(p, p, input_precision="ieee")
            ppp = tl.dot(pp, p, input_precision="ieee")
            g_s -= 0.5 * tl.dot(tl.trans(ppp), g_p, input_precision="ieee")
            h = -0.5 * tl.dot(g_p, tl.trans(s), input_precision="ieee")
            g_p = 1.5 * g_p + tl.dot(h, tl.trans(pp), input_precision="ieee") \
                + tl.dot(tl.dot(tl.trans(p), h, input_precision="ieee"), tl.trans(p), input_precision="ieee") \
                + tl.dot(tl.trans(pp), h, input_precision="ieee")
        if T >= 1:
            g_s -= 0.5 * g_p
        g_tr -= tl.sum(tl.sum(g_s * cov, axis=1), axis=0) / (tr * tr)
        tl.store(out_ptr + offs, g_s / tr + g_tr * eye, mask=mask)



def _kernels():
    """(forward kernel, backward kernel), or None without Triton."""
    return (forward_kernel, backward_kernel) if triton is not None else None


def available() -> bool:
    """Whether Triton imports here (the kernels compile on their first launch)."""
    return _kernels() is not None


def applies(cov: torch.Tensor) -> bool:
    """Whether the kernels take ``cov``: float32 (..., d, d) with ``d <= MAX_D``."""
    return cov.dtype == torch.float32 and cov.dim() >= 2 and cov.shape[-1] == cov.shape[-2] \
        and 0 < cov.shape[-1] <= MAX_D and cov.numel() > 0


def block_size(d: int) -> int:
    """The padded matrix size a group of ``d`` channels runs at: 16 or 32."""
    return max(16, 1 << (d - 1).bit_length())


def _launch(cov: torch.Tensor, grad: Optional[torch.Tensor], T: int) -> torch.Tensor:
    fwd, bwd = _kernels()
    d = cov.shape[-1]
    cov = cov.contiguous()
    out = torch.empty_like(cov)
    G = cov.numel() // (d * d)
    block = block_size(d)
    if grad is None:
        fwd[(G,)](cov, out, d, T=int(T), BLOCK=block, num_warps=4)
    else:
        bwd[(G,)](cov, grad.to(cov.dtype).contiguous(), out, d, T=int(T), BLOCK=block, num_warps=4)
    return out


def forward(cov: torch.Tensor, T: int) -> torch.Tensor:
    """``P_T / sqrt(tr(Sigma))`` for the float32 covariance matrices ``cov`` (..., d, d)."""
    return _launch(cov, None, T)


def backward(cov: torch.Tensor, grad: torch.Tensor, T: int) -> torch.Tensor:
    """``dL/dSigma`` for ``dL/d(P_T / sqrt(tr(Sigma))) = grad``."""
    return _launch(cov, grad, T)
