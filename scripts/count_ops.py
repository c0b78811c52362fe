#!/usr/bin/env python
"""Operations each normalizer runs for one training forward + backward, as GPUs in eager
mode launch them: counted on the meta device (which takes the same code path as CUDA,
not the CPU kernels), views and zero-size allocations left out. On a GPU whose kernel
launches cost more than their work (small layers, or a slow host), a layer's eager time
follows this count.

    python scripts/count_ops.py            # every layer bench_norms.py times, 64 channels
    python scripts/count_ops.py --detail   # which operations
    python scripts/count_ops.py --dtype bf16   # half-precision input, float32 parameters
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import normswap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_norms import DTYPES, layers  # noqa: E402  (the layers and native counterparts bench_norms times)

NOT_LAUNCHES = {"view", "_unsafe_view", "reshape", "_reshape_alias", "detach", "alias", "expand", "permute",
                "t", "transpose", "select", "slice", "as_strided", "unsqueeze", "squeeze", "empty",
                "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh"}


class CountOps(TorchDispatchMode):
    """Counts every dispatched ATen operation that would launch work on a device."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[1]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        empty = all(isinstance(o, torch.Tensor) and o.numel() == 0 for o in outs)
        if name not in NOT_LAUNCHES and not empty:
            self.ops[name] += 1
        return out


@contextlib.contextmanager
def triton_kernels_as_launches(counter: collections.Counter):
    """CUDA runs IterNorm's Newton iteration as one Triton kernel each way
    (normswap/kernels/triton_newton.py); the meta device cannot run them: count each call
    as one launch instead (without Triton installed, CUDA runs the PyTorch steps, which
    are what is counted then)."""
    from normswap.kernels import triton_newton
    from normswap.norms import whitening
    if not triton_newton.available():
        yield
        return

    def launch(name):
        def fake(cov, *rest):
            counter[f"triton_newton_{name}"] += 1
            return torch.empty_like(cov)
        return fake
    saved = (whitening._TRITON_DEVICES, triton_newton.forward, triton_newton.backward)
    whitening._TRITON_DEVICES = saved[0] + ("meta",)
    triton_newton.forward, triton_newton.backward = launch("forward"), launch("backward")
    try:
        yield
    finally:
        whitening._TRITON_DEVICES, triton_newton.forward, triton_newton.backward = saved


def count(module: nn.Module, shape, channels_last: bool = False,
          dtype: torch.dtype = torch.float32) -> collections.Counter:
    """Operations of one training forward + backward of ``module`` (its parameters as they
    are) on an input of ``shape`` and ``dtype``."""
    module = module.to("meta").train()
    x = torch.randn(shape, device="meta", dtype=dtype)
    if channels_last:
        x = x.permute(0, 2, 3, 1).contiguous()
    x.requires_grad_()
    grad = torch.randn_like(x)
    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        y = module(x)
        if getattr(module, "l1_alpha", 0):
            y = y + 0 * normswap.penalty(module)   # (adds 2: the penalty's own mul and add)
        y.backward(grad)

    counter = CountOps()
    with triton_kernels_as_launches(counter.ops):
        step()   # the first step (lazy set-up, constants made once)
        counter.ops.clear()
        with counter:
            step()
    return counter.ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detail", action="store_true", help="list each layer's operations")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                    help="the input's dtype (parameters stay float32, as under autocast)")
    args = ap.parse_args(argv)
    totals = {}
    print("| layer | operations fwd+bwd | x native |")
    print("|---|---:|---:|")
    for name, make, native, layout in layers(64):   # bench_norms.py's layers and counterparts
        if make is None:
            continue
        ops = count(make(), (8, 64, 16, 16), layout == "nhwc", DTYPES[args.dtype] or torch.float32)
        totals[name] = sum(ops.values())
        ratio = f"{totals[name] / totals[native]:.1f}" if native else "-"
        print(f"| {name} | {totals[name]} | {ratio} |")
        if args.detail:
            print("    " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
