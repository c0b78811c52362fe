"""Cross-process batch statistics: 2 CPU processes on gloo give the single-process
result on the concatenated batch (outputs, input gradients, parameter gradients,
running statistics, penalty)."""
import pytest
import torch
from torch import nn

import normswap
import normswap.norms as N

from .distributed import run_processes

LAYERS = {
    "l1": lambda: N.L1BatchNorm2d(3, l1_alpha=0.1),
    "topk": lambda: N.TopKBatchNorm2d(3, k=4),
    "bn*": lambda: N.BatchNormStar2d(3, sigma=0.7, l1_alpha=0.2),
    "bn-s": lambda: N.BatchNormStar2d(3, sigma=0.7),
    "mean": lambda: N.MeanOnlyBatchNorm2d(3),
    "l1-1d": lambda: N.L1BatchNorm1d(3, l1_alpha=0.1),
    "iternorm": lambda: N.IterNorm2d(3, group_size=2, l1_alpha=0.1),
}
SIZES = (3, 5)  # uneven per-process batches


def _data(name):
    g = torch.Generator().manual_seed(0)
    n = sum(SIZES)
    shape = (n, 3) if name.endswith("1d") else (n, 3, 4, 4)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, w


def _model(name):
    torch.manual_seed(0)
    m = LAYERS[name]().double()
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
    return m


def _step(m, x, w, copies):
    x = x.clone().requires_grad_()
    y = m(x)
    # each process adds the (global) penalty to its loss: `copies` of it in all
    loss = (y * w).sum() + copies * normswap.penalty(m)
    loss.backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}, \
        {n: b.clone() for n, b in m.named_buffers()}, normswap.penalty(m).detach()


def _worker(rank, world, name):
    x, w = _data(name)
    lo = sum(SIZES[:rank])
    sl = slice(lo, lo + SIZES[rank])
    m = N.convert_sync(_model(name))
    return _step(m, x[sl], w[sl], 1)


@pytest.mark.parametrize("name", list(LAYERS))
def test_two_process_sync_equals_single_process_on_concatenated_batch(name):
    results = run_processes(_worker, 2, (name,))
    x, w = _data(name)
    y, gx, gp, bufs, pen = _step(_model(name), x, w, 2)
    torch.testing.assert_close(torch.cat([r[0] for r in results]), y)
    torch.testing.assert_close(torch.cat([r[1] for r in results]), gx)
    for n in gp:  # local parameter gradients add up to the global one (DDP then averages)
        torch.testing.assert_close(results[0][2][n] + results[1][2][n], gp[n])
    for n in bufs:
        for r in results:
            torch.testing.assert_close(r[3][n], bufs[n])
    for r in results:
        torch.testing.assert_close(r[4], pen)


def _ddp_worker(rank, world):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), N.L1BatchNorm2d(3, l1_alpha=0.1), nn.ReLU())
    N.convert_sync(net)
    ddp = nn.parallel.DistributedDataParallel(net)
    g = torch.Generator().manual_seed(rank)
    ddp(torch.randn(4, 2, 5, 5, generator=g))
    p = normswap.penalty(ddp)
    p.backward()
    return p.detach(), [q.grad.clone() for q in ddp.parameters() if q.grad is not None]


def test_penalty_on_ddp_wrapped_model_is_the_same_on_every_process():
    (p0, g0), (p1, g1) = run_processes(_ddp_worker, 2)
    assert p0.item() > 0
    torch.testing.assert_close(p0, p1)
    for a, b in zip(g0, g1):  # DDP averaged the gradients
        torch.testing.assert_close(a, b)
