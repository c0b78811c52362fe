"""Tables (markdown) and plots from the study's results.json; nothing typed by hand."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import claims as C

def markers(section: str = "main"):
    return f"<!-- study-results:{section}:begin -->", f"<!-- study-results:{section}:end -->"


def _fmt(xs: List[float], digits: int = 2) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    m, s = C.mean_std(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s == s else f"{m:.{digits}f}"


def _flatten(doc) -> List[Tuple[dict, dict]]:
    """Claim 7 jobs hold several variants; give every (job, result) one variant."""
    rows = []
    for job, res in doc["runs"]:
        if "variants" in res:
            for v, r in res["variants"].items():
                rows.append((dict(job, variant=v), r))
        else:
            rows.append((job, res))
    return rows


def compact(doc) -> dict:
    """Replace claim 7's per-step, per-channel effective steps (large) by what the tables and
    plots use, computed against the WD run of the same setting and seed: ``eff_dev`` (mean
    over steps and channels of |eff / eff_WD - 1|), ``eff_mean`` (per step, mean over
    channels) and ``eff_ratio`` (per step, mean over channels of eff / eff_WD)."""
    for job, res in doc["runs"]:
        if job["claim"] != 7 or "variants" not in res:
            continue
        for v, r in res["variants"].items():
            if "eff_step" not in r:
                continue
            wd = None
            for j2, r2 in doc["runs"]:
                if (j2["claim"] == 7 and j2["setting"] == job["setting"] and j2["seed"] == job["seed"]
                        and "variants" in r2 and "WD" in r2["variants"]):
                    wd = r2["variants"]["WD"].get("eff_step_full", r2["variants"]["WD"].get("eff_step"))
            e = r["eff_step"]
            r["eff_mean"] = [sum(row) / len(row) for row in e]
            if wd is not None:
                n = min(len(e), len(wd))
                ratios = [[a / b for a, b in zip(e[i], wd[i])] for i in range(n)]
                r["eff_ratio"] = [sum(x) / len(x) for x in ratios]
                r["eff_dev"] = sum(abs(x - 1) for row in ratios for x in row) / (n * len(ratios[0]))
                wd_mean = [sum(row) / len(row) for row in wd[:n]]
                r["eff_dev_layer"] = sum(abs(a / b - 1) for a, b in zip(r["eff_mean"], wd_mean)) / n
            if v == "WD":
                r["eff_step_full"] = e  # kept until every run of this seed is compacted
            del r["eff_step"]
    for job, res in doc["runs"]:
        for r in res.get("variants", {}).values():
            r.pop("eff_step_full", None)
    return doc


def _metric_runs(rows, claim) -> Dict[Tuple[str, str], List[float]]:
    runs = defaultdict(list)
    for job, res in rows:
        if job["claim"] == claim and "error" not in res:
            runs[(job["setting"], job["variant"])].append(res["metric"])
    return runs


def _plot_curves(rows, claim, path: Path, ylabel: str, logy: bool = False):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = list(C.CLAIM_VARIANTS[claim])
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for v in C.CLAIM_VARIANTS[claim][setting]:
            curves = [r["curve"] for j, r in rows if j["claim"] == claim and j["setting"] == setting
                      and j["variant"] == v and "error" not in r and r.get("curve")]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            xs = [curves[0][i][0] for i in range(n)]
            ys = [sum(c[i][1] for c in curves) / len(curves) for i in range(n)]
            ys = [y if (y == y and abs(y) != math.inf) else float("nan") for y in ys]
            ax.plot(xs, ys, label=v)
        ax.set_title(f"claim {claim}: {setting}")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_eff(rows, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = list(C.CLAIM_VARIANTS[7])
    fig, axes = plt.subplots(2, len(settings), figsize=(5.5 * len(settings), 7), squeeze=False)
    for col, setting in enumerate(settings):
        by = {j["variant"]: r for j, r in rows if j["claim"] == 7 and j["setting"] == setting and j["seed"] == 0
              and "eff_mean" in r}
        for v, r in by.items():
            axes[0][col].plot(r["eff_mean"], label=v)
            if "eff_ratio" in r:
                axes[1][col].plot(r["eff_ratio"], label=v)
        axes[0][col].set_title(f"{setting}: eta_c/||w_c||^2, conv1 (mean over channels)", fontsize=9)
        axes[0][col].set_yscale("log")
        axes[1][col].set_title("per-channel ratio to the WD run (mean over channels)", fontsize=9)
        axes[1][col].set_xlabel("step")
        for ax in axes[:, col]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _eff_err(rows, setting, variant, key="eff_dev") -> List[float]:
    return [r[key] for j, r in rows if j["claim"] == 7 and j["setting"] == setting
            and j["variant"] == variant and key in r]


def _paper_cell(c: int, comp) -> str:
    a, b = C.PAPER_FIGURES.get((c, comp.setting, comp.a)), C.PAPER_FIGURES.get((c, comp.setting, comp.b))
    if a is None or b is None:
        return "direction only"
    unit = " ppl" if c in C.LOWER_IS_BETTER else "%"
    return f"{a:g} vs {b:g}{unit}"


def summary(rows, claims) -> List[str]:
    """The claims table: one row per comparison (paper figure, ours, verdict); claim 5 by
    the first non-finite step of each float16 variant."""
    md = ["### All claims at a glance\n",
          "| claim | comparison | paper | ours (difference of means) | verdict |", "|---|---|---|---|---|"]
    for c in claims:
        lower = c in C.LOWER_IS_BETTER
        runs = _metric_runs(rows, c)
        for comp in C.PAPER[c][1]:
            if (comp.setting, comp.a) not in runs or (comp.setting, comp.b) not in runs:
                continue
            (ma, sa), (mb, sb) = C.mean_std(runs[(comp.setting, comp.a)]), C.mean_std(runs[(comp.setting, comp.b)])
            rel = "≈" if comp.kind == "close" else ("<" if lower else ">")
            unit = " bits/char" if lower else " points"
            ours = f"{ma - mb:+.3f}{unit}"
            dev = _eff_err(rows, comp.setting, comp.a) if c == 7 else []
            if dev:
                ours += f"; effective step {100 * sum(dev) / len(dev):.0f}% off per channel"
            md.append(f"| {c} | {comp.setting}: {comp.a} {rel} {comp.b} | {_paper_cell(c, comp)} | "
                      f"{ours} | {C.verdict(comp, runs, lower)} |")
        if c == 5:
            for setting, variants in C.CLAIM_VARIANTS[5].items():
                nonfinite: Dict[str, List[bool]] = {}   # variant -> per seed: went non-finite
                for j, r in rows:
                    if j["claim"] == 5 and j["setting"] == setting and "error" not in r:
                        nonfinite.setdefault(j["variant"], []).append(r["first_nonfinite_step"] is not None)
                if not nonfinite:
                    continue
                cells = [f"{v}: {sum(nonfinite[v])}/{len(nonfinite[v])} seeds non-finite"
                         for v in variants if v in nonfinite]
                l2_fails = any(any(b) for v, b in nonfinite.items() if v.startswith("L2"))
                l1_fails = any(nonfinite.get("L1 BN", []))
                if not l2_fails:
                    verdict = "does not reproduce (L2 BN does not fail)"
                else:
                    verdict = "does not reproduce" if l1_fails else "reproduces"
                md.append(f"| 5 | {setting}: pure float16, L1 BN trains where L2 BN fails | direction only | "
                          f"{'; '.join(cells)} | {verdict} |")
    md.append("")
    return md


def render(doc, out: Path, docs: Optional[Path] = None) -> str:
    """Markdown tables for every claim in ``doc``; plots into ``out``, linked relative to
    the markdown file ``docs`` (or to ``out``'s parent)."""
    import os
    link = os.path.relpath(out, (docs.parent if docs else out.parent)).replace(os.sep, "/")
    rows = _flatten(compact(doc))
    claims = sorted({j["claim"] for j, _ in rows})
    md: List[str] = []
    for meta in doc["meta"].values():
        md.append(f"- `{meta['command']}`: {meta['wall_seconds']:.0f} s wall on {meta['machine']} "
                  f"({meta['date']}, torch {meta['torch']}, {meta['jobs']} processes, {meta['seeds']} seeds)")
    md.append("")
    md += summary(rows, claims)
    for c in claims:
        paper, comps = C.PAPER[c]
        lower = c in C.LOWER_IS_BETTER
        runs = _metric_runs(rows, c)
        unit = "val bits/char (lower is better)" if lower else "val accuracy %"
        md.append(f"### Claim {c}\n\nPaper: {paper}.\n")
        md.append(f"| setting | variant | ours: {unit} | seeds |\n|---|---|---|---|")
        errors = {}
        for job, res in rows:
            if job["claim"] == c and "error" in res:
                errors.setdefault((job["setting"], job["variant"]), res["error"].splitlines()[0][:80])
        for setting, variants in C.CLAIM_VARIANTS[c].items():
            for v in variants:
                xs = runs.get((setting, v), [])
                if not xs and (setting, v) not in errors:
                    continue  # not run in this result file
                cell = _fmt(xs, 3 if lower else 2) if xs else f"failed: {errors[(setting, v)]}"
                md.append(f"| {setting} | {v} | {cell} | {len(xs)} |")
        md.append("")
        if comps:
            md.append("| comparison | difference (mean) | verdict |\n|---|---|---|")
            for comp in comps:
                if (comp.setting, comp.a) not in runs or (comp.setting, comp.b) not in runs:
                    continue
                ma = C.mean_std(runs[(comp.setting, comp.a)])[0]
                mb = C.mean_std(runs[(comp.setting, comp.b)])[0]
                rel = "≈" if comp.kind == "close" else ("<" if lower else ">")
                md.append(f"| {comp.setting}: {comp.a} {rel} {comp.b} | {ma - mb:+.3f} | "
                          f"{C.verdict(comp, runs, lower)} |")
            md.append("")
        if c == 2:
            md.append("Near-zero centered pre-normalization activations (validation batch, mean over the 3 "
                      "layers): fraction with |x - mu_c| < 0.1 std_c, fraction with |x - mu_c| < 0.05, and "
                      "mean |x - mu_c|.\n")
            md.append("| variant | near zero (relative) | near zero (absolute) | mean abs |\n|---|---|---|---|")
            for v in C.CLAIM_VARIANTS[2]["batch 64"]:
                sel = [r for j, r in rows if j["claim"] == 2 and j["variant"] == v and "near_zero_rel" in r]
                if sel:
                    md.append(f"| {v} | {_fmt([r['near_zero_rel'] for r in sel], 3)} | "
                              f"{_fmt([r['near_zero_abs'] for r in sel], 3)} | "
                              f"{_fmt([r['mean_abs_centered'] for r in sel], 3)} |")
            md.append("")
        if c == 5:
            md.append("| setting | variant | first non-finite step (per seed) | final train loss | "
                      "max abs pre-norm activation | max abs norm output |\n|---|---|---|---|---|---|")
            for setting, variants in C.CLAIM_VARIANTS[5].items():
                for v in variants:
                    sel = [r for j, r in rows if j["claim"] == 5 and j["setting"] == setting and j["variant"] == v
                           and "error" not in r]
                    if not sel:
                        continue
                    nf = ", ".join(str(r["first_nonfinite_step"]) if r["first_nonfinite_step"] is not None
                                   else "none" for r in sel)
                    last = [r["curve"][-1][1] for r in sel if r["curve"]]
                    md.append(f"| {setting} | {v} | {nf} | {_fmt(last, 3)} | "
                              f"{max(r['max_abs_pre_norm'] for r in sel):.3g} | "
                              f"{max(r['max_abs_norm_out'] for r in sel):.3g} |")
            dev = {r.get("device") for j, r in rows if j["claim"] == 5 and "device" in r}
            md.append(f"\n(float16 runs on: {', '.join(sorted(dev))})\n")
            _plot_curves(rows, 5, out / "claim5_fp16_loss.png", "train loss (float16)", logy=True)
        if c == 7:
            md.append("Effective step eta_c / ||w_c||^2 of each output channel c of the first conv, every step, "
                      "against the WD run of the same seed: per channel, mean over steps and channels of "
                      "|ratio - 1|; per layer, mean over steps of |ratio of the channel means - 1|.\n")
            md.append("| setting | variant | per-channel deviation from WD | per-layer deviation from WD |\n"
                      "|---|---|---|---|")
            for setting in C.CLAIM_VARIANTS[7]:
                for v in ("WD (rounding-perturbed)", "no WD", "no WD + online", "no WD + reference"):
                    md.append(f"| {setting} | {v} | {_fmt(_eff_err(rows, setting, v), 3)} | "
                              f"{_fmt(_eff_err(rows, setting, v, 'eff_dev_layer'), 3)} |")
            md.append("")
            _plot_eff(rows, out / "claim7_effective_step.png")
        if c != 5:
            _plot_curves(rows, c, out / f"claim{c}_curves.png", "train bits/char" if lower else "train loss")
        figs = [f"claim{c}_curves.png"] if c != 5 else ["claim5_fp16_loss.png"]
        if c == 7:
            figs.append("claim7_effective_step.png")
        for f in figs:
            md.append(f"![claim {c}]({link}/{f})\n")
    return "\n".join(md)


def write_docs(path: Path, md: str, section: str = "main") -> None:
    """Replace the text between the result markers of ``section`` in ``path`` (appending
    them if absent)."""
    BEGIN, END = markers(section)
    text = path.read_text() if path.is_file() else ""
    block = f"{BEGIN}\n{md}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    path.write_text(text)
