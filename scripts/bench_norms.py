#!/usr/bin/env python
"""Benchmark every normswap normalizer against the native PyTorch layer.

Prints, per shape, the forward+backward median time (on CPU the processor time of
this process, which other processes on a shared machine do not disturb; use
--threads 1 there) and the bytes saved
for backward, as ratios to the native layer of the same area measured in the same run:
nn.BatchNorm2d for the batch area (and IterNorm, DN), nn.LayerNorm on channels-last
input for the layer area, timm's LayerNorm2d for the channels at each position,
nn.GroupNorm and nn.InstanceNorm2d; the L1 and top-k batch norms also on channels-last
input, against nn.BatchNorm2d on the same. Absolute numbers are in the --json output only.
Layers missing from the installed normswap are skipped (to measure older code).

    python scripts/bench_norms.py                 # CPU (and CUDA when present)
    python scripts/bench_norms.py --json out.json --reps 20 --device cpu --threads 1 --only L1,TopK
    python scripts/bench_norms.py --compile --only L1LayerNorm,L1GroupNorm   # both sides torch.compile'd
    python scripts/bench_norms.py --device cuda --dtype bf16                  # bf16 input under autocast

``--dtype fp16|bf16`` feeds half-precision input to fp32 layers under ``torch.autocast``,
as a mixed-precision network does (fp16 is CUDA only). On CUDA the script also measures
the device's copy bandwidth and, for the batch-statistics layers, prints each one's time
against the memory-bandwidth limit of a training step: a forward and backward of a batch
normalization must at least read x for the statistics, read x and write y, read x and dy
for the reductions of the backward, and read x and dy and write dx again, 8 passes over
the tensor (``BYTES_PASSES``), so the limit is ``8 * numel * element size / bandwidth``.

``--compile`` compiles each layer and its native counterpart (inductor, static shapes,
forward and backward) and times the compiled modules: what a user of ``torch.compile``
pays. Compilation happens in the warm-up steps and is not timed.
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
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
BYTES_PASSES = 8   # tensor-sized reads and writes of a batch norm's forward + backward (see above)


def copy_bandwidth(device: str, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Bytes read plus written per second by a device-to-device copy of ``nbytes``."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * nbytes * reps / (time.perf_counter() - t0)


def _n(name):
    """A normswap class by name, or None when this checkout lacks it (to run old code too)."""
    return getattr(N, name, None)


def layers(c: int):
    """(name, module factory, native baseline name, input layout); None factories are skipped."""
    import timm.layers

    def mk(cls_name, *args, **kw):
        cls = _n(cls_name)
        return (lambda: cls(*args, **kw)) if cls is not None else None

    g = 32 if c % 32 == 0 else 1
    bn, ln, ln2d, gn, inn = "nn.BatchNorm2d", "nn.LayerNorm(C)", "timm LayerNorm2d", "nn.GroupNorm", "nn.InstanceNorm2d"
    bn_cl = "nn.BatchNorm2d channels-last"
    return [
        (bn, lambda: nn.BatchNorm2d(c), None, "nchw"),
        (bn_cl, lambda: nn.BatchNorm2d(c), None, "channels_last"),
        (ln, lambda: nn.LayerNorm(c), None, "nhwc"),
        (ln2d, lambda: timm.layers.LayerNorm2d(c), None, "nchw"),
        (gn, lambda: nn.GroupNorm(g, c), None, "nchw"),
        (inn, lambda: nn.InstanceNorm2d(c, affine=True), None, "nchw"),
        ("L1BatchNorm2d", mk("L1BatchNorm2d", c), bn, "nchw"),
        ("TopKBatchNorm2d(k=10)", mk("TopKBatchNorm2d", c, k=10), bn, "nchw"),
        ("L1BatchNorm2d channels-last", mk("L1BatchNorm2d", c), bn_cl, "channels_last"),
        ("TopKBatchNorm2d(k=10) channels-last", mk("TopKBatchNorm2d", c, k=10), bn_cl, "channels_last"),
        ("BatchNormStar2d", mk("BatchNormStar2d", c), bn, "nchw"),
        ("BatchNormStar2d+L1", mk("BatchNormStar2d", c, l1_alpha=0.005), bn, "nchw"),
        ("L1BatchNorm2d+L1", mk("L1BatchNorm2d", c, l1_alpha=0.005), bn, "nchw"),
        ("MeanOnlyBatchNorm2d", mk("MeanOnlyBatchNorm2d", c), bn, "nchw"),
        ("IterNorm2d(16, T=5)", mk("IterNorm2d", c), bn, "nchw"),
        ("DivisiveNorm2d(5,5)", mk("DivisiveNorm2d", 5, 5), bn, "nchw"),
        ("LayerNormStar(C)", mk("LayerNormStar", c, elementwise_affine=True), ln, "nhwc"),
        ("L1LayerNorm(C)", mk("L1LayerNorm", c), ln, "nhwc"),
        ("TopKLayerNorm(C)", mk("TopKLayerNorm", c), ln, "nhwc"),
        ("DivisiveNorm1d(30)", mk("DivisiveNorm1d", 30), ln, "nhwc"),
        ("LayerNormStar2d", mk("LayerNormStar2d", c, affine=True), ln2d, "nchw"),
        ("L1LayerNorm2d", mk("L1LayerNorm2d", c), ln2d, "nchw"),
        ("TopKLayerNorm2d", mk("TopKLayerNorm2d", c), ln2d, "nchw"),
        (f"GroupNormStar({g})", mk("GroupNormStar", g, c), gn, "nchw"),
        (f"L1GroupNorm({g})", mk("L1GroupNorm", g, c), gn, "nchw"),
        (f"TopKGroupNorm({g})", mk("TopKGroupNorm", g, c), gn, "nchw"),
        ("InstanceNormStar2d", mk("InstanceNormStar2d", c, affine=True), inn, "nchw"),
        ("L1InstanceNorm2d", mk("L1InstanceNorm2d", c, affine=True), inn, "nchw"),
        ("TopKInstanceNorm2d", mk("TopKInstanceNorm2d", c, affine=True), inn, "nchw"),
    ]


def saved_bytes(module: nn.Module, x: torch.Tensor, dtype=None) -> int:
    """Bytes of distinct storages autograd keeps for backward (input counted)."""
    seen = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except Exception:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        y = module(x)
    del y
    return sum(seen.values())


def time_fwd_bwd(module, x, grad, sync, clock=time.perf_counter, dtype=None, inner: int = 1):
    """The time of one forward + backward step (forward under autocast to ``dtype`` if
    given), averaged over ``inner`` steps queued between two synchronizations (on CUDA,
    so that the synchronization's own latency does not enter a microsecond figure)."""
    x.grad = None
    sync()
    t0 = clock()
    for _ in range(inner):
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            y = module(x)
        if getattr(module, "l1_alpha", 0):
            y = y + 0 * N.penalty(module)
        y.backward(grad)
    sync()
    return (clock() - t0) / inner


def run(device: str, reps: int, only=None, compile_layers: bool = False, dtype_name: str = "fp32"):
    """Every layer of each shape, round-robin: repetition i times each layer once, so that a
    change of load hits a layer and its native counterpart alike; a layer's ratio is the
    median over repetitions of t(layer, i) / t(native, i)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # CPU: processor time of this process, not wall time, so that other processes on a
    # shared machine do not enter the figures (with --threads 1 it is the work done)
    clock = time.perf_counter if device == "cuda" else time.process_time
    inner = 10 if device == "cuda" else 1
    if compile_layers:   # every layer stays compiled at once: one graph per module
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
    dtype = DTYPES[dtype_name]
    bandwidth = copy_bandwidth(device) if device == "cuda" else None
    rows = []
    for shape in SHAPES:
        n, c, h, w = shape
        cases = {}
        chosen = [(name, make, base, layout) for name, make, base, layout in layers(c)
                  if make is not None and not (only and base and not any(o in name for o in only))]
        needed = {base for _, _, base, _ in chosen if base}
        for name, make, base, layout in chosen:
            if only and base is None and name not in needed:   # a native layer nothing is measured against
                continue
            torch.manual_seed(0)
            m = make().to(device).train()
            if compile_layers:
                m = torch.compile(m, dynamic=False)
            x = torch.randn(shape, device=device, dtype=dtype or torch.float32)
            if layout == "nhwc":
                x = x.permute(0, 2, 3, 1).contiguous()
            elif layout == "channels_last":   # (N, C, H, W) shape, (N, H, W, C) memory
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                out_dtype = m(x).dtype   # autocast may return fp32 (layer norm does)
            grad = torch.randn_like(x, dtype=out_dtype)
            t_warm = time.perf_counter()
            for _ in range(2):   # warm-up (and compilation)
                time_fwd_bwd(m, x, grad, sync, clock, dtype)
            print(f"  {tuple(shape)} {name}: warm-up {time.perf_counter() - t_warm:.1f} s", file=sys.stderr, flush=True)
            mem = saved_bytes(m, x, dtype) if not compile_layers else 0
            cases[name] = {"module": m, "x": x, "grad": grad, "times": [], "saved_bytes": mem, "baseline": base}
        for _ in range(reps):
            for case in cases.values():
                case["times"].append(time_fwd_bwd(case["module"], case["x"], case["grad"], sync, clock, dtype,
                                                  inner))
        for name, r in cases.items():
            if r["baseline"] is None and only:
                continue
            base = cases[r["baseline"]] if r["baseline"] else r
            ratio = statistics.median(a / b for a, b in zip(r["times"], base["times"]))
            t = statistics.median(r["times"])
            bound = (BYTES_PASSES * r["x"].numel() * r["x"].element_size() / bandwidth
                     if bandwidth and (r["baseline"] or name) == "nn.BatchNorm2d" else None)
            rows.append({"device": device, "shape": list(shape), "layer": name, "dtype": dtype_name,
                         "baseline": r["baseline"] or name, "time_s": t,
                         "bandwidth_Bps": bandwidth, "bound_ratio": t / bound if bound else None,
                         "saved_bytes": r["saved_bytes"],
                         "time_ratio": ratio, "compiled": compile_layers,
                         "memory_ratio": r["saved_bytes"] / max(base["saved_bytes"], 1)})
        del cases
        print_table([r for r in rows if tuple(r["shape"]) == tuple(shape)], file=sys.stderr)  # progress
    return rows


def print_table(rows, file=None):
    print(f"{'device':6} {'shape':18} {'layer':24} {'vs':18} {'time x':>7} {'mem x':>6}", file=file)
    for r in rows:
        print(f"{r['device']:6} {str(tuple(r['shape'])):18} {r['layer']:24} {r['baseline']:18} "
              f"{r['time_ratio']:7.2f} {'-' if r.get('compiled') else format(r['memory_ratio'], '6.2f'):>6}",
              file=file, flush=True)


def print_markdown(rows):
    if any(r.get("compiled") for r in rows) and not all(r.get("compiled") for r in rows):
        return print_merged_markdown(rows)
    print("| device | shape | layer | vs | time x | memory x |")
    print("|---|---|---|---|---:|---:|")
    for r in rows:
        if r["baseline"] != r["layer"]:
            print(f"| {r['device']} | {tuple(r['shape'])} | {r['layer']} | {r['baseline']} | "
                  f"{r['time_ratio']:.2f} | {'-' if r.get('compiled') else format(r['memory_ratio'], '.2f')} |")


def print_bandwidth(rows):
    """Batch-statistics layers against the memory-bandwidth limit (CUDA rows only)."""
    rows = [r for r in rows if r.get("bound_ratio")]
    if not rows:
        return
    bw = rows[0]["bandwidth_Bps"]
    print(f"\nagainst the memory-bandwidth limit ({BYTES_PASSES} tensor passes at the measured copy "
          f"bandwidth {bw / 1e12:.2f} TB/s):")
    print("| input (N, C, H, W) | dtype | layer | compiled | time (us) | time / limit |")
    print("|---|---|---|---|---:|---:|")
    for r in rows:
        print(f"| {tuple(r['shape'])} | {r.get('dtype', 'fp32')} | {r['layer']} | "
              f"{'yes' if r.get('compiled') else 'no'} | {r['time_s'] * 1e6:.0f} | {r['bound_ratio']:.2f} |")


def print_merged_markdown(rows):
    """Eager and compiled rows of the same layers as one table (docs/performance.md's)."""
    compiled = {(r["device"], tuple(r["shape"]), r["layer"]): r["time_ratio"] for r in rows if r.get("compiled")}
    print("| input (N, C, H, W) | layer | against | eager time x | compiled time x | saved memory x |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        if r.get("compiled") or r["baseline"] == r["layer"]:
            continue
        c = compiled.get((r["device"], tuple(r["shape"]), r["layer"]))
        print(f"| {tuple(r['shape'])} | {r['layer']} | {r['baseline']} | {r['time_ratio']:.2f} | "
              f"{'-' if c is None else format(c, '.2f')} | {r['memory_ratio']:.2f} |")


def plot(rows, path: str) -> None:
    """Horizontal bars: time ratio to the native layer, one panel per (device, compiled),
    one bar per layer and input shape; dashed line at the 1.5x target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in rows if r["baseline"] != r["layer"]]
    panels = list(dict.fromkeys((r["device"], bool(r.get("compiled"))) for r in rows))
    layers_ = list(dict.fromkeys(r["layer"] for r in rows))
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.32 * len(layers_) + 1.2),
                             squeeze=False, sharey=True)
    h = 0.8 / max(1, len(shapes))
    for ax, (dev, comp) in zip(axes[0], panels):
        for j, shape in enumerate(shapes):
            vals = {r["layer"]: r["time_ratio"] for r in rows
                    if r["device"] == dev and bool(r.get("compiled")) == comp and tuple(r["shape"]) == shape}
            ys = [i + (j - (len(shapes) - 1) / 2) * h for i, n in enumerate(layers_) if n in vals]
            xs = [vals[n] for n in layers_ if n in vals]
            ax.barh(ys, xs, h, label=str(shape))
            for xx, yy in zip(xs, ys):
                ax.text(xx, yy, f" {xx:.2f}", va="center", fontsize=6)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.axvline(1.5, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        # plain numbers on the log axis (a narrow range gets minor ticks only, as 1.1 x 10^0)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="x", which="both", labelsize=6)
        ax.set_title(f"{dev}, {'compiled' if comp else 'eager'}: fwd+bwd time / native", fontsize=9)
        ax.legend(fontsize=7)
    axes[0][0].set_yticks(range(len(layers_)))
    axes[0][0].set_yticklabels(layers_, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                    help="fp16 / bf16: half-precision input, forward under torch.autocast (fp16: CUDA only)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows (with absolute times) as JSON")
    ap.add_argument("--only", help="comma-separated substrings of the layer names to measure")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--plot", metavar="PNG", help="bar chart of the time ratios (needs matplotlib)")
    ap.add_argument("--from-json", nargs="+", metavar="FILE",
                    help="measure nothing: print and plot the rows of earlier --json files")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile every layer and its native counterpart (memory not measured)")
    args = ap.parse_args(argv)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if args.threads:
        torch.set_num_threads(args.threads)
    only = args.only.split(",") if args.only else None
    rows = []
    if args.from_json:
        for f in args.from_json:
            with open(f) as fh:
                rows += json.load(fh)
        devices = []
    if args.dtype == "fp16" and "cpu" in devices:
        ap.error("--dtype fp16: autocast to fp16 is for CUDA; use --device cuda, or bf16 on CPU")
    for d in devices:
        rows += run(d, args.reps, only, args.compile, args.dtype)
    gpu = f", {torch.cuda.get_device_name()}" if "cuda" in devices else ""
    print(f"torch {torch.__version__}{gpu}, threads {torch.get_num_threads()}, {args.dtype}"
          + (", compiled" if args.compile else ""))
    (print_markdown if args.markdown else print_table)(rows)
    print_bandwidth(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
