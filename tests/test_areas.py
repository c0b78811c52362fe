"""Every (area, operation, recovery) beyond the batch area, and IterNorm, against
independent float64 re-computations (tests/reference.py): forward in train and eval
mode, running statistics, gradients (gradcheck), the L1 penalty, state_dict, checks."""
import pytest
import torch

import normswap
import normswap.norms as N

from . import reference as ref

# (factory, area, operation, input shape, reference kwargs)
AREA_LAYERS = [
    (lambda: N.L1LayerNorm(5), "layer", "l1", (3, 4, 5), {}),
    (lambda: N.L1LayerNorm((4, 5)), "layer", "l1", (3, 4, 5), {"ndim": 2}),
    (lambda: N.L1LayerNorm(6, elementwise_affine=False), "layer", "l1", (4, 6), {}),
    (lambda: N.TopKLayerNorm(6, k=3), "layer", "topk", (4, 6), {"k": 3}),
    (lambda: N.TopKLayerNorm((3, 4), k=5, bias=False), "layer", "topk", (2, 3, 4), {"k": 5, "ndim": 2}),
    (lambda: N.LayerNormStar(5, sigma=0.5, elementwise_affine=True, learn_sigma=True), "layer", "l2", (3, 5),
     {"sigma": 0.5}),
    (lambda: N.L1LayerNorm2d(4), "channels", "l1", (2, 4, 3, 5), {}),
    (lambda: N.TopKLayerNorm2d(5, k=2), "channels", "topk", (2, 5, 3, 3), {"k": 2}),
    (lambda: N.TopKLayerNorm2d(5, k=2, bias=False), "channels", "topk", (2, 5, 3, 3), {"k": 2}),
    (lambda: N.LayerNormStar2d(4, affine=True, learn_sigma=True), "channels", "l2", (2, 4, 3, 3), {"sigma": 0.5}),
    (lambda: N.L1GroupNorm(2, 6), "group", "l1", (2, 6, 3, 3), {"num_groups": 2}),
    (lambda: N.L1GroupNorm(3, 6, affine=False), "group", "l1", (2, 6, 5), {"num_groups": 3}),
    (lambda: N.TopKGroupNorm(3, 6, k=4), "group", "topk", (3, 6, 2, 3), {"k": 4, "num_groups": 3}),
    (lambda: N.GroupNormStar(2, 4, sigma=0.7), "group", "l2", (2, 4, 5), {"sigma": 0.7, "num_groups": 2}),
    (lambda: N.GroupNormStar(2, 4, learn_sigma=True), "group", "l2", (2, 4, 3, 3), {"sigma": 0.5, "num_groups": 2}),
    (lambda: N.L1InstanceNorm1d(3, affine=True), "instance", "l1", (2, 3, 7), {}),
    (lambda: N.L1InstanceNorm2d(3), "instance", "l1", (2, 3, 4, 4), {}),
    (lambda: N.TopKInstanceNorm2d(3, k=3, affine=True), "instance", "topk", (2, 3, 4, 4), {"k": 3}),
    (lambda: N.TopKInstanceNorm3d(2, k=2), "instance", "topk", (2, 2, 2, 3, 3), {"k": 2}),
    (lambda: N.InstanceNormStar2d(3, affine=True), "instance", "l2", (2, 3, 4, 4), {"sigma": 0.5}),
    (lambda: N.InstanceNormStar1d(3, affine=True, learn_sigma=True), "instance", "l2", (2, 3, 6), {"sigma": 0.5}),
    (lambda: N.InstanceNormStar3d(2, sigma=0.0), "instance", "l2", (2, 2, 2, 3, 3), {"sigma": 0.0}),
    (lambda: N.AreaNorm(N.GroupArea(2, 4), N.Operation("mean"), N.BIAS_ONLY), "group", "mean", (2, 4, 3),
     {"num_groups": 2}),
    (lambda: N.AreaNorm(N.ChannelsArea(3), N.Operation("l1", eps=1e-3), N.SCALE_ONLY), "channels", "l1",
     (2, 3, 4), {"eps": 1e-3}),
]
IDS = [f"{i}-{a}-{o}" for i, (_, a, o, _, _) in enumerate(AREA_LAYERS)]


