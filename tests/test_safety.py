"""A converted model is never broken, never half-done: bad input is refused before any
change, shared modules, wrappers, repeated transforms, pickling in a new process."""
import importlib
import io as _io
import math
import os
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

import normswap
import normswap.norms as N
from normswap import Spec, SpecError, TransformError
from normswap.variants import PRESETS, VARIANTS

from .helper_models import ChannelsFirstLN, Mystery, TwoNames, functional_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()})


def _same(model, snap):
    sd, types = snap
    now = model.state_dict()
    assert list(now) == list(sd)
    assert all(torch.equal(now[k], v) for k, v in sd.items())
    assert {n: type(m) for n, m in model.named_modules()} == types


# Bad values per keyword, written by hand (not derived from the checks under test).
BAD_VALUES = {
    "eps": [-1, 0, "a", None], "momentum": [2, -0.1, "a"], "affine": ["no", 1, None],
    "track_running_stats": ["yes"], "l1_alpha": [-0.1, "a"], "sync": ["true"],
    "sigma": [-1, "a", float("nan")], "learn_sigma": ["no"], "k": [0, -1, 1.5, "3"], "bias": ["no"],
    "sum_window": [0, 4, 2.0], "sup_window": [-3, 6], "radius": [-1, 1.5], "sup_radius": [-2, "a"],
    "group_size": [0, 1.5], "T": [0, "5"], "p": [0, 3, "two"], "rho": [-1, 0, "a"],
    "learn_gain": ["no"], "fallback": ["nope", "bwn", 3, {"k": 1}],
}


def test_every_keyword_of_every_variant_has_bad_values_listed():
    missing = {a for v in VARIANTS.values() for a in v.accepted()} - set(BAD_VALUES)
    assert not missing, f"add bad values for {missing} to BAD_VALUES"


CASES = [(p.name, key, bad) for p in PRESETS.values() for key in VARIANTS[p.variant].accepted()
         for bad in BAD_VALUES.get(key, []) if p.name == p.variant or p.name == "bwn-g"]


@pytest.mark.parametrize("preset,key,bad", CASES, ids=[f"{p}-{k}-{b!r}" for p, k, b in CASES])
def test_bad_keyword_value_is_refused_before_anything_changes(preset, key, bad):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8))
    snap = _snapshot(model)
    with pytest.raises(SpecError) as e:
        normswap.transform(model, {"preset": preset, "kwargs": {key: bad}}, inplace=True)
    assert key in str(e.value) and "expected" in str(e.value)
    _same(model, snap)
    # as a rule, the same check
    with pytest.raises(SpecError):
        Spec(names={"1": {"to": preset, key: bad}})


def test_bwn_with_a_bad_p_leaves_resnet_untouched_and_a_retry_works():
    model = timm.create_model("resnet18", pretrained=False)
    snap = _snapshot(model)
    with pytest.raises(SpecError, match="p=0"):
        normswap.transform(model, {"preset": "bwn", "kwargs": {"p": 0}}, inplace=True)
    _same(model, snap)
    out = normswap.transform(model, "bwn", inplace=True)
    assert len(normswap.report(out).converted) == 20


