"""Training helpers: penalty by hand, parameter groups, the LR correction."""
import copy
import os
import sys

import pytest
import timm
import torch
from torch import nn

import normswap
import normswap.norms as N

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import lr_correction_study as study  # noqa: E402


def test_penalty_against_a_hand_computation_on_a_tiny_model():
    net = nn.Sequential(nn.Linear(2, 2, bias=False), N.L1BatchNorm1d(2, l1_alpha=0.5))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    x = torch.tensor([[1.0, 1.0], [3.0, -1.0]])
    net(x)
    # pre-norm activations: channel 0 = [1, 3] (mean 2, |v| = 1, 1); channel 1 = [2, -2] (mean 0, |v| = 2, 2)
    # mean |v| over the 4 values = (1 + 1 + 2 + 2) / 4 = 1.5; penalty = 0.5 * 1.5
    assert normswap.penalty(net).item() == pytest.approx(0.75)


def test_param_groups_resnet18_and_vit():
    model = normswap.transform(timm.create_model("resnet18", pretrained=False), "l1bn")
    groups = {g["name"]: g for g in normswap.param_groups(model, 0.1, 1e-4, scale_invariant_weight_decay=0.0)}
    si = {id(p) for p in groups["scale_invariant"]["params"]}
    assert len(si) == 20 and id(model.conv1.weight) in si and id(model.layer2[0].downsample[0].weight) in si
    nd = {id(p) for p in groups["no_decay"]["params"]}
    assert id(model.bn1.weight) in nd and id(model.fc.bias) in nd
    assert [id(p) for p in groups["decay"]["params"]] == [id(model.fc.weight)]
    assert groups["scale_invariant"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 1e-4
    n = sum(len(g["params"]) for g in groups.values())
    assert n == len(list(model.parameters()))
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    vg = {g["name"]: g for g in normswap.param_groups(vit, 1e-3, 0.05)}
    assert "scale_invariant" not in vg  # layer norms are not per-channel batch statistics
    assert id(vit.blocks[0].norm1.weight) in {id(p) for p in vg["no_decay"]["params"]}
    assert id(vit.cls_token) in {id(p) for p in vg["decay"]["params"]}
    assert id(vit.blocks[0].attn.qkv.weight) in {id(p) for p in vg["decay"]["params"]}


def test_online_correction_matches_weight_decay_exactly_in_float64():
    """150 plain-SGD steps: with weight decay vs without + mode='online'."""
    data = study.batches(150)
    ref = study.train(1e-14, False, 0.0, 150, data=data)
    cor = study.train(1e-14, "online", 0.0, 150, data=data)
    nowd = study.train(1e-14, False, 0.0, 150, wd=0.0, data=data)
    assert study.direction_gap(ref, cor) < 1e-6          # measured ~2e-15
    assert study.direction_gap(ref, nowd) > 1e-3         # weight decay matters here
    # the non-scale-invariant parameters follow the same trajectory too
    torch.testing.assert_close(ref[-1].weight, cor[-1].weight, rtol=1e-9, atol=1e-12)
    # weight norms differ: no weight decay lets them grow
    assert cor[0].weight.norm() > ref[0].weight.norm()


@pytest.mark.parametrize("nesterov,dampening", [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_online_correction_is_exact_with_momentum(nesterov, dampening):
    """Momentum 0.9 at lr 0.1 (where the old per-channel shadow was no better than no
    correction), with an LR change half way: the run without weight decay + LRCorrection
    stays a per-channel multiple of the run with weight decay, every step."""
    data = study.batches(60)

    def run(wd_in_sgd, correction):
        net = study.make_net(1e-14)
        groups = normswap.param_groups(net, 0.1, 5e-3, scale_invariant_weight_decay=None if wd_in_sgd else 0.0)
        opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=nesterov, dampening=dampening)
        if correction:
            opt = normswap.LRCorrection(opt, net, weight_decay=5e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, 30, gamma=0.3)
        dirs = []
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            sched.step()
            dirs.append(net[3].weight.detach().reshape(8, -1).clone())
        return net, dirs

    ref, ref_dirs = run(True, False)
    cor, cor_dirs = run(False, True)
    nowd, _ = run(False, False)
    for a, b in zip(ref_dirs, cor_dirs):
        ua, ub = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
        assert (ua - ub).abs().max() < 1e-9
    assert study.direction_gap(ref, cor) < 1e-9
    assert study.direction_gap(ref, nowd) > 1e-2
    torch.testing.assert_close(ref[-1].weight, cor[-1].weight, rtol=1e-8, atol=1e-10)
    # the norms of the corrected run are C_t^-1 times the WD run's, the same C for every channel
    ratio = cor[3].weight.detach().reshape(8, -1).norm(dim=1) / ref[3].weight.detach().reshape(8, -1).norm(dim=1)
    torch.testing.assert_close(ratio, ratio[:1].expand(8), rtol=1e-9, atol=0)
    assert ratio[0] > 1.01


def test_momentum_recurrence_by_hand():
    """The C, Q recurrence of a first and second step of momentum SGD, written out."""
    net = _si_net()
    lr, mu, lam = 0.1, 0.9, 0.02
    opt = normswap.LRCorrection(torch.optim.SGD(normswap.param_groups(net, lr, lam, scale_invariant_weight_decay=0),
                                                lr=lr, momentum=mu), net, weight_decay=lam)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    factors = []
    for _ in range(2):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
        factors.append(float(opt.last_factors["0.weight"][0]))
    # step 0: Q1 = lam, C1 = 1 - lr lam; step 1: Q2 = mu lam + lam C1, C2 = C1 - lr Q2
    c1 = 1 - lr * lam
    q2 = mu * lam + lam * c1
    c2 = c1 - lr * q2
    assert factors == pytest.approx([1 / c1, 1 / (c1 * c2)], rel=1e-12)


def test_renormalization_keeps_the_function_and_exactness():
    """A high threshold forces several power-of-two renormalizations in 60 steps."""
    data = study.batches(60)

    def run(renorm):
        net = study.make_net(1e-14)
        groups = normswap.param_groups(net, 0.1, 2e-2, scale_invariant_weight_decay=0.0)
        opt = normswap.LRCorrection(torch.optim.SGD(groups, lr=0.1, momentum=0.9), net, weight_decay=2e-2,
                                    renormalize=renorm)
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        return net, opt

    ref = study.train(1e-14, False, 0.9, 60, wd=2e-2, data=data)
    never, _ = run(0.0)
    often, opt = run(0.9)
    assert opt._scale["0.weight"][1] >= 0.7  # C was brought back
    assert never[0].weight.norm() > 1.5 * often[0].weight.norm()
    assert study.direction_gap(ref, never) < 1e-9
    assert study.direction_gap(ref, often) < 1e-9
    torch.testing.assert_close(ref[-1].weight, often[-1].weight, rtol=1e-8, atol=1e-10)


def test_default_eps_and_reference_mode_deviation_is_bounded():
    data = study.batches(150)
    ref = study.train(1e-5, False, 0.0, 150, data=data)
    cor = study.train(1e-5, "online", 0.0, 150, data=data)
    assert study.direction_gap(ref, cor) < 1e-4          # measured ~2.8e-6 (eps breaks exact invariance)
    ref = study.train(1e-14, False, 0.9, 150, lr=0.01, data=data)
    norms = study.train.last_norms
    cor = study.train(1e-14, "reference", 0.9, 150, lr=0.01, data=data, reference=norms)
    nowd = study.train(1e-14, False, 0.9, 150, lr=0.01, wd=0.0, data=data)
    gap, base = study.direction_gap(ref, cor), study.direction_gap(ref, nowd)
    assert gap < base / 2  # reference mode is an approximation, measured 0.0056 vs 0.022


def _si_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, eps=1e-14), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).double()


