"""Bounded weight norm, Lp weight norm, mean-only batch norm, and the bwn presets."""

import pytest
import timm
import torch
from torch import nn

import normswap
import normswap.norms as N
from normswap import Spec
from normswap.graph import scale_invariant_params

LAYERS = [  # (factory, input shape)
    (lambda: nn.Conv1d(3, 5, 3), (2, 3, 8)),
    (lambda: nn.Conv2d(4, 6, 3), (2, 4, 8, 8)),
    (lambda: nn.Conv2d(6, 6, 3, groups=6), (2, 6, 8, 8)),          # depthwise
    (lambda: nn.Conv3d(2, 4, 2), (2, 2, 4, 4, 4)),
    (lambda: nn.ConvTranspose2d(4, 6, 3), (2, 4, 5, 5)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), (2, 4, 5, 5)),  # channel (g, j) spans a block
    (lambda: nn.Linear(5, 7), (2, 5)),
]
IDS = ["conv1d", "conv2d", "depthwise", "conv3d", "convT", "convT-groups", "linear"]
P = [1, 2, "inf"]


def _channel_vectors(m, w):
    """Independent per-output-channel flattening (loops, no normswap code)."""
    if isinstance(m, nn.ConvTranspose2d):
        g = m.groups
        cin_g, cout_g = w.shape[0] // g, w.shape[1]
        return [w[gi * cin_g:(gi + 1) * cin_g, j].reshape(-1) for gi in range(g) for j in range(cout_g)]
    return [w[i].reshape(-1) for i in range(w.shape[0])]


def _pnorm(v, p):
    return v.abs().max() if p == "inf" else v.abs().pow(p).sum().pow(1.0 / p)


@pytest.mark.parametrize("p", P)
@pytest.mark.parametrize("make,shape", LAYERS, ids=IDS)
def test_rho_is_mean_initial_norm_and_every_channel_keeps_it_through_training(make, shape, p):
    torch.manual_seed(0)
    m = make().double()
    rho = torch.stack([_pnorm(v, p) for v in _channel_vectors(m, m.weight.detach())]).mean()
    N.bounded_weight_norm(m, p=p)
    bwn = m.parametrizations.weight[0]
    assert float(bwn.rho) == pytest.approx(float(rho), rel=1e-6)
    assert [n for n, _ in m.named_parameters()] == ["bias", "parametrizations.weight.original"]
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)  # built after: sees v
    for _ in range(5):
        opt.zero_grad()
        m(torch.randn(shape, dtype=torch.float64)).square().mean().backward()
        opt.step()
        for v in _channel_vectors(m, m.weight.detach()):
            assert float(_pnorm(v, p)) == pytest.approx(float(rho), rel=1e-9)
    assert not torch.equal(m.parametrizations.weight.original, m.weight)  # v moved, w bounded


@pytest.mark.parametrize("p", P)
@pytest.mark.parametrize("make,shape", LAYERS, ids=IDS)
def test_gradcheck_and_direct_formula(make, shape, p):
    torch.manual_seed(1)
    m = make().double()
    w0 = m.weight.detach().clone()
    N.bounded_weight_norm(m, p=p)
    bwn = m.parametrizations.weight[0]
    v = m.parametrizations.weight.original.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: bwn(t), (v,))
    # w_i = rho * v_i / ||v_i||_p, channel by channel
    rho = float(bwn.rho)
    for vi, wi in zip(_channel_vectors(m, v.detach()), _channel_vectors(m, bwn(v).detach())):
        torch.testing.assert_close(wi, rho * vi / _pnorm(vi, p))
    # learned gain: w_i = g_i * G0 / ||g||_2 * v_i / ||v_i||_p, gradients for v and g
    m2 = make().double()
    m2.weight.data.copy_(w0)
    N.bounded_weight_norm(m2, p=p, learn_gain=True)
    g = m2.parametrizations.weight[0]
    init = torch.stack([_pnorm(c, p) for c in _channel_vectors(m2, w0)])
    torch.testing.assert_close(g.gain.detach(), init)
    torch.testing.assert_close(m2.weight.detach(), w0)  # g_i = ||w_i|| reproduces w at start

    gain0 = g.gain.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda vv, gg: _with_gain(g, gg, vv), (v, gain0))
    scaled = torch.stack([c.norm() for c in _channel_vectors(m2, _with_gain(g, gain0 * 3, v).detach())])
    assert float(scaled.norm()) == pytest.approx(float(g.gain_norm), rel=1e-9) if p == 2 else True


