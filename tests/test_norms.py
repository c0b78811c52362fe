"""The normalizer family against independent float64 re-computations of PAPERS.md."""
import copy
import math

import pytest
import torch
from torch import nn

import normswap
import normswap.norms as N
from normswap.norms import C_L1, c_inf

from . import reference as ref

BATCH_LAYERS = [
    # (class, kind, input shape, kwargs)
    (N.L1BatchNorm1d, "l1", (6, 3), {}),
    (N.L1BatchNorm1d, "l1", (4, 3, 5), {}),
    (N.L1BatchNorm2d, "l1", (3, 4, 5, 5), {}),
    (N.L1BatchNorm3d, "l1", (2, 3, 3, 4, 4), {}),
    (N.TopKBatchNorm1d, "topk", (8, 3), {"k": 3}),
    (N.TopKBatchNorm2d, "topk", (3, 4, 5, 5), {"k": 10}),
    (N.TopKBatchNorm2d, "topk", (3, 4, 5, 5), {"k": 1}),
    (N.TopKBatchNorm3d, "topk", (2, 3, 3, 4, 4), {"k": 5}),
    (N.BatchNormStar1d, "l2", (4, 3, 5), {"sigma": 1.0}),
    (N.BatchNormStar2d, "l2", (3, 4, 5, 5), {"sigma": 1.0}),
    (N.BatchNormStar2d, "l2", (3, 4, 5, 5), {"sigma": 0.3, "learn_sigma": True}),
    (N.BatchNormStar3d, "l2", (2, 3, 3, 4, 4), {"sigma": 0.5}),
    (N.MeanOnlyBatchNorm1d, "mean", (6, 3), {}),
    (N.MeanOnlyBatchNorm2d, "mean", (3, 4, 5, 5), {}),
    (N.MeanOnlyBatchNorm3d, "mean", (2, 3, 3, 4, 4), {}),
]
IDS = [f"{c.__name__}-{len(s)}d-{kw}" for c, _, s, kw in BATCH_LAYERS]


def _make(cls, shape, kw, dtype=torch.float64):
    torch.manual_seed(0)
    m = cls(shape[1], **kw).to(dtype)
    with torch.no_grad():  # non-trivial affine so that it is tested too
        if getattr(m, "weight", None) is not None:
            m.weight.uniform_(0.5, 1.5)
        if getattr(m, "bias", None) is not None:
            m.bias.uniform_(-0.5, 0.5)
    return m


def _input(shape, dtype=torch.float64, scale=2.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + 0.7).to(dtype)


def _sigma(m):
    s = getattr(m, "sigma", 0.0)
    return float(s.detach()) if torch.is_tensor(s) else float(s)


def _running_stat(m):
    return getattr(m, m._stat_buffer) if m._stat_buffer else None


# -- forward ----------------------------------------------------------------------
@pytest.mark.parametrize("cls,kind,shape,kw", BATCH_LAYERS, ids=IDS)
def test_batch_forward_train_matches_reference(cls, kind, shape, kw):
    m = _make(cls, shape, kw).train()
    x = _input(shape)
    y = m(x)
    want = ref.batch_norm_train(x, kind, m.weight, m.bias, eps=m.eps, sigma=_sigma(m), k=kw.get("k"))
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("cls,kind,shape,kw", BATCH_LAYERS, ids=IDS)
def test_batch_running_stats_and_eval_match_reference(cls, kind, shape, kw):
    m = _make(cls, shape, kw).train()
    xs = [_input(shape, seed=s) for s in (1, 2, 3)]
    rm = torch.zeros(shape[1], dtype=torch.float64)
    rs = torch.ones(shape[1], dtype=torch.float64)
    n = xs[0].numel() // shape[1]
    for x in xs:
        m(x)
        mu, s = ref.bn_stats(x, kind, kw.get("k"))
        if kind == "l2":
            s = s * n / (n - 1)          # unbiased running variance, as nn.BatchNorm
        elif kind == "topk":
            s = c_inf(n) * s             # calibrated top-k scale (see TopKBatchNorm docs)
        rm = 0.9 * rm + 0.1 * mu
        rs = 0.9 * rs + 0.1 * s
    torch.testing.assert_close(m.running_mean, rm, rtol=1e-10, atol=1e-12)
    if kind != "mean":
        torch.testing.assert_close(_running_stat(m), rs, rtol=1e-10, atol=1e-12)
    assert int(m.num_batches_tracked) == 3
    m.eval()
    x = _input(shape, seed=9)
    want = ref.batch_norm_eval(x, kind, rm, rs if kind != "mean" else None, m.weight, m.bias,
                               eps=m.eps, sigma=_sigma(m))
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)


