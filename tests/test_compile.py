"""torch.compile: every normswap layer traces without a graph break, in train and eval
mode, with and without the L1 penalty and a learned sigma; compiled L1 and top-k batch
norms match eager mode in forward, backward and running statistics."""
import copy

import pytest
import torch

import normswap
import normswap.norms as N

# class -> (factory(**extra), input shape). Every public layer class must be here.
LAYERS = {
    N.L1BatchNorm1d: (lambda **kw: N.L1BatchNorm1d(4, **kw), (3, 4, 5)),
    N.L1BatchNorm2d: (lambda **kw: N.L1BatchNorm2d(4, **kw), (2, 4, 5, 5)),
    N.L1BatchNorm3d: (lambda **kw: N.L1BatchNorm3d(4, **kw), (2, 4, 2, 3, 3)),
    N.TopKBatchNorm1d: (lambda **kw: N.TopKBatchNorm1d(4, k=3, **kw), (6, 4)),
    N.TopKBatchNorm2d: (lambda **kw: N.TopKBatchNorm2d(4, **kw), (2, 4, 5, 5)),
    N.TopKBatchNorm3d: (lambda **kw: N.TopKBatchNorm3d(4, **kw), (2, 4, 2, 3, 3)),
    N.BatchNormStar1d: (lambda **kw: N.BatchNormStar1d(4, **kw), (3, 4, 5)),
    N.BatchNormStar2d: (lambda **kw: N.BatchNormStar2d(4, **kw), (2, 4, 5, 5)),
    N.BatchNormStar3d: (lambda **kw: N.BatchNormStar3d(4, **kw), (2, 4, 2, 3, 3)),
    N.MeanOnlyBatchNorm1d: (lambda **kw: N.MeanOnlyBatchNorm1d(4, **kw), (6, 4)),
    N.MeanOnlyBatchNorm2d: (lambda **kw: N.MeanOnlyBatchNorm2d(4, **kw), (2, 4, 5, 5)),
    N.MeanOnlyBatchNorm3d: (lambda **kw: N.MeanOnlyBatchNorm3d(4, **kw), (2, 4, 2, 3, 3)),
    N.LayerNormStar: (lambda **kw: N.LayerNormStar(6, **kw), (2, 3, 6)),
    N.LayerNormStar2d: (lambda **kw: N.LayerNormStar2d(4, affine=True, **kw), (2, 4, 3, 3)),
    N.L1LayerNorm: (lambda **kw: N.L1LayerNorm(6, **kw), (2, 3, 6)),
    N.TopKLayerNorm: (lambda **kw: N.TopKLayerNorm(12, k=3, **kw), (2, 3, 12)),
    N.L1LayerNorm2d: (lambda **kw: N.L1LayerNorm2d(4, **kw), (2, 4, 3, 3)),
    N.TopKLayerNorm2d: (lambda **kw: N.TopKLayerNorm2d(4, k=2, **kw), (2, 4, 3, 3)),
    N.GroupNormStar: (lambda **kw: N.GroupNormStar(2, 4, **kw), (2, 4, 3, 3)),
    N.L1GroupNorm: (lambda **kw: N.L1GroupNorm(2, 4, **kw), (2, 4, 3, 3)),
    N.TopKGroupNorm: (lambda **kw: N.TopKGroupNorm(2, 4, k=3, **kw), (2, 4, 3, 3)),
    N.InstanceNormStar1d: (lambda **kw: N.InstanceNormStar1d(4, **kw), (2, 4, 6)),
    N.InstanceNormStar2d: (lambda **kw: N.InstanceNormStar2d(4, track_running_stats=True, **kw), (2, 4, 3, 3)),
    N.InstanceNormStar3d: (lambda **kw: N.InstanceNormStar3d(4, **kw), (2, 4, 2, 2, 2)),
    N.L1InstanceNorm1d: (lambda **kw: N.L1InstanceNorm1d(4, **kw), (2, 4, 6)),
    N.L1InstanceNorm2d: (lambda **kw: N.L1InstanceNorm2d(4, affine=True, track_running_stats=True, **kw),
                         (2, 4, 3, 3)),
    N.L1InstanceNorm3d: (lambda **kw: N.L1InstanceNorm3d(4, **kw), (2, 4, 2, 2, 2)),
    N.TopKInstanceNorm1d: (lambda **kw: N.TopKInstanceNorm1d(4, k=3, **kw), (2, 4, 6)),
    N.TopKInstanceNorm2d: (lambda **kw: N.TopKInstanceNorm2d(4, k=3, track_running_stats=True, **kw),
                           (2, 4, 3, 3)),
    N.TopKInstanceNorm3d: (lambda **kw: N.TopKInstanceNorm3d(4, k=3, **kw), (2, 4, 2, 2, 2)),
    N.IterNorm1d: (lambda **kw: N.IterNorm1d(6, group_size=4, **kw), (8, 6)),
    N.IterNorm2d: (lambda **kw: N.IterNorm2d(6, group_size=4, **kw), (2, 6, 3, 3)),
    N.IterNorm3d: (lambda **kw: N.IterNorm3d(6, group_size=4, **kw), (2, 6, 2, 2, 2)),
    N.DivisiveNorm1d: (lambda **kw: N.DivisiveNorm1d(radius=2, **kw), (2, 9)),
    N.DivisiveNorm2d: (lambda **kw: N.DivisiveNorm2d(3, 3, **kw), (2, 4, 5, 5)),
    N.AreaNorm: (lambda **kw: N.AreaNorm(N.GroupArea(2, 4), N.Operation("l1"), **kw), (2, 4, 3)),
}
SIGMA = {N.BatchNormStar1d, N.BatchNormStar2d, N.BatchNormStar3d, N.LayerNormStar, N.LayerNormStar2d,
         N.GroupNormStar, N.InstanceNormStar1d, N.InstanceNormStar2d, N.InstanceNormStar3d,
         N.DivisiveNorm1d, N.DivisiveNorm2d}


