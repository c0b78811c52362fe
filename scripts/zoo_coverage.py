#!/usr/bin/env python
"""Run normswap over the timm model zoo and report coverage.

For every timm model (pretrained=False, built on the meta device where it builds):
normalization sites found, converted, skipped by reason; whether the model traces
whole with plain ``torch.fx.symbolic_trace`` and with normswap's timm-aware tracer;
with ``--forward`` a forward/backward check on a small input for small models. Writes
JSON and a markdown summary. Also times ``transform(resnet50)`` against one trace.

    python scripts/zoo_coverage.py --filter 'resnet*' --out zoo
    python scripts/zoo_coverage.py --spec l1bn --forward --max-params 5e6
"""
from __future__ import annotations

import argparse
import collections
import fnmatch
import functools
import json
import sys
import time
import traceback
import warnings

import timm
import torch

import normswap
from normswap.graph.functional import candidate_owners
from normswap.graph.sites import find_module_sites
from normswap.graph.tracer import trace

DEFAULT_SPEC = {"types": {"batchnorm": "l1bn", "layernorm": "ln-s", "groupnorm": "dn"}}


def build(name, device):
    with torch.device(device):
        return timm.create_model(name, pretrained=False)


def check_model(name, spec, forward, max_params, skip_trace=False):
    row = {"model": name}
    try:
        try:
            model, row["device"] = build(name, "meta"), "meta"
        except Exception:
            model, row["device"] = build(name, "cpu"), "cpu"
    except Exception as e:
        row["error"] = f"build: {type(e).__name__}: {e}"[:300]
        return row
    sites = find_module_sites(model)
    row["module_sites"] = len(sites)
    if not sites and not candidate_owners(model):
        row["no_norm"] = True
        return row
    for label, fn in (("plain_fx", lambda: torch.fx.symbolic_trace(model)), ("normswap_fx", lambda: trace(model))):
        if skip_trace:
            break
        try:
            fn()
            row[label] = True
        except Exception as e:
            row[label] = False
            row[label + "_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = normswap.plan(model, spec)
    except Exception as e:
        row["error"] = f"plan: {type(e).__name__}: {e}"[:300]
        return row
    counts = rep.counts()
    row.update(counts)
    mod = [s for s in rep.sites if s.kind == "module"]
    fun = [s for s in rep.sites if s.kind == "functional"]
    row["module_converted"] = sum(s.status == "converted" for s in mod)
    row["functional_sites"] = len(fun)
    row["functional_converted"] = sum(s.status == "converted" for s in fun)
    row["skip_reasons"] = [f"{s.kind}: {s.reason.split(':')[0] if s.reason else ''}" for s in rep.sites
                           if s.status == "skipped"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            normswap.transform(model, spec, inplace=True)
        row["transformed"] = True
    except Exception as e:
        row["transformed"] = False
        row["error"] = f"transform: {type(e).__name__}: {e}"[:300]
    if forward and row.get("transformed"):
        n_params = sum(p.numel() for p in model.parameters())
        row["params"] = n_params
        if n_params <= max_params:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    real = normswap.transform(build(name, "cpu"), spec)
                cfg = real.pretrained_cfg.get("input_size", (3, 224, 224))
                fixed = real.pretrained_cfg.get("fixed_input_size", False)
                size = cfg[1:] if fixed else (min(cfg[1], 96), min(cfg[2], 96))
                x = torch.randn(2, cfg[0], *size)
                y = real.train()(x)
                y = y if torch.is_tensor(y) else y[0]
                (y.float().mean() + normswap.penalty(real)).backward()
                ok = bool(torch.isfinite(y).all())
                real.eval()
                with torch.no_grad():
                    ye = real(x)
                    ye = ye if torch.is_tensor(ye) else ye[0]
                row["forward_ok"] = ok and bool(torch.isfinite(ye).all())
            except Exception as e:
                row["forward_ok"] = False
                row["forward_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    return row


def _checked(name, spec, forward, max_params, skip_trace):
    """check_model that never raises (the script keeps going whatever one model does)."""
    try:
        return check_model(name, spec, forward, max_params, skip_trace)
    except Exception as e:  # noqa: BLE001
        return {"model": name, "error": f"crash: {type(e).__name__}: {e}"[:300],
                "trace": traceback.format_exc()[-500:]}


def time_resnet50(spec, reps=5):
    model = timm.create_model("resnet50", pretrained=False)
    t_trace, t_tf, t_inplace = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter(); trace(model); t_trace.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); normswap.transform(model, spec); t_tf.append(time.perf_counter() - t0)
        fresh = timm.create_model("resnet50", pretrained=False)
        t0 = time.perf_counter(); normswap.transform(fresh, spec, inplace=True)
        t_inplace.append(time.perf_counter() - t0)
    med = lambda v: sorted(v)[len(v) // 2]
    return {"trace_s": med(t_trace), "transform_s": med(t_tf), "ratio": med(t_tf) / med(t_trace),
            "transform_inplace_s": med(t_inplace), "ratio_inplace": med(t_inplace) / med(t_trace)}


def summarize(rows, timing, spec):
    with_norm = [r for r in rows if not r.get("no_norm") and "module_sites" in r]
    full = [r for r in with_norm if r.get("transformed") and r.get("module_converted") == r.get("module_sites")]
    reasons = collections.Counter(x for r in with_norm for x in r.get("skip_reasons", []))
    fsites = sum(r.get("functional_sites", 0) for r in with_norm)
    fconv = sum(r.get("functional_converted", 0) for r in with_norm)
    lines = [f"# normswap zoo coverage (timm {timm.__version__}, torch {torch.__version__})", "",
             f"spec: `{json.dumps(spec)}`", "",
             f"- models: {len(rows)}; with norm layers: {len(with_norm)}; build errors: "
             f"{sum('build' in r.get('error', '') for r in rows)}",
             f"- every module site converted: {len(full)} / {len(with_norm)} "
             f"({100.0 * len(full) / max(len(with_norm), 1):.1f}%)",
             f"- module sites: {sum(r.get('module_sites', 0) for r in with_norm)}, converted "
             f"{sum(r.get('module_converted', 0) for r in with_norm)}",
             f"- functional sites: {fsites}, converted {fconv}",
             ]
    if any("plain_fx" in r for r in with_norm):
        lines.append(f"- trace whole: plain fx {sum(bool(r.get('plain_fx')) for r in with_norm)}, "
                     f"normswap tracer {sum(bool(r.get('normswap_fx')) for r in with_norm)} of {len(with_norm)}")
    fw = [r for r in with_norm if "forward_ok" in r]
    if fw:
        lines.append(f"- forward/backward ok: {sum(r['forward_ok'] for r in fw)} / {len(fw)}")
    if timing:
        lines.append(f"- transform(resnet50, inplace=True) / trace(resnet50): {timing['ratio_inplace']:.2f}x "
                     f"({timing['transform_inplace_s'] * 1e3:.0f} ms vs {timing['trace_s'] * 1e3:.0f} ms); "
                     f"with the default copy (inplace=False): {timing['ratio']:.2f}x")
    lines += ["", "## Skipped sites by reason", ""]
    lines += [f"- {n} x {r}" for r, n in reasons.most_common(20)] or ["- none"]
    errors = [r for r in with_norm if r.get("error") or r.get("forward_ok") is False]
    lines += ["", "## Errors", ""]
    lines += [f"- {r['model']}: {r.get('error') or r.get('forward_error')}" for r in errors[:50]] or ["- none"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=None, help="preset, JSON (default: l1bn / ln-s / dn per family)")
    ap.add_argument("--filter", default="*", help="glob over timm model names")
    ap.add_argument("--forward", action="store_true", help="also run forward/backward on small models")
    ap.add_argument("--max-params", type=float, default=3e6)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--out", default="zoo_coverage", help="output prefix (.json and .md)")
    ap.add_argument("--workers", type=int, default=1, help="models checked in parallel processes")
    ap.add_argument("--skip-trace", action="store_true", help="skip the whole-model fx trace columns")
    args = ap.parse_args(argv)
    spec = args.spec or DEFAULT_SPEC
    if isinstance(spec, str) and spec.strip().startswith("{"):
        spec = json.loads(spec)
    names = [n for n in timm.list_models() if fnmatch.fnmatch(n, args.filter)]
    if args.limit:
        names = names[:args.limit]
    rows = []
    t0 = time.time()
    job = functools.partial(_checked, spec=spec, forward=args.forward, max_params=args.max_params,
                            skip_trace=args.skip_trace)
    if args.workers > 1:
        import multiprocessing as mp
        torch.set_num_threads(1)
        with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=20) as pool:
            for i, row in enumerate(pool.imap(job, names, chunksize=2)):
                rows.append(row)
                if (i + 1) % 50 == 0:
                    print(f"{i + 1}/{len(names)} models, {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    else:
        for i, name in enumerate(names):
            rows.append(job(name))
            if (i + 1) % 50 == 0:
                print(f"{i + 1}/{len(names)} models, {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    print(f"checked {len(names)} models in {time.time() - t0:.0f}s", file=sys.stderr)
    timing = time_resnet50(spec if isinstance(spec, str) or spec != DEFAULT_SPEC else "l1bn")
    md = summarize(rows, timing, spec)
    with open(args.out + ".json", "w") as f:
        json.dump({"spec": spec, "timing": timing, "models": rows}, f, indent=1, default=str)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