def _with_gain(mod, gain, v):
    """Evaluate the parametrization with a given gain tensor (differentiably)."""
    saved = mod._parameters["gain"]
    try:
        del mod._parameters["gain"]
        mod.gain = gain
        return mod(v)
    finally:
        del mod.gain
        mod._parameters["gain"] = saved


def test_learned_gain_keeps_its_l2_norm():
    torch.manual_seed(0)
    m = N.bounded_weight_norm(nn.Conv2d(3, 8, 3), learn_gain=True)
    g = m.parametrizations.weight[0]
    g0 = float(g.gain_norm)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    for _ in range(5):
        opt.zero_grad()
        (m(torch.randn(2, 3, 6, 6)) * torch.randn(2, 8, 4, 4)).sum().backward()
        opt.step()
    norms = m.weight.detach().reshape(8, -1).norm(dim=1)   # per channel = effective gain
    assert float(norms.norm()) == pytest.approx(g0, rel=1e-5)
    assert float(g.gain.detach().norm()) != pytest.approx(g0, rel=1e-3)  # the raw gain moved


def test_remove_bounded_weight_norm_gives_the_same_outputs():
    torch.manual_seed(0)
    m = N.bounded_weight_norm(nn.Conv2d(3, 4, 3), p="inf")
    x = torch.randn(2, 3, 6, 6)
    y = m(x)
    N.remove_bounded_weight_norm(m)
    assert type(m) is nn.Conv2d and isinstance(m.weight, nn.Parameter)
    torch.testing.assert_close(m(x), y)
    with pytest.raises(ValueError, match="has no bounded weight norm"):
        N.remove_bounded_weight_norm(m)
    with pytest.raises(ValueError, match="supports Conv1d"):
        N.bounded_weight_norm(nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="p must be 1, 2 or 'inf'"):
        N.bounded_weight_norm(nn.Linear(2, 2), p=3)


# -- the bwn preset ---------------------------------------------------------------------
def _bwn_convs(model):
    return {n for n, m in model.named_modules() if N.is_bounded_weight_norm(m)}