def test_every_public_layer_is_listed():
    public = [getattr(N, n) for n in N.__all__]
    layers = {c for c in public if isinstance(c, type) and issubclass(c, N.NormalizerBase)
              and c not in (N.NormalizerBase, N.BatchStatNorm)}
    assert layers == set(LAYERS)


def _configs():
    for cls, (make, shape) in LAYERS.items():
        yield pytest.param(make, shape, {}, id=cls.__name__)
        yield pytest.param(make, shape, {"l1_alpha": 0.1}, id=cls.__name__ + "-l1")
        if cls in SIGMA:
            yield pytest.param(make, shape, {"learn_sigma": True, "l1_alpha": 0.1},
                               id=cls.__name__ + "-learned")


@pytest.mark.parametrize("make,shape,kw", list(_configs()))
def test_no_graph_break_in_train_and_eval(make, shape, kw):
    m = make(**kw)
    x = torch.randn(shape)
    for mode in ("train", "eval"):
        getattr(m, mode)()
        torch._dynamo.reset()
        explained = torch._dynamo.explain(m)(x)
        assert explained.graph_break_count == 0, (mode, [str(b.reason)[:300] for b in explained.break_reasons])


def _assert_same_step(eager, compiled_mod, eager_out, compiled_out) -> None:
    """A training step of the compiled copy equals eager mode's: output, input gradient,
    parameter gradients and buffers (``*_out``: (output, input))."""
    (ya, xa), (yb, xb) = eager_out, compiled_out
    torch.testing.assert_close(yb, ya)
    torch.testing.assert_close(xb.grad, xa.grad)
    for (n, a), b in zip(eager.named_parameters(), compiled_mod.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=n)
    for (n, a), b in zip(eager.named_buffers(), compiled_mod.buffers()):
        torch.testing.assert_close(b, a, msg=n)


