#!/usr/bin/env python
"""Benchmark every normswap normalizer against the native PyTorch layer.

Prints, per shape, the forward+backward median time and the bytes saved for
backward, as ratios to the native layer (nn.BatchNorm2d for the batch-statistics
layers and DN, nn.LayerNorm for LN-s) measured in the same run. Absolute numbers are
in the --json output only.

    python scripts/bench_norms.py                 # CPU (and CUDA when present)
    python scripts/bench_norms.py --json out.json --reps 20 --device cpu
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

import normswap.norms as N

SHAPES = [(32, 64, 56, 56), (32, 256, 14, 14)]


def layers(c: int):
    """(name, module factory, native baseline name, input layout)."""
    return [
        ("nn.BatchNorm2d", lambda: nn.BatchNorm2d(c), None, "nchw"),
        ("nn.LayerNorm(C)", lambda: nn.LayerNorm(c), None, "nhwc"),
        ("L1BatchNorm2d", lambda: N.L1BatchNorm2d(c), "nn.BatchNorm2d", "nchw"),
        ("TopKBatchNorm2d(k=10)", lambda: N.TopKBatchNorm2d(c, k=10), "nn.BatchNorm2d", "nchw"),
        ("BatchNormStar2d", lambda: N.BatchNormStar2d(c), "nn.BatchNorm2d", "nchw"),
        ("BatchNormStar2d+L1", lambda: N.BatchNormStar2d(c, l1_alpha=0.005), "nn.BatchNorm2d", "nchw"),
        ("L1BatchNorm2d+L1", lambda: N.L1BatchNorm2d(c, l1_alpha=0.005), "nn.BatchNorm2d", "nchw"),
        ("MeanOnlyBatchNorm2d", lambda: N.MeanOnlyBatchNorm2d(c), "nn.BatchNorm2d", "nchw"),
        ("DivisiveNorm2d(5,5)", lambda: N.DivisiveNorm2d(5, 5), "nn.BatchNorm2d", "nchw"),
        ("LayerNormStar(C)", lambda: N.LayerNormStar(c, elementwise_affine=True), "nn.LayerNorm(C)", "nhwc"),
        ("LayerNormStar2d", lambda: N.LayerNormStar2d(c, affine=True), "nn.BatchNorm2d", "nchw"),
    ]


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd keeps for backward (input counted)."""
    seen = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except Exception:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    del y
    return sum(seen.values())


def time_fwd_bwd(module, x, grad, reps, sync):
    times = []
    for i in range(reps + 2):
        x.grad = None
        sync()
        t0 = time.perf_counter()
        y = module(x)
        if getattr(module, "l1_alpha", 0):
            y = y + 0 * N.penalty(module)
        y.backward(grad)
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(device: str, reps: int):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for shape in SHAPES:
        n, c, h, w = shape
        res = {}
        for name, make, base, layout in layers(c):
            torch.manual_seed(0)
            m = make().to(device).train()
            x = torch.randn(shape, device=device)
            if layout == "nhwc":
                x = x.permute(0, 2, 3, 1).contiguous()
            x.requires_grad_()
            grad = torch.randn_like(x)
            t = time_fwd_bwd(m, x, grad, reps, sync)
            mem = saved_bytes(m, x)
            res[name] = {"time_s": t, "saved_bytes": mem, "baseline": base}
        for name, r in res.items():
            base = res[r["baseline"]] if r["baseline"] else r
            rows.append({"device": device, "shape": list(shape), "layer": name,
                         "baseline": r["baseline"] or name, "time_s": r["time_s"],
                         "saved_bytes": r["saved_bytes"],
                         "time_ratio": r["time_s"] / base["time_s"],
                         "memory_ratio": r["saved_bytes"] / max(base["saved_bytes"], 1)})
    return rows


def print_table(rows):
    print(f"{'device':6} {'shape':18} {'layer':24} {'vs':16} {'time x':>7} {'mem x':>6}")
    for r in rows:
        print(f"{r['device']:6} {str(tuple(r['shape'])):18} {r['layer']:24} {r['baseline']:16} "
              f"{r['time_ratio']:7.2f} {r['memory_ratio']:6.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", metavar="FILE", help="also write the rows (with absolute times) as JSON")
    args = ap.parse_args(argv)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    rows = []
    for d in devices:
        rows += run(d, args.reps)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