def test_a_failure_while_applying_rolls_every_change_back(monkeypatch):
    """Anything that fails after the first change (here: the producer rewrite of the
    last bwn site) restores every module, parametrization and forward."""
    import normswap.graph.bwn as gbwn
    model = timm.create_model("resnet18", pretrained=False)
    snap = _snapshot(model)
    calls = {"n": 0}
    real = gbwn.bounded_weight_norm

    def failing(conv, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(conv, **kw)

    monkeypatch.setattr(gbwn, "bounded_weight_norm", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        normswap.transform(model, {"preset": "bwn-g"}, inplace=True)
    _same(model, snap)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    monkeypatch.setattr(gbwn, "bounded_weight_norm", real)
    assert len(normswap.report(normswap.transform(model, "bwn", inplace=True)).converted) == 20


def test_functional_rewrite_is_rolled_back_too(monkeypatch):
    """The first owner's rewrite is applied, the second fails: both owners keep their
    original forward and gain no submodule."""
    import normswap.graph.functional as GF
    T = importlib.import_module("normswap.transform")
    model = functional_model()
    x = torch.randn(2, 3, 8)
    ref = model(x)
    real_prepare = GF.prepare_rewrite
    made = []

    def prepare(rw, new):
        p = real_prepare(rw, new)
        made.append(p)
        if len(made) < 2:
            return p

        def apply():
            p.apply()
            raise RuntimeError("boom")
        return GF.PreparedRewrite(apply, p.undo)

    monkeypatch.setattr(T, "prepare_rewrite", prepare)
    with pytest.raises(RuntimeError, match="boom"):
        normswap.transform(model, "ln-s", inplace=True)
    assert len(made) == 2
    for blk in (model[0], model[2]):
        assert "forward" not in blk.__dict__ and not hasattr(blk, "layer_norm")
    torch.testing.assert_close(model(x), ref)


def test_spec_field_types_are_checked():
    with pytest.raises(SpecError, match=r"exclude='bn1'.*did you mean exclude=\['bn1'\]"):
        Spec("l1bn", exclude="bn1")
    with pytest.raises(SpecError, match="kwargs"):
        Spec("l1bn", kwargs=[("eps", 1)])
    with pytest.raises(SpecError, match="types"):
        Spec("l1bn", types=["LayerNorm"])
    with pytest.raises(SpecError, match="fallback='nope'"):
        Spec("bwn", kwargs={"fallback": "nope"})
    with pytest.raises(SpecError, match="sigma='a'"):
        Spec("bn-s", kwargs={"sigma": "a"})


def test_bwn_fallback_takes_every_family_and_passes_its_kwargs():
    from timm.layers import LayerNorm
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), LayerNorm(8))
    # a LayerNorm after a linear: bwn takes it; a keyword of the fallback passes through
    out = normswap.transform(nn.Sequential(nn.Linear(4, 8), nn.GELU(), LayerNorm(8), nn.Linear(8, 8)),
                             {"preset": "bwn", "kwargs": {"fallback": "bn-s", "sigma": 0.25, "eps": 1e-3}})
    rec = normswap.report(out)["2"]
    assert rec.status == "converted" and rec.preset == "bn-s", rec
    assert isinstance(out[2], N.BatchNormStar1d) and out[2].sigma == 0.25 and out[2].eps == 1e-3
    with pytest.raises(SpecError, match="neither by 'bwn' nor by its fallback"):
        Spec("bwn", kwargs={"fallback": "l1bn", "sigma": 0.5})
    with pytest.raises(SpecError, match="unknown argument"):
        Spec("bwn", kwargs={"sigma": 0.5})
    assert model is not None


def test_one_module_under_two_names_ends_on_one_new_module():
    model = TwoNames()
    rep = normswap.plan(model, "l1bn")
    assert [s.name for s in rep.sites] == ["a"] and rep["a"].aliases == ["b"]
    assert "also reachable as b" in rep["a"].note
    out = normswap.transform(model, "l1bn")
    assert out.a is out.b and isinstance(out.a, N.L1BatchNorm2d)
    x = torch.randn(2, 3, 6, 6)
    out(x).sum().backward()
    assert out.a.weight.grad is not None


def test_wrappers_scripted_and_already_transformed_models_are_refused_with_the_fix():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(TransformError, match=r"DataParallel.*normswap.transform\(model.module, spec\)"):
        normswap.transform(nn.DataParallel(model), "l1bn")
    with pytest.raises(TransformError, match=r"OptimizedModule.*normswap.transform\(model._orig_mod, spec\)"):
        normswap.transform(torch.compile(model), "l1bn")
    with pytest.raises(TransformError, match="ScriptModule.*transform the nn.Module first"):
        normswap.transform(torch.jit.script(model), "l1bn")
    out = normswap.transform(model, "l1bn")
    with pytest.raises(TransformError, match="already transformed"):
        normswap.transform(out, "bn-s")
    with pytest.raises(TransformError, match="expected a torch.nn.Module"):
        normswap.transform("resnet18", "l1bn")


# -- layouts learned from what a module does -----------------------------------------------
def test_channels_first_layernorm_subclass_is_converted_with_its_layout():
    c = 5   # the input's width equals the channel count: a wrong axis would still run
    model = nn.Sequential(nn.Conv2d(3, c, 1), ChannelsFirstLN(c))
    rep = normswap.plan(model, "ln-s")
    assert rep["1"].status == "converted" and rep["1"].becomes == "LayerNormStar2d"
    out = normswap.transform(model, Spec("ln-s", kwargs={"sigma": 0.0, "affine": True}))
    x = torch.randn(2, 3, 4, c)
    torch.testing.assert_close(out(x), model(x))


def test_a_norm_subclass_with_an_unknown_forward_is_skipped_with_the_reason():
    model = nn.Sequential(nn.Linear(3, 4), Mystery(4), nn.LayerNorm(4))
    rep = normswap.plan(model, "ln-s")
    assert rep["1"].status == "skipped" and "matches no known layout" in rep["1"].reason
    assert rep["2"].status == "converted"


