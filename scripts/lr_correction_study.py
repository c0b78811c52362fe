#!/usr/bin/env python
"""How closely does training without weight decay plus normswap.LRCorrection follow
training with weight decay? Prints the largest per-channel direction gap (max abs
difference of unit directions) after N steps, for BN eps ~0 (weights exactly scale
invariant) and the default eps=1e-5, plain SGD, momentum 0.9 and Nesterov, for the
online correction, the reference correction (norms recorded every 10 steps by
NormRecorder from the run with weight decay) and no correction.

    python scripts/lr_correction_study.py --steps 150
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

import normswap


def make_net(eps: float) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6, eps=eps), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, bias=False), nn.BatchNorm2d(8, eps=eps), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).double()


def batches(steps: int, n: int = 16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64),
             torch.randint(0, 4, (n,), generator=g)) for _ in range(steps)]


def train(eps, correction, momentum, steps, lr=0.1, wd=5e-3, data=None, nesterov=False, reference=None,
          record_every=10):
    """``correction``: False (ordinary SGD, weight decay ``wd``), "online" or "reference"
    (no weight decay on scale-invariant weights, LRCorrection). Returns the net and the
    per-``record_every``-steps norms recorded by NormRecorder."""
    net = make_net(eps)
    data = data or batches(steps)
    if correction:
        groups = normswap.param_groups(net, lr, wd, scale_invariant_weight_decay=0.0)
        opt = normswap.LRCorrection(torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov), net,
                                    weight_decay=wd, mode=correction, reference=reference,
                                    steps_per_epoch=record_every if correction == "reference" else None)
    else:
        opt = torch.optim.SGD(normswap.param_groups(net, lr, wd), lr=lr, momentum=momentum, nesterov=nesterov)
    rec = normswap.NormRecorder(net)
    for i, (x, y) in enumerate(data):
        if correction == "reference":
            opt.set_epoch(i // record_every)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if (i + 1) % record_every == 0:
            rec.record()
    train.last_norms = rec.tensors()
    return net


def direction_gap(a: nn.Module, b: nn.Module):
    """max over scale-invariant channels of |u_a - u_b| (unit directions)."""
    gap = 0.0
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.dim() == 4:
            ua = pa.detach().reshape(pa.shape[0], -1)
            ub = pb.detach().reshape(pb.shape[0], -1)
            ua, ub = ua / ua.norm(dim=1, keepdim=True), ub / ub.norm(dim=1, keepdim=True)
            gap = max(gap, float((ua - ub).abs().max()))
    return gap


def study(steps: int, lrs=(0.1, 0.01), epss=(1e-14, 1e-5)):
    data = batches(steps)
    rows = []
    for lr in lrs:
        for eps in epss:
            for momentum, nesterov in ((0.0, False), (0.9, False), (0.9, True)):
                ref = train(eps, False, momentum, steps, lr=lr, data=data, nesterov=nesterov)
                norms = train.last_norms
                cor = train(eps, "online", momentum, steps, lr=lr, data=data, nesterov=nesterov)
                refm = train(eps, "reference", momentum, steps, lr=lr, data=data, nesterov=nesterov, reference=norms)
                nowd = train(eps, False, momentum, steps, lr=lr, wd=0.0, data=data, nesterov=nesterov)
                rows.append({"lr": lr, "bn_eps": eps, "momentum": momentum, "nesterov": nesterov, "steps": steps,
                             "gap_online": direction_gap(ref, cor), "gap_reference": direction_gap(ref, refm),
                             "gap_no_wd_uncorrected": direction_gap(ref, nowd)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, nargs="+", default=[0.1, 0.01])
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-14, 1e-5])
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    rows = study(args.steps, args.lr, args.eps)
    print("| lr | BN eps | momentum | online | reference | no WD, no correction |\n|---|---|---|---|---|---|")
    for r in rows:
        mom = f"{r['momentum']:.1f}" + (" Nesterov" if r["nesterov"] else "")
        print(f"| {r['lr']:.2f} | {r['bn_eps']:.0e} | {mom} | {r['gap_online']:.1e} | {r['gap_reference']:.1e} | "
              f"{r['gap_no_wd_uncorrected']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