def test_cumulative_average_when_momentum_is_none():
    m = N.L1BatchNorm2d(3, momentum=None).double()
    xs = [_input((2, 3, 4, 4), seed=s) for s in range(4)]
    for x in xs:
        m(x)
    means = torch.stack([ref.bn_stats(x, "l1")[0] for x in xs]).mean(0)
    mads = torch.stack([ref.bn_stats(x, "l1")[1] for x in xs]).mean(0)
    torch.testing.assert_close(m.running_mean, means)
    torch.testing.assert_close(m.running_mad, mads)


def test_non_finite_batch_leaves_running_stats_untouched():
    for m in (N.L1BatchNorm2d(3), N.TopKBatchNorm2d(3, k=2), N.BatchNormStar2d(3), N.MeanOnlyBatchNorm2d(3)):
        m(torch.randn(2, 3, 4, 4))
        before = {k: v.clone() for k, v in m.state_dict().items()}
        x = torch.randn(2, 3, 4, 4)
        x[0, 1, 0, 0] = float("inf")
        m(x)
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), (type(m).__name__, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_update_on_the_cpu_gives_the_device_forms_bits(dtype, momentum, monkeypatch):
    """On CPU tensors in eager mode the running update tests finiteness as a Python bool
    (``finite_now``) and lerps every buffer in one call; GPUs and torch.compile run the
    form without a host test (``all_finite``'s tensor, ``where``, one ``lerp_`` a buffer).
    Both give the same buffers and count, bit for bit, over batches with NaN, inf and (in
    float64) values whose sum overflows though each is finite; so do the two forms of
    ``copy_running_`` (the native path's guarded copy), which keeps the last finite batch."""
    from normswap.norms import running
    gen = torch.Generator().manual_seed(0)
    batches = [[torch.randn(7, generator=gen, dtype=dtype), torch.rand(7, generator=gen, dtype=dtype)]
               for _ in range(12)]
    batches[3][1][2] = float("nan")
    batches[6][0][0] = float("-inf")
    if dtype == torch.float64:
        batches[8][0][:] = 1e308          # finite, but 7e308 as a sum
    results, copies = [], []
    for host_test in (True, False):
        if not host_test:
            monkeypatch.setattr(running, "finite_now", lambda *stats: None)
        bufs, count = [torch.zeros(7, dtype=dtype), torch.ones(7, dtype=dtype)], torch.tensor(0)
        for values in batches:
            running.update_running_(bufs, values, count, momentum)
        results.append((bufs, int(count)))
        kept, kept_count = [torch.zeros(7, dtype=dtype), torch.ones(7, dtype=dtype)], torch.tensor(0)
        for values in batches:   # (the native path's form: copies of a kernel's update)
            running.copy_running_(kept, values, kept_count)
        copies.append((kept, int(kept_count)))
    (cpu_bufs, cpu_count), (dev_bufs, dev_count) = results
    assert cpu_count == dev_count == 10
    for a, b in zip(cpu_bufs, dev_bufs):
        assert torch.equal(a, b)
        assert torch.isfinite(a).all()
    (cpu_kept, cpu_kept_count), (dev_kept, dev_kept_count) = copies
    assert cpu_kept_count == dev_kept_count == 10
    for a, b, last_finite in zip(cpu_kept, dev_kept, batches[11]):
        assert torch.equal(a, b) and torch.equal(a, last_finite)


def test_track_running_stats_false_uses_batch_stats_in_eval():
    m = N.L1BatchNorm2d(3, track_running_stats=False, affine=False).double().eval()
    x = _input((2, 3, 4, 4))
    torch.testing.assert_close(m(x), ref.batch_norm_train(x, "l1"))
    assert m.running_mean is None and m.running_mad is None


def test_reset_running_stats():
    m = N.TopKBatchNorm2d(3, k=2)
    m(torch.randn(2, 3, 4, 4) * 5 + 3)
    m.reset_running_stats()
    assert torch.equal(m.running_mean, torch.zeros(3)) and torch.equal(m.running_std, torch.ones(3))
    assert int(m.num_batches_tracked) == 0


def test_batch_norm_star_with_zero_sigma_is_native_batch_norm():
    x = torch.randn(4, 5, 6, 6)
    star, bn = N.BatchNormStar2d(5, sigma=0.0), nn.BatchNorm2d(5)
    torch.testing.assert_close(star(x), bn(x))
    torch.testing.assert_close(star.running_var, bn.running_var)
    star.eval(), bn.eval()
    torch.testing.assert_close(star(x), bn(x))


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4), (2, 2, 3, 4)])
def test_layer_norm_star_matches_reference(shape, affine):
    m = N.LayerNormStar(shape[-1:] if len(shape) < 4 else shape[-2:], sigma=0.5,
                        elementwise_affine=affine).double()
    if affine:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-1, 1)
    x = _input(shape)
    want = ref.layer_norm_star(x, len(m.normalized_shape), 0.5, gamma=m.weight, beta=m.bias)
    for mode in (m.train(), m.eval()):  # no batch dependence: same in both modes
        torch.testing.assert_close(mode(x), want, rtol=1e-10, atol=1e-10)