def _step_both(eager, compiled_mod, compiled, x, dy) -> None:
    """One training step of ``eager`` and of its compiled copy on ``x``, ``dy``: they agree."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = eager(xa), compiled(xb)
    ya.backward(dy)
    yb.backward(dy)
    _assert_same_step(eager, compiled_mod, (ya, xa), (yb, xb))


def _assert_one_graph_calling(compiled_mod, x, op: str) -> None:
    """``compiled_mod`` traces ``x`` into one graph that calls the operator ``op``."""
    graph = torch._dynamo.explain(compiled_mod)(x)
    assert graph.graph_break_count == 0
    assert op in str(graph.graphs[0].code)


@pytest.mark.slow
@pytest.mark.parametrize("make", [lambda: N.L1BatchNorm2d(4, l1_alpha=0.1), lambda: N.TopKBatchNorm2d(4, k=3),
                                  lambda: N.L1GroupNorm(2, 4), lambda: N.MeanOnlyBatchNorm2d(4),
                                  lambda: N.DivisiveNorm2d(3, 3, learn_sigma=True, l1_alpha=0.1)],
                         ids=["L1BatchNorm2d", "TopKBatchNorm2d", "L1GroupNorm", "MeanOnlyBatchNorm2d",
                              "DivisiveNorm2d"])
def test_compiled_matches_eager_forward_backward_and_running_stats(make):
    torch._dynamo.reset()
    eager = make()
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod)
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 4, 5, 5), (3, 4, 6, 6)):  # a second shape: recompiled with dynamic sizes
        x = torch.randn(shape, generator=g) * 2 + 1
        dy = torch.randn(shape, generator=g)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = eager(xa), compiled(xb)
        (ya * dy).sum().add(normswap.penalty(eager)).backward()
        (yb * dy).sum().add(normswap.penalty(compiled_mod)).backward()
        _assert_same_step(eager, compiled_mod, (ya, xa), (yb, xb))
    eager.eval(), compiled_mod.eval()
    torch.testing.assert_close(compiled(x), eager(x))


@pytest.mark.parametrize("make,shape", [(lambda: N.TopKLayerNorm(12, k=3), (2, 3, 12)),
                                        (lambda: N.L1GroupNorm(2, 4), (2, 4, 3, 3)),
                                        (lambda: N.TopKBatchNorm2d(4, k=3), (2, 4, 5, 5))],
                         ids=["TopKLayerNorm", "L1GroupNorm", "TopKBatchNorm2d"])
def test_compiled_kernel_layer_with_frozen_gamma_and_beta_matches_eager(make, shape):
    """Layers that run the kernels' operators under torch.compile, with gamma and beta frozen:
    the backward operator returns no gradient for them (an empty tensor of its own for each;
    one shared empty tensor is outputs aliasing each other, which torch.library refuses at
    the first backward) and the input gradient equals eager mode's."""
    torch._dynamo.reset()
    eager = make()
    for p in eager.parameters():
        p.requires_grad_(False)
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    _step_both(eager, compiled_mod, compiled, torch.randn(shape, generator=g) * 2 + 1,
               torch.randn(shape, generator=g))


