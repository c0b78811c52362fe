#!/usr/bin/env python
"""Training-step time of normswap-converted timm models, as ratios to the original.

For every model and every preset that applies to it, the script times one full
training step (forward, cross-entropy loss [+ the L1 penalty for the ``*`` presets],
backward, SGD step) of the converted model and of the unconverted original, in the
same run, **alternating** the two (A B B A ...) so that a change of load on a shared
machine hits both alike. The figure reported is the median over the repetitions of
the per-pair ratio ``t(converted) / t(original)``; absolute medians are in ``--json``.

Eager and compiled (``torch.compile``, inductor) are both measured unless
``--no-compile``; compile time (first step) is recorded too. ``--dtype fp16|bf16``
runs the forward under ``torch.autocast`` (on CUDA, or bf16 on CPU).

    python scripts/bench_train_step.py --models resnet18 --no-compile
    python scripts/bench_train_step.py --device cuda --dtype bf16 --json cuda_bf16.json \
        --plot docs/train_step_cuda_bf16.png

On a shared CPU machine, ``--threads 1 --clock cpu`` (CPU time of this process)
is far less disturbed by other processes than elapsed time. ``--plot`` needs matplotlib (``pip install normswap[bench]``).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

import normswap
from normswap.norms.base import NormalizerBase

MODELS = {  # name -> timm kwargs beyond pretrained=False (vit needs its image size)
    "resnet18": {},
    "resnet50": {},
    "efficientnet_b0": {},
    "vit_tiny_patch16_224": {"img_size": None},
    "convnext_atto": {},
}
SPECIAL_SPECS = {  # presets that need arguments to apply everywhere
    "bwn": {"preset": "bwn", "kwargs": {"fallback": "l1bn"}},
    "bwn-g": {"preset": "bwn-g", "kwargs": {"fallback": "l1bn"}},
}
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Row:
    device: str
    dtype: str
    model: str
    preset: str
    mode: str                      # eager | compiled
    ratio: float                   # median of per-pair t(converted) / t(original)
    ratio_of_medians: float
    time_s: float                  # median step time of the converted model
    base_time_s: float             # median step time of the original, same run
    reps: int
    converted_sites: int
    compile_s: Optional[float] = None
    base_compile_s: Optional[float] = None
    peak_mem_ratio: Optional[float] = None   # CUDA only: peak allocated memory of a step
    note: str = ""


@dataclass
class Setup:
    device: str
    dtype: str
    batch: int
    size: int
    reps: int
    compile: bool
    clock: str = "wall"
    threads: int = field(default_factory=torch.get_num_threads)
    torch_version: str = torch.__version__
    gpu: Optional[str] = None


def spec_for(preset: str):
    return SPECIAL_SPECS.get(preset, preset)


def make_model(name: str, size: int) -> nn.Module:
    kw = dict(MODELS.get(name, {}))
    if "img_size" in kw:
        kw["img_size"] = size
    return timm.create_model(name, pretrained=False, num_classes=100, **kw)


def sync_fn(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


class Stepper:
    """One model, its optimizer and a timed training step on a fixed batch."""

    def __init__(self, model: nn.Module, x, target, dtype, compile_: bool, device: str,
                 clock: Callable[[], float] = time.perf_counter):
        self.model = model.to(device).train()
        self.uses_penalty = any(isinstance(m, NormalizerBase) and m.l1_alpha > 0 for m in model.modules())
        self.run = torch.compile(self.model) if compile_ else self.model
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.x, self.target, self.dtype, self.device = x, target, dtype, device
        self.sync = sync_fn(device)
        self.clock = clock

    def step(self) -> float:
        self.sync()
        t0 = self.clock()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.split(":")[0], dtype=self.dtype, enabled=self.dtype is not None):
            out = self.run(self.x)
            loss = F.cross_entropy(out.float(), self.target)
            if self.uses_penalty:
                loss = loss + normswap.penalty(self.model)
        loss.backward()
        self.opt.step()
        self.sync()
        return self.clock() - t0

    def peak_memory(self) -> Optional[int]:
        if not self.device.startswith("cuda"):
            return None
        torch.cuda.reset_peak_memory_stats()
        self.step()
        return torch.cuda.max_memory_allocated()


def alternate(base: Stepper, conv: Stepper, reps: int):
    """A B B A A B ...: returns (base times, converted times), paired by index."""
    tb, tc = [], []
    for i in range(reps):
        if i % 2 == 0:
            tb.append(base.step())
            tc.append(conv.step())
        else:
            tc.append(conv.step())
            tb.append(base.step())
    return tb, tc


def applicable_presets(model: nn.Module, wanted: List[str]) -> Dict[str, nn.Module]:
    """Preset -> converted copy, for the presets that convert at least one site."""
    out = {}
    for p in wanted:
        try:
            conv = normswap.transform(model, spec_for(p))
        except (normswap.TransformError, normswap.SpecError) as e:
            print(f"  skip {p}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
            continue
        if not normswap.report(conv).converted:
            print(f"  skip {p}: no site converted", file=sys.stderr)
            continue
        out[p] = conv
    return out


def bench_model(name: str, presets: List[str], args, modes: List[str],
                on_row: Callable[[Row], None] = lambda row: None) -> List[Row]:
    """Every (mode, preset) row of one model; ``on_row`` is called with each as it is measured."""
    torch.manual_seed(0)
    device, dtype = args.device, DTYPES[args.dtype]
    original = make_model(name, args.size)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    target = torch.randint(0, 100, (args.batch,), device=device)
    converted = applicable_presets(original, presets)
    rows = []
    for mode in modes:
        compiled = mode == "compiled"
        if compiled:
            torch._dynamo.reset()
            # every converted copy recompiles the same forward code: keep them all compiled
            for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
                if hasattr(torch._dynamo.config, limit):
                    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 256))
        base = Stepper(copy.deepcopy(original), x, target, dtype, compiled, device, CLOCKS[args.clock])
        t0 = time.perf_counter()
        base.step()                                 # compiles when compiled
        base_compile = time.perf_counter() - t0 if compiled else None
        base.step()
        base_mem = base.peak_memory()
        for preset, model in converted.items():
            conv = Stepper(copy.deepcopy(model), x, target, dtype, compiled, device, CLOCKS[args.clock])
            t0 = time.perf_counter()
            try:
                conv.step()
            except Exception as e:  # one preset that cannot run here must not end the run
                print(f"{name:22} {preset:9} {mode:8} FAILED: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:160]}", flush=True)
                continue
            conv_compile = time.perf_counter() - t0 if compiled else None
            conv.step()
            mem = conv.peak_memory()
            tb, tc = alternate(base, conv, args.reps)
            row = Row(device=device, dtype=args.dtype, model=name, preset=preset, mode=mode,
                      ratio=statistics.median(c / b for b, c in zip(tb, tc)),
                      ratio_of_medians=statistics.median(tc) / statistics.median(tb),
                      time_s=statistics.median(tc), base_time_s=statistics.median(tb), reps=args.reps,
                      converted_sites=len(normswap.report(model).converted),
                      compile_s=conv_compile, base_compile_s=base_compile,
                      peak_mem_ratio=mem / base_mem if mem and base_mem else None)
            rows.append(row)
            on_row(row)
            print(f"{name:22} {preset:9} {mode:8} {row.ratio:6.3f}x  (medians {row.time_s * 1e3:8.1f} ms"
                  f" / {row.base_time_s * 1e3:8.1f} ms" +
                  (f", compile {conv_compile:.0f}s / {base_compile:.0f}s" if compiled else "") + ")",
                  flush=True)
            del conv
    return rows


def plot(rows: List[Row], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("eager", "compiled") if any(r.mode == m for r in rows)]
    models = list(dict.fromkeys(r.model for r in rows))
    presets = list(dict.fromkeys(r.preset for r in rows))
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(6, 1.1 * len(presets) * max(1, len(models)) / 2), 3.2 * len(modes)),
                             squeeze=False)
    width = 0.8 / max(1, len(models))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    for ax, mode in zip(axes[:, 0], modes):
        for j, model in enumerate(models):
            vals = {r.preset: r.ratio for r in rows if r.mode == mode and r.model == model}
            if not vals:
                continue
            xs = [i + (j - (len(models) - 1) / 2) * width for i, p in enumerate(presets) if p in vals]
            ys = [vals[p] for p in presets if p in vals]
            ax.bar(xs, ys, width, label=model, color=colors[model])
            for xx, yy in zip(xs, ys):
                ax.text(xx, yy, f"{yy:.2f}", ha="center", va="bottom", fontsize=6, rotation=90)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.05, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(presets)))
        ax.set_xticklabels(presets, rotation=30, ha="right")
        ax.set_ylabel(f"step time / original ({mode})")
        ax.legend(fontsize=7, ncol=min(5, len(models)))
    axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def replot(args) -> int:
    rows, setups = [], []
    for path in args.from_json:
        with open(path) as f:
            d = json.load(f)
        setups.append(d["setup"])
        rows += [Row(**r) for r in d["rows"]]
    for r in rows:
        print(f"{r.device:5} {r.dtype:5} {r.model:22} {r.preset:9} {r.mode:8} {r.ratio:6.3f}x  "
              f"(ratio of medians {r.ratio_of_medians:.3f}, reps {r.reps})")
    if args.plot and rows:
        s = setups[0]
        plot(rows, args.plot, f"training step, {s['device']}{' ' + s['gpu'] if s.get('gpu') else ''}, "
                              f"{s['dtype']}, batch {s['batch']}, {s['size']}x{s['size']}, "
                              f"threads={s['threads']}, {s.get('clock', 'wall')} clock")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), metavar="NAME",
                    help=f"timm model names (default: {' '.join(MODELS)})")
    ap.add_argument("--presets", nargs="+", default=None, metavar="PRESET",
                    help="normswap presets (default: every preset but 'keep')")
    ap.add_argument("--reps", type=int, default=10, help="timed steps per model, each side (default 10)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64, help="input height = width (default 64)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                    help="fp16 / bf16: forward under torch.autocast")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--compiled-only", action="store_true", help="torch.compile only")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall: elapsed time (default); cpu: CPU time of this process, which other "
                         "processes on a shared machine disturb far less (CPU device; use with --threads 1)")
    ap.add_argument("--json", metavar="FILE", help="write setup and rows (absolute times too)")
    ap.add_argument("--plot", metavar="PNG", help="bar chart of the ratios (needs matplotlib)")
    ap.add_argument("--from-json", nargs="+", metavar="FILE",
                    help="measure nothing: plot (--plot) and print the rows of earlier --json files")
    args = ap.parse_args(argv)
    if args.from_json:
        return replot(args)

    all_presets = [p for p in normswap.presets() if p != "keep"]
    presets = args.presets or all_presets
    bad = [p for p in presets if p not in normswap.presets()]
    if bad:
        ap.error(f"--presets: unknown preset(s) {bad}; choose from {all_presets}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available")
    if args.dtype == "fp16" and not args.device.startswith("cuda"):
        ap.error("--dtype fp16: autocast to fp16 is for CUDA; use bf16 on CPU")
    if args.no_compile and args.compiled_only:
        ap.error("--no-compile and --compiled-only exclude each other")
    if args.clock == "cpu" and not args.device.startswith("cpu"):
        ap.error("--clock cpu measures CPU time: it is for --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = ["compiled"] if args.compiled_only else ["eager"] if args.no_compile else ["eager", "compiled"]
    setup = Setup(device=args.device, dtype=args.dtype, batch=args.batch, size=args.size, reps=args.reps,
                  compile=not args.no_compile, clock=args.clock,
                  gpu=torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None)
    print(f"torch {setup.torch_version}, {setup.device}{' ' + setup.gpu if setup.gpu else ''}, "
          f"threads {setup.threads}, {args.clock} clock, {args.dtype}, batch {args.batch}, {args.size}x{args.size}, "
          f"reps {args.reps}", flush=True)
    rows: List[Row] = []

    def keep(row: Row) -> None:  # written after every row: a run cut short keeps what it measured
        rows.append(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"setup": asdict(setup), "rows": [asdict(r) for r in rows]}, f, indent=1)

    for name in args.models:
        bench_model(name, presets, args, modes, on_row=keep)
    if args.plot and rows:
        plot(rows, args.plot, f"training step, {setup.device}{' ' + setup.gpu if setup.gpu else ''}, "
                              f"{args.dtype}, batch {args.batch}, {args.size}x{args.size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
