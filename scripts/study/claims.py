"""The seven claims: which runs each needs (jobs), how one job runs, and how the results
become a table row with a verdict."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

import normswap
from . import data as D
from .models import CharRNN, SmallCNN, SmallResNet
from .train import RunResult, TrainConfig, train_classifier, train_lm

DN_WINDOWS = {"norm1": {"sum_window": 5, "sup_window": 5}, "norm2": {"sum_window": 3, "sup_window": 3},
              "norm3": {"sum_window": 3, "sup_window": 3}}


@dataclass(frozen=True)
class Scale:
    """How big the study is. ``quick``: digits and 20k characters, a few steps (a smoke run)."""
    quick: bool = False
    n_train: int = 10000
    n_val: int = 2000
    epochs: int = 3
    small_batch_epochs: int = 1
    lm_steps: int = 400
    lm_hidden: int = 128
    lm_chars: Optional[int] = None
    fp16_steps: int = 150
    data_dir: Optional[str] = None
    device: str = "cpu"


QUICK = Scale(quick=True, n_train=0, n_val=0, epochs=1, small_batch_epochs=1, lm_steps=6, lm_hidden=32,
              lm_chars=20000, fp16_steps=4)


@dataclass(frozen=True)
class Job:
    claim: int
    setting: str      # e.g. "batch 64", "relu", "wd"
    variant: str      # the row label, e.g. "BN*"
    seed: int


# claim -> setting -> variants; every variant a (model norm, spec) recipe in _cnn_spec / _run
CLAIM_VARIANTS: Dict[int, Dict[str, List[str]]] = {
    1: {"batch 64": ["Baseline", "BN", "BN*", "LN", "LN*", "DN", "DN*"],
        "batch 8": ["Baseline", "BN", "BN*", "LN", "LN*", "DN", "DN*"]},
    2: {"batch 64": ["BN", "BN-s (sigma only)", "BN+L1 (L1 only)", "BN*", "DN (sigma=0)", "DN-s (sigma only)",
                     "DN+L1 (L1 only)", "DN*"]},
    3: {"relu": ["Baseline", "LN", "LN-s", "LN*", "DN*"], "lstm": ["Baseline", "LN", "LN-s", "LN*", "DN*"]},
    4: {"resnet": ["L2 BN", "L1 BN", "top-k BN"]},
    5: {"standardized input": ["L2 BN (nn.BatchNorm2d)", "L2 BN (normswap sigma=0)", "L1 BN", "top-k BN"],
        "raw pixels 0-255": ["L2 BN (nn.BatchNorm2d)", "L2 BN (normswap sigma=0)", "L1 BN", "top-k BN"]},
    6: {"cnn": ["BN", "BWN + mean-only BN", "WN + mean-only BN"]},
    7: {"momentum 0.9": ["WD", "WD (rounding-perturbed)", "no WD", "no WD + online", "no WD + reference"],
        "Nesterov 0.9": ["WD", "WD (rounding-perturbed)", "no WD", "no WD + online", "no WD + reference"]},
}


def jobs_for(claims, seeds) -> List[Job]:
    out = []
    for c in claims:
        for setting, variants in CLAIM_VARIANTS[c].items():
            for v in variants:
                if c == 7 and v == "no WD + reference":
                    continue  # produced by the "WD" job, which records the norms it needs
                for s in seeds:
                    out.append(Job(c, setting, v, s))
    return out


# -- data, cached per process --------------------------------------------------------------
_CACHE: Dict[Tuple, object] = {}


def image_data(scale: Scale):
    key = ("img", scale.quick, scale.n_train, scale.n_val, scale.data_dir)
    if key not in _CACHE:
        _CACHE[key] = D.load_digits() if scale.quick else D.load_fashion_mnist(scale.data_dir, scale.n_train,
                                                                                 scale.n_val)
    return _CACHE[key]


def text_data(scale: Scale):
    key = ("txt", scale.lm_chars)
    if key not in _CACHE:
        _CACHE[key] = D.load_stdlib_text(max_chars=scale.lm_chars)
    return _CACHE[key]


# -- one job -----------------------------------------------------------------------------------
def _cnn_recipe(variant: str) -> Tuple[str, object]:
    """Row label -> (SmallCNN norm, normswap spec)."""
    dn = lambda preset, **kw: normswap.Spec(preset, kwargs=kw, names=DN_WINDOWS)  # noqa: E731
    table = {
        "Baseline": ("none", None), "BN": ("bn", None), "BN*": ("bn", "bn*"), "LN": ("ln", None),
        "LN*": ("ln", "ln*"), "DN": ("bn", dn("dn")), "DN*": ("bn", dn("dn*")),
        "BN-s (sigma only)": ("bn", "bn-s"), "BN+L1 (L1 only)": ("bn", normswap.Spec("bn*", kwargs={"sigma": 0.0})),
        "DN (sigma=0)": ("bn", dn("dn", sigma=0.0)), "DN-s (sigma only)": ("bn", dn("dn")),
        "DN+L1 (L1 only)": ("bn", dn("dn*", sigma=0.0)),
    }
    return table[variant]


def _sparsity(model: nn.Module, x: torch.Tensor, names=("norm1", "norm2", "norm3")) -> Dict[str, float]:
    """Fraction of near-zero centered pre-normalization activations on a validation batch:
    ``|x - mu_c| < 0.1 std_c`` (shape, independent of scale) and ``|x - mu_c| < 0.05``."""
    seen = []
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o: seen.append(i[0].detach().float()))
             for n in names]
    model.eval()
    with torch.no_grad():
        model(x)
    model.train()
    for h in hooks:
        h.remove()
    rel, ab = [], []
    for a in seen:
        v = a - a.mean((0, 2, 3), keepdim=True)
        sd = v.square().mean((0, 2, 3), keepdim=True).sqrt()
        rel.append(float((v.abs() < 0.1 * sd).float().mean()))
        ab.append(float((v.abs() < 0.05).float().mean()))
    return {"near_zero_rel": sum(rel) / len(rel), "near_zero_abs": sum(ab) / len(ab),
            "mean_abs_centered": sum(float((a - a.mean((0, 2, 3), keepdim=True)).abs().mean()) for a in seen) / len(seen)}


def _base_cfg(scale: Scale, seed: int, **kw) -> TrainConfig:
    cfg = TrainConfig(epochs=scale.epochs, device=scale.device, seed=seed)
    return replace(cfg, **kw)


def run_job(job: Job, scale: Scale) -> Dict[str, object]:
    """Run one job; returns a JSON-able dict (metric, curve, seconds, extras)."""
    torch.set_num_threads(1)
    torch.manual_seed(job.seed)
    c, v = job.claim, job.variant
    out: Dict[str, object] = {}
    if c in (1, 2):
        norm, spec = _cnn_recipe(v)
        model = SmallCNN(norm)
        if spec is not None:
            model = normswap.transform(model, spec)
        small = job.setting == "batch 8"
        cfg = _base_cfg(scale, job.seed, batch_size=8 if small else 64, lr=0.01 if small else 0.05,
                        epochs=scale.small_batch_epochs if small else scale.epochs)
        data = image_data(scale)
        res = train_classifier(model, data, cfg)
        if c == 2 and norm == "bn":
            out.update(_sparsity(model, data.x_val[:500].to(cfg.device)))
    elif c == 3:
        text = text_data(scale)
        base = CharRNN(len(text.alphabet), job.setting, hidden=scale.lm_hidden, norm=v != "Baseline")
        spec = {"Baseline": None, "LN": None, "LN-s": "ln-s", "LN*": "ln*", "DN*": "dn*"}[v]
        model = normswap.transform(base, spec) if spec else base
        # plain SGD with momentum as Ren et al.'s RNNs; no weight decay (nothing scale invariant)
        # on the CPU: a 64-step Python loop of small matmuls is launch-bound on a GPU
        cfg = _base_cfg(scale, job.seed, batch_size=32, lr=0.05 if job.setting == "relu" else 0.5,
                        weight_decay=0.0, device="cpu")
        res = train_lm(model, text, cfg, steps=scale.lm_steps)
    elif c == 4:
        spec = {"L2 BN": None, "L1 BN": "l1bn", "top-k BN": "topkbn"}[v]
        model = SmallResNet()
        model = normswap.transform(model, spec) if spec else model
        res = train_classifier(model, image_data(scale), _base_cfg(scale, job.seed, lr=0.1))
    elif c == 5:
        res, out = _fp16_job(job, scale)
    elif c == 6:
        model = SmallCNN("bn")
        if v == "BWN + mean-only BN":
            model = normswap.transform(model, "bwn")
        elif v == "WN + mean-only BN":
            for conv in (model.conv1, model.conv2, model.conv3):
                torch.nn.utils.parametrizations.weight_norm(conv)
            model = normswap.transform(model, "meanonly")
        res = train_classifier(model, image_data(scale), _base_cfg(scale, job.seed))
    elif c == 7:
        return _lr_correction_job(job, scale)
    else:
        raise ValueError(f"unknown claim {c}")
    out.update(metric=res.metric, curve=res.curve, seconds=res.seconds,
               first_nonfinite_step=res.first_nonfinite_step)
    return out


def _fp16_job(job: Job, scale: Scale):
    """Pure float16: model.half(), half inputs, SGD in half, no autocast, no loss scaling."""
    spec = {"L2 BN (nn.BatchNorm2d)": None, "L2 BN (normswap sigma=0)": normswap.Spec("bn-s", kwargs={"sigma": 0.0}),
            "L1 BN": "l1bn", "top-k BN": "topkbn"}[job.variant]
    torch.manual_seed(job.seed)
    model = SmallCNN("bn", widths=(16, 32, 32))
    model = normswap.transform(model, spec) if spec else model
    data = image_data(scale)
    if job.setting == "raw pixels 0-255":  # undo the standardization (an affine map): pixels 0..255
        lo, hi = float(data.x_train.min()), float(data.x_train.max())
        raw = lambda t: (t - lo) * (255.0 / (hi - lo))  # noqa: E731
        data = D.ImageData(data.name, raw(data.x_train), data.y_train, raw(data.x_val), data.y_val)
    steps = scale.fp16_steps
    bs = 64
    n = min(len(data.x_train), steps * bs)
    sub = D.ImageData(data.name, data.x_train[:n], data.y_train[:n], data.x_val, data.y_val)
    device = "cuda" if torch.cuda.is_available() else scale.device
    cfg = TrainConfig(epochs=max(1, steps * bs // n), batch_size=bs, lr=0.05, weight_decay=5e-4, half=True,
                      device=device, seed=job.seed, log_every=1, schedule="constant")
    peak = {"max_abs_pre_norm": 0.0, "max_abs_norm_out": 0.0}

    def watch(m, i, o):
        a = i[0].detach()
        if torch.isfinite(a).all():
            peak["max_abs_pre_norm"] = max(peak["max_abs_pre_norm"], float(a.abs().max()))
        if torch.isfinite(o).all():
            peak["max_abs_norm_out"] = max(peak["max_abs_norm_out"], float(o.detach().abs().max()))
    for name in ("norm1", "norm2", "norm3"):
        getattr(model, name).register_forward_hook(watch)
    res = train_classifier(model, sub, cfg)
    nonfinite_params = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
    return res, dict(peak, nonfinite_params=nonfinite_params, device=device)


def _lr_correction_job(job: Job, scale: Scale) -> Dict[str, object]:
    """Claim 7: a CNN with BN, SGD momentum 0.9 (or Nesterov), weight decay 5e-3 on a cosine
    schedule. "WD" also runs "no WD + reference" from the norms it recorded."""
    data = image_data(scale)
    nesterov = job.setting.startswith("Nesterov")
    base = dict(lr=0.1, weight_decay=5e-3, nesterov=nesterov, track_channels=True)
    corr = {"WD": "none", "WD (rounding-perturbed)": "none", "no WD": "nowd",
            "no WD + online": "online"}[job.variant]
    torch.manual_seed(job.seed)
    model = SmallCNN("bn")
    init = {k: v.clone() for k, v in model.state_dict().items()}
    if job.variant == "WD (rounding-perturbed)":  # the same run, every weight moved by ~1e-7 relative:
        g = torch.Generator().manual_seed(1000 + job.seed)  # how far float rounding alone takes a run
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=g))
    res = train_classifier(model, data, _base_cfg(scale, job.seed, correction=corr,
                                                  record_norms=job.variant == "WD", **base))
    out = {job.variant: _summ(res)}
    if job.variant == "WD":
        model = SmallCNN("bn")
        model.load_state_dict(init)
        ref = train_classifier(model, data, _base_cfg(scale, job.seed, correction="reference",
                                                      reference=res.extra["norms"], **base))
        out["no WD + reference"] = _summ(ref)
    return {"variants": out}


def _summ(res: RunResult) -> Dict[str, object]:
    return {"metric": res.metric, "curve": res.curve, "seconds": res.seconds,
            "first_nonfinite_step": res.first_nonfinite_step, "eff_step": res.extra["eff_step"].tolist()}


# -- aggregation -----------------------------------------------------------------------------
def mean_std(xs: List[float]) -> Tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return m, sd


@dataclass
class Comparison:
    """``a`` vs ``b`` in one setting: "better" (a beats b) or "close" (within ``tol`` or noise)."""
    setting: str
    a: str
    b: str
    kind: str = "better"
    tol: float = 0.5


PAPER = {
    1: ("Ren et al. Table 3 (CIFAR-10 test acc., 3-conv CNN): Baseline .757, BN .781, BN* .818, LN .721, "
        "LN* .809, DN .806, DN* .812; DN*/LN* expected to beat BN at small batch",
        [Comparison(s, a, b) for s in ("batch 64", "batch 8")
         for a, b in (("BN*", "BN"), ("DN*", "BN"), ("BN*", "Baseline"), ("DN*", "Baseline"), ("LN*", "LN"))]
        + [Comparison("batch 8", "LN*", "BN")]),
    2: ("Ren et al. ablation: sigma alone and the L1 penalty alone each improve on plain BN / DN; "
        "L1 makes centered activations sparser",
        [Comparison("batch 64", "BN-s (sigma only)", "BN"), Comparison("batch 64", "BN+L1 (L1 only)", "BN"),
         Comparison("batch 64", "DN-s (sigma only)", "DN (sigma=0)"),
         Comparison("batch 64", "DN+L1 (L1 only)", "DN (sigma=0)")]),
    3: ("Ren et al. Table 4 (PTB word-level test perplexity): ReLU RNN baseline 147.6, LN 149.1, LN* 116.6, "
        "DN* 117.9; LSTM baseline 115.7, LN* 101.7, DN* 102.2 (lower is better)",
        [Comparison(s, a, b) for s in ("relu", "lstm")
         for a, b in (("LN*", "LN"), ("DN*", "LN"), ("LN*", "Baseline"), ("DN*", "Baseline"), ("LN-s", "LN"))]),
    4: ("Hoffer et al.: L1 and top-k BN reach L2 BN's accuracy (ResNet, CIFAR/ImageNet)",
        [Comparison("resnet", "L1 BN", "L2 BN", "close"), Comparison("resnet", "top-k BN", "L2 BN", "close")]),
    5: ("Hoffer et al.: in pure float16 L1 BN trains where L2 BN fails (E[v^2] overflows for |v| > 256)", []),
    6: ("Hoffer et al.: bounded WN + mean-only BN close to BN (ResNet-50 ImageNet); plain WN worse",
        [Comparison("cnn", "BWN + mean-only BN", "BN", "close"),
         Comparison("cnn", "BWN + mean-only BN", "WN + mean-only BN")]),
    7: ("Hoffer et al.: no WD + LR correction matches training with WD", [
        Comparison(s, v, "WD", "close") for s in ("momentum 0.9", "Nesterov 0.9")
        for v in ("no WD + online", "no WD + reference", "no WD", "WD (rounding-perturbed)")]),
}

LOWER_IS_BETTER = {3}

# The papers' own figures for a row label, where they give one (Ren et al. Tables 3 and 4:
# CIFAR-10 test accuracy in %, PTB word-level test perplexity); the other claims are stated
# as directions only.
PAPER_FIGURES: Dict[Tuple[int, str, str], float] = {
    **{(1, s, v): a for s in ("batch 64", "batch 8") for v, a in
       (("Baseline", 75.65), ("BN", 78.07), ("BN*", 81.79), ("LN", 72.11), ("LN*", 80.91), ("DN", 80.58),
        ("DN*", 81.22))},
    **{(3, "relu", v): p for v, p in (("Baseline", 147.6), ("LN", 149.1), ("LN*", 116.6), ("DN*", 117.9))},
    **{(3, "lstm", v): p for v, p in (("Baseline", 115.7), ("LN*", 101.7), ("DN*", 102.2))},
}


def verdict(comp: Comparison, runs: Dict[Tuple[str, str], List[float]], lower_better: bool) -> str:
    """reproduces / does not / inconclusive, from means and a 2-standard-error band."""
    a, b = runs[(comp.setting, comp.a)], runs[(comp.setting, comp.b)]
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    se = math.sqrt((sa ** 2 if sa == sa else 0) / len(a) + (sb ** 2 if sb == sb else 0) / len(b))
    d = (mb - ma) if lower_better else (ma - mb)
    if comp.kind == "close":
        if abs(d) <= max(2 * se, comp.tol):
            return "reproduces"
        return "does not reproduce" if abs(d) > max(4 * se, 2 * comp.tol) else "inconclusive"
    if d > 2 * se and d > 0:
        return "reproduces"
    if d < -2 * se:
        return "does not reproduce (opposite)"
    return "inconclusive (within noise)"
