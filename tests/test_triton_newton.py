"""IterNorm's Newton iteration as Triton kernels (normswap/kernels/triton_newton.py), which
CUDA float32 runs. Without a GPU here they run under Triton's interpreter
(``TRITON_INTERPRET=1``, set before Triton is imported, so in a process of their own) on
CPU tensors, against an independent float64 re-computation of PAPERS.md section 6:

    S = Sigma / tr(Sigma),  P_0 = I,  P_k = (3 P_{k-1} - P_{k-1}^3 S) / 2,  W = P_T / sqrt(tr(Sigma))

forward, and backward by autograd through that loop; then IterNorm layers whose iteration
runs on them (equal groups: the written-out Function; unequal groups: the operator),
against tests/reference.py. And a kernel that fails to launch warns once and leaves the
PyTorch formulation in charge."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))

_INTERPRETED = textwrap.dedent('''
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import normswap.norms as N
    from normswap.kernels import triton_newton as tn
    from normswap.norms import whitening as W
    from tests import reference as ref

    def newton64(cov, T):                       # PAPERS.md section 6, float64
        tr = cov.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
        s = cov / tr
        p = torch.eye(cov.shape[-1], dtype=cov.dtype).expand_as(cov)
        for _ in range(T):
            p = (3 * p - p @ p @ p @ s) / 2
        return p / torch.sqrt(tr)

    g = torch.Generator().manual_seed(0)
    assert tn.applies(torch.zeros(2, 32, 32)) and not tn.applies(torch.zeros(2, 33, 33))
    assert not tn.applies(torch.zeros(2, 16, 16, dtype=torch.float64))
    for d, T in [(16, 5), (16, 0), (16, 1), (8, 3), (5, 2), (24, 4), (32, 5)]:
        a = torch.randn(3, d, 3 * d, generator=g, dtype=torch.float64)
        cov = (a @ a.mT / (3 * d) + 1e-3 * torch.eye(d, dtype=torch.float64)).requires_grad_()
        grad = torch.randn(3, d, d, generator=g, dtype=torch.float64)
        want = newton64(cov, T)
        want.backward(grad)
        got = tn.forward(cov.detach().float(), T)
        dgot = tn.backward(cov.detach().float(), grad.float(), T)
        assert got.dtype == dgot.dtype == torch.float32
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= 2e-6 * max(scale, 1.0), (d, T, "forward")
        gscale = cov.grad.abs().max().item()
        assert (dgot.double() - cov.grad).abs().max().item() <= 2e-5 * max(gscale, 1.0), (d, T, "backward")

    # the layers with their iteration on the kernels (spied on), float32 CPU tensors
    W._TRITON_DEVICES = ("cuda", "cpu")
    calls = []
    for name in ("forward", "backward"):
        fn = getattr(tn, name)
        setattr(tn, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    for C, group, shape in [(16, 8, (6, 16, 3, 3)), (24, 16, (6, 24, 2, 2)), (16, 4, (40, 16))]:
        make = N.IterNorm2d if len(shape) == 4 else N.IterNorm1d
        m = make(C, group_size=group, T=5).train()
        x = (torch.randn(shape, generator=g) * 2 + 0.5).requires_grad_()
        calls.clear()
        y = m(x)
        want_y, want_mu, _ = ref.iter_norm(x, group, 5, m.eps)
        assert (y.double() - want_y).abs().max().item() < 1e-4, (C, group, "output")
        dy = torch.randn(shape, generator=g)
        y.backward(dy)
        assert "forward" in calls and "backward" in calls, (C, group, calls)
        # gradients: the float64 layer on the PyTorch formulation (gradchecked elsewhere)
        m64 = make(C, group_size=group, T=5).double().train()
        x64 = x.detach().double().requires_grad_()
        W._TRITON_DEVICES = ("cuda",)
        m64(x64).backward(dy.double())
        W._TRITON_DEVICES = ("cuda", "cpu")
        assert (x.grad.double() - x64.grad).abs().max().item() < 1e-4, (C, group, "input gradient")
        for p, p64 in zip(m.parameters(), m64.parameters()):
            assert (p.grad.double() - p64.grad).abs().max().item() < 1e-3, (C, group, "parameter gradient")
    print("OK")
''')


def test_triton_newton_kernels_match_float64_and_run_iternorm_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.path.dirname(HERE))
    run = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(HERE), timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout[-2000:] + run.stderr[-4000:]


def _compile_for(kernel, capability: int, block: int):
    import triton
    from triton.backends.compiler import GPUTarget
    sig = {"cov_ptr": "*fp32", "grad_ptr": "*fp32", "out_ptr": "*fp32", "d": "i32", "T": "constexpr",
           "BLOCK": "constexpr"}
    if kernel.fn.__name__ == "forward_kernel":
        del sig["grad_ptr"]
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs={"T": 5, "BLOCK": block})
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})


@pytest.mark.parametrize("block", [16, pytest.param(32, marks=pytest.mark.slow)])
@pytest.mark.parametrize("capability", [80, 90], ids=["sm_80", "sm_90"])
def test_triton_newton_kernels_compile_to_gpu_machine_code(capability, block):
    """What the interpreter cannot check: both kernels compile (Triton's own ptxas, no GPU
    needed) for Ampere and Hopper at the block sizes normswap launches, T = 5, within the
    shared memory those GPUs give a block (A100: 163 KiB)."""
    from normswap.kernels import triton_newton as tn
    for kernel in (tn.forward_kernel, tn.backward_kernel):
        compiled = _compile_for(kernel, capability, block)
        assert compiled.asm["cubin"] and compiled.metadata.shared <= 163 * 1024


def test_a_failing_triton_launch_warns_once_and_runs_the_pytorch_formulation(monkeypatch):
    from normswap.kernels import triton_newton
    from normswap.norms import whitening as W
    if not triton_newton.available():
        pytest.skip("Triton does not import here")
    monkeypatch.setattr(W, "_TRITON_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(W, "_triton_failed", [])

    def broken(*a):
        raise RuntimeError("no GPU it compiles for")
    monkeypatch.setattr(triton_newton, "forward", broken)
    monkeypatch.setattr(triton_newton, "backward", broken)
    a = torch.randn(2, 8, 30, dtype=torch.float64)
    cov = (a @ a.mT / 30).float()
    with pytest.warns(RuntimeWarning, match="Triton Newton kernels failed"):
        out = W._newton_kernel(cov, None, 5)
    assert out is None and len(W._triton_failed) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # not tried again: no second warning
        assert W._newton_kernel(cov, None, 5) is None
    tr, _, _, _, p = W._newton_steps(cov.double(), 5)
    torch.testing.assert_close(W._newton_whitening(cov, 5).double(), p / torch.sqrt(tr), rtol=1e-5, atol=1e-6)
