"""Half precision: output dtypes, float32 statistics, and L1 / top-k batch norm staying
finite in pure float16 where L2 batch norm's squares overflow (Hoffer et al.)."""
import pytest
import torch
from torch import nn

import normswap.norms as N

from . import reference as ref

HALF = [torch.float16, torch.bfloat16]
LAYERS = [
    (lambda: N.L1BatchNorm2d(4), (4, 4, 6, 6)),
    (lambda: N.TopKBatchNorm2d(4, k=10), (4, 4, 6, 6)),
    (lambda: N.BatchNormStar2d(4), (4, 4, 6, 6)),
    (lambda: N.BatchNormStar2d(4, l1_alpha=0.1), (4, 4, 6, 6)),
    (lambda: N.MeanOnlyBatchNorm2d(4), (4, 4, 6, 6)),
    (lambda: N.L1BatchNorm1d(4), (8, 4)),
    (lambda: N.LayerNormStar(6), (4, 5, 6)),
    (lambda: N.LayerNormStar(6, l1_alpha=0.1), (4, 5, 6)),
    (lambda: N.LayerNormStar2d(4, affine=True), (4, 4, 6, 6)),
    (lambda: N.DivisiveNorm2d(3, 3), (4, 4, 6, 6)),
    (lambda: N.DivisiveNorm1d(radius=2), (4, 9)),
    (lambda: N.L1LayerNorm(6), (4, 5, 6)),
    (lambda: N.TopKLayerNorm(12, k=3, l1_alpha=0.1), (4, 5, 12)),
    (lambda: N.L1LayerNorm2d(4), (4, 4, 6, 6)),
    (lambda: N.TopKLayerNorm2d(4, k=2), (4, 4, 6, 6)),
    (lambda: N.L1GroupNorm(2, 4), (4, 4, 6, 6)),
    (lambda: N.TopKGroupNorm(2, 4, k=3), (4, 4, 6, 6)),
    (lambda: N.GroupNormStar(2, 4), (4, 4, 6, 6)),
    (lambda: N.L1InstanceNorm2d(4, affine=True, track_running_stats=True), (4, 4, 6, 6)),
    (lambda: N.TopKInstanceNorm2d(4, k=3), (4, 4, 6, 6)),
    (lambda: N.InstanceNormStar2d(4, affine=True, track_running_stats=True), (4, 4, 6, 6)),
    (lambda: N.IterNorm2d(4, group_size=2), (4, 4, 6, 6)),
]


@pytest.mark.parametrize("pure", [False, True], ids=["half-input", "module.half()"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("make,shape", LAYERS)
def test_half_outputs_keep_input_dtype_and_float32_stats(make, shape, dtype, pure):
    m = make()
    if pure:
        m = m.to(dtype)
    x = torch.randn(shape).to(dtype)
    for mode in ("train", "eval"):
        y = getattr(m, mode)()(x)
        assert y.dtype == dtype and torch.isfinite(y).all()
    # close to the float64 computation of the same layer
    m64 = make().double()
    m64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in m.state_dict().items()})
    torch.testing.assert_close(m.train()(x).double(), m64.train()(x.double()),
                               atol=0.05, rtol=0.05)
    for name, buf in m.named_buffers():
        if name.startswith("running"):
            assert buf.dtype == torch.float32, name


def _naive_fp16_l2_batch_norm(x):
    """L2 batch norm computed elementwise in float16: E[v^2] over float16 squares."""
    mu = x.mean(dim=(0, 2, 3), keepdim=True)
    v = x - mu
    var = (v * v).mean(dim=(0, 2, 3), keepdim=True)
    return v / torch.sqrt(var + 1e-5), var