@pytest.mark.parametrize("name", ["poolformerv2_s12"])
def test_timm_models_whose_layer_norms_are_channels_first(name):
    model = timm.create_model(name, pretrained=False)
    out = normswap.transform(model, "ln*")
    for s in normswap.report(out).converted:
        assert s.becomes == "LayerNormStar2d", s
    y = out(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(y).all()


def test_timm_layernorm2d_nobias_layout():
    from timm.layers import LayerNorm2d
    from timm.models.metaformer import LayerNorm2dNoBias
    model = nn.Sequential(nn.Conv2d(3, 7, 1), LayerNorm2dNoBias(7), LayerNorm2d(7))
    out = normswap.transform(model, Spec("ln-s", kwargs={"sigma": 0.0, "affine": True}))
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(out(x), model(x))


def test_layout_probe_works_on_the_meta_device():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 6, 1), ChannelsFirstLN(6))
    rep = normswap.plan(model, "ln-s")
    assert rep["1"].becomes == "LayerNormStar2d"


# -- instance norms and functional calls with computed arguments -------------------------------
def test_instance_norm_modules_and_calls_are_sites():
    import torch.nn.functional as F

    class Calls(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))
            self.b = nn.Parameter(torch.zeros(4))

        def forward(self, x):
            h = F.instance_norm(x, weight=self.w, bias=self.b)
            h = F.layer_norm(h, h.shape[-1:], None, None)        # shape computed, no weight
            return F.group_norm(h, 2, self.w, self.b)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.InstanceNorm2d(4, affine=True), Calls())
    rep = normswap.plan(model, "dn")
    by = {s.name: s for s in rep.sites}
    assert by["1"].family == "instancenorm" and by["1"].status == "converted"
    assert by["2.instance_norm"].family == "instancenorm" and by["2.instance_norm"].status == "converted"
    assert by["2.group_norm"].status == "converted"
    ln = by["2.layer_norm"]
    assert ln.status == "skipped" and "computed at run time" in ln.reason


def test_functional_layer_norm_with_computed_shape_is_read_from_its_weight():
    import torch.nn.functional as F

    class Dyn(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.rand(6) + 0.5)
            self.b = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return F.layer_norm(x, x.shape[-1:], self.w, self.b)

    model = nn.Sequential(nn.Linear(6, 6), Dyn())
    out = normswap.transform(model, Spec("ln-s", kwargs={"sigma": 0.0, "affine": True}))
    x = torch.randn(3, 6)
    torch.testing.assert_close(out(x), model(x))


# -- persistence --------------------------------------------------------------------------------
def _roundtrip_in_new_process(tmp_path, model, x):
    path = tmp_path / "model.pt"
    torch.save(model, path)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; sys.path.insert(0, %r)\n"
            "m = torch.load(%r, weights_only=False).eval()\n"
            "x = torch.load(%r)\n"
            "with torch.no_grad(): torch.save(m(x), %r)\n"
            "print(type(m).__name__)") % (ROOT, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(tmp_path / "y.pt")


@pytest.mark.slow
def test_converted_timm_model_with_act_norms_loads_in_a_new_process(tmp_path):
    model = normswap.transform(timm.create_model("efficientnet_b0", pretrained=False), "l1bn").eval()
    assert type(model.bn1).__name__ == "L1BatchNorm2dAct"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(_roundtrip_in_new_process(tmp_path, model, x), ref)


def test_rewritten_functional_calls_survive_pickling_in_a_new_process(tmp_path):
    model = functional_model()
    out = normswap.transform(model, Spec("ln-s", kwargs={"sigma": 2.0}))
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        ref, orig = out.eval()(x), model.eval()(x)
    assert not torch.allclose(ref, orig)          # sigma=2 changes the function
    torch.testing.assert_close(_roundtrip_in_new_process(tmp_path, out, x), ref)
    buf = _io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded.eval()(x), ref)
    import copy
    torch.testing.assert_close(copy.deepcopy(out).eval()(x), ref)


def test_training_helpers_read_the_recorded_state_and_do_not_trace_again(monkeypatch):
    T = importlib.import_module("normswap.transform")
    model = normswap.transform(timm.create_model("resnet18", pretrained=False), "bwn")
    calls = {"n": 0}
    real = T.norm_producers

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(T, "norm_producers", counting)
    groups = normswap.param_groups(model, lr=0.1, weight_decay=1e-4, scale_invariant_weight_decay=0)
    opt = normswap.LRCorrection(torch.optim.SGD(groups, lr=0.1), model, weight_decay=1e-4)
    normswap.NormRecorder(model)
    assert calls["n"] == 0 and opt is not None
    # a non-bwn transform traces once, on first use, then keeps it
    model2 = normswap.transform(timm.create_model("resnet18", pretrained=False), "l1bn")
    normswap.param_groups(model2, lr=0.1, weight_decay=1e-4)
    normswap.param_groups(model2, lr=0.1, weight_decay=1e-4)
    assert calls["n"] == 1
    si = normswap.scale_invariant_params(model2)
    assert len(si) == 20 and all(math.isfinite(s.param.sum().item()) for s in si)
