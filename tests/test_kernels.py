"""The compiled CPU kernels (normswap.kernels): which layers take them, that they give
the PyTorch formulation's values and gradients on inputs large enough to split between
threads, and how they are built, cached and switched off.

The formulas themselves are checked against the float64 re-computations of PAPERS.md in
tests/test_areas.py, on both paths (its ``path`` fixture)."""
import contextlib
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import normswap
import normswap.kernels as kernels
import normswap.norms as N
from normswap.norms import rows

from .scripts import load

saved_bytes = load("bench_norms").saved_bytes   # what bench_norms.py reports as saved memory

ROW_LAYERS = [
    ("L1LayerNorm", lambda: N.L1LayerNorm(96), (16, 40, 96)),
    ("TopKLayerNorm", lambda: N.TopKLayerNorm(96, k=7), (16, 40, 96)),
    ("LayerNormStar-learned", lambda: N.LayerNormStar(96, learn_sigma=True, elementwise_affine=True), (16, 40, 96)),
    ("L1LayerNorm2d", lambda: N.L1LayerNorm2d(24), (8, 24, 12, 16)),
    ("TopKLayerNorm2d", lambda: N.TopKLayerNorm2d(24, k=3), (8, 24, 12, 16)),
    ("L1GroupNorm", lambda: N.L1GroupNorm(4, 24), (8, 24, 12, 16)),
    ("TopKGroupNorm", lambda: N.TopKGroupNorm(6, 24, k=9, affine=False), (8, 24, 12, 16)),
    ("GroupNormStar-learned", lambda: N.GroupNormStar(4, 24, learn_sigma=True), (8, 24, 12, 16)),
    ("L1InstanceNorm2d", lambda: N.L1InstanceNorm2d(24, affine=True), (8, 24, 12, 16)),
    ("TopKInstanceNorm1d", lambda: N.TopKInstanceNorm1d(24, k=5, affine=True), (8, 24, 180)),
    ("InstanceNormStar2d-learned", lambda: N.InstanceNormStar2d(24, affine=True, learn_sigma=True), (8, 24, 12, 16)),
    ("L1BatchNorm2d", lambda: N.L1BatchNorm2d(24), (8, 24, 12, 16)),
    ("TopKBatchNorm2d", lambda: N.TopKBatchNorm2d(24, k=11), (8, 24, 12, 16)),
    ("BatchNormStar2d-learned", lambda: N.BatchNormStar2d(24, learn_sigma=True), (8, 24, 12, 16)),
    ("L1BatchNorm1d-tokens", lambda: N.L1BatchNorm1d(24), (64, 24, 30)),
    # rows of 45: the vector sums' partial last vector (masked loads and stores of the columns' sums)
    ("TopKLayerNorm-ragged", lambda: N.TopKLayerNorm(45, k=6), (16, 48, 45)),
    ("L1LayerNorm-ragged", lambda: N.L1LayerNorm(45), (16, 48, 45)),
]


@pytest.fixture(scope="module", autouse=True)
def _built():
    assert kernels.available(), "the compiled CPU kernels did not build (is a C compiler installed?)"


def _layer(factory, dtype):
    torch.manual_seed(0)
    m = factory().to(dtype).train()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "sigma":
                p.uniform_(0.5, 1.5)
    m.l1_alpha = 0.01
    return m


def _step(m, x, dy):
    """Output, penalty and every gradient of ``(y * dy).sum() + penalty``."""
    x = x.clone().requires_grad_()
    m.zero_grad()
    y = m(x)
    pen = normswap.penalty(m)
    ((y * dy).sum() + pen).backward()
    return [y.detach(), pen.detach(), x.grad] + [p.grad for p in m.parameters()]


