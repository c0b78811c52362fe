"""Running statistics: the update every normalizer with batch statistics shares.

``running = lerp(running, batch_value, factor)`` (``factor`` = momentum, or ``1 / t`` for
a cumulative average), except that a batch whose statistics are not all finite leaves
every running buffer untouched (and is not counted). Written as few kernels as possible,
because on a GPU in eager mode each one is a launch and the update runs after every
training forward: the finiteness test is one multiply, one sum and one compare over all
the statistics at once (``0 * x`` is NaN exactly when ``x`` is not finite), and each
buffer is then one ``where`` and one in-place ``lerp_``. On the CPU outside torch.compile
the test is a Python bool instead (:func:`finite_now`: nothing to wait for), and a finite
batch is one ``lerp_`` for all the buffers: the update measured 64 -> 18 us a layer, of a
layer's whole eager forward of about 230 us on a small input.

    >>> import torch
    >>> rm = torch.zeros(3)
    >>> ok = all_finite(torch.tensor([1.0, 2.0, 3.0]))
    >>> guarded_lerp_(rm, torch.tensor([1.0, 2.0, 3.0]), 0.5, ok)
    tensor([0.5000, 1.0000, 1.5000])
    >>> guarded_lerp_(rm, torch.tensor([1.0, float("nan"), 3.0]), 0.5,
    ...               all_finite(torch.tensor([float("nan")])))
    tensor([0.5000, 1.0000, 1.5000])
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch


def all_finite(*stats: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: whether every value of ``stats`` is finite (no host sync)."""
    flat = [t.reshape(-1) for t in stats]
    both = flat[0] if len(flat) == 1 else torch.cat([t.to(flat[0].dtype) for t in flat])
    return both.mul(0).sum() == 0


def finite_now(*stats: torch.Tensor) -> Optional[bool]:
    """Whether every value of ``stats`` is finite, as a Python bool where asking costs no
    wait (CPU tensors, eager mode), else None (use :func:`all_finite`'s tensor). A float32
    or half statistic is summed in float64, which cannot overflow there and is not finite
    exactly when a value is not; a float64 one is tested value by value."""
    if torch.compiler.is_compiling():
        return None
    for t in stats:
        if not t.is_cpu:
            return None
        if t.dtype == torch.float64:
            if not bool(torch.isfinite(t).all()):
                return False
        elif not math.isfinite(t.sum(dtype=torch.float64).item()):
            return False
    return True


def guarded_lerp_(buf: torch.Tensor, new: torch.Tensor, factor: Union[float, torch.Tensor],
                  finite: torch.Tensor) -> torch.Tensor:
    """``buf = lerp(buf, new, factor)`` in place where ``finite``, else ``buf`` unchanged
    (exactly: ``lerp(buf, buf, f) == buf``)."""
    return buf.lerp_(torch.where(finite, new.to(buf.dtype), buf), factor)


def copy_running_(buffers: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                  num_batches_tracked: torch.Tensor) -> None:
    """``buffers[i] = values[i]`` when every value is finite (and the batch counted), else
    every buffer untouched: for statistics a native kernel has already updated in copies
    (BatchNormStar's native path). The two forms of :func:`update_running_`."""
    now = finite_now(*values)
    if now is not None:   # (CPU, eager: a bool)
        if now:
            for buf, new in zip(buffers, values):
                buf.copy_(new)
            num_batches_tracked.add_(1)
        return
    finite = all_finite(*values)
    for buf, new in zip(buffers, values):
        buf.copy_(torch.where(finite, new, buf))
    num_batches_tracked.add_(finite)


def update_running_(buffers: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                    num_batches_tracked: torch.Tensor, momentum: Optional[float]) -> None:
    """The whole update: ``buffers[i] = lerp(buffers[i], values[i], factor)`` when every
    value is finite (and the batch counted), with ``factor = momentum``, or ``1 / t`` (a
    cumulative average over the ``t`` batches counted) when ``momentum`` is None."""
    now = finite_now(*values)
    if now is not None:   # (CPU, eager: a bool, and one lerp_ for every buffer)
        if now:
            num_batches_tracked.add_(1)
            factor = momentum if momentum is not None else 1.0 / max(int(num_batches_tracked), 1)
            torch._foreach_lerp_(list(buffers), [v.to(b.dtype) for b, v in zip(buffers, values)], factor)
        return
    finite = all_finite(*values)
    num_batches_tracked.add_(finite)
    if momentum is None:
        factor = 1.0 / num_batches_tracked.clamp(min=1).to(values[0].dtype)
    else:
        factor = momentum
    for buf, new in zip(buffers, values):
        guarded_lerp_(buf, new, factor, finite)
