"""Run the study: ``python -m scripts.study.run --claims 1,2,7 [--quick] [--jobs 4]``.

Each claim's runs are independent jobs (claim, setting, variant, seed), run in a process
pool; the results go to ``<out>/results.json``, plots to ``<out>/*.png`` and the tables
into ``docs/study/README.md`` between its result markers (``--docs``)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List

from . import claims as C
from .report import compact, render, write_docs  # noqa: F401


def _worker(args):
    job, scale = args
    t0 = time.perf_counter()
    try:
        out = C.run_job(job, scale)
    except Exception as e:  # one failed run must not lose the others
        import traceback
        out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    out["wall"] = time.perf_counter() - t0
    out.setdefault("device", scale.device)
    return asdict(job), out


def parse_claims(text: str) -> List[int]:
    if text == "all":
        return sorted(C.CLAIM_VARIANTS)
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        vals = []
    if not vals or any(v not in C.CLAIM_VARIANTS for v in vals):
        raise argparse.ArgumentTypeError(f"--claims must be 'all' or a comma list of {sorted(C.CLAIM_VARIANTS)}, "
                                         f"got {text!r}")
    return vals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true",
                    help="every claim at the default scale (the committed run: about an hour on 2 CPU cores "
                         "with --jobs 2); the same as --claims all")
    ap.add_argument("--claims", type=parse_claims, default="all", help="'all' or e.g. 1,2,7")
    ap.add_argument("--quick", action="store_true", help="smoke run on digits and 20k characters (no data package)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1, help="parallel processes (each uses one thread)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (claim 5 uses cuda when there is one)")
    ap.add_argument("--data", help="folder with the Fashion-MNIST idx files (default: the Debian package's)")
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--n-val", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lm-steps", type=int, default=500)
    ap.add_argument("--fp16-steps", type=int, default=200)
    ap.add_argument("--out", default="docs/study", help="folder for results.json and the plots")
    ap.add_argument("--docs", help="markdown file whose result section is rewritten (e.g. docs/study/README.md)")
    ap.add_argument("--merge", action="store_true", help="keep other claims' results already in results.json")
    ap.add_argument("--variants", help="run only these variants (comma list of exact row labels)")
    ap.add_argument("--settings", help="run only these settings (comma list, e.g. 'batch 64')")
    ap.add_argument("--section", default="main",
                    help="which result section of --docs to rewrite (markers study-results:SECTION)")
    ap.add_argument("--no-report", action="store_true", help="write results.json only (no plots, no tables)")
    ap.add_argument("--render", metavar="RESULTS_JSON", nargs="+",
                    help="run nothing: make the tables and plots from results.json files (later files win for "
                         "the same claim/setting/variant/seed) into --out (with the combined, compacted "
                         "results.json) and --docs")
    args = ap.parse_args(argv)
    if args.render:
        doc = {"runs": [], "meta": {}}
        for f in args.render:
            part = json.loads(Path(f).read_text())
            new = {(j["claim"], j["setting"], j["variant"], j["seed"]) for j, _ in part["runs"]}
            doc["runs"] = [r for r in doc["runs"]
                           if (r[0]["claim"], r[0]["setting"], r[0]["variant"], r[0]["seed"]) not in new]
            doc["runs"] += part["runs"]
            doc["meta"].update(part["meta"])
        doc = compact(doc)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(doc))
        md = render(doc, Path(args.out), Path(args.docs) if args.docs else None)
        print(md)
        if args.docs:
            write_docs(Path(args.docs), md, args.section)
        return 0
    claims = args.claims if isinstance(args.claims, list) else parse_claims(args.claims)
    if args.all:
        claims = parse_claims("all")
    if args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.quick:
        scale = replace(C.QUICK, device=args.device)
    else:
        scale = C.Scale(n_train=args.n_train, n_val=args.n_val, epochs=args.epochs, lm_steps=args.lm_steps, fp16_steps=args.fp16_steps,
                        data_dir=args.data, device=args.device)
        from .data import MissingDataError, load_fashion_mnist
        try:
            load_fashion_mnist(args.data, 10, 10)
        except MissingDataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    jobs = C.jobs_for(claims, list(range(args.seeds)))
    if args.variants:
        wanted = {v.strip() for v in args.variants.split(",")}
        known = {v for c in claims for vs in C.CLAIM_VARIANTS[c].values() for v in vs}
        if wanted - known:
            ap.error(f"--variants: unknown {sorted(wanted - known)}; known for these claims: {sorted(known)}")
        jobs = [j for j in jobs if j.variant in wanted]
    if args.settings:
        wanted = {v.strip() for v in args.settings.split(",")}
        jobs = [j for j in jobs if j.setting in wanted]
        if not jobs:
            ap.error(f"--settings {args.settings!r} selects no run of claims {claims}")
    # longest first: the claim-7 "WD" jobs run two trainings, small batches take longest
    jobs.sort(key=lambda j: (j.claim != 7 or j.variant != "WD", j.setting != "batch 8", j.claim != 3))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    previous = json.loads(path.read_text()) if args.merge and path.is_file() else {"runs": [], "meta": {}}
    rerun = {(j.claim, j.setting, j.variant) for j in jobs}
    kept = [r for r in previous["runs"] if (r[0]["claim"], r[0]["setting"], r[0]["variant"]) not in rerun]
    meta = dict(previous.get("meta", {}))
    import torch
    key = ",".join(map(str, claims)) + (f" ({args.variants})" if args.variants else "")
    meta[key] = {
        "command": "python -m scripts.study.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_seconds": 0.0, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                   f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        "torch": torch.__version__, "scale": asdict(scale), "jobs": args.jobs, "seeds": args.seeds}
    t0 = time.perf_counter()
    results = []

    def save(done: bool):  # after every run: a run cut short keeps what finished
        meta[key]["wall_seconds"] = round(time.perf_counter() - t0, 1)
        meta[key]["complete"] = done
        doc = {"runs": kept + [[j, r] for j, r in results], "meta": meta}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(path)
        return doc

    work = [(j, scale) for j in jobs]
    if args.jobs > 1:
        import multiprocessing
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = [ex.submit(_worker, w) for w in work]
            for f in as_completed(futures):
                results.append(f.result())
                save(False)
    else:
        for w in work:
            results.append(_worker(w))
            save(False)
    for job, res in results:
        if "error" in res:
            print(f"FAILED {job}: {res['error']}\n{res['traceback']}", file=sys.stderr)
    wall = time.perf_counter() - t0
    doc = save(True)
    if args.no_report:
        print(f"{len(results)} runs, {sum('error' in r for _, r in results)} failed, {wall:.0f} s")
        return 0
    md = render(doc, out, Path(args.docs) if args.docs else None)
    print(md)
    if args.docs:
        write_docs(Path(args.docs), md, args.section)
    failed = sum("error" in r for _, r in results)
    print(f"{len(results)} runs, {failed} failed, {wall:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