def test_pure_fp16_l1_and_topk_finite_where_l2_overflows():
    g = torch.Generator().manual_seed(0)
    x = ((torch.rand(8, 4, 8, 8, generator=g) * 2 - 1) * 6e4).half()
    assert x.abs().max() > 5e4
    # the paper's point: |v| > 256 gives v^2 > 65504, so L2 statistics overflow in fp16
    y_l2, var = _naive_fp16_l2_batch_norm(x)
    assert torch.isinf(var).all() and (y_l2 == 0).all()  # the signal is gone
    for make in (lambda: N.L1BatchNorm2d(4), lambda: N.TopKBatchNorm2d(4, k=10)):
        m = make().half().train()
        xg = x.clone().requires_grad_()
        y = m(xg)
        assert y.dtype == torch.float16 and torch.isfinite(y).all()
        assert 0.5 < y.float().std() < 2.0  # normalized, not collapsed
        (y.float() * torch.randn(y.shape, generator=g)).sum().backward()
        assert torch.isfinite(xg.grad).all()
        assert torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_mad if hasattr(m, "running_mad") else m.running_std).all()
        assert torch.isfinite(m.eval()(x)).all()
    # and L1 BN in fp16 agrees with the float64 formula
    m = N.L1BatchNorm2d(4).half()
    torch.testing.assert_close(m(x).double(), ref.batch_norm_train(x.double(), "l1"), atol=2e-2, rtol=2e-2)


def test_small_cnn_trains_50_steps_in_pure_fp16_with_l1_batch_norm():
    from sklearn.datasets import load_digits
    digits = load_digits()
    X = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 200.0  # large activations
    Y = torch.tensor(digits.target)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), N.L1BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), N.L1BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).half()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(50):
        idx = torch.randint(0, len(X), (64,))
        out = net(X[idx].half())
        loss = nn.functional.cross_entropy(out.float(), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert torch.isfinite(loss), f"step {step}"
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert all(p.dtype == torch.float16 for p in net.parameters())
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10  # it learns


# L1 and top-k on every area: (layer, area, operation, reference kwargs)
EVERY_AREA = [
    (lambda: N.L1BatchNorm2d(4), "batch", "l1", {}),
    (lambda: N.TopKBatchNorm2d(4, k=10), "batch", "topk", {"k": 10}),
    (lambda: N.L1LayerNorm(8), "layer", "l1", {}),
    (lambda: N.TopKLayerNorm(8, k=3), "layer", "topk", {"k": 3}),
    (lambda: N.L1LayerNorm2d(4), "channels", "l1", {}),
    (lambda: N.TopKLayerNorm2d(4, k=2), "channels", "topk", {"k": 2}),
    (lambda: N.L1GroupNorm(2, 4), "group", "l1", {"num_groups": 2}),
    (lambda: N.TopKGroupNorm(2, 4, k=5), "group", "topk", {"k": 5, "num_groups": 2}),
    (lambda: N.L1InstanceNorm2d(4, track_running_stats=True), "instance", "l1", {}),
    (lambda: N.TopKInstanceNorm2d(4, k=5, track_running_stats=True), "instance", "topk", {"k": 5}),
]


@pytest.mark.parametrize("offset", [0.0, 3e4], ids=["centered", "offset"])
@pytest.mark.parametrize("make,area,op,kw", EVERY_AREA, ids=[f"{a}-{o}" for _, a, o, _ in EVERY_AREA])
def test_pure_fp16_l1_and_topk_finite_on_every_area(make, area, op, kw, offset):
    """Activations up to 6e4 in pure float16 (|v| > 256 already overflows v^2)."""
    g = torch.Generator().manual_seed(0)
    span = 6e4 - offset
    x = (offset + (torch.rand(8, 4, 4, 8, generator=g) * 2 - 1) * span).half()
    assert x.abs().max() > 5e4 and torch.isfinite(x).all()
    m = make().half().train()
    xg = x.clone().requires_grad_()
    y = m(xg)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert 0.3 < y.float().std() < 3.0  # normalized, not collapsed
    (y.float() * torch.randn(y.shape, generator=g)).sum().backward()
    assert torch.isfinite(xg.grad).all()
    want = ref.area_norm(x.double(), area, op, **kw)[0]
    torch.testing.assert_close(y.double(), want, atol=2e-2, rtol=2e-2)
    assert all(torch.isfinite(b).all() for b in m.buffers())
    assert torch.isfinite(m.eval()(x)).all()