@pytest.mark.slow
def test_compiled_topk_batch_norm_runs_the_kernels_on_channels_last_maps():
    """Top-k batch norm after a convolution under torch.compile (inductor lays the maps out
    channels last): one graph, the kernels as the normswap::rows_forward operator given the
    layer's input (not a copy in another layout), and eager mode's outputs, gradients and
    running statistics, also for a channels-last input."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), N.TopKBatchNorm2d(8, k=3),
                                torch.nn.ReLU(inplace=True))
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(4, 3, 9, 9, generator=g).contiguous(memory_format=fmt)
        _step_both(eager, compiled_mod, compiled, x, torch.randn(4, 8, 9, 9, generator=g))
    _assert_one_graph_calling(compiled_mod, x, "normswap.rows_forward")


@pytest.mark.slow
def test_compiled_iternorm_runs_the_whitening_kernels_and_matches_eager():
    """IterNorm with groups of 16 channels under torch.compile: one graph, the kernels as the
    normswap::whiten_forward / whiten_backward operators, eager mode's outputs, gradients
    and running statistics."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = N.IterNorm2d(32)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
        eager.bias.uniform_(-0.5, 0.5)
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for shape in ((4, 32, 5, 5), (3, 32, 6, 6)):
        x = torch.randn(shape, generator=g) * 2 + 1
        _step_both(eager, compiled_mod, compiled, x, torch.randn(shape, generator=g))
    _assert_one_graph_calling(compiled_mod, x, "normswap.whiten_forward")


@pytest.mark.slow
def test_compiled_iternorm_stem_saves_no_bool_mask():
    """conv -> IterNorm -> ReLU(inplace) -> max-pool compiled on CPU: the whitening operator's
    output is kept for its backward, so the ReLU's mask is recomputed from it instead of
    kept as bool (see test_compiled_stem_saves_no_bool_mask); the gradients equal eager mode's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1, bias=False), N.IterNorm2d(16),
                               torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(2))
    eager = copy.deepcopy(stem)
    compiled = torch.compile(stem, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    compiled(x).sum().backward()   # compiled before the saved tensors are recorded
    saved = _saved_under(compiled, x)
    assert not any(dtype == torch.bool for dtype, _ in saved), saved
    stem.zero_grad()
    compiled(x).sum().backward()
    eager(x).sum().backward()
    for a, b in zip(eager.parameters(), stem.parameters()):   # (gradients of size ~50)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-4)


def _saved_under(fn, *args):
    """(dtype, shape) of every tensor autograd saves while ``fn(*args)`` runs."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t,
                                                  lambda t: t):
        fn(*args)
    return saved


@pytest.mark.parametrize("make", [lambda: N.MeanOnlyBatchNorm2d(8), lambda: N.TopKBatchNorm2d(8, k=3),
                                  lambda: N.L1BatchNorm2d(8), lambda: N.BatchNormStar2d(8),
                                  lambda: N.DivisiveNorm2d(3, 3)],
                         ids=["MeanOnlyBatchNorm2d", "TopKBatchNorm2d", "L1BatchNorm2d", "BatchNormStar2d",
                              "DivisiveNorm2d"])
def test_compiled_stem_saves_no_bool_mask(make):
    """conv -> norm layer -> ReLU -> max-pool compiled on CPU: the backward keeps the conv
    output (as with nn.BatchNorm2d) and recomputes the ReLU mask from it, instead of saving
    the mask as a bool tensor (whose store inductor's CPU code does one value at a time)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), make(),
                               torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(2))
    compiled = torch.compile(stem, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    compiled(x).sum().backward()   # compiled before the saved tensors are recorded
    saved = _saved_under(compiled, x)
    assert (torch.float32, (4, 8, 8, 8)) in saved, saved      # the conv output
    assert not [s for s in saved if s[0] == torch.bool], saved


def test_compiled_mean_only_matches_eager_with_non_finite_input():
    """The compiled mean-only backward uses its input only through exact zeros: its
    gradient equals eager mode's, also where the input is inf or NaN (dx = dy - mean(dy))."""
    torch._dynamo.reset()
    eager = N.MeanOnlyBatchNorm2d(4)
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 5, generator=g)
    x[0, 1, 2, 3], x[1, 2, 0, 0] = float("inf"), float("nan")
    dy = torch.randn(2, 4, 5, 5, generator=g)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (eager(xa) * dy).sum().backward()
    (compiled(xb) * dy).sum().backward()
    assert torch.isfinite(xa.grad).all()
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(compiled_mod.bias.grad, eager.bias.grad)