@contextlib.contextmanager
def _num_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block (the kernels follow it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _row_inputs(shape, dtype):
    """The comparison tests' input ``x`` (mean 0.5, sd 2) and gradient ``dy`` in ``dtype``."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    return x, torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = rows.row_norm

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)
    monkeypatch.setattr(rows, "row_norm", counting)
    return calls


@pytest.fixture
def spy_calls(monkeypatch):
    """The names of the kernels' entry points called (``kernels.call``)."""
    names = []
    real = kernels.call

    def counting(name, *args):
        names.append(name)
        return real(name, *args)
    monkeypatch.setattr(kernels, "call", counting)
    return names


@pytest.mark.parametrize("name,factory,shape", ROW_LAYERS, ids=[r[0] for r in ROW_LAYERS])
def test_row_layers_take_the_kernels_in_every_float_dtype(name, factory, shape, spy):
    m = _layer(factory, torch.float32)
    m(torch.randn(shape))
    assert len(spy) == 1
    m.to(torch.bfloat16)(torch.randn(shape, dtype=torch.bfloat16))
    assert len(spy) == 2, "a model cast to bfloat16 computes in float32 in the kernels"


COLUMN_LAYERS = [   # (name, factory, input shape, memory format): the channels are the input's last dim
    ("L1BatchNorm2d", lambda c: N.L1BatchNorm2d(c), (8, 24, 12, 16), torch.channels_last),
    ("TopKBatchNorm2d", lambda c: N.TopKBatchNorm2d(c, k=7), (8, 24, 12, 16), torch.channels_last),
    ("BatchNormStar2d-learned", lambda c: N.BatchNormStar2d(c, learn_sigma=True), (8, 24, 12, 16),
     torch.channels_last),
    ("L1BatchNorm3d", lambda c: N.L1BatchNorm3d(c), (4, 5, 8, 16, 16), torch.channels_last_3d),
    ("TopKBatchNorm2d-one-channel-chunk", lambda c: N.TopKBatchNorm2d(c, k=3), (16, 16, 12, 12),
     torch.channels_last),
    ("L1BatchNorm1d-tokens", lambda c: N.L1BatchNorm1d(c, channel_dim=-1), (16, 50, 48), None),
    ("TopKBatchNorm1d-tokens", lambda c: N.TopKBatchNorm1d(c, k=5, channel_dim=-1), (16, 50, 48), None),
]


def _kernels_against_pytorch(make, x, dy, tol: float) -> list:
    """:func:`_step` of a fresh layer from ``make`` (in ``x``'s dtype) with the kernels, and
    its running statistics, checked against the same with the PyTorch formulation; returns
    the kernels' results."""
    m_fast, m_slow = _layer(make, x.dtype), _layer(make, x.dtype)
    fast = _step(m_fast, x, dy) + list(m_fast.buffers())
    with kernels.disabled():
        slow = _step(m_slow, x, dy) + list(m_slow.buffers())
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    return fast


def _column_input(shape, fmt, dtype):
    x, dy = _row_inputs(shape, dtype)
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    return x, dy


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,factory,shape,fmt", COLUMN_LAYERS, ids=[r[0] for r in COLUMN_LAYERS])
def test_channels_last_input_is_read_in_place_by_the_column_kernels(name, factory, shape, fmt, dtype, threads,
                                                                     spy_calls):
    """A batch norm whose channels are the input's last dim in memory (channels-last maps,
    tokens with their channels last) runs the column kernels on the input as it lies (no
    transposed copy: four of them made such a layer 3-6x nn.BatchNorm2d), with the PyTorch
    formulation's values and gradients (penalty and running statistics included) and the
    input's layout; threaded and not."""
    c = shape[-1] if fmt is None else shape[1]
    assert torch.tensor(shape).prod() >= rows._SMALL, "large enough for the threaded path"
    x, dy = _column_input(shape, fmt, dtype)
    with _num_threads(threads):
        fast = _kernels_against_pytorch(lambda: factory(c), x, dy, tol=1e-10 if dtype == torch.float64 else 2e-4)
    assert spy_calls == ["cols_forward", "cols_backward"]
    if fmt is not None:
        assert fast[0].is_contiguous(memory_format=fmt) and fast[2].is_contiguous(memory_format=fmt), \
            "the output and the input gradient keep the input's layout"


@pytest.mark.parametrize("name,factory,shape,fmt", COLUMN_LAYERS[:3], ids=[r[0] for r in COLUMN_LAYERS[:3]])
def test_column_kernels_give_the_same_bits_on_any_thread_count(name, factory, shape, fmt):
    """The columns' sums are added per block of positions, then block by block, and the
    top-k values sorted before they are added: a result does not depend on how the
    positions were split between threads."""
    x, dy = _column_input(shape, fmt, torch.float32)
    runs = []
    for threads in (1, 2, 3):
        with _num_threads(threads):
            m = _layer(lambda: factory(shape[1]), torch.float32)
            runs.append(_step(m, x, dy) + list(m.buffers()))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("k,shape", [
    (1, (8, 33, 20, 20)),      # k = 1, channels past the last full chunk of 16
    (64, (4, 5, 4, 4)),        # k = every value of a channel (one block: every value a candidate)
    (50, (4, 5, 4, 4)),
    (200, (8, 33, 40, 40)),    # lists of 2 k + 32 values cut again and again
], ids=["k1", "k-all", "k50-one-block", "k200"])
def test_column_top_k_for_every_k(k, shape, spy_calls):
    """The column kernels' top-k statistic for k from 1 to every value of a channel, against
    the PyTorch formulation in float64 (Gaussian input: no ties)."""
    x, dy = _column_input(shape, torch.channels_last, torch.float64)
    _kernels_against_pytorch(lambda: N.TopKBatchNorm2d(shape[1], k=k), x, dy, tol=1e-10)
    assert spy_calls == ["cols_forward", "cols_backward"]


def test_other_strided_rows_are_copied_into_the_kernels(spy_calls):
    """A batch norm input whose channels are neither outermost nor innermost in memory (here
    (N, H, C, W)) runs the row kernels on one contiguous copy, with the PyTorch
    formulation's values and gradients."""
    x = torch.randn(8, 12, 24, 16).transpose(1, 2)   # (N, C, H, W) shape, (N, H, C, W) memory
    _kernels_against_pytorch(lambda: N.L1BatchNorm2d(24), x, torch.randn_like(x), tol=2e-5)
    assert spy_calls == ["forward", "backward"]


@pytest.mark.parametrize("param_dtype", ["float32", "half"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,factory,shape", ROW_LAYERS, ids=[r[0] for r in ROW_LAYERS])
def test_half_input_is_computed_in_float32_by_the_kernels(name, factory, shape, dtype, param_dtype, spy):
    """Half activations with float32 parameters (autocast's case) or with the whole layer in
    the half type: the kernels compute in float32 from the half input, so every result is
    exactly the float32 computation on the same values (the float32 path is checked against
    the PyTorch formulation above and against float64 references in test_areas.py),
    rounded once to the caller's dtype."""
    import copy
    param_dtype = torch.float32 if param_dtype == "float32" else dtype
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    m_half = _layer(factory, param_dtype)
    m_ref = copy.deepcopy(m_half).float()   # the same parameter values, exactly, in float32
    got = _step(m_half, x, dy) + list(m_half.buffers())
    assert len(spy) == 1, "a half input takes the kernels"
    want = _step(m_ref, x.float(), dy.float()) + list(m_ref.buffers())
    assert got[0].dtype == dtype and got[2].dtype == dtype, "output and input gradient in the input's dtype"
    assert all(p.grad.dtype == param_dtype for p in m_half.parameters())
    assert len(got) == len(want)
    nparams = len(list(m_half.parameters()))
    for i, (a, b) in enumerate(zip(got, want)):
        if param_dtype != torch.float32 and 3 <= i < 3 + nparams:
            # a half parameter shared by several rows (instance norm: one per example) sums
            # its rows' gradients in its own dtype, outside the kernels: N roundings
            ulp = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
            torch.testing.assert_close(a.float(), b, rtol=0, atol=x.shape[0] * ulp * float(b.abs().max()))
        else:
            torch.testing.assert_close(a, b.to(a.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,factory,shape", ROW_LAYERS, ids=[r[0] for r in ROW_LAYERS])
def test_kernels_give_the_pytorch_formulations_values_and_gradients(name, factory, shape, dtype, threads):
    assert torch.tensor(shape).prod() >= rows._SMALL, "large enough for the threaded path"
    x, dy = _row_inputs(shape, dtype)
    with _num_threads(threads):
        m_fast, m_slow = _layer(factory, dtype), _layer(factory, dtype)
        fast = _step(m_fast, x, dy) + list(m_fast.buffers())   # running statistics too
        with kernels.disabled():
            slow = _step(m_slow, x, dy) + list(m_slow.buffers())
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, **tol)


def test_top_k_picks_the_k_largest_deviations_of_each_row():
    """One row whose k largest |x - mu| are known: only they get the top-k gradient."""
    x = torch.tensor([[0.0, 10.0, -9.0, 1.0, 2.0, -8.0, 0.5, 3.0]], dtype=torch.float64)
    m = N.TopKLayerNorm(8, k=3, elementwise_affine=False).double()
    xs = x.clone().requires_grad_()
    y = m(xs)
    # the loss sum(y * v) makes dL/dd nonzero; the top-k term adds only at positions 1, 2, 5
    v = x - x.mean()
    (y * v).sum().backward()
    with kernels.disabled():
        xr = x.clone().requires_grad_()
        (m(xr) * v).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-12, atol=1e-12)
    a = v.abs()[0]
    d = normswap.norms.functional.c_inf(8) * a.topk(3).values.mean() + m.eps
    torch.testing.assert_close(y, v / d, rtol=1e-12, atol=1e-12)


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full, timeout=300)


_PROBE = """
    import json, warnings, torch
    warnings.simplefilter("always")
    import normswap.kernels as kernels, normswap.norms as N
    torch.manual_seed(0)
    m = N.L1GroupNorm(4, 16)
    x = torch.randn(4, 16, 9, 9, requires_grad=True)
    y = m(x)
    y.pow(2).sum().backward()
    print(json.dumps({"available": kernels.available(), "y": y.flatten()[:50].tolist(),
                      "g": x.grad.flatten()[:50].tolist()}))
"""


def test_built_once_into_the_cache_then_reused_and_two_processes_agree(tmp_path):
    env = {"NORMSWAP_CACHE_DIR": str(tmp_path / "cache")}
    first = _run(_PROBE, env)
    assert first.returncode == 0, first.stderr
    built = sorted((tmp_path / "cache").iterdir())
    assert [p.suffix for p in built] == [".so"], "one library and no temporary file left"
    stamp = built[0].stat().st_mtime_ns
    second = _run(_PROBE, env)
    assert second.returncode == 0, second.stderr
    assert sorted((tmp_path / "cache").iterdir()) == built and built[0].stat().st_mtime_ns == stamp
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["available"] and a == b


def test_without_a_compiler_or_switched_off_the_pytorch_formulation_runs(tmp_path):
    want = json.loads(_run(_PROBE, {"NORMSWAP_CACHE_DIR": str(tmp_path / "ok")}).stdout)
    broken = _run(_PROBE, {"NORMSWAP_CACHE_DIR": str(tmp_path / "cc"), "CC": "false"})
    assert broken.returncode == 0, broken.stderr
    assert "compiled CPU kernels are unavailable" in broken.stderr
    assert not (tmp_path / "cc").exists() or not list((tmp_path / "cc").iterdir()), "no half-built file"
    off = _run(_PROBE, {"NORMSWAP_CACHE_DIR": str(tmp_path / "off"), "NORMSWAP_KERNELS": "0"})
    for run in (json.loads(broken.stdout), json.loads(off.stdout)):
        assert not run["available"]
        torch.testing.assert_close(torch.tensor(run["y"]), torch.tensor(want["y"]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(run["g"]), torch.tensor(want["g"]), rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "off").exists()


_COMPILED = (1, 3, 5, 6, 7, 8, 11, 12)   # (6: no gamma, no beta)


@pytest.mark.parametrize("name,factory,shape", [ROW_LAYERS[i] for i in _COMPILED],
                         ids=[ROW_LAYERS[i][0] for i in _COMPILED])
def test_compiled_model_calls_the_same_kernels_as_eager(name, factory, shape):
    """Under torch.compile the kernels are the normswap::rows_forward operator (no graph break;
    values and gradients are the eager layer's), except for the L1 and L2 statistics of the
    batch area (Area.compiled_kernel_stats), where inductor's code from the PyTorch
    formulation fuses with the layers around it."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._inductor.compile(gm, example_inputs)

    torch._dynamo.reset()
    m = _layer(factory, torch.float64)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    eager = _step(m, x, dy)
    compiled = torch.compile(m, backend=backend, fullgraph=True)
    got = _step(compiled, x, dy)
    assert len(graphs) == 1
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    kernel = m.operation.stat in m.area.compiled_kernel_stats
    assert kernel == (not isinstance(m.area, N.BatchArea) or m.operation.stat == "topk")
    assert (torch.ops.normswap.rows_forward.default in ops) == kernel
    tol = 1e-12 if kernel else 1e-9   # (inductor's code: another formulation of the same sums)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_one_value_per_row_keeps_each_rows_own_recovery():
    """Instance norm in eval mode (no running statistics) on 1x1 maps: one value per row,
    so v = 0 and y = beta of the row's channel (the kernels' along-the-row indexing would
    read beta[0] for every row)."""
    m = N.L1InstanceNorm2d(3, affine=True).eval()
    with torch.no_grad():
        m.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    y = m(torch.randn(2, 3, 1, 1))
    torch.testing.assert_close(y.flatten(), torch.tensor([1.0, 2.0, 3.0]).repeat(2))


@pytest.mark.parametrize("make,shape,fmt", [
    (lambda: N.TopKLayerNorm(64, k=10), (40, 64), None),            # rows selected side by side
    (lambda: N.TopKLayerNorm(600, k=10), (40, 600), None),          # one row at a time
    (lambda: N.TopKBatchNorm2d(8, k=5), (4, 8, 6, 6), None),        # the batch area
    (lambda: N.TopKBatchNorm2d(8, k=5), (8, 8, 6, 6), None),        # ... with at least k examples
    (lambda: N.TopKBatchNorm2d(8, k=5), (8, 8, 6, 6), torch.channels_last),   # ... channels-last
    (lambda: N.L1GroupNorm(2, 8), (4, 8, 6, 6), None)],
    ids=["topk-lanes", "topk-rows", "topk-batch", "topk-batch-slices", "topk-batch-channels-last", "l1-group"])
def test_non_finite_values_give_non_finite_rows_and_no_out_of_range_access(make, shape, fmt):
    """A row holding NaN or inf has no order; the kernels must still give NaN / inf there
    (top-k: forward and backward, whose k-th largest value is then NaN) and the other rows
    their normal values."""
    m = make()
    x = torch.randn(shape)
    x.view(-1)[7] = float("nan")
    x.view(-1)[-3] = float("inf")
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    xs = x.clone().requires_grad_()
    y = m(xs)
    y.sum().backward()
    with kernels.disabled():
        want = m(x)
    bad = ~torch.isfinite(want)
    assert bad.any() and torch.equal(bad, ~torch.isfinite(y))
    torch.testing.assert_close(y[~bad], want[~bad], rtol=1e-4, atol=1e-4)
    if isinstance(m.area, N.BatchArea):
        m.eval()   # the running statistics skipped the non-finite batch
        assert torch.isfinite(m.running_mean).all()


def _top_k_rows_with_earliest_ties(rows: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """Float64 re-computation of a top-k standardization of each row (PAPERS.md section 2)
    whose k positions are fixed first: the k largest ``|v|``, and of values tied at the k-th
    place the earliest (a stable sort); the gradient then follows those positions."""
    from tests import reference as ref
    v = rows - rows.mean(dim=1, keepdim=True)
    order = torch.sort(v.detach().abs(), dim=1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(v).scatter_(1, order, 1.0)
    d = ref.c_inf(rows.shape[1]) * (v.abs() * mask).sum(dim=1, keepdim=True) / k + eps
    return v / d


_SAME = (lambda x: x, lambda rows, shape: rows)
_BATCH_ROWS = (lambda x: x.transpose(0, 1).reshape(x.shape[1], -1),       # (N, C, ...) -> (C, N ...)
               lambda rows, shape: rows.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1).contiguous())


_CL = torch.channels_last


@pytest.mark.parametrize("make,shape,rows,fmt", [
    (lambda: N.TopKLayerNorm(64, k=10, elementwise_affine=False), (12, 64), _SAME, None),    # rows side by side
    (lambda: N.TopKLayerNorm(600, k=10, elementwise_affine=False), (5, 600), _SAME, None),   # one row at a time
    (lambda: N.TopKBatchNorm2d(3, k=10, affine=False), (4, 3, 5, 5), _BATCH_ROWS, None),     # the batch area
    # at least k examples: candidates above the bound from the examples' extremes (portable build)
    (lambda: N.TopKBatchNorm2d(3, k=10, affine=False), (16, 3, 6, 6), _BATCH_ROWS, None),
    # channels-last: the column kernels, with fewer blocks of positions than k (every value a
    # candidate) and with more (candidates above the blocks' bound), 16 channels and a tail
    (lambda: N.TopKBatchNorm2d(3, k=10, affine=False), (4, 3, 5, 5), _BATCH_ROWS, _CL),
    (lambda: N.TopKBatchNorm2d(19, k=10, affine=False), (16, 19, 16, 16), _BATCH_ROWS, _CL),
], ids=["lanes", "rows", "batch", "batch-slices", "batch-channels-last", "batch-channels-last-blocks"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_top_k_gradient_at_a_tied_kth_place_follows_the_earliest_values(make, shape, rows, fmt, dtype, spy_calls):
    """When more values than fit tie at the k-th largest |v|, the kernels' backward (which
    keeps only each row's k-th largest value from the forward) gives the gradient to the
    earliest of them, as a stable sort would choose; checked against the float64
    re-computation above, with a tie in every row and a row without one (float32 takes
    the kernels' float32-only selection paths). Channels-last input: "earliest" in the
    (n, h, w) order of the positions, as for the channels-first layout."""
    to_rows, from_rows = rows   # (the values that share statistics as rows, and back)
    m = make().to(dtype).train()
    gen = torch.Generator().manual_seed(3)
    x = 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
    rows_view = to_rows(x)
    n = rows_view.shape[1]
    tied = torch.zeros(n, dtype=torch.bool)
    tied[3:n:max(n // 16, 2)] = True            # ~16 equal values per row, spread out
    rows_view = rows_view.clone()
    rows_view[:, tied] = 2.0
    rows_view[0] = torch.randn(n, generator=gen, dtype=torch.float64)   # (no tie in this row)
    x = from_rows(rows_view, shape)
    assert torch.equal(to_rows(x), rows_view)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x.to(dtype)   # (2.0 and the ties stay exact)

    xs = (x.clone() if fmt is None else x.contiguous(memory_format=fmt)).requires_grad_()
    (m(xs) * w.to(dtype)).sum().backward()
    assert ("cols_forward" in spy_calls) == (fmt is not None)
    xr = x.double().requires_grad_()
    want = _top_k_rows_with_earliest_ties(to_rows(xr), 10, m.eps)
    (want * to_rows(w)).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(to_rows(m(x).detach()).double(), want.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(xs.grad.double(), xr.grad, rtol=tol, atol=tol)


def _rows_for_selection(kind: str, rows: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of n values built to send the float32 one-row selection down each of its
    branches (rows.c: candidates by the 16 interleaved subsets' maxima, then ranked in one
    register, in two, or by the general path)."""
    x = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    if kind == "mixed":           # the kinds below in turn, row by row (rows taken four at a time)
        kinds = ["gauss", "one-subset", "tied-20", "tied-40", "tied-12"]
        return torch.cat([_rows_for_selection(kinds[i % len(kinds)], 1, n, gen) for i in range(rows)])
    if kind == "one-subset":      # every 16th value large: one subset holds the top, > 32 candidates
        x[:, 5::16] = 10.0 + torch.rand(rows, len(range(5, n, 16)), generator=gen, dtype=torch.float64)
    elif kind.startswith("tied-"):   # that many equal values above the rest, spread over the row
        count = int(kind.split("-")[1])
        x[:, torch.linspace(0, n - 1, count).long()] = 8.0
    elif kind == "all-candidates":   # +-1 in turn: mean 0, every |x - m| ties, every value is a candidate
        x[:, 0::2], x[:, 1::2] = 1.0, -1.0
    return x


@pytest.mark.parametrize("n,k,kind", [
    (64, 16, "gauss"), (51, 16, "gauss"), (600, 10, "gauss"), (600, 1, "gauss"),
    (600, 10, "one-subset"), (600, 10, "tied-12"), (600, 10, "tied-20"), (600, 10, "tied-40"),
    (600, 10, "mixed"), (48, 10, "mixed"), (600, 10, "all-candidates"), (602, 16, "all-candidates"),
    # short rows, 16 side by side (n * k <= 4096): each row's candidates into the lanes
    (256, 10, "mixed"), (64, 10, "one-subset"), (33, 16, "mixed"), (256, 16, "all-candidates"),
    # ... lists shorter than the 16 values the lanes first sort (k = 1, 4) and longer (k = 16)
    (64, 4, "gauss"), (100, 1, "gauss"), (64, 16, "tied-20"),
    # ... and whole rows into the lanes (portable build: rows under 32 values, or k > 16)
    (20, 10, "mixed"), (64, 20, "mixed"),
])
def test_top_k_one_row_selection_matches_a_float64_recomputation_on_every_branch(n, k, kind):
    """Float32 top-k layer norm, against the float64 re-computation with earliest ties, on
    rows selected from the input itself (n * k above the 16-row selection's limit): full
    64-value blocks and a tail of 3 values, k = 1 and 16, candidates that fit one register
    (Gaussian rows), two (20 tied values), or neither (40 tied values; one subset holding
    the top of the row), so that the general path takes over; and those kinds mixed in the
    rows that are selected together. Short rows go 16 side by side, each row's candidates
    packed into the lanes: lists of unequal lengths (mixed), a row length that is not whole
    tiles (33), every value a candidate, lists shorter than 16 (the lanes sort their first
    16 values, zeros past a list) and longer (the rest inserted one at a time); or whole
    (rows of 20, k = 20). 23 rows: the last group of rows is not full."""
    gen = torch.Generator().manual_seed(11)
    x = _rows_for_selection(kind, 23, n, gen)
    w = torch.randn(23, n, generator=gen, dtype=torch.float64)
    m = N.TopKLayerNorm(n, k=k, elementwise_affine=False).train()
    x32 = x.float()
    xs = x32.clone().requires_grad_()
    (m(xs) * w.float()).sum().backward()
    xr = x32.double().requires_grad_()
    want = _top_k_rows_with_earliest_ties(xr, k, m.eps)
    (want * w).sum().backward()
    torch.testing.assert_close(m(x32).detach().double(), want.detach(), rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(xs.grad.double(), xr.grad, rtol=2e-4, atol=2e-4)


def test_the_16_value_sorting_network_sorts_every_input():
    """rows_impl.h's ns_sort16_ (the compare-exchanges that sort 16 lanes' values, from
    which the short rows' top-k takes its bound and its k largest) sorts every one of the
    2^16 inputs of zeros and ones in descending order, which by the 0-1 principle means
    every input. Read from the C source and run here: a pair dropped or mistyped fails."""
    import re
    source = (Path(kernels.__file__).parent / "rows_impl.h").read_text()
    table = source[source.index("ns_sort16_[63][2] = {"):]
    pairs = [(int(a), int(b)) for a, b in re.findall(r"\{(\d+), (\d+)\}", table[:table.index("};")])]
    assert len(pairs) == 63
    bits = (torch.arange(1 << 16)[:, None] >> torch.arange(16)) & 1   # every 0/1 input, one per row
    v = bits.clone()
    for a, b in pairs:
        hi, lo = torch.maximum(v[:, a], v[:, b]), torch.minimum(v[:, a], v[:, b])
        v[:, a], v[:, b] = hi, lo
    assert torch.equal(v, bits.sort(dim=1, descending=True).values)


@pytest.mark.parametrize("make,native,shape", [
    (lambda: N.TopKLayerNorm(64), lambda: torch.nn.LayerNorm(64), (8, 12, 12, 64)),     # 16-row selection
    (lambda: N.TopKLayerNorm(256), lambda: torch.nn.LayerNorm(256), (8, 6, 6, 256)),    # rows four at a time
    (lambda: N.L1LayerNorm(64), lambda: torch.nn.LayerNorm(64), (8, 12, 12, 64)),
    (lambda: N.TopKGroupNorm(8, 64), lambda: torch.nn.GroupNorm(8, 64), (8, 64, 6, 6)),
    (lambda: N.TopKInstanceNorm2d(16, affine=True), lambda: torch.nn.InstanceNorm2d(16, affine=True),
     (8, 16, 6, 6)),
    (lambda: N.TopKBatchNorm2d(16), lambda: torch.nn.BatchNorm2d(16), (8, 16, 6, 6)),
], ids=["topk-layer-64", "topk-layer-256", "l1-layer", "topk-group", "topk-instance", "topk-batch"])
def test_kernels_keep_no_more_for_backward_than_the_native_layer(make, native, shape):
    """What the kernels' Function keeps for backward is at most what the native layer of
    the same area keeps (the input and two numbers per group): top-k rows of up to 128
    values keep d and the k-th largest |v| (their means are computed again in backward);
    longer rows keep their means too, one number per row more, under 0.5% of the memory."""
    x = torch.randn(shape, requires_grad=True)
    ours, theirs = saved_bytes(make().train(), x), saved_bytes(native().train(), x)
    short_topk = isinstance(make(), N.TopKLayerNorm) and shape[-1] <= 128
    assert ours <= (theirs if short_topk else 1.005 * theirs)


def test_the_portable_candidate_scan_gives_the_vectorized_ones_results(tmp_path, monkeypatch):
    """rows.c scans long rows for top-k candidates with AVX-512 bit masks where the compiler
    targets it, else with portable code; a build without AVX-512 gives the same layers'
    values and gradients (rows of 1,568 and 3,136 values, and the batch area); so do its
    portable 16 x 16 product of IterNorm's Newton iteration and the one-at-a-time prefix
    sums of DN along rows."""
    import ctypes
    cc = kernels._compiler()
    default = kernels.library()
    if cc is None or default is None:
        pytest.skip("no C compiler: the kernels are not in use")
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    if subprocess.run([cc, "-mno-avx512f", str(probe), "-o", str(tmp_path / "probe")],
                      capture_output=True).returncode != 0:
        pytest.skip("the compiler has no -mno-avx512f (not an x86 target)")
    target = tmp_path / "rows_portable.so"
    built = subprocess.run([cc, *kernels._FLAGS, "-mno-avx512f", *kernels._OPENMP, str(kernels._SOURCE),
                            "-o", str(target), "-lm"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    portable = ctypes.CDLL(str(target))
    kernels._declare(portable)
    cases = [(N.TopKGroupNorm(8, 64, k=10), (4, 64, 14, 14)), (N.TopKInstanceNorm2d(8, k=10), (2, 8, 56, 56)),
             (N.TopKBatchNorm2d(8, k=10), (4, 8, 20, 20)), (N.IterNorm2d(32), (4, 32, 6, 6)),
             (N.DivisiveNorm1d(30, l1_alpha=0.1), (4, 30, 100))]
    for m, shape in cases:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        results = []
        for lib in (default, portable):
            monkeypatch.setattr(kernels, "_lib", lib)
            xs = x.clone().requires_grad_()
            y = m(xs)
            (y * w).sum().backward()
            results.append((y.detach(), xs.grad))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)


def _newton_reference(cov: torch.Tensor, T: int) -> torch.Tensor:
    """IterNorm's whitening matrix re-computed from PAPERS.md: S = Sigma / tr(Sigma),
    P_0 = I, P_k = (3 P_{k-1} - P_{k-1}^3 S) / 2, W = P_T / sqrt(tr(Sigma))."""
    tr = cov.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    s = cov / tr
    p = torch.eye(cov.shape[-1], dtype=cov.dtype).expand_as(cov)
    for _ in range(T):
        p = (3 * p - p @ p @ p @ s) / 2
    return p / tr.sqrt()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d,T,G", [(16, 5, 7), (16, 1, 3), (5, 2, 4), (33, 5, 2), (4, 0, 3)])
def test_newton_kernel_matches_a_float64_recomputation_forward_and_backward(dtype, d, T, G):
    """The kernels' Newton iteration (d = 16 has a fixed-size product of its own) against
    the iteration in float64, its backward against autograd through that iteration."""
    from normswap.norms.whitening import _newton_kernel
    g = torch.Generator().manual_seed(d * 10 + T)
    a = torch.randn(G, d, 3 * d, generator=g, dtype=torch.float64)
    cov = a @ a.mT / (3 * d) + 1e-3 * torch.eye(d, dtype=torch.float64)
    grad = torch.randn(G, d, d, generator=g, dtype=torch.float64)
    c = cov.clone().requires_grad_()
    want = _newton_reference(c, T)
    want_grad, = torch.autograd.grad(want, c, grad)
    got = _newton_kernel(cov.to(dtype), None, T)
    got_grad = _newton_kernel(cov.to(dtype), grad.to(dtype), T)
    assert got is not None and got_grad is not None and got.dtype == dtype
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(got.double(), want.detach(), **tol)
    torch.testing.assert_close(got_grad.double(), want_grad, **tol)


def test_newton_kernel_gives_the_same_bits_on_one_and_two_threads():
    from normswap.norms.whitening import _newton_kernel
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 64, 200, generator=g)
    cov, grad = a @ a.mT / 200 + 1e-3 * torch.eye(64), torch.randn(8, 64, 64, generator=g)
    outs = []
    for threads in (1, 2):
        with _num_threads(threads):
            outs.append((_newton_kernel(cov, None, 5), _newton_kernel(cov, grad, 5)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# -- IterNorm's group whitening (normswap/kernels/whiten.h) ------------------------------
def _iter_norm_autograd(x, gamma, beta, T, eps, d=16):
    """IterNorm's training forward re-computed from PAPERS.md with autograd (float64 in,
    float64 out): per group V = x - mean, Sigma = V V^T / m + eps I, S = Sigma / tr(Sigma),
    P_0 = I, P_k = (3 P - P^3 S) / 2, y = P_T / sqrt(tr) V, then gamma y + beta."""
    N, C = x.shape[0], x.shape[1]
    X = x.transpose(0, 1).reshape(C // d, d, -1)
    m = X.shape[-1]
    V = X - X.mean(-1, keepdim=True)
    sigma = V @ V.mT / m + eps * torch.eye(d, dtype=x.dtype)
    tr = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
    P = torch.eye(d, dtype=x.dtype).expand_as(sigma)
    for _ in range(T):
        P = (3 * P - P @ P @ P @ (sigma / tr)) / 2
    y = (P / tr.sqrt() @ V).reshape((C, N) + tuple(x.shape[2:])).transpose(0, 1)
    shape = (1, C) + (1,) * (x.dim() - 2)
    if gamma is not None:
        y = y * gamma.view(shape) + beta.view(shape)
    return y


# (input shape, affine): one position per sample, maps of 3 / 16 / 17 / 300 positions (a
# sample's columns split between buffer chunks of 256 float / 128 double positions, or
# several samples in one), three groups; groups of more than 2 MiB a pass (the next chunk's
# lines requested during a chunk's products, whiten.h's WH_AHEAD_MIN_BYTES): maps of 9,000
# positions (chunks across two planes, rows not aligned to cache lines), of 16, and one
# position per sample (more lines a chunk than the requests keep: 256 samples in a chunk)
WHITEN_CASES = [((64, 16), True), ((5, 32, 3), True), ((40, 16, 4, 4), False), ((9, 16, 17), True),
                ((3, 48, 15, 20), True), ((2, 16, 300), False),
                ((2, 16, 90, 100), True), ((1100, 16, 4, 4), False), ((17000, 16), True),
                # planes shorter than a vector copied sample by sample: 2 x 2 over two chunks,
                # 1 x 2, and 2 x 3 (a chunk of 1 KiB is not whole planes: the general walk)
                ((100, 32, 2, 2), True), ((50, 16, 1, 2), False), ((70, 16, 2, 3), True)]


def _in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` (N, C, *) laid out channels first, channels last ((N, *, C) in memory), or in
    another dense order ((N, H, C, W) for 4d: the kernels read a copy)."""
    if layout == "last" and t.dim() > 2:
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "other" and t.dim() == 4:
        return t.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    return t.contiguous()


@pytest.mark.parametrize("layout", ["first", "last", "other"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,affine", WHITEN_CASES)
def test_whitening_kernel_matches_a_float64_recomputation(shape, affine, dtype, layout):
    """IterNorm's training step by the kernels (groups of 16 channels; input and gradient
    channels first, channels last, or in another order) against PAPERS.md's iteration in
    float64 with autograd: output (in the input's layout), input / gamma / beta gradients,
    running statistics."""
    from normswap.norms.whitening import _whiten_kernels
    C, T, eps = shape[1], 5, 1e-5
    cls = N.IterNorm2d if len(shape) == 4 else N.IterNorm1d
    m = cls(C, T=T, eps=eps, affine=affine).to(dtype)
    g = torch.Generator().manual_seed(C + len(shape))
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.7
    x64 = x64 + torch.randn((1, C) + shape[2:], generator=g, dtype=torch.float64)  # correlated channels
    dy64 = torch.randn(shape, generator=g, dtype=torch.float64)
    if affine:
        with torch.no_grad():
            m.weight.copy_(torch.rand(C, generator=g) + 0.5)
            m.bias.copy_(torch.rand(C, generator=g) - 0.5)
    x = _in_layout(x64.to(dtype), layout).clone().requires_grad_()   # (clone: keeps the layout)
    assert _whiten_kernels(x, 16)
    y = m(x)
    assert type(y.grad_fn).__name__ == "_GroupWhitenKernelFnBackward"   # the kernels ran
    assert y.stride() == x.stride()
    y.backward(_in_layout(dy64.to(dtype), layout))

    xr = x64.detach().clone().requires_grad_()
    gamma = m.weight.detach().double().requires_grad_() if affine else None
    beta = m.bias.detach().double().requires_grad_() if affine else None
    want = _iter_norm_autograd(xr, gamma, beta, T, eps)
    want.backward(dy64)
    tol = {"rtol": 2e-4, "atol": 2e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(y.detach().double(), want.detach(), **tol)
    torch.testing.assert_close(x.grad.double(), xr.grad, **tol)
    if affine:
        gtol = {"rtol": 1e-3, "atol": 1e-3} if dtype == torch.float32 else tol
        torch.testing.assert_close(m.weight.grad.double(), gamma.grad, **gtol)
        torch.testing.assert_close(m.bias.grad.double(), beta.grad, **gtol)
    mean = x64.transpose(0, 1).reshape(C, -1).mean(1)
    torch.testing.assert_close(m.running_mean.double(), 0.1 * mean, **tol)


@pytest.mark.parametrize("layout", ["first", "last"])
def test_whitening_kernel_gives_the_same_bits_on_one_and_two_threads(layout):
    """Channels first: one group per thread; channels last: slabs of 512 positions per thread,
    their partial sums added in slab order (here 3,200 positions)."""
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(8, 64, 20, 20, generator=g), torch.randn(8, 64, 20, 20, generator=g)
    outs = []
    for threads in (1, 2):
        with _num_threads(threads):
            m = N.IterNorm2d(64)
            xs = _in_layout(x, layout).requires_grad_()
            y = m(xs)
            y.backward(_in_layout(dy, layout))
            outs.append((y.detach(), xs.grad, m.weight.grad, m.bias.grad, m.running_wm))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_whitening_kernel_channels_last_beyond_the_slab_count_cap():
    """Channels last with more than 1,024 slabs of 512 positions: slabs grow instead (one
    partial sum per slab is kept); float64 against the autograd re-computation."""
    m = 512 * 1024 + 300
    x64 = torch.randn(1, 16, m, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.3
    dy = torch.randn(1, 16, m, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    layer = N.IterNorm1d(16).double()
    x = _in_layout(x64, "last").requires_grad_()
    y = layer(x)
    y.backward(_in_layout(dy, "last"))
    xr = x64.clone().requires_grad_()
    want = _iter_norm_autograd(xr, None, None, 5, 1e-5) * layer.weight.detach()[None, :, None]
    want.backward(dy)
    torch.testing.assert_close(y.detach(), want.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-9)


def test_whitening_kernel_leaves_other_inputs_to_the_pytorch_formulation():
    """Groups of another size, a channel count not a multiple of 16 and half precision take
    _GroupWhitenFn / autograd (the kernels are written for 16 channels)."""
    from normswap.norms.whitening import _whiten_kernels
    assert _whiten_kernels(torch.zeros(4, 32, 3, 3), 16)
    assert not _whiten_kernels(torch.zeros(4, 32, 3, 3), 8)
    assert not _whiten_kernels(torch.zeros(4, 40, 3, 3), 16)
    assert not _whiten_kernels(torch.zeros(4, 32, 3, 3, dtype=torch.bfloat16), 16)
    y = N.IterNorm2d(32, group_size=8)(torch.randn(4, 32, 3, 3, requires_grad=True))
    assert type(y.grad_fn).__name__ != "_GroupWhitenKernelFnBackward"


# -- divisive normalization along rows (normswap/kernels/divisive.h) ---------------------
DN_ROW_CASES = [   # (layer, input shape): windows wider than the row, one unit, unequal radii
    (lambda: N.DivisiveNorm1d(30, sigma=0.5), (4, 5, 64)),
    (lambda: N.DivisiveNorm1d(2, sup_radius=5, sigma=0.3, learn_sigma=True), (3, 17)),
    (lambda: N.DivisiveNorm1d(30, sigma=0.5), (2, 9)),
    (lambda: N.DivisiveNorm1d(0, sup_radius=1, sigma=1.0), (6, 3)),
    (lambda: N.DivisiveNorm1d(3, sigma=0.5), (5, 1)),
    (lambda: N.DivisiveNorm2d((1, 5), (1, 3), sigma=0.5), (2, 1, 3, 11)),   # C = 1, windows along W
    (lambda: N.DivisiveNorm1d(5, sup_radius=7, sigma=0.5), (2, 7, 37)),   # a part group, rows not in tiles
    (lambda: N.DivisiveNorm1d(30, sigma=0.5), (3, 3, 130)),   # groups long enough to be fetched ahead
]
DN_IDS = ["r30-n64", "learned-sigma", "window-wider-than-row", "r0", "one-unit", "2d-rows", "ragged",
          "fetch-ahead"]


@pytest.fixture
def dn_spy(monkeypatch):
    from normswap.norms import divisive
    calls = []
    real = divisive._dn_rows_call

    def counting(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)
    monkeypatch.setattr(divisive, "_dn_rows_call", counting)
    return calls


def _dn_reference_2d(layer, x):
    """PAPERS.md's DN of (N, 1, H, W) rows, re-computed in float64 (tests/reference.py)."""
    from . import reference as ref
    if isinstance(layer, N.DivisiveNorm1d):
        return ref.divisive_norm_1d(x, layer.radius, layer.sup_radius, layer._sigma_value())
    return ref.divisive_norm_2d(x, layer.sum_window, layer.sup_window, layer._sigma_value())


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("make,shape", DN_ROW_CASES, ids=DN_IDS)
def test_divisive_rows_kernel_matches_a_float64_recomputation_and_gradcheck(make, shape, mode, dn_spy):
    """DN along rows runs the kernel (forward and backward), whose output is PAPERS.md's DN
    re-computed in float64 and whose gradients (input, learned sigma, the L1 penalty's
    mean |v|) pass gradcheck, in train and eval mode."""
    m = getattr(make().double(), mode)()
    m.l1_alpha = 0.25
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2 + 0.5
    torch.testing.assert_close(m(x), _dn_reference_2d(m, x), rtol=1e-10, atol=1e-10)
    assert dn_spy == [torch.float64]
    w = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    params = tuple(m.parameters())
    assert torch.autograd.gradcheck(lambda x, *p: (m(x) * w).sum() + normswap.penalty(m),
                                    (x.clone().requires_grad_(),) + params)
    assert len(dn_spy) > 2 and set(dn_spy) == {torch.float64}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_divisive_rows_kernel_gives_the_pytorch_formulations_values_and_gradients(dtype, threads, dn_spy):
    """On a ViT-sized input (split between threads), with the L1 penalty and a learned
    sigma: the kernel and the PyTorch formulation (kernels switched off) agree; a bfloat16
    input is computed in float32 by the kernel."""
    shape = (32, 17, 192)
    assert torch.tensor(shape).prod() >= rows._SMALL
    x, dy = _row_inputs(shape, dtype)
    pdtype = torch.float32 if dtype == torch.bfloat16 else dtype
    make = lambda: _layer(lambda: N.DivisiveNorm1d(30, sigma=0.5, learn_sigma=True), pdtype)
    with _num_threads(threads):
        fast = _step(make(), x, dy)
        assert dn_spy == [pdtype] * 2
        with kernels.disabled():
            slow = _step(make(), x, dy)
    tol = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5),
           torch.bfloat16: dict(rtol=1e-2, atol=2e-2)}[dtype]
    assert len(fast) == len(slow) == 4   # y, penalty, dx, dsigma
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, **tol)


def test_divisive_rows_kernel_gives_the_same_bits_on_one_and_two_threads():
    m = N.DivisiveNorm1d(30, learn_sigma=True, l1_alpha=0.1)
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(64, 17, 192, generator=g), torch.randn(64, 17, 192, generator=g)
    outs = []
    for threads in (1, 2):
        with _num_threads(threads):
            outs.append(_step(m, x, dy))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_divisive_rows_kernel_keeps_no_more_for_backward_than_layer_norm(dn_spy):
    """The kernel's Function keeps the input alone (its backward computes the local means
    and scales again); so does the PyTorch formulation (what CUDA runs), which kept three
    more maps of the input's size before (measured on the H200: 3.9-4.0x nn.LayerNorm)."""
    x = torch.randn(8, 17, 192, requires_grad=True)
    layer_norm = saved_bytes(torch.nn.LayerNorm(192).train(), x)
    ours = saved_bytes(N.DivisiveNorm1d(30).train(), x)
    assert dn_spy and ours <= layer_norm   # (dn_spy: the kernel ran)
    with kernels.disabled():
        assert saved_bytes(N.DivisiveNorm1d(30).train(), x) <= layer_norm
        assert saved_bytes(N.DivisiveNorm1d(30, learn_sigma=True).train(), x) <= layer_norm + 64


def test_divisive_rows_with_non_finite_values_stay_in_their_rows():
    x = torch.randn(4, 50)
    x[1, 7], x[2, 40] = float("inf"), float("nan")
    x.requires_grad_()
    y = N.DivisiveNorm1d(5)(x)
    y.sum().backward()
    assert torch.isfinite(y[[0, 3]]).all() and torch.isfinite(x.grad[[0, 3]]).all()
    assert not torch.isfinite(y[1]).all() and not torch.isfinite(y[2]).all()


@pytest.mark.parametrize("learn", [False, True])
def test_compiled_divisive_rows_call_the_kernel_with_eager_values_and_gradients(learn):
    """Under torch.compile DN along rows is the normswap::dn_rows_forward operator (no
    graph break), with the eager layer's output, penalty and gradients."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._inductor.compile(gm, example_inputs)

    torch._dynamo.reset()
    m = _layer(lambda: N.DivisiveNorm1d(4, sup_radius=2, learn_sigma=learn), torch.float64)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 40, generator=g, dtype=torch.float64)
    dy = torch.randn(3, 7, 40, generator=g, dtype=torch.float64)
    eager = _step(m, x, dy)
    got = _step(torch.compile(m, backend=backend, fullgraph=True), x, dy)
    assert len(graphs) == 1
    assert torch.ops.normswap.dn_rows_forward.default in [n.target for n in graphs[0].graph.nodes]
    assert len(got) == len(eager) == (4 if learn else 3)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_divisive_rows_kernel_agrees_with_the_pytorch_formulation_on_every_block_layout(dn_spy):
    """Rows of 1 to 130 values against windows of radius 0 to 40 (wider than the row, equal
    to it, one block, several blocks and a part block; unequal radii), 1 to 17 rows (a part
    group, one, several): the kernel's output, mean |v| and gradients (input, learned
    sigma) in float64 are the PyTorch formulation's (kernels switched off), whose box sums
    are shifted slices and float64 prefix sums: an independent computation of every block
    boundary the kernel's box sums cross."""
    g = torch.Generator().manual_seed(21)
    cases = 0
    for n in (1, 2, 3, 5, 8, 9, 16, 31, 33, 64, 130):
        for a, b in ((0, 0), (0, 3), (1, 1), (2, 7), (5, 5), (30, 30), (40, 2)):
            rows_count = (1, 5, 17)[cases % 3]
            x = torch.randn(rows_count, n, generator=g, dtype=torch.float64) * 2 + 0.5
            dy = torch.randn(rows_count, n, generator=g, dtype=torch.float64)
            make = lambda: _layer(lambda: N.DivisiveNorm1d(a, sup_radius=b, sigma=0.4, learn_sigma=True),
                                  torch.float64)
            calls = len(dn_spy)
            fast = _step(make(), x, dy)
            assert len(dn_spy) == calls + 2, (n, a, b)
            with kernels.disabled():
                slow = _step(make(), x, dy)
            for got, want in zip(fast, slow):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"n={n} a={a} b={b}: {m}")
            cases += 1
    assert cases == 77


@pytest.mark.parametrize("shape", [(13, 45), (20, 300), (3, 8, 64)], ids=["ragged", "fetch-ahead", "tiles"])
@pytest.mark.parametrize("radius,sup", [(30, 30), (2, 5)])
def test_divisive_rows_kernel_in_float32_matches_a_float64_recomputation(shape, radius, sup, dn_spy):
    """Float32 rows are computed in float32, several rows side by side (a part group of rows,
    rows not a whole number of tiles, groups fetched ahead): within float32's precision of
    PAPERS.md's DN re-computed in float64, forward and backward (the float64 kernel's
    gradient is checked by gradcheck above)."""
    from . import reference as ref
    m = N.DivisiveNorm1d(radius, sup_radius=sup, sigma=0.5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g) * 2 + 0.5
    w = torch.randn(shape, generator=g)
    xg = x.clone().requires_grad_()
    (m(xg) * w).sum().backward()
    assert dn_spy == [torch.float32] * 2
    torch.testing.assert_close(m(x).double(), ref.divisive_norm_1d(x, radius, sup, 0.5), rtol=2e-5, atol=2e-5)
    x64 = x.double().requires_grad_()
    (m.double()(x64) * w.double()).sum().backward()
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("radius", [2, 30])
def test_divisive_rows_windows_of_every_width_keep_their_own_precision(radius):
    """Every window's sums hold that window's values alone, as the PyTorch formulation's
    sums do: a huge value does not cancel away the precision of windows far from it
    (prefix-sum differences lost it: with sigma = 0 the error far from a 1e6 outlier was
    2.6e3 against the float64 re-computation), and a NaN spoils only the windows that hold
    it (with prefix sums, the rest of its row); float32 rows as float64 ones."""
    from . import reference as ref
    reach = 2 * radius   # |j - i| <= a + b: the outputs a value at i reaches
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        x = torch.randn(10, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1e-3
        x[0, 5] = 1e6
        m = N.DivisiveNorm1d(radius, sigma=0.0, eps=1e-12).to(dtype)
        y = m(x.to(dtype))
        want = ref.divisive_norm_1d(x.to(dtype), radius, radius, 0.0, eps=1e-12)
        torch.testing.assert_close(y[:, 6 + reach:].double(), want[:, 6 + reach:], rtol=tol, atol=tol)
    xn = torch.randn(9, 150, generator=torch.Generator().manual_seed(2))
    xn[1, 70] = float("nan")
    layer = N.DivisiveNorm1d(radius)
    y = layer(xn)
    with kernels.disabled():
        y_pytorch = layer(xn)
    assert (~torch.isfinite(y[1])).sum() == 2 * reach + 1
    assert torch.isfinite(y[[0] + list(range(2, 9))]).all()
    if radius <= 4:   # (the PyTorch formulation's prefix sums for wider windows spread a NaN)
        assert torch.equal(torch.isfinite(y), torch.isfinite(y_pytorch))


def test_a_kernel_that_cannot_allocate_its_scratch_raises_memory_error_naming_it(monkeypatch):
    """Every entry point returns nonzero when its scratch buffers could not be allocated;
    kernels.call turns that into a MemoryError naming the entry point (not a wrong result)."""
    class NoMemory:
        def __getattr__(self, entry):
            return lambda *args: 1
    x = torch.randn(2, 4, 3, 3)
    assert kernels.library() is not None
    monkeypatch.setattr(kernels, "library", lambda: NoMemory())
    with pytest.raises(MemoryError, match="ns_forward_f32: out of memory"):
        N.L1BatchNorm2d(4).train()(x)
    with pytest.raises(MemoryError, match="ns_whiten_forward_f64"):
        N.IterNorm2d(16).double().train()(torch.randn(2, 16, 3, 3, dtype=torch.float64))
    with pytest.raises(MemoryError, match="ns_dn_rows_f32"):
        N.DivisiveNorm1d(2).train()(torch.randn(3, 9))


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="-mno-avx512f is an x86 flag")
def test_the_portable_paths_pass_the_selection_tests_on_a_processor_with_avx512(tmp_path):
    """The kernels have AVX-512 paths and portable ones; a machine runs one of them. This
    builds the portable ones (``NORMSWAP_CFLAGS=-mno-avx512f``) and runs the tests that
    depend on the forward and backward computing a row's mean bit for bit alike (top-k
    ties, the selection paths, the comparison with the PyTorch formulation) against that
    build: on a machine without AVX-512 the backward's mean of a row once differed in its
    last bit from the forward's, and tied top-k rows got a wrong gradient. The Newton
    iteration, the whitening kernel and DN along rows (rows side by side in a vector) have
    code sized to each machine's vector registers (AVX-512, else AVX2): their tests run
    against that build too."""
    env = {**os.environ, "NORMSWAP_CFLAGS": "-mno-avx512f", "NORMSWAP_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "tied_kth_place or one_row_selection or (pytorch_formulations and TopK) "
                           "or column_kernels or read_in_place or newton_kernel or whitening_kernel or divisive_rows"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout
    built = list(tmp_path.iterdir())
    assert len(built) == 1, "the portable build, in its own cache entry"
