"""One training loop for every image run and one for the language models, using only
normswap's public API: ``transform``, ``penalty``, ``param_groups``, ``LRCorrection``,
``NormRecorder``."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import normswap


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"          # "cosine" or "constant"
    correction: str = "none"          # "none", "nowd" (no WD on scale-invariant weights), "online", "reference"
    reference: Optional[Dict[str, torch.Tensor]] = None
    record_norms: bool = False        # NormRecorder, per epoch (for a later reference run)
    track_channels: bool = False      # per-step effective step eta_c / ||w_c||^2 of one weight
    half: bool = False                # pure float16: model.half(), no autocast, no loss scaling
    device: str = "cpu"
    seed: int = 0
    log_every: int = 10


@dataclass
class RunResult:
    """What one run measured. ``curve``: (step, training loss) every ``log_every`` steps."""
    metric: float                     # val accuracy in % (images) or bits per char (text)
    curve: List[List[float]] = field(default_factory=list)
    seconds: float = 0.0
    first_nonfinite_step: Optional[int] = None
    extra: Dict[str, object] = field(default_factory=dict)


def _schedule(opt, cfg: TrainConfig, total: int):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    if cfg.schedule == "constant":
        return None
    raise ValueError(f"schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")


def make_optimizer(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    """SGD on normswap.param_groups; with ``correction`` != "none" the scale-invariant
    weights get no weight decay, and "online"/"reference" wrap SGD in LRCorrection."""
    si_wd = None if cfg.correction == "none" else 0.0
    groups = normswap.param_groups(model, cfg.lr, cfg.weight_decay, scale_invariant_weight_decay=si_wd)
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.correction in ("online", "reference"):
        opt = normswap.LRCorrection(opt, model, weight_decay=cfg.weight_decay, mode=cfg.correction,
                                    reference=cfg.reference,
                                    steps_per_epoch=steps_per_epoch if cfg.correction == "reference" else None)
    elif cfg.correction not in ("none", "nowd"):
        raise ValueError(f"correction must be none, nowd, online or reference, got {cfg.correction!r}")
    return opt


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device, dtype, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch].to(device, dtype))
        correct += int((out.argmax(1).cpu() == y[i:i + batch]).sum())
    model.train()
    return 100.0 * correct / len(x)


def train_classifier(model: nn.Module, data, cfg: TrainConfig,
                     on_step: Optional[Callable[[int, nn.Module], None]] = None) -> RunResult:
    """Train ``model`` (already transformed) on ``data`` (an ImageData) with cross-entropy
    plus ``normswap.penalty``; returns the final validation accuracy and the loss curve."""
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    dtype = torch.float16 if cfg.half else torch.float32
    model = model.to(dev)
    if cfg.half:
        model = model.half()
    n = len(data.x_train)
    steps_per_epoch = n // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    opt = make_optimizer(model, cfg, steps_per_epoch)
    sched = _schedule(opt, cfg, total)
    rec = normswap.NormRecorder(model) if cfg.record_norms else None
    si = normswap.scale_invariant_params(model) if cfg.track_channels else []
    eff: List[torch.Tensor] = []
    res = RunResult(metric=float("nan"))
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all, y_all = data.x_train.to(dev, dtype), data.y_train.to(dev)
    t0, step, running = time.perf_counter(), 0, 0.0
    for epoch in range(cfg.epochs):
        if isinstance(opt, normswap.LRCorrection):
            opt.set_epoch(epoch)
        perm = torch.randperm(n, generator=gen).to(dev)
        for b in range(steps_per_epoch):
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            out = model(x_all[idx])
            loss = F.cross_entropy(out.float(), y_all[idx]) + normswap.penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if si:
                w = si[0].param.detach()
                w2 = w.reshape(w.shape[0], -1).double().square().sum(1)
            opt.step()
            if si:
                lr = opt.param_groups[0]["lr"] if sched is None else sched.get_last_lr()[0]
                f = opt.last_factors.get(si[0].name) if isinstance(opt, normswap.LRCorrection) else None
                eff.append((lr * (f if f is not None else 1.0) / w2).float().cpu())
            if sched is not None:
                sched.step()
            lv = float(loss.detach())
            if not math.isfinite(lv) and res.first_nonfinite_step is None:
                res.first_nonfinite_step = step
            running += lv
            if (step + 1) % cfg.log_every == 0:
                res.curve.append([step + 1, running / cfg.log_every])
                running = 0.0
            if on_step is not None:
                on_step(step, model)
            step += 1
        if rec is not None:
            rec.record(epoch)
    res.seconds = time.perf_counter() - t0
    res.metric = evaluate(model, data.x_val, data.y_val, dev, dtype)
    if rec is not None:
        res.extra["norms"] = rec.tensors()
    if eff:
        res.extra["eff_step"] = torch.stack(eff)  # (steps, channels)
    return res


def train_lm(model: nn.Module, text, cfg: TrainConfig, seq_len: int = 64, steps: int = 500) -> RunResult:
    """Truncated BPTT on contiguous streams of ``text.train`` (``batch_size`` streams,
    ``seq_len`` characters per step, state carried and detached); returns validation bits
    per character (the whole validation text, streamed the same way)."""
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    model = model.to(dev)
    opt = make_optimizer(model, cfg, steps)
    sched = _schedule(opt, TrainConfig(schedule=cfg.schedule, epochs=1), steps)
    nb = cfg.batch_size
    usable = (len(text.train) - 1) // nb
    streams = text.train[:usable * nb + 1]
    xs = streams[:-1].view(nb, usable).to(dev)
    ys = streams[1:].view(nb, usable).to(dev)
    res = RunResult(metric=float("nan"))
    state = model.init_state(nb, dev)
    t0, pos, running = time.perf_counter(), 0, 0.0
    for step in range(steps):
        if pos + seq_len > usable:
            pos, state = 0, model.init_state(nb, dev)
        logits, state = model(xs[:, pos:pos + seq_len], state)
        state = tuple(s.detach() for s in state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys[:, pos:pos + seq_len].reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + normswap.penalty(model)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        pos += seq_len
        lv = float(loss.detach())
        if not math.isfinite(lv) and res.first_nonfinite_step is None:
            res.first_nonfinite_step = step
        running += lv
        if (step + 1) % cfg.log_every == 0:
            res.curve.append([step + 1, running / cfg.log_every / math.log(2)])
            running = 0.0
    res.seconds = time.perf_counter() - t0
    res.metric = eval_bpc(model, text.val, dev, seq_len)
    return res


@torch.no_grad()
def eval_bpc(model: nn.Module, ids: torch.Tensor, dev, seq_len: int, streams: int = 16) -> float:
    model.eval()
    usable = (len(ids) - 1) // streams
    xs = ids[:usable * streams].view(streams, usable).to(dev)
    ys = ids[1:usable * streams + 1].view(streams, usable).to(dev)
    state = model.init_state(streams, dev)
    total, count = 0.0, 0
    for pos in range(0, usable, seq_len):
        logits, state = model(xs[:, pos:pos + seq_len], state)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys[:, pos:pos + seq_len].reshape(-1),
                                       reduction="sum"))
        count += ys[:, pos:pos + seq_len].numel()
    model.train()
    return total / count / math.log(2)
