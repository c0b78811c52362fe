#!/usr/bin/env python
"""Operations each normalizer runs for one training forward + backward, as GPUs in eager
mode launch them: counted on the meta device (which takes the same code path as CUDA,
not the CPU kernels), views and zero-size allocations left out. On a GPU whose kernel
launches cost more than their work (small layers, or a slow host), a layer's eager time
follows this count.

    python scripts/count_ops.py            # every batch-area layer and the layer norms
    python scripts/count_ops.py --detail   # which operations
"""
from __future__ import annotations

import argparse
import collections
import sys

import timm.layers
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import normswap
import normswap.norms as N

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


LAYERS = [  # name, module factory, input layout, native counterpart's name
    ("nn.BatchNorm2d", lambda c: nn.BatchNorm2d(c), False, None),
    ("L1BatchNorm2d", lambda c: N.L1BatchNorm2d(c), False, "nn.BatchNorm2d"),
    ("TopKBatchNorm2d(k=10)", lambda c: N.TopKBatchNorm2d(c), False, "nn.BatchNorm2d"),
    ("BatchNormStar2d (BN-s)", lambda c: N.BatchNormStar2d(c), False, "nn.BatchNorm2d"),
    ("BatchNormStar2d+L1 (BN*)", lambda c: N.BatchNormStar2d(c, l1_alpha=0.005), False, "nn.BatchNorm2d"),
    ("MeanOnlyBatchNorm2d", lambda c: N.MeanOnlyBatchNorm2d(c), False, "nn.BatchNorm2d"),
    ("IterNorm2d(16, T=5)", lambda c: N.IterNorm2d(c), False, "nn.BatchNorm2d"),
    ("DivisiveNorm2d(5,5)", lambda c: N.DivisiveNorm2d(5, 5), False, "nn.BatchNorm2d"),
    ("nn.LayerNorm(C)", lambda c: nn.LayerNorm(c), True, None),
    ("L1LayerNorm(C)", lambda c: N.L1LayerNorm(c), True, "nn.LayerNorm(C)"),
    ("LayerNormStar(C)", lambda c: N.LayerNormStar(c, elementwise_affine=True), True, "nn.LayerNorm(C)"),
    ("timm LayerNorm2d", lambda c: timm.layers.LayerNorm2d(c), False, None),
    ("L1LayerNorm2d", lambda c: N.L1LayerNorm2d(c), False, "timm LayerNorm2d"),
    ("nn.GroupNorm", lambda c: nn.GroupNorm(8, c), False, None),
    ("L1GroupNorm(8)", lambda c: N.L1GroupNorm(8, c), False, "nn.GroupNorm"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detail", action="store_true", help="list each layer's operations")
    args = ap.parse_args(argv)
    totals = {}
    print("| layer | operations fwd+bwd | x native |")
    print("|---|---:|---:|")
    for name, make, channels_last, native in LAYERS:
        ops = count(make(64), (8, 64, 16, 16), channels_last)
        totals[name] = sum(ops.values())
        ratio = f"{totals[name] / totals[native]:.1f}" if native else "-"
        print(f"| {name} | {totals[name]} | {ratio} |")
        if args.detail:
            print("    " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
