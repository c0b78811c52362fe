"""First derivatives only: a guard for the hand-written backwards of normswap's Functions.

Their backwards (compiled kernels called through ctypes, in-place steps, products into
buffers) give exact first derivatives but no graph of their own, so a second derivative
through them (``create_graph=True``: a gradient penalty, a Hessian-vector product) would
miss every term that comes through the layer's input and parameters: autograd would return
a gradient that silently does not depend on them. :func:`first_order_only` raises instead.
(``torch.autograd.function.once_differentiable`` defers an error only when an incoming
gradient requires grad, which a gradient penalty's usually does not, and its deferred error
node is not on the paths back to the input, so it would not fire either.)

    >>> import torch, normswap.norms as N
    >>> m = N.L1LayerNorm(8)
    >>> x = torch.randn(4, 8, requires_grad=True)
    >>> try:
    ...     torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
    ... except RuntimeError as err:
    ...     print("second derivative refused")
    second derivative refused
"""
from __future__ import annotations

import functools

import torch


def first_order_only(backward):
    """Decorator for an autograd Function's ``backward``: under ``create_graph=True``, when
    an input of the call needs a gradient, it raises a RuntimeError that names the Function.
    A Function whose backward for one call uses nothing it saved (linear in the incoming
    gradients, written in differentiable operations) sets ``ctx.linear_backward = True`` in
    its forward and stays twice differentiable."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled() and not getattr(ctx, "linear_backward", False) \
                and any(ctx.needs_input_grad):
            name = type(ctx).__name__.replace("Backward", "")
            raise RuntimeError(
                f"normswap: {name}'s backward gives first derivatives only; a second derivative "
                f"through it (create_graph=True, e.g. a gradient penalty or a Hessian-vector "
                f"product) is not supported. Differentiate a model without normswap layers, or "
                f"compute the gradient without create_graph=True")
        return backward(ctx, *grads)

    return wrapper