def test_reference_mode_uses_the_recorded_norms(tmp_path):
    data = study.batches(6)
    wd_net = _si_net()
    rec = normswap.NormRecorder(wd_net)
    opt = torch.optim.SGD(normswap.param_groups(wd_net, 0.1, 1e-2), lr=0.1)
    for epoch in range(3):
        for x, y in data[epoch * 2:(epoch + 1) * 2]:
            opt.zero_grad()
            nn.functional.cross_entropy(wd_net(x[:, :, :8, :8]), y % 2).backward()
            opt.step()
        rec.record(epoch)
    rec.save(tmp_path / "norms.safetensors")
    ref = normswap.NormRecorder.load(tmp_path / "norms.safetensors")
    assert ref["0.weight"].shape == (3, 4)
    torch.testing.assert_close(ref["0.weight"][-1], wd_net[0].weight.detach().reshape(4, -1).norm(dim=1).float())

    net = _si_net()
    opt = normswap.LRCorrection(torch.optim.SGD(normswap.param_groups(net, 0.1, 1e-2, scale_invariant_weight_decay=0),
                                                lr=0.1), net, weight_decay=1e-2, mode="reference",
                                reference=str(tmp_path / "norms.safetensors"))
    opt.set_epoch(1)
    x, y = data[0]
    net.zero_grad()
    nn.functional.cross_entropy(net(x[:, :, :8, :8]), y % 2).backward()
    w = net[0].weight.detach().clone()
    g = net[0].weight.grad.detach().clone()
    opt.step()
    factor = w.reshape(4, -1).norm(dim=1) ** 2 / ref["0.weight"][1].double() ** 2
    torch.testing.assert_close(net[0].weight.detach(), w - 0.1 * factor.view(4, 1, 1, 1) * g)
    torch.testing.assert_close(opt.last_factors["0.weight"], factor)