def _make(factory, dtype=torch.float64):
    torch.manual_seed(0)
    m = factory().to(dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "weight":
                p.uniform_(0.5, 1.5)
            elif name == "bias":
                p.uniform_(-0.5, 0.5)
    return m


def _input(shape, seed=1, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + 0.7


def _sigma(m):
    s = getattr(m, "sigma", 0.0)
    return float(s.detach()) if torch.is_tensor(s) else float(s)


def _reference(m, x, area, op, kw):
    kw = dict(kw)
    kw.setdefault("eps", m.eps)
    if "sigma" in kw:
        kw["sigma"] = _sigma(m)
    return ref.area_norm(x, area, op, gamma=m.weight, beta=m.bias, **kw)[0]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("factory,area,op,shape,kw", AREA_LAYERS, ids=IDS)
def test_forward_matches_reference(factory, area, op, shape, kw, mode, path):
    m = getattr(_make(factory), mode)()
    x = _input(shape)
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, _reference(m, x, area, op, kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("factory,area,op,shape,kw", AREA_LAYERS, ids=IDS)
def test_gradcheck(factory, area, op, shape, kw, mode, path):
    m = getattr(_make(factory), mode)()
    x = _input(shape).requires_grad_()
    w = _input(shape, seed=7)
    assert torch.autograd.gradcheck(lambda x, *p: (m(x) * w).sum(), (x,) + tuple(m.parameters()))


@pytest.mark.parametrize("factory,area,op,shape,kw", AREA_LAYERS, ids=IDS)
def test_penalty_is_mean_abs_centered_over_own_area(factory, area, op, shape, kw, path):
    m = _make(factory).train()
    m.l1_alpha = 0.25
    x = _input(shape).requires_grad_()
    y = m(x)
    want = 0.25 * ref.area_mean_abs_centered(x, area, kw.get("num_groups"), kw.get("ndim", 1))
    p = normswap.penalty(m)
    assert p.item() == pytest.approx(want, rel=1e-12)
    # the output does not change with the penalty on
    torch.testing.assert_close(y, _reference(m, x, area, op, kw), rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x: (m(x), normswap.penalty(m))[1], (x,))
    m.eval()(x)
    assert m.penalty_term() is None or normswap.penalty(m).item() == pytest.approx(want, rel=1e-12)


def test_learned_sigma_gets_a_gradient_on_every_area():
    for m, shape in ((N.GroupNormStar(2, 4, learn_sigma=True), (2, 4, 3)),
                     (N.InstanceNormStar2d(3, learn_sigma=True), (2, 3, 3, 3))):
        m(torch.randn(shape)).pow(3).sum().backward()
        assert m.sigma.grad is not None and m.sigma.grad.abs() > 0


# -- instance norm with running statistics (torch's track_running_stats=True) ----------
@pytest.mark.parametrize("factory,op,k", [
    (lambda: N.L1InstanceNorm2d(3, affine=True, track_running_stats=True), "l1", None),
    (lambda: N.TopKInstanceNorm2d(3, k=2, track_running_stats=True), "topk", 2),
    (lambda: N.InstanceNormStar2d(3, sigma=0.4, affine=True, track_running_stats=True), "l2", None),
], ids=["l1", "topk", "l2"])
def test_instance_running_stats_and_eval(factory, op, k):
    m = _make(factory).train()
    shape = (3, 3, 4, 5)
    L = 20
    rm, rs = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for seed in (1, 2, 3):
        x = _input(shape, seed=seed)
        y = m(x)
        torch.testing.assert_close(y, ref.area_norm(x, "instance", op, sigma=_sigma(m), k=k, gamma=m.weight,
                                                    beta=m.bias)[0])
        _, mu, s = ref.area_norm(x, "instance", op, sigma=_sigma(m), k=k)
        mu, s = mu.view(3, 3).mean(0), s.view(3, 3)
        if op == "l2":
            s = s * L / (L - 1)  # unbiased per instance, as torch's instance norm
        rm = 0.9 * rm + 0.1 * mu
        rs = 0.9 * rs + 0.1 * s.mean(0)
    torch.testing.assert_close(m.running_mean, rm, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(getattr(m, N.STAT_BUFFERS[op]), rs, rtol=1e-10, atol=1e-12)
    assert int(m.num_batches_tracked) == 3
    m.eval()
    x = _input(shape, seed=9)
    want = ref.batch_norm_eval(x, op, rm, rs, m.weight, m.bias, eps=m.eps, sigma=_sigma(m))
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)


def test_instance_norm_star_with_zero_sigma_is_native_instance_norm():
    x = torch.randn(3, 4, 5, 5) * 2 + 1
    star = N.InstanceNormStar2d(4, sigma=0.0, affine=True, track_running_stats=True)
    native = torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
    torch.testing.assert_close(star(x), native(x))
    torch.testing.assert_close(star.running_var, native.running_var)
    torch.testing.assert_close(star.eval()(x), native.eval()(x))
    l1 = N.L1InstanceNorm2d(4, track_running_stats=True)  # the generic path agrees on the mean
    l1(x)
    torch.testing.assert_close(l1.running_mean, native.running_mean)


def test_group_norm_star_with_zero_sigma_is_native_group_norm():
    x = torch.randn(3, 6, 4, 4)
    torch.testing.assert_close(N.GroupNormStar(3, 6, sigma=0.0)(x), torch.nn.GroupNorm(3, 6)(x))
    m = N.GroupNormStar(3, 6, sigma=0.0, learn_sigma=True)  # generic path
    torch.testing.assert_close(m(x), torch.nn.GroupNorm(3, 6)(x))


def test_non_finite_instance_batch_leaves_running_stats_untouched():
    for m in (N.L1InstanceNorm2d(3, track_running_stats=True),
              N.InstanceNormStar2d(3, track_running_stats=True)):
        m(torch.randn(2, 3, 4, 4))
        before = {k: v.clone() for k, v in m.state_dict().items()}
        x = torch.randn(2, 3, 4, 4)
        x[1, 2, 0, 0] = float("nan")
        m(x)
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), (type(m).__name__, k)


# -- IterNorm ------------------------------------------------------------------------
# unequal groups (autograd through the steps); equal groups with L = H W <= 16 (the Function's
# (G, d, N L) layout) and L > 16 (its (N, G, d, L) layout); a 1d input; unequal 3d; groups of
# 16 channels (on CPU the compiled kernels' Function, whiten.h: N L above one buffer chunk of
# 128 double positions in the last case)
ITER_CASES = [((8, 6, 3, 3), 4, 5), ((6, 8, 2, 2), 4, 3), ((3, 8, 5, 4), 4, 5), ((10, 3), 16, 5),
              ((4, 5, 6), 2, 4), ((4, 32, 3, 3), 16, 5), ((3, 16, 7, 8), 16, 3)]


def _iter(C, g, T, shape, **kw):
    cls = {2: N.IterNorm1d, 3: N.IterNorm1d, 4: N.IterNorm2d, 5: N.IterNorm3d}[len(shape)]
    return _make(lambda: cls(C, group_size=g, T=T, **kw))


@pytest.mark.parametrize("shape,g,T", ITER_CASES)
def test_iter_norm_train_running_and_eval_match_reference(shape, g, T):
    C = shape[1]
    m = _iter(C, g, T, shape)
    rm = torch.zeros(C, dtype=torch.float64)
    rw = [torch.eye(len(range(s, min(s + min(g, C), C))), dtype=torch.float64) for s in range(0, C, min(g, C))]
    for seed in (1, 2):
        x = _input(shape, seed=seed)
        want, mu, wms = ref.iter_norm(x, g, T, m.eps, gamma=m.weight, beta=m.bias)
        torch.testing.assert_close(m(x), want, rtol=1e-9, atol=1e-9)
        rm = 0.9 * rm + 0.1 * mu
        rw = [0.9 * r + 0.1 * torch.from_numpy(w) for r, w in zip(rw, wms)]
    torch.testing.assert_close(m.running_mean, rm)
    m.eval()
    x = _input(shape, seed=5)
    want, _, _ = ref.iter_norm(x, g, T, m.eps, running_mean=rm, running_wm=rw, gamma=m.weight, beta=m.bias)
    torch.testing.assert_close(m(x), want, rtol=1e-9, atol=1e-9)


def test_iter_norm_whitens():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(4, 4, generator=g, dtype=torch.float64)
    z = torch.randn(4096, 4, generator=g, dtype=torch.float64) @ mix.T  # correlated channels
    m = N.IterNorm1d(4, group_size=4, T=10, affine=False).double()
    y = m(z)
    cov = y.T @ y / y.shape[0]
    raw = z.T @ z / z.shape[0]
    assert (cov - torch.eye(4)).abs().max() < 0.1 < (raw / raw.diagonal().mean() - torch.eye(4)).abs().max()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape,g,T", ITER_CASES[:3] + ITER_CASES[-2:])
def test_iter_norm_gradcheck(shape, g, T, mode):
    m = _iter(shape[1], g, T, shape)
    m(_input(shape, seed=4))
    getattr(m, mode)()
    x = _input(shape).requires_grad_()
    w = _input(shape, seed=7)
    assert torch.autograd.gradcheck(lambda x, *p: (m(x) * w).sum(), (x,) + tuple(m.parameters()))


@pytest.mark.parametrize("group", [8, 16])
def test_iter_norm_pytorch_function_takes_channels_last_input(group, path):
    """The PyTorch formulation's Function (other group sizes; the kernels off) on a
    channels-last input with maps over 16 positions: its backward viewed V's gradient
    (strided like the input) as (N G, d, L) and raised; gradients equal the channels-first
    ones."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 5, 5, generator=g, dtype=torch.float64)
    dy = torch.randn(2, 32, 5, 5, generator=g, dtype=torch.float64)
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        m = _iter(32, group, 5, (2, 32, 5, 5))
        xs = x.contiguous(memory_format=fmt).detach().requires_grad_()
        m(xs).backward(dy.contiguous(memory_format=fmt))
        grads.append((xs.grad, m.weight.grad))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


def test_iter_norm_gradcheck_channels_last():
    """The kernels' channels-last layout (groups of 16 channels, (N, H, W, C) in memory)."""
    shape = (3, 16, 5, 4)
    m = _iter(16, 16, 3, shape)
    x = _input(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = _input(shape, seed=7)
    assert torch.autograd.gradcheck(lambda x, *p: (m(x) * w).sum(), (x,) + tuple(m.parameters()))


@pytest.mark.parametrize("T", [0, 1, 2, 5, 7])
def test_newton_whitening_operator_backward_equals_autograd_of_the_iteration(T):
    """IterNorm's whitening is one operator with a hand-written backward (a small graph for
    torch.compile); its gradient must be autograd's through P_k = (3 P - P^3 S) / 2."""
    from normswap.norms.whitening import newton_whitening

    def iteration(cov):  # PAPERS.md: S = cov / tr, P_0 = I, ..., P_T / sqrt(tr)
        tr = cov.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
        p = torch.eye(cov.shape[-1], dtype=cov.dtype).expand_as(cov)
        for _ in range(T):
            p = (3 * p - p @ p @ p @ (cov / tr)) / 2
        return p / tr.sqrt()

    g = torch.Generator().manual_seed(T)
    v = torch.randn(3, 5, 40, generator=g, dtype=torch.float64)
    cov = (v @ v.mT / 40 + 1e-3 * torch.eye(5, dtype=torch.float64)).requires_grad_()
    up = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    want, = torch.autograd.grad(iteration(cov), cov, up)
    for f in (newton_whitening, torch.ops.normswap.newton_whitening):  # eager path, compiled path
        torch.testing.assert_close(f(cov, T), iteration(cov), rtol=1e-12, atol=1e-12)
        got, = torch.autograd.grad(f(cov, T), cov, up)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_iter_norm_momentum_none_penalty_and_state_dict():
    m = _iter(6, 4, 5, (8, 6, 2, 2), momentum=None, l1_alpha=0.5)
    xs = [_input((8, 6, 2, 2), seed=s) for s in range(3)]
    for x in xs:
        m(x)
    mus = torch.stack([ref.iter_norm(x, 4, 5, m.eps)[1] for x in xs])
    torch.testing.assert_close(m.running_mean, mus.mean(0))
    assert normswap.penalty(m).item() == pytest.approx(0.5 * ref.centered_mean_abs_batch(xs[-1]).item())
    b = N.IterNorm2d(6, group_size=4, momentum=None).double()
    b.load_state_dict(m.state_dict())
    x = _input((8, 6, 2, 2), seed=9)
    assert torch.equal(m.eval()(x), b.eval()(x))
    assert set(m.state_dict()) == {"weight", "bias", "running_mean", "running_wm", "num_batches_tracked"}
    assert m.running_wm.shape == (2, 4, 4)


# -- state dict, repr ------------------------------------------------------------------
@pytest.mark.parametrize("factory,area,op,shape,kw", AREA_LAYERS + [
    (lambda: N.L1InstanceNorm2d(3, affine=True, track_running_stats=True), "instance", "l1", (2, 3, 4, 4), {}),
    (lambda: N.IterNorm2d(6, group_size=4), "batch", "whiten", (4, 6, 3, 3), {}),
], ids=IDS + ["l1in-tracked", "iternorm"])
def test_state_dict_round_trip_and_repr(factory, area, op, shape, kw):
    a = _make(factory, torch.float32).train()
    a(torch.randn(shape) * 3 + 1)
    b = factory()
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    x = torch.randn(shape)
    assert torch.equal(a.eval()(x), b.eval()(x))
    r = repr(a)
    assert r.startswith(type(a).__name__ + "(") and "eps=" in r


# -- bad arguments and inputs --------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: N.GroupNormStar(3, 8), r"GroupNormStar: num_groups must divide num_channels, got num_groups=3, num_channels=8"),
    (lambda: N.L1GroupNorm(0, 8), r"L1GroupNorm: num_groups must be a positive int, got 0"),
    (lambda: N.GroupNormStar(2, 8, sigma=-1), r"GroupNormStar: sigma must be >= 0 .*got -1"),
    (lambda: N.BatchNormStar2d(8, sigma=-1), r"BatchNormStar2d: sigma must be >= 0 .*got -1"),
    (lambda: N.InstanceNormStar2d(8, sigma="a"), r"InstanceNormStar2d: sigma must be >= 0 .*got 'a'"),
    (lambda: N.L1BatchNorm2d(8, eps=-1), r"L1BatchNorm2d: eps must be > 0 .*got -1"),
    (lambda: N.L1LayerNorm(8, eps=0), r"L1LayerNorm: eps must be > 0 .*got 0"),
    (lambda: N.TopKLayerNorm(8, k=0), r"TopKLayerNorm: k must be a positive int, got 0"),
    (lambda: N.TopKGroupNorm(2, 8, k=2.5), r"TopKGroupNorm: k must be a positive int, got 2.5"),
    (lambda: N.TopKBatchNorm2d(8, k=True), r"TopKBatchNorm2d: k must be a positive int, got True"),
    (lambda: N.L1BatchNorm2d(8, affine="no"), r"L1BatchNorm2d: affine must be True or False, got 'no'"),
    (lambda: N.L1LayerNorm(8, elementwise_affine="no"), r"elementwise_affine must be True or False"),
    (lambda: N.L1InstanceNorm2d(8, momentum=1.5), r"L1InstanceNorm2d: momentum must be a number in \[0, 1\] or None"),
    (lambda: N.IterNorm2d(8, group_size=0), r"IterNorm2d: group_size must be a positive int, got 0"),
    (lambda: N.IterNorm2d(8, T=0), r"IterNorm2d: T must be a positive int, got 0"),
    (lambda: N.IterNorm2d(8, eps=0.0), r"IterNorm2d: eps must be > 0"),
    (lambda: N.IterNorm2d(8, affine="no"), r"IterNorm2d: affine must be True or False"),
    (lambda: N.L1GroupNorm(2, 8, l1_alpha=-0.1), r"L1GroupNorm: l1_alpha must be >= 0"),
    (lambda: N.AreaNorm(N.LayerArea((4,)), N.Operation("l1"), track_running_stats=True),
     r"AreaNorm: track_running_stats=True needs an area whose statistics mix examples"),
    (lambda: N.AreaNorm(N.LayerArea((4,)), N.Operation("l3")), r"AreaNorm: operation must be one of"),
    (lambda: N.AreaNorm(N.LayerArea((4,)), N.Operation("l1", sigma=0.5)), r"sigma / learn_sigma belong to the 'l2'"),
])
def test_bad_arguments_give_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make,x,match", [
    (lambda: N.L1GroupNorm(2, 4), torch.randn(2, 6, 3), r"L1GroupNorm: expected 4 channels"),
    (lambda: N.L1LayerNorm2d(4), torch.randn(2, 4, 3), r"L1LayerNorm2d: expected a 4D input"),
    (lambda: N.TopKLayerNorm(6), torch.randn(2, 6), r"TopKLayerNorm: k=10 is larger than the 6 values"),
    (lambda: N.L1InstanceNorm2d(3), torch.randn(2, 3, 4), r"L1InstanceNorm2d: expected a 4D input"),
    (lambda: N.L1InstanceNorm1d(3), torch.randn(2, 3, 1), r"more than 1 value per channel"),
    (lambda: N.IterNorm2d(3), torch.randn(2, 4, 3, 3), r"IterNorm2d: expected 3 channels"),
])
def test_bad_input_gives_clear_error(make, x, match):
    with pytest.raises(ValueError, match=match):
        make()(x)


