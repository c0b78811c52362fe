#!/usr/bin/env python
"""Operations each normalizer runs for one training forward + backward, as GPUs in eager
mode launch them: counted on the meta device (which takes the same code path as CUDA,
not the CPU kernels), views and zero-size allocations left out. On a GPU whose kernel
launches cost more than their work (small layers, or a slow host), a layer's eager time
follows this count.

    python scripts/count_ops.py            # every layer bench_norms.py times, 64 channels
    python scripts/count_ops.py --detail   # which operations
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import normswap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_norms import layers  # noqa: E402  (the layers and native counterparts bench_norms times)

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


def count(module: nn.Module, shape, channels_last: bool = False) -> collections.Counter:
    module = module.to("meta").train()
    x = torch.randn(shape, device="meta")
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

    step()   # the first step (lazy set-up, constants made once)
    with CountOps() as c:
        step()
    return c.ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detail", action="store_true", help="list each layer's operations")
    args = ap.parse_args(argv)
    totals = {}
    print("| layer | operations fwd+bwd | x native |")
    print("|---|---:|---:|")
    for name, make, native, layout in layers(64):   # bench_norms.py's layers and counterparts
        if make is None:
            continue
        ops = count(make(), (8, 64, 16, 16), layout == "nhwc")
        totals[name] = sum(ops.values())
        ratio = f"{totals[name] / totals[native]:.1f}" if native else "-"
        print(f"| {name} | {totals[name]} | {ratio} |")
        if args.detail:
            print("    " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