def test_resnet50_bwn():
    model = timm.create_model("resnet50", pretrained=False)
    out = normswap.transform(model, "bwn")
    rep = normswap.report(out)
    assert len(rep.converted) == 53 and not rep.skipped
    assert isinstance(out.bn1, N.MeanOnlyBatchNorm2d) and "conv1" in _bwn_convs(out)
    assert len(_bwn_convs(out)) == 53  # 49 convs in blocks + 3 downsample + stem conv1
    assert all(s.preserves_function is False for s in rep.converted)
    y = out(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(y).all()
    y.sum().backward()


def test_efficientnet_depthwise_and_batchnormact():
    model = timm.create_model("efficientnet_b0", pretrained=False)
    out = normswap.transform(model, "bwn")
    dw = out.blocks[1][0].conv_dw
    assert dw.groups == dw.out_channels and N.is_bounded_weight_norm(dw)
    bn = out.blocks[1][0].bn1
    assert isinstance(bn, N.MeanOnlyBatchNorm2d) and hasattr(bn, "act")
    assert torch.isfinite(out(torch.randn(2, 3, 64, 64))).all()


def test_convnext_layernorm2d_after_depthwise_conv():
    model = timm.create_model("convnext_atto", pretrained=False)
    rep = normswap.plan(model, "bwn")
    blk = "stages.0.blocks.0"
    assert rep[f"{blk}.norm"].status == "converted" and f"{blk}.conv_dw" in rep[f"{blk}.norm"].note
    # downsample norms sit after a residual add: skipped with the reason
    assert rep["stages.1.downsample.0"].status == "skipped" and "add" in rep["stages.1.downsample.0"].reason
    out = normswap.transform(model, "bwn")
    assert isinstance(out.get_submodule(f"{blk}.norm"), N.MeanOnlyBatchNorm2d)
    assert torch.isfinite(out(torch.randn(2, 3, 64, 64))).all()


def test_vit_sites_are_skipped_with_reasons_or_sent_to_the_fallback():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    rep = normswap.plan(vit, "bwn")
    assert rep.counts()["skipped"] == 25
    assert all("residual add" in s.reason or "not a conv/linear" in s.reason for s in rep.skipped)
    with pytest.raises(normswap.TransformError, match="none can be converted"):
        normswap.transform(vit, "bwn")
    out = normswap.transform(vit, Spec("bwn", kwargs={"fallback": "ln-s"}))
    assert all(s.preset == "ln-s" and "bwn fallback" in s.note for s in normswap.report(out).converted)


class TwoConsumers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.conv(x)
        return self.bn2(self.conv2(self.bn(h))) + h  # conv's output also feeds the add


def test_conv_with_two_consumers_is_not_converted():
    rep = normswap.plan(TwoConsumers(), "bwn")
    assert rep["bn"].status == "skipped" and "has 2 users" in rep["bn"].reason
    assert rep["bn2"].status == "converted"
    out = normswap.transform(TwoConsumers(), Spec("bwn", kwargs={"fallback": "l1bn"}))
    assert isinstance(out.bn, N.L1BatchNorm2d) and isinstance(out.bn2, N.MeanOnlyBatchNorm2d)
    assert _bwn_convs(out) == {"conv2"}


def test_bwn_g_keeps_eval_outputs_of_a_pretrained_model():
    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False)
    with torch.no_grad():
        for m in model.modules():  # a "pretrained" model: non-trivial BN parameters
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
        model.bn1.weight[0] = 0.0  # a zero gamma must survive too
    model.train()
    for _ in range(2):
        model(torch.randn(4, 3, 64, 64))
    model.eval()
    out = normswap.transform(model, "bwn-g")
    assert all(s.preserves_function for s in normswap.report(out).converted)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)


def test_remove_after_transform_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    out = normswap.transform(model, "bwn")
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    out(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    out.eval()
    x = torch.randn(2, 3, 32, 32)
    y = out(x)
    fresh = normswap.transform(timm.create_model("resnet18", pretrained=False), "bwn").eval()
    fresh.load_state_dict(out.state_dict())
    assert torch.equal(fresh(x), y)
    assert "layer1.0.conv1.parametrizations.weight.0.rho" in out.state_dict()
    for name in _bwn_convs(out):
        N.remove_bounded_weight_norm(out.get_submodule(name))
    torch.testing.assert_close(out(x), y)


def test_scale_invariant_params():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU(),
                        nn.Flatten(), nn.LazyLinear(3) if False else nn.Identity())
    names = [s.name for s in scale_invariant_params(net)]
    assert names == ["0.weight"]  # the second conv feeds no normalizer
    out = normswap.transform(timm.create_model("resnet18", pretrained=False), "bwn")
    si = scale_invariant_params(out)
    assert len(si) == 20 and all(s.name.endswith("parametrizations.weight.original") for s in si)
    l1 = normswap.transform(timm.create_model("resnet18", pretrained=False), "l1bn")
    assert len(scale_invariant_params(l1)) == 20
    bns = normswap.transform(timm.create_model("resnet18", pretrained=False), "bn-s")
    assert scale_invariant_params(bns) == []  # sigma > 0: not scale invariant