def test_layer_norm_star_2d_matches_reference():
    m = N.LayerNormStar2d(4, sigma=0.5).double()
    x = _input((2, 4, 3, 5))
    want = ref.layer_norm_star(x.permute(0, 2, 3, 1), 1, 0.5).permute(0, 3, 1, 2)
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)
    m.l1_alpha, m.learn_sigma = 0.1, False  # the composed (penalty) path gives the same
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)


@pytest.fixture(params=["pooled", "shifted"])
def box_sums(request, monkeypatch):
    """Both eager forms of DN's box sums: one avg_pool2d call (small maps) and shifted
    slices (larger maps, and torch.compile)."""
    from normswap.norms import divisive
    monkeypatch.setattr(divisive, "_POOL_MAX_WORK", 1 << 62 if request.param == "pooled" else 0)
    return request.param


@pytest.mark.parametrize("sum_w,sup_w", [(5, 5), (3, 3), (5, 7), ((3, 5), 1)])
def test_divisive_norm_2d_matches_reference(sum_w, sup_w, box_sums):
    m = N.DivisiveNorm2d(sum_w, sup_w, sigma=0.5).double()
    x = _input((2, 3, 6, 7))
    pair = lambda w: (w, w) if isinstance(w, int) else w
    want = ref.divisive_norm_2d(x, pair(sum_w), pair(sup_w), 0.5)
    torch.testing.assert_close(m.train()(x), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.eval()(x), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape,radius,sup", [((3, 20), 4, None), ((2, 3, 17), 3, 5), ((2, 9), 30, None)])
def test_divisive_norm_1d_matches_reference(shape, radius, sup, path):
    m = N.DivisiveNorm1d(radius=radius, sup_radius=sup, sigma=0.5).double()
    x = _input(shape)
    want = ref.divisive_norm_1d(x, radius, radius if sup is None else sup, 0.5)
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)


