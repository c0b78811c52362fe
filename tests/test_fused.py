"""The fused training forward (normswap.norms.fused, opt-in): run on CPU tensors here
(``fused.enabled("cpu")``), it must give what the independent float64 re-computations of
tests/reference.py give, forward, running statistics and gradients, keep the penalty
differentiable, allow an in-place activation after it, share one graph between layers of
different widths, stay out of an enclosing torch.compile, and fall back with a warning
when compiling fails."""
import os
import subprocess
import sys

import pytest
import torch

import normswap
import normswap.norms as N
from normswap.norms import fused

from . import reference as ref

pytestmark = pytest.mark.slow   # every case compiles (seconds each on CPU)


@pytest.fixture(autouse=True)
def on_cpu():
    # gradcheck retains the graph: compiled backwards must not donate their buffers
    donated = torch._functorch.config.donated_buffer
    torch._functorch.config.donated_buffer = False
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        with fused.enabled("cpu"):
            yield
    finally:
        torch._functorch.config.donated_buffer = donated
        torch._dynamo.reset()


def _x(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.7).requires_grad_()


def _params(m):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + (0.5 if name == "weight" else -0.5))
    return m


BATCH = [  # (layer, reference kind, reference kwargs, running-stat buffer)
    (lambda: N.L1BatchNorm2d(4), "l1", {}, "running_mad"),
    (lambda: N.TopKBatchNorm2d(4, k=3), "topk", {"k": 3}, "running_std"),
    (lambda: N.BatchNormStar2d(4, sigma=1.0, l1_alpha=0.01), "l2", {"sigma": 1.0}, "running_var"),
    (lambda: N.MeanOnlyBatchNorm2d(4), "mean", {}, None),
]


@pytest.mark.parametrize("factory,kind,kw,buf", BATCH, ids=[b[1] for b in BATCH])
def test_batch_layers_match_reference_forward_running_stats_and_gradients(factory, kind, kw, buf):
    m = _params(factory().double().train())
    x = _x((3, 4, 5, 5))
    y = m(x)
    want = ref.batch_norm_train(x, kind, m.weight, m.bias, eps=m.eps, **kw)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "the fused path did not compile"
    mu, s = ref.bn_stats(x, kind, kw.get("k"))
    torch.testing.assert_close(m.running_mean, 0.9 * torch.zeros(4, dtype=torch.float64) + 0.1 * mu)
    if buf is not None:
        n = x.numel() // 4
        stat = {"l1": s, "topk": ref.c_inf(n) * s, "l2": s * n / (n - 1)}[kind]
        torch.testing.assert_close(getattr(m, buf), 0.9 + 0.1 * stat)
    w = _x((3, 4, 5, 5), seed=7).detach()
    assert torch.autograd.gradcheck(lambda x, *p: (m(x) * w).sum(), (x,) + tuple(m.parameters()))


def test_iternorm_and_divisive_norm_match_reference():
    m = _params(N.IterNorm2d(6, group_size=3, T=5).double().train())
    x = _x((4, 6, 3, 3))
    y = m(x)
    want, mu, _ = ref.iter_norm(x, 3, 5, m.eps, gamma=m.weight, beta=m.bias)
    torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(m.running_mean, 0.1 * mu)
    assert torch.autograd.gradcheck(lambda x: m(x).pow(2).sum(), (x,))

    dn = N.DivisiveNorm2d(3, 3, sigma=0.5).double().train()
    x = _x((2, 3, 6, 6))
    torch.testing.assert_close(dn(x), ref.divisive_norm_2d(x, (3, 3), (3, 3), 0.5, eps=dn.eps),
                               rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x: dn(x).pow(2).sum(), (x,))


def test_penalty_is_recorded_and_differentiable():
    m = N.L1BatchNorm2d(4, l1_alpha=0.5).double().train()
    x = _x((3, 4, 5, 5))
    m(x)
    p = normswap.penalty(m)
    assert p.item() == pytest.approx(0.5 * ref.centered_mean_abs_batch(x).mean().item(), rel=1e-12)
    assert torch.autograd.gradcheck(lambda x: (m(x), normswap.penalty(m))[1], (x,))


