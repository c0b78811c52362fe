"""The fused forms behind bounded weight norm and divisive normalization.

Each fused autograd Function is checked against an independent float64
re-computation (plain per-channel / per-position loops, no normswap code): forward
values, gradients (vector-Jacobian products of the loop formula through autograd),
and torch.autograd.gradcheck of the Function itself.
"""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import normswap.norms as N
from normswap.norms.bwn import BoundedWeightFn


# -- bounded weight norm ------------------------------------------------------------------
def _bounded_rows_loop(v2d, s, p):
    """w_i = s_i * v_i / ||v_i||_p, one output channel (row) at a time."""
    rows = []
    for i in range(v2d.shape[0]):
        vi = v2d[i]
        if p == "inf":
            n = vi.abs().max()
        else:
            n = vi.abs().pow(p).sum().pow(1.0 / p)
        si = s if s.dim() == 0 else s[i, 0]
        rows.append(si * vi / n)
    return torch.stack(rows)


@pytest.mark.parametrize("p", [1, 2, "inf"])
@pytest.mark.parametrize("per_channel_scale", [False, True], ids=["rho", "gain"])
def test_bounded_weight_fn_matches_loop_formula_and_gradcheck(p, per_channel_scale):
    torch.manual_seed(0)
    pv = float("inf") if p == "inf" else float(p)
    v = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(5, 1, dtype=torch.float64) + 0.5 if per_channel_scale
         else torch.tensor(1.7, dtype=torch.float64)).requires_grad_()
    w = BoundedWeightFn.apply(v, s, pv, (1,))
    want = _bounded_rows_loop(v, s, p)
    torch.testing.assert_close(w, want)
    g = torch.randn_like(w)
    got = torch.autograd.grad(w, (v, s), g)
    exp = torch.autograd.grad(want, (v, s), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda a, b: BoundedWeightFn.apply(a, b, pv, (1,)), (v, s))


@pytest.mark.parametrize("p", [1, 2, "inf"])
def test_bounded_weight_fn_grouped_transposed_layout(p):
    """(G, Cin/G, Cout/G, K) layout: channel (g, j) spans w[g-th block of Cin, j, :]."""
    torch.manual_seed(1)
    pv = float("inf") if p == "inf" else float(p)
    v = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(2, 1, 4, 1, dtype=torch.float64) + 0.5).requires_grad_()
    w = BoundedWeightFn.apply(v, s, pv, (1, 3))
    rows = v.permute(0, 2, 1, 3).reshape(8, 15)               # one row per output channel
    want = _bounded_rows_loop(rows, s.reshape(8, 1), p).reshape(2, 4, 3, 5).permute(0, 2, 1, 3)
    torch.testing.assert_close(w, want)
    g = torch.randn_like(w)
    for a, b in zip(torch.autograd.grad(w, (v, s), g), torch.autograd.grad(want, (v, s), g)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda a, b: BoundedWeightFn.apply(a, b, pv, (1, 3)), (v, s))


def test_parametrize_cached_computes_each_bounded_weight_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    for m in (model[0], model[2]):
        N.bounded_weight_norm(m)
    calls = []
    for m in (model[0], model[2]):  # the parametrization module runs once per evaluation
        m.parametrizations.weight[0].register_forward_hook(lambda *_: calls.append(1))
    xs = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    with torch.no_grad():
        plain = [model(x) for x in xs]
        assert len(calls) == 6                          # 2 convs x 3 forwards
        calls.clear()
        with parametrize.cached():
            cached = [model(x) for x in xs]
        assert len(calls) == 2                          # once per conv
    for a, b in zip(plain, cached):
        torch.testing.assert_close(a, b)
    # outside the context the cache is gone: a change of v shows at once
    with torch.no_grad():
        model[0].parametrizations.weight.original.mul_(-1)
    assert not torch.allclose(model(xs[0]), plain[0])