def test_divisive_norm_affine():
    m = N.DivisiveNorm2d(3, 3, num_channels=3, affine=True).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.0, 2.0, 3.0])), m.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = _input((2, 3, 5, 5))
    want = ref.divisive_norm_2d(x, (3, 3), (3, 3), 0.5) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) \
        + torch.tensor([0.0, 1.0, -1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(m(x), want)


def test_constants():
    assert C_L1 == pytest.approx(math.sqrt(math.pi / 2), rel=1e-15)
    for n in (2, 100, 10 ** 6):
        assert c_inf(n) == pytest.approx(0.5 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(n)))
    # For Gaussian data, C_L1 * mean|v| estimates the standard deviation.
    g = torch.Generator().manual_seed(0)
    v = torch.randn(200000, generator=g, dtype=torch.float64) * 3.0
    assert (C_L1 * (v - v.mean()).abs().mean()).item() == pytest.approx(3.0, rel=0.01)
    with pytest.raises(ValueError):
        c_inf(1)


@pytest.mark.parametrize("k", [1, 10])
def test_top_k_on_long_channels_matches_reference(k):
    """1024 values per channel, against the reference; gradients by gradcheck (fast mode)."""
    m = _make(N.TopKBatchNorm2d, (4, 3, 16, 16), {"k": k}).train()
    x = _input((4, 3, 16, 16))
    want = ref.batch_norm_train(x, "topk", m.weight, m.bias, eps=m.eps, k=k)
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)
    w = _input((4, 3, 16, 16), seed=7)
    assert torch.autograd.gradcheck(lambda x, *p: (m(x) * w).sum(), _grad_inputs(m, x), fast_mode=True)


def test_top_k_with_ties_takes_k_values():
    x = torch.tensor([[3.0, 3.0, 3.0, 1.0, -5.0, 0.0], [2.0, -2.0, 2.0, 2.0, 0.0, 1.0]], dtype=torch.float64)
    m = N.TopKLayerNorm(6, k=2, elementwise_affine=False).double()
    torch.testing.assert_close(m(x), ref.area_norm(x, "layer", "topk", k=2)[0], rtol=1e-12, atol=1e-12)
    xs = torch.randn(3, 6, dtype=torch.float64).requires_grad_()  # (differentiable away from ties)
    assert torch.autograd.gradcheck(lambda a: (m(a) * torch.arange(6.0)).sum(), (xs,))


# -- backward ---------------------------------------------------------------------
def _grad_inputs(m, x):
    return (x.requires_grad_(),) + tuple(p for p in m.parameters())


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("cls,kind,shape,kw", BATCH_LAYERS, ids=IDS)
def test_batch_gradcheck(cls, kind, shape, kw, mode):
    m = _make(cls, shape, kw)
    m(_input(shape, seed=5))  # non-trivial running stats for eval
    getattr(m, mode)()
    x = _input(shape)
    w = _input(shape, seed=7)

    def f(x, *params):
        return (m(x) * w).sum()
    assert torch.autograd.gradcheck(f, _grad_inputs(m, x))


_MAPS = [(c, k, s, kw) for c, k, s, kw in BATCH_LAYERS if len(s) >= 4]


@pytest.mark.parametrize("cls,kind,shape,kw", _MAPS, ids=[f"{c.__name__}-{len(s)}d-{kw}" for c, _, s, kw in _MAPS])
def test_batch_layers_on_channels_last_input_match_reference(cls, kind, shape, kw, path):
    """Channels-last maps (the compiled kernels read their columns in place): the training
    forward and the running statistics against the float64 re-computation, the output in
    the input's layout, gradients (with the L1 penalty on) by gradcheck on the
    channels-last input itself."""
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    m = _make(cls, shape, kw).train()
    x = _input(shape).contiguous(memory_format=fmt)
    y = m(x)
    want = ref.batch_norm_train(x, kind, m.weight, m.bias, eps=m.eps, sigma=_sigma(m), k=kw.get("k"))
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    assert y.is_contiguous(memory_format=fmt)
    mu, _ = ref.bn_stats(x, kind, kw.get("k"))
    torch.testing.assert_close(m.running_mean, 0.1 * mu, rtol=1e-10, atol=1e-12)
    m.l1_alpha = 0.25 if kind != "mean" else 0.0
    w = _input(shape, seed=7)
    assert torch.autograd.gradcheck(lambda x, *p: (m(x) * w).sum() + normswap.penalty(m),
                                    _grad_inputs(m, x.requires_grad_()))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("make,shape", [
    (lambda: N.LayerNormStar(5, sigma=0.5, learn_sigma=True, elementwise_affine=True), (3, 4, 5)),
    (lambda: N.LayerNormStar(5, sigma=0.5), (3, 5)),
    (lambda: N.LayerNormStar2d(3, sigma=0.5, learn_sigma=True, affine=True), (2, 3, 4, 4)),
    (lambda: N.DivisiveNorm2d(3, 5, sigma=0.5, learn_sigma=True, num_channels=3, affine=True), (2, 3, 5, 6)),
    (lambda: N.DivisiveNorm2d(5, 5, sigma=0.5), (2, 3, 5, 5)),
    (lambda: N.DivisiveNorm1d(radius=2, sigma=0.5, learn_sigma=True), (2, 3, 9)),
], ids=["LNs-learned", "LNs", "LNs2d-learned", "DN-learned", "DN", "DN1d-learned"])
def test_per_example_gradcheck(make, shape, mode, path, box_sums):
    m = getattr(make().double(), mode)()
    x = _input(shape)
    w = _input(shape, seed=7)
    assert torch.autograd.gradcheck(lambda x, *p: (m(x) * w).sum(), _grad_inputs(m, x))