def test_inplace_activation_after_the_layer_and_widths_share_a_graph():
    a, b = N.L1BatchNorm2d(8).train(), N.L1BatchNorm2d(16).train()
    xa, xb = torch.randn(4, 8, 6, 9, requires_grad=True), torch.randn(3, 16, 5, 7, requires_grad=True)
    for m, x in ((a, xa), (b, xb)):
        y = torch.relu_(m(x))
        y.sum().backward()
        with fused.disabled():
            x2 = x.detach().clone().requires_grad_()
            torch.relu_(type(m)(m.num_features).train()(x2)).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, \
        "layers of different widths and input sizes should share one dynamic graph (sizes chosen all different: equal sizes specialize a graph)"


def test_not_used_inside_an_enclosing_compile_nor_when_disabled(monkeypatch):
    calls = []
    monkeypatch.setattr(fused, "fused_call", lambda fn, *a: calls.append(fn) or fn(*a))
    m = N.L1BatchNorm2d(4).train()
    x = torch.randn(2, 4, 3, 3)
    torch.compile(m, backend="eager")(x)
    with fused.disabled():
        m(x)
    assert calls == []
    m(x)
    assert len(calls) == 1


def test_layers_that_are_pytorchs_own_kernel_stay_so(monkeypatch):
    """A fixed-sigma layer is PyTorch's batch / layer / group norm kernel; compiled it was
    1.6-1.9x slower on the H200 (BN-s 3.42x against 1.81x the native layer). It keeps the
    kernel; with a learned sigma or the penalty it has no such kernel and is fused."""
    calls = []
    monkeypatch.setattr(fused, "fused_call", lambda fn, *a: calls.append(fn) or fn(*a))
    x = torch.randn(2, 4, 3, 3)
    for m in (N.BatchNormStar2d(4), N.GroupNormStar(2, 4), N.LayerNormStar2d(4)):
        m.train()(x)
    m.train()(x.bfloat16())   # half input, float32 parameters: the kernel too
    assert calls == []
    for m in (N.BatchNormStar2d(4, learn_sigma=True), N.BatchNormStar2d(4, l1_alpha=0.1)):
        m.train()(x)
    assert len(calls) == 2


def test_compile_failure_warns_once_and_runs_op_by_op(monkeypatch):
    def broken(*a, **k):
        def run(*args):
            raise torch._dynamo.exc.TorchDynamoException("no C++ compiler here")
        return run
    monkeypatch.setattr(fused, "_state", dict(fused._state, compiled=None, failed=False))
    monkeypatch.setattr(torch, "compile", broken)
    m = N.L1BatchNorm2d(4).double().train()
    x = _x((3, 4, 2, 2))
    with pytest.warns(RuntimeWarning, match="compiling the normalizers' training forward failed"):
        y = m(x)
    torch.testing.assert_close(y, ref.batch_norm_train(x, "l1", m.weight, m.bias, eps=m.eps))
    assert fused._state["failed"] and not fused.wanted(x)


def test_a_value_error_of_the_layer_is_not_taken_for_a_compile_failure():
    m = N.L1BatchNorm2d(4).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 4, 1, 1))
    assert not fused._state["failed"]


def test_an_error_the_layer_raises_op_by_op_too_leaves_the_fused_path_on(monkeypatch):
    """Whatever form the error takes under the compiler, if the op-by-op rerun raises as
    well it was the input's fault: it propagates and the fused path stays on."""
    def wrapped(fn, *args):
        raise torch._dynamo.exc.TorchRuntimeError("shape mismatch seen while tracing")
    monkeypatch.setattr(fused, "_state", dict(fused._state, compiled=wrapped, failed=False))
    m = N.TopKBatchNorm2d(4, k=10).train()
    with pytest.raises(ValueError, match="k=10 is larger than the 8 values"):
        m(torch.randn(2, 4, 2, 2))   # raised inside the training forward, op by op
    assert not fused._state["failed"]
    with pytest.warns(RuntimeWarning, match="compiling the normalizers' training forward failed"):
        m(torch.randn(2, 4, 3, 3))   # a valid input: now it was the compiler's failure
    assert fused._state["failed"]


def test_environment_variable_values():
    code = ("import warnings; warnings.simplefilter('error')\n"
            "from normswap.norms import fused; print(sorted(fused._state['devices']))")
    out = {}
    for value in ("", "0", "1", "cpu", "gpu"):
        env = dict(os.environ, NORMSWAP_FUSED=value)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        out[value] = r.stdout.strip() if r.returncode == 0 else r.stderr.strip().splitlines()[-1]
    assert out[""] == out["0"] == "[]"
    assert out["1"] == "['cuda']" and out["cpu"] == "['cpu', 'cuda']"
    assert "NORMSWAP_FUSED='gpu' is not understood" in out["gpu"]