# -- mean-only batch norm in nn.BatchNorm's order -------------------------------------------
def test_mean_only_batch_norm_has_batch_norms_argument_order():
    m = N.MeanOnlyBatchNorm2d(64, 1e-5)
    assert m.momentum == 0.1 and m.eps == 1e-5
    m = N.MeanOnlyBatchNorm2d(4, 1e-5, 0.3, False, False)
    assert m.momentum == 0.3 and m.bias is None and m.weight is None and m.running_mean is None
    assert N.MeanOnlyBatchNorm2d(4).bias is not None and N.MeanOnlyBatchNorm2d(4).weight is None
    assert N.MeanOnlyBatchNorm2d(4, bias=False).bias is None        # the old keyword still works
    with pytest.raises(ValueError, match="bias is an alias of affine"):
        N.MeanOnlyBatchNorm2d(4, affine=False, bias=True)


def test_named_classes_are_configurations_of_the_generic_module():
    x = _input((3, 4, 5, 5))
    pairs = [
        (N.L1BatchNorm2d(4), N.AreaNorm(N.BatchArea(4), N.Operation("l1"))),
        (N.TopKGroupNorm(2, 4, k=3), N.AreaNorm(N.GroupArea(2, 4), N.Operation("topk", k=3))),
        (N.InstanceNormStar2d(4, sigma=0.3), N.AreaNorm(N.InstanceArea(4), N.Operation("l2", sigma=0.3),
                                                        N.NO_RECOVERY)),
        (N.L1LayerNorm2d(4, bias=False), N.AreaNorm(N.ChannelsArea(4), N.Operation("l1"), N.SCALE_ONLY)),
    ]
    for named, generic in pairs:
        named, generic = named.double(), generic.double()
        assert isinstance(named, N.AreaNorm) and named.area == generic.area
        assert named.operation == generic.operation and named.recovery == generic.recovery
        assert set(named.state_dict()) == set(generic.state_dict())
        torch.testing.assert_close(named(x), generic(x), rtol=0, atol=0)


def test_convert_sync_marks_batch_area_layers_only():
    net = torch.nn.Sequential(N.L1BatchNorm2d(4), N.IterNorm2d(4), N.L1GroupNorm(2, 4), N.L1InstanceNorm2d(4))
    N.convert_sync(net)
    assert [getattr(m, "sync", False) for m in net] == [True, True, False, False]