def test_learned_sigma_gets_gradient_and_changes_output():
    m = N.DivisiveNorm2d(3, 3, sigma=0.5, learn_sigma=True)
    assert [n for n, _ in m.named_parameters()] == ["sigma"]
    m(torch.randn(2, 3, 5, 5)).square().sum().backward()
    assert m.sigma.grad is not None and m.sigma.grad.abs() > 0


# -- penalty ----------------------------------------------------------------------
@pytest.mark.parametrize("make,shape,mean_abs_v", [
    (lambda: N.L1BatchNorm2d(3), (2, 3, 4, 4), ref.centered_mean_abs_batch),
    (lambda: N.TopKBatchNorm2d(3, k=2), (2, 3, 4, 4), ref.centered_mean_abs_batch),
    (lambda: N.BatchNormStar2d(3), (2, 3, 4, 4), ref.centered_mean_abs_batch),
    (lambda: N.MeanOnlyBatchNorm1d(3), (5, 3), ref.centered_mean_abs_batch),
    (lambda: N.LayerNormStar(6), (3, 6), lambda x: (x - x.mean(-1, keepdim=True)).abs().mean()),
    (lambda: N.LayerNormStar2d(3), (2, 3, 4, 4), lambda x: (x - x.mean(1, keepdim=True)).abs().mean()),
    (lambda: N.DivisiveNorm2d(1, 3), (2, 3, 4, 4), lambda x: (x - x.mean(1, keepdim=True)).abs().mean()),
], ids=["l1bn", "topk", "bn*", "meanonly", "ln*", "ln*2d", "dn*"])
def test_penalty_value_and_gradient(make, shape, mean_abs_v):
    m = make().double()
    m.l1_alpha = 0.25
    x = _input(shape).requires_grad_()
    m(x)
    p = normswap.penalty(m)
    torch.testing.assert_close(p, 0.25 * mean_abs_v(x.detach().double()))
    assert torch.autograd.gradcheck(lambda x: (m(x), normswap.penalty(m))[1], (x,))


def test_penalty_sums_sites_counts_repeated_calls_and_is_zero_without_alpha():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn1 = N.L1BatchNorm2d(4, l1_alpha=0.1)
            self.bn2 = N.BatchNormStar2d(4, l1_alpha=0.2)
            self.plain = N.L1BatchNorm2d(4)

        def forward(self, x):
            a = self.conv(x)
            b = self.bn1(a)
            c = self.bn2(b)
            d = self.bn1(c)       # bn1 called twice: both calls count
            return self.plain(d)

    net = Net().double()
    x = _input((2, 3, 5, 5))
    normswap.penalty(net)  # installs the per-forward reset
    seen = {"bn1": [], "bn2": []}
    for name in seen:
        getattr(net, name).register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0].detach()))
    net(x)
    (a, c), (b,) = seen["bn1"], seen["bn2"]
    want = 0.1 * ref.centered_mean_abs_batch(a) + 0.2 * ref.centered_mean_abs_batch(b) \
        + 0.1 * ref.centered_mean_abs_batch(c)
    torch.testing.assert_close(normswap.penalty(net), want)
    net(x)  # a second forward does not add up with the first
    torch.testing.assert_close(normswap.penalty(net), want)
    net.eval()(x)  # no penalty outside training
    assert normswap.penalty(nn.Sequential(nn.Linear(2, 2))).item() == 0.0
    plain = nn.Sequential(N.L1BatchNorm2d(3))
    plain(x.float())
    assert normswap.penalty(plain).item() == 0.0