def test_resume_from_state_dict_continues_exactly():
    data = study.batches(20)

    def make():
        net = study.make_net(1e-5)
        groups = normswap.param_groups(net, 0.05, 1e-3, scale_invariant_weight_decay=0)
        return net, normswap.LRCorrection(torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True), net,
                                          weight_decay=1e-3, renormalize=0.995)

    def steps(net, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

    net, opt = make()
    steps(net, opt, data)
    net2, opt2 = make()
    steps(net2, opt2, data[:10])
    state = copy.deepcopy((net2.state_dict(), opt2.state_dict()))
    net3, opt3 = make()
    net3.load_state_dict(state[0])
    opt3.load_state_dict(state[1])
    steps(net3, opt3, data[10:])
    for a, b in zip(net.parameters(), net3.parameters()):
        assert torch.equal(a, b)


def test_lr_correction_errors():
    net = _si_net()
    with pytest.raises(ValueError, match="supports torch.optim.SGD"):
        normswap.LRCorrection(torch.optim.Adam(net.parameters()), net, weight_decay=1e-4)
    with pytest.raises(ValueError, match="weight_decay=0.1.*scale_invariant_weight_decay=0"):
        normswap.LRCorrection(torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=0.1), net, weight_decay=1e-4)
    with pytest.raises(ValueError, match="none of the optimizer's parameters"):
        normswap.LRCorrection(torch.optim.SGD(net[4].parameters(), lr=0.1), net, weight_decay=1e-4)
    with pytest.raises(ValueError, match="renormalize must be in"):
        normswap.LRCorrection(torch.optim.SGD(net.parameters(), lr=0.1), net, weight_decay=1e-4, renormalize=1.0)
    with pytest.raises(ValueError, match="steps_per_epoch must be"):
        normswap.LRCorrection(torch.optim.SGD(net.parameters(), lr=0.1), net, weight_decay=1e-4, steps_per_epoch=0)
    with pytest.raises(ValueError, match="lr \\* weight_decay too large"):
        opt = normswap.LRCorrection(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net, weight_decay=0.05)
        net.zero_grad()
        net(torch.randn(2, 3, 8, 8, dtype=torch.float64)).sum().backward()
        opt.step()
    with pytest.raises(ValueError, match="needs reference="):
        normswap.LRCorrection(torch.optim.SGD(net.parameters(), lr=0.1), net, weight_decay=1e-4, mode="reference")
    opt = normswap.LRCorrection(torch.optim.SGD(net.parameters(), lr=0.1), net, weight_decay=1e-4)
    assert opt.param_groups is opt.optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)  # works with torch schedulers
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_reference_mode_interpolates_within_an_epoch():
    net = _si_net()
    w0 = net[0].weight.detach().reshape(4, -1).norm(dim=1)
    ref = {"0.weight": torch.stack([2 * torch.ones(4), 4 * torch.ones(4)])}
    opt = normswap.LRCorrection(torch.optim.SGD(net.parameters(), lr=1e-3), net, weight_decay=1e-2,
                                mode="reference", reference=ref, steps_per_epoch=4)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen = []
    for epoch, steps in ((0, 2), (1, 3), (2, 1)):
        opt.set_epoch(epoch)
        for _ in range(steps):
            w2 = net[0].weight.detach().reshape(4, -1).square().sum(dim=1)
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
            seen.append(w2 / opt.last_factors["0.weight"])  # the reference ||w||^2 used
    # epoch 0: from the initial norms to 2, t = 0, 1/4; epoch 1: from 2 to 4, t = 0, 1/4, 2/4
    # epoch 2 is past the records: the last record
    expect = [w0 ** 2, w0 ** 1.5 * 2 ** 0.5, torch.full((4,), 4.0, dtype=torch.float64),
              4 ** 0.75 * 16 ** 0.25 * torch.ones(4, dtype=torch.float64),
              4 ** 0.5 * 16 ** 0.5 * torch.ones(4, dtype=torch.float64), torch.full((4,), 16.0, dtype=torch.float64)]
    for a, b in zip(seen, expect):
        torch.testing.assert_close(a, b.double())