def test_parametrized_weight_is_computed_once_per_forward():
    model = normswap.transform(timm.create_model("resnet18", pretrained=False), "bwn")
    calls = []
    for m in model.modules():
        if isinstance(m, N.BoundedWeightNorm):
            m.register_forward_hook(lambda mod, args, out: calls.append(mod))
    model(torch.randn(2, 3, 32, 32))
    assert len(calls) == 20 and len({id(c) for c in calls}) == 20


def _reference_bounded(v, s, g):
    """w = s v / ||v|| per output channel and dL/dv, dL/ds for dL/dw = g, by autograd on
    the PyTorch formula in float64 (no normswap code)."""
    v = v.detach().double().requires_grad_(True)
    s = s.detach().double().requires_grad_(True)
    dims = tuple(range(1, v.dim()))
    w = s * v / torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    gv, gs = torch.autograd.grad(w, (v, s), g.double())
    return w.detach(), gv, gs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gain", [False, True], ids=["rho", "gain"])
def test_p2_weights_take_the_kernels_and_match_a_float64_recomputation(dtype, gain, monkeypatch):
    """On CPU the bounded weight with p = 2 runs ns_bwn_forward / ns_bwn_backward (a
    channel at a time); forward and both gradients against autograd on the formula in
    float64, with a scalar rho and a per-channel gain; a channels-last weight and a strided
    gradient take the PyTorch form and agree as well; one and two threads give the same
    bits."""
    from normswap import kernels
    from normswap.norms.bwn import BoundedWeightFn
    names = []
    real = kernels.call
    monkeypatch.setattr(kernels, "call", lambda name, *a: (names.append(name), real(name, *a))[1])
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(48, 32, 5, 5, generator=gen, dtype=dtype)          # 38400 values: threaded
    s = (torch.rand((48, 1, 1, 1) if gain else (), generator=gen, dtype=dtype) + 0.5)
    g = torch.randn(v.shape, generator=gen, dtype=dtype)
    want_w, want_gv, want_gs = _reference_bounded(v, s, g)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    results = []
    for weight, grad in [(v, g), (v.to(memory_format=torch.channels_last), g),
                         (v, g.to(memory_format=torch.channels_last))]:
        names.clear()
        vv, ss = weight.clone().requires_grad_(True), s.clone().requires_grad_(True)
        w = BoundedWeightFn.apply(vv, ss, 2.0, (1, 2, 3))
        gv, gs = torch.autograd.grad(w, (vv, ss), grad)
        torch.testing.assert_close(w.double(), want_w, **tol)
        torch.testing.assert_close(gv.double(), want_gv, **tol)
        torch.testing.assert_close(gs.double(), want_gs, **tol)
        results.append((w, gv, gs))
        took = names.copy()
        if weight.is_contiguous():
            assert took[0] == "bwn_forward" and ("bwn_backward" in took) == grad.is_contiguous()
        else:
            assert "bwn_forward" not in took
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if threads == 1 else 1)
        vv, ss = v.clone().requires_grad_(True), s.clone().requires_grad_(True)
        w = BoundedWeightFn.apply(vv, ss, 2.0, (1, 2, 3))
        gv, gs = torch.autograd.grad(w, (vv, ss), g)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(w, results[0][0]) and torch.equal(gv, results[0][1]) and torch.equal(gs, results[0][2])


def test_p2_kernel_keeps_a_zero_channel_at_zero_and_a_nan_channel_in_its_channel():
    """A channel of zeros gives w = 0 (its norm clamped to the floor, as the PyTorch form),
    a NaN stays in its own channel."""
    from normswap.norms.bwn import BoundedWeightFn
    v = torch.randn(4, 3, 3, 3)
    v[1] = 0
    v[2, 0, 0, 0] = float("nan")
    w = BoundedWeightFn.apply(v, torch.tensor(1.0), 2.0, (1, 2, 3))
    assert torch.equal(w[1], torch.zeros(3, 3, 3))
    assert torch.isnan(w[2]).all()
    assert torch.isfinite(w[[0, 3]]).all()