def test_penalty_survives_deepcopy_and_state_dict():
    m = N.L1BatchNorm2d(3, l1_alpha=0.1)
    m(torch.randn(2, 3, 4, 4))
    m2 = copy.deepcopy(m)
    assert m2.penalty_term() is None
    assert "l1_alpha" not in m.state_dict()


# -- state dict, repr, fx leaf ------------------------------------------------------
ALL_LAYERS = [lambda: N.L1BatchNorm2d(4), lambda: N.TopKBatchNorm1d(4, k=3),
              lambda: N.BatchNormStar3d(4, learn_sigma=True), lambda: N.MeanOnlyBatchNorm2d(4),
              lambda: N.LayerNormStar(4, elementwise_affine=True), lambda: N.LayerNormStar2d(4, affine=True),
              lambda: N.DivisiveNorm2d(3, 3, learn_sigma=True, num_channels=4, affine=True),
              lambda: N.DivisiveNorm1d(2, num_features=4, affine=True)]


@pytest.mark.parametrize("make", ALL_LAYERS)
def test_state_dict_round_trip_and_repr(make):
    torch.manual_seed(0)
    a = make()
    shape = {N.TopKBatchNorm1d: (6, 4), N.BatchNormStar3d: (2, 4, 3, 3, 3), N.LayerNormStar: (3, 4),
             N.DivisiveNorm1d: (3, 4)}.get(type(a), (2, 4, 5, 5))
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.rand_like(p))
    a.train()(torch.randn(shape) * 3 + 1)
    b = make()
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    x = torch.randn(shape)
    assert torch.equal(a.eval()(x), b.eval()(x))
    r = repr(a)
    assert r.startswith(type(a).__name__ + "(") and "=" in r


def test_every_normalizer_is_an_fx_leaf():
    from timm.layers import is_notrace_module
    for name in N.__all__:
        obj = getattr(N, name)
        if isinstance(obj, type) and issubclass(obj, N.NormalizerBase) and not name.startswith(("Normalizer", "BatchStat")):
            assert is_notrace_module(obj), name
    net = nn.Sequential(nn.Conv2d(3, 4, 1), N.L1BatchNorm2d(4), N.DivisiveNorm2d(3, 3))
    from normswap.norms.base import NORMSWAP_LEAF_MODULES
    tracer = torch.fx.Tracer()
    tracer.is_leaf_module = lambda m, q: type(m) in NORMSWAP_LEAF_MODULES or torch.fx.Tracer.is_leaf_module(tracer, m, q)
    graph = tracer.trace(net)
    targets = [n.target for n in graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1", "2"]


def test_not_a_torch_batchnorm_so_convert_sync_batchnorm_leaves_it_alone():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), N.L1BatchNorm2d(4))
    out = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert isinstance(out[1], N.L1BatchNorm2d)
    N.convert_sync(out)
    assert out[1].sync and "sync=True" in repr(out[1])


# -- bad input ----------------------------------------------------------------------
@pytest.mark.parametrize("make,x,match", [
    (lambda: N.L1BatchNorm2d(3), torch.randn(2, 3, 4), r"L1BatchNorm2d: expected a 4D input"),
    (lambda: N.L1BatchNorm2d(3), torch.randn(2, 5, 4, 4), r"L1BatchNorm2d: expected 3 channels"),
    (lambda: N.TopKBatchNorm1d(3), torch.randn(2, 3, 4, 4), r"TopKBatchNorm1d: expected a 2D or 3D"),
    (lambda: N.MeanOnlyBatchNorm1d(3), torch.randn(1, 3), r"more than 1 value per channel"),
    (lambda: N.TopKBatchNorm2d(3, k=10), torch.randn(2, 3, 2, 2), r"k=10 is larger than the 8 values"),
    (lambda: N.LayerNormStar(8), torch.randn(2, 7), r"LayerNormStar: expected an input whose last 1 dims are \(8,\)"),
    (lambda: N.LayerNormStar2d(3), torch.randn(2, 4, 5, 5), r"LayerNormStar2d: expected 3 channels"),
    (lambda: N.DivisiveNorm2d(), torch.randn(2, 3, 4), r"DivisiveNorm2d: expected a 4D input"),
    (lambda: N.DivisiveNorm1d(num_features=5), torch.randn(2, 4), r"DivisiveNorm1d: expected 5 channels"),
    (lambda: N.DivisiveNorm1d(), torch.randn(4), r"DivisiveNorm1d: expected a 2D or 3D or"),
])
def test_bad_input_gives_clear_error(make, x, match):
    with pytest.raises(ValueError, match=match):
        make()(x)


@pytest.mark.parametrize("make,match", [
    (lambda: N.DivisiveNorm2d(sum_window=4), "odd positive"),
    (lambda: N.TopKBatchNorm2d(3, k=0), "k must be a positive int"),
    (lambda: N.L1BatchNorm2d(0), "num_features must be a positive int"),
    (lambda: N.L1BatchNorm2d(3, momentum=2.0), "momentum"),
    (lambda: N.LayerNormStar(3, sigma=-1.0), "sigma must be >= 0"),
    (lambda: N.DivisiveNorm2d(affine=True), "affine=True needs num_channels"),
    (lambda: N.L1BatchNorm2d(3, l1_alpha=-1), "l1_alpha must be >= 0"),
])
def test_bad_arguments_give_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- second derivatives ---------------------------------------------------------------
SECOND_ORDER_LAYERS = [
    (lambda: N.L1LayerNorm(8), (4, 8)),
    (lambda: N.TopKBatchNorm2d(4, k=2), (4, 4, 3, 3)),
    (lambda: N.BatchNormStar2d(4, learn_sigma=True), (4, 4, 3, 3)),
    (lambda: N.IterNorm2d(16), (4, 16, 3, 3)),
    (lambda: N.DivisiveNorm1d(2), (3, 20)),
    (lambda: N.DivisiveNorm2d(3, 3), (2, 3, 5, 5)),
]


@pytest.mark.parametrize("make,shape", SECOND_ORDER_LAYERS,
                         ids=["l1-layer", "topk-batch", "bn*-learned", "iternorm", "dn1d", "dn2d"])
def test_a_second_derivative_through_a_layer_is_refused_not_silently_wrong(make, shape, path):
    """The layers' hand-written backwards give first derivatives only. A gradient penalty
    (create_graph=True, then differentiating the gradient) used to get a gradient that did
    not depend on x through the layer: a wrong second derivative and no error. Now
    create_graph=True raises an error that says so; the plain first derivative is unchanged."""
    m = make().double().train()
    x = _input(shape).requires_grad_()
    w = _input(shape, seed=7)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad((m(x) * w).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad((m(x) * w).sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_the_mean_only_layer_keeps_its_second_derivative(path):
    """The mean-only backward, dx = dy - mean(dy) per channel, uses nothing it saved: a
    gradient penalty through it stays exact (here d/dx of sum(dx^2) is 0, so the penalty's
    gradient is that of sum(x^2))."""
    m = N.MeanOnlyBatchNorm2d(3).double().train()
    x = _input((4, 3, 2, 2)).requires_grad_()
    w = _input((4, 3, 2, 2), seed=7).requires_grad_()
    (g,) = torch.autograd.grad((m(x) * w).sum(), x, create_graph=True)
    want_g = w - w.mean(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(g, want_g)
    gx, gw = torch.autograd.grad(g.square().sum() + x.square().sum(), (x, w))
    torch.testing.assert_close(gx, 2 * x.detach())
    torch.testing.assert_close(gw, 2 * want_g.detach())
