"""normswap.transform / plan / report on timm, torchvision and custom models."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import normswap
import normswap.norms as N
from normswap import Spec, SpecError, TransformError
from normswap.graph.sites import module_family

# (timm name, create kwargs, input size, spec)
TIMM_CASES = [
    ("resnet18", {}, 64, "l1bn"),
    ("efficientnet_b0", {}, 96, "topkbn"),        # BatchNormAct2d, depthwise convs (k=10 <= 2*3*3)
    ("mobilenetv3_small_050", {}, 64, "bn*"),
    ("regnetx_002", {}, 64, "l1bn"),
    ("convnext_atto", {}, 64, "ln*"),               # LayerNorm2d and LayerNorm
    ("vit_tiny_patch16_224", {"img_size": 32}, 32, "ln-s"),
    ("swin_tiny_patch4_window7_224", {"img_size": 112}, 112, "dn*"),  # LN on (N, H, W, C)
    ("maxvit_nano_rw_256", {"img_size": 64}, 64, "dn"),   # BatchNorm2d + LayerNorm2d + LayerNorm
    ("resnet50_gn", {}, 64, "dn"),                  # GroupNorm
    ("efficientnet_b0_gn", {}, 64, {"types": {"groupnorm": "l1bn"}}),  # GroupNormAct
]


def _norm_modules(model):
    names = []
    for name, m in model.named_modules():
        if module_family(m) is not None and not any(name.startswith(p + ".") for p in names):
            names.append(name)
    return names


def _check_model(name, kw, size, spec):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norm_names = _norm_modules(model)
    out = normswap.transform(model, spec)
    rep = normswap.report(out)
    # the input model is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # every norm module of the model is a site of the report
    module_sites = [s.name for s in rep.sites if s.kind == "module"]
    assert sorted(module_sites) == sorted(norm_names)
    converted = {s.name for s in rep.converted}
    assert converted, rep
    for s in rep.sites:
        if s.status == "converted" and s.kind == "module":
            assert isinstance(out.get_submodule(s.name), N.NormalizerBase)
        elif s.kind == "module":
            assert type(out.get_submodule(s.name)) is type(model.get_submodule(s.name))
    # class, methods, attributes
    assert type(out) is type(model)
    for attr in ("forward_features", "forward_head", "reset_classifier", "get_classifier"):
        assert callable(getattr(out, attr))
    assert out.pretrained_cfg == model.pretrained_cfg
    # untouched parameters and buffers keep name and value
    sd = out.state_dict()
    for k, v in before.items():
        if not any(k.startswith(c + ".") for c in converted):
            assert k in sd and torch.equal(sd[k], v), k
    # forward / backward in train and eval
    x = torch.randn(2, 3, size, size)
    y = out.train()(x)
    assert y.shape == (2, out.num_classes) and torch.isfinite(y).all()
    (y.square().mean() + normswap.penalty(out)).backward()
    assert any(p.grad is not None for p in out.parameters())
    with torch.no_grad():
        ye = out.eval()(x)
    assert torch.isfinite(ye).all()
    return model, out, rep


@pytest.mark.parametrize("name,kw,size,spec", TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_timm_families(name, kw, size, spec):
    model, out, rep = _check_model(name, kw, size, spec)
    if isinstance(spec, str) and spec.endswith("*"):
        assert all(out.get_submodule(s.name).l1_alpha == 0.005 for s in rep.converted)


def test_batch_norm_act_keeps_its_activation_and_drop():
    model = timm.create_model("efficientnet_b0", pretrained=False, drop_rate=0.0)
    out = normswap.transform(model, "l1bn")
    bn = out.bn1
    assert isinstance(bn, N.L1BatchNorm2d) and type(bn).__name__ == "L1BatchNorm2dAct"
    assert bn.act is model.bn1.act.__class__ or type(bn.act) is type(model.bn1.act)
    x = torch.randn(4, 32, 8, 8)
    plain = N.L1BatchNorm2d(32)
    plain.load_state_dict({k: v for k, v in bn.state_dict().items()})
    assert torch.equal(bn(x), bn.act(plain(x)))
    assert (bn(x) >= -0.2785).all()  # SiLU's minimum: the activation ran


@pytest.mark.parametrize("spec", ["l1bn", "topkbn"])
def test_eval_mode_equivalence_after_conversion(spec):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    model.train()
    for _ in range(3):  # non-trivial running statistics
        model(torch.randn(8, 3, 32, 32) * 2 + 1)
    model.eval()
    out = normswap.transform(model, spec)
    assert not out.training
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)
    assert all(s.preserves_function for s in normswap.report(out).converted)


def test_report_says_where_the_function_changes():
    model = timm.create_model("resnet18", pretrained=False)
    rep = normswap.plan(model, "bn-s")
    assert all(s.preserves_function is False and "sigma" in s.note for s in rep.converted)
    rep = normswap.plan(timm.create_model("convnext_atto", pretrained=False), "dn")
    assert all(s.preserves_function is False for s in rep.converted)


def test_torchvision_models():
    import torchvision
    for ctor, spec in ((torchvision.models.resnet18, "l1bn"), (torchvision.models.convnext_tiny, "ln*")):
        model = ctor(weights=None)
        out = normswap.transform(model, spec)
        rep = normswap.report(out)
        assert len(rep.converted) == len(_norm_modules(model))
        y = out(torch.randn(2, 3, 32, 32))
        assert y.shape == (2, 1000) and torch.isfinite(y).all()


def test_transform_keeps_device_dtype_mode_and_requires_grad():
    model = timm.create_model("resnet18", pretrained=False).double().eval()
    model.bn1.weight.requires_grad_(False)
    out = normswap.transform(model, "l1bn")
    assert out.bn1.weight.dtype == torch.float64 and not out.bn1.training
    assert out.bn1.weight.requires_grad is False
    assert out.layer1[0].bn1.weight.requires_grad is True
    assert out(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_inplace_and_copy():
    model = timm.create_model("resnet18", pretrained=False)
    out = normswap.transform(model, "l1bn")
    assert out is not model and isinstance(model.bn1, nn.BatchNorm2d)
    same = normswap.transform(model, "l1bn", inplace=True)
    assert same is model and isinstance(model.bn1, N.L1BatchNorm2d)


# -- custom models ---------------------------------------------------------------------
class FunctionalLN(nn.Module):
    """A block that calls F.layer_norm itself, with its own weight and bias."""

    def __init__(self, dim=8):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.ln_weight = nn.Parameter(torch.ones(dim) * 1.5)
        self.ln_bias = nn.Parameter(torch.zeros(dim) + 0.1)
        self.dim = dim

    def helper(self):
        return "still here"

    def forward(self, x):
        h = F.layer_norm(self.fc(x), (self.dim,), self.ln_weight, self.ln_bias, 1e-6)
        return torch.layer_norm(h + x, (self.dim,)) * 2


def test_functional_layer_norm_is_rewritten_into_submodules():
    model = nn.Sequential(FunctionalLN(), nn.ReLU(), FunctionalLN())
    x = torch.randn(4, 3, 8)
    ref = model(x)
    rep = normswap.plan(model, "ln-s")
    names = [s.name for s in rep.sites]
    assert names == ["0.layer_norm", "0.layer_norm_1", "2.layer_norm", "2.layer_norm_1"]
    assert all(s.kind == "functional" and s.original == "F.layer_norm" for s in rep.sites)
    # sigma = 0 and keeping the affine: exactly the original function
    out = normswap.transform(model, Spec("ln-s", kwargs={"sigma": 0.0, "affine": True}))
    blk = out[0]
    assert type(blk) is FunctionalLN and blk.helper() == "still here"
    assert isinstance(blk.layer_norm, N.LayerNormStar) and blk.layer_norm.weight is blk.ln_weight
    assert blk.layer_norm.eps == 1e-6
    torch.testing.assert_close(out(x), ref)
    # the new modules are ordinary sites: penalty and state dict see them
    out2 = normswap.transform(model, "ln*")
    out2(x)
    assert normswap.penalty(out2).item() > 0
    assert "0.layer_norm_1.weight" not in out2.state_dict()  # ln* has no affine
    assert "0.ln_weight" in out2.state_dict()
    # the original model still runs its own code
    torch.testing.assert_close(model(x), ref)


class ControlFlow(nn.Module):
    """Data-dependent control flow: does not trace; its modules are still sites."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.conv(x)
        if h.mean() > 0:
            return self.bn_a(h)
        h = self.bn_b(h)
        return F.group_norm(h, 2)


def test_untraceable_model_still_converts_module_sites():
    model = ControlFlow()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    out = normswap.transform(model, "l1bn")
    assert isinstance(out.bn_a, N.L1BatchNorm2d) and isinstance(out.bn_b, N.L1BatchNorm2d)
    rep = normswap.report(out)
    skipped = rep.skipped
    assert len(skipped) == 1 and skipped[0].kind == "functional" and "does not trace" in skipped[0].reason
    for x in (torch.randn(2, 3, 5, 5) + 3, torch.randn(2, 3, 5, 5) - 3):
        assert torch.isfinite(out(x)).all()
    with pytest.raises(TransformError, match="strict=True"):
        normswap.transform(model, "l1bn", strict=True)
    assert isinstance(model.bn_a, nn.BatchNorm2d)  # nothing changed


class BN1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq_bn = nn.BatchNorm1d(4)     # on (N, C, L)
        self.vec_bn = nn.BatchNorm1d(6)     # on (N, C)
        self.fc = nn.Linear(4 * 5, 6)
        self.shared = nn.BatchNorm1d(6)     # called twice

    def forward(self, x):
        h = self.seq_bn(x)
        h = self.vec_bn(self.fc(h.flatten(1)))
        return self.shared(self.shared(h) * 2)


@pytest.mark.parametrize("spec", ["l1bn", "topkbn", "bn*", "dn"])
def test_batchnorm1d_layouts_and_a_module_called_twice(spec):
    torch.manual_seed(0)
    model = BN1dNet()
    kw = {"k": 3} if spec == "topkbn" else {}
    out = normswap.transform(model, Spec(spec, kwargs=kw))
    rep = normswap.report(out)
    assert [s.name for s in rep.sites] == ["seq_bn", "vec_bn", "shared"]
    x = torch.randn(8, 4, 5)
    y = out(x)
    assert y.shape == (8, 6) and torch.isfinite(y).all()
    (y.sum() + normswap.penalty(out)).backward()
    if spec == "dn":  # DN over the channel index: (N, C, L) keeps L apart
        assert out.seq_bn.dim == 1
    if spec == "bn*":
        # the shared module's penalty counts both calls
        assert len(out.shared._penalty_terms) == 2
    out.eval()
    assert torch.isfinite(out(x)).all()


def test_layernorm_to_batchnorm_uses_the_channel_axis():
    """LayerNorm(C) on (N, L, C) sent to l1bn normalizes each channel over N and L."""
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
    out = normswap.transform(model, {"types": {"LayerNorm": "l1bn"}})
    bn = out[1]
    assert isinstance(bn, N.L1BatchNorm1d) and bn.channel_dim == -1
    x = torch.randn(3, 7, 4)
    h = out[0](x)
    y = out(x)
    mu = h.mean(dim=(0, 1))
    mad = (h - mu).abs().mean(dim=(0, 1))
    torch.testing.assert_close(y, (h - mu) / (N.C_L1 * mad + 1e-5))


def test_multi_dim_layernorm_to_batchnorm_is_refused_clearly():
    model = nn.Sequential(nn.LayerNorm([4, 5]))
    with pytest.raises(TransformError, match="none can be converted:\n  0: .*one channel dim"):
        normswap.transform(model, {"types": {"LayerNorm": "l1bn"}})
    rep = normswap.plan(nn.Sequential(nn.LayerNorm([4, 5]), nn.LayerNorm(5)), {"types": {"LayerNorm": "l1bn"}})
    assert rep["0"].status == "skipped" and "one channel dim" in rep["0"].reason
    with pytest.raises(TransformError, match="one channel dim"):
        normswap.transform(nn.Sequential(nn.LayerNorm([4, 5]), nn.LayerNorm(5)),
                           {"types": {"LayerNorm": "l1bn"}}, strict=True)


# -- spec: rules and precedence ------------------------------------------------------
def test_rule_precedence_global_type_regex_name_and_exclude():
    model = timm.create_model("resnet18", pretrained=False)
    spec = Spec("l1bn", kwargs={"eps": 1e-3},
                types={"BatchNorm2d": {"to": "topkbn", "k": 4}},
                regex={r"layer1\..*": "bn*", r"layer2\.0\..*": {"to": "bn-s", "sigma": 2.0}},
                names={"layer1.0.bn1": {"to": "dn", "sum_window": 3}},
                exclude=[r"layer4\..*", "bn1"])
    rep = normswap.plan(model, spec)
    assert rep["bn1"].status == "excluded"
    assert rep["layer4.0.bn1"].status == "excluded"
    assert rep["layer3.0.bn1"].preset == "topkbn" and rep["layer3.0.bn1"].kwargs["k"] == 4
    assert rep["layer1.1.bn2"].preset == "bn*" and rep["layer1.1.bn2"].kwargs["l1_alpha"] == 0.005
    assert rep["layer2.0.bn1"].kwargs["sigma"] == 2.0
    assert rep["layer1.0.bn1"].preset == "dn" and rep["layer1.0.bn1"].kwargs["sum_window"] == 3
    # a rule without "to" adjusts what the site already becomes
    rep = normswap.plan(model, Spec("l1bn", regex={r"layer3\..*": {"eps": 0.1}}))
    assert rep["layer3.0.bn1"].preset == "l1bn" and rep["layer3.0.bn1"].kwargs["eps"] == 0.1
    assert rep["layer2.0.bn1"].kwargs.get("eps") is None
    # family names work as type rules; the class rule beats the family rule
    rep = normswap.plan(timm.create_model("maxvit_nano_rw_256", pretrained=False),
                        Spec(types={"layernorm": "ln-s", "LayerNorm2d": "dn", "batchnorm": "keep"}))
    kinds = {s.original: s.preset for s in rep.sites}
    assert kinds["LayerNorm2d"] == "dn" and kinds["LayerNorm"] == "ln-s" and kinds["BatchNormAct2d"] == "keep"


def test_spec_round_trips_exactly():
    spec = Spec("topkbn", kwargs={"k": 5}, types={"BatchNorm2d": {"to": "bn*", "sigma": 0.5}},
                regex={r"a\..*": "keep"}, names={"b": "dn"}, exclude=["c"])
    d = spec.to_dict()
    assert Spec.from_dict(d) == spec
    assert Spec.from_json(spec.to_json()) == spec
    assert json.loads(spec.to_json()) == d
    assert Spec.coerce(spec.to_json()) == spec and Spec.coerce(d) == spec
    assert Spec.coerce("l1bn") == Spec(preset="l1bn")


def test_presets_listed_with_formula_and_defaults():
    p = normswap.presets()
    for name in ("l1bn", "topkbn", "bn-s", "bn*", "ln-s", "ln*", "dn", "dn*"):
        assert name in p and "y = " in p[name] or "+ L1 penalty" in p[name]
    assert "k': 10" in p["topkbn"] and "0.005" in p["bn*"]


# -- errors -------------------------------------------------------------------------
def test_unknown_preset_lists_presets():
    with pytest.raises(SpecError, match=r"unknown preset 'l1b'.*did you mean l1bn.*presets: l1bn, topkbn"):
        normswap.transform(nn.Sequential(nn.BatchNorm2d(3)), "l1b")


def test_unknown_kwarg_names_the_accepted_ones():
    with pytest.raises(SpecError, match=r"unknown argument\(s\) sigmaa for 'bn-s'; accepted: .*sigma"):
        Spec("bn*", kwargs={"sigmaa": 1.0})
    with pytest.raises(SpecError, match=r"unknown argument\(s\) k for 'l1bn'"):
        Spec(types={"BatchNorm2d": {"to": "l1bn", "k": 3}})


def test_rule_that_matches_nothing_warns_with_close_names_or_errors_in_strict_mode():
    model = timm.create_model("resnet18", pretrained=False)
    spec = Spec("l1bn", names={"layer1.0.bn3": "keep"})
    with pytest.warns(UserWarning, match=r"names\['layer1.0.bn3'\] matches no normalization site; close names: layer1.0.bn2, layer1.0.bn1"):
        normswap.plan(model, spec)
    with pytest.raises(SpecError, match="matches no normalization site"):
        normswap.transform(model, spec, strict=True)
    with pytest.warns(UserWarning, match="BatchNorm2d"):
        normswap.plan(model, Spec("l1bn", types={"BatchNorm2": "keep"}))


def test_empty_match_and_no_norms_and_bad_spec_types():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    with pytest.raises(SpecError, match=r"matches none of the 25 normalization sites.*layernorm"):
        normswap.transform(vit, "l1bn")
    with pytest.raises(TransformError, match="no normalization layers found"):
        normswap.transform(nn.Sequential(nn.Linear(2, 2)), "l1bn")
    with pytest.raises(SpecError, match="empty spec"):
        Spec()
    with pytest.raises(SpecError, match="must be a preset name"):
        normswap.transform(vit, 42)
    with pytest.raises(SpecError, match="newer than this normswap"):
        Spec.from_dict({"format": 99, "preset": "l1bn"})
    with pytest.raises(SpecError, match="unknown spec field"):
        Spec.from_dict({"preset": "l1bn", "rulez": {}})
    with pytest.raises(SpecError, match="not valid JSON"):
        Spec.coerce("{bad json")
    with pytest.raises(SpecError, match="bad regular expression"):
        Spec("l1bn", regex={"(": "keep"})


def test_report_to_dict_is_json_and_str_is_a_table():
    model = timm.create_model("resnet18", pretrained=False)
    out = normswap.transform(model, Spec("l1bn", exclude=["bn1"]))
    rep = normswap.report(out)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["counts"]["converted"] == 19 and d["counts"]["excluded"] == 1 and d["applied"]
    text = str(rep)
    assert "layer1.0.bn1" in text and "L1BatchNorm2d" in text and "19 converted" in text
    with pytest.raises(ValueError, match="was not transformed"):
        normswap.report(model)
    # plan() changes nothing
    plan = normswap.plan(model, "l1bn")
    assert isinstance(model.bn1, nn.BatchNorm2d) and not plan.applied


def test_plan_and_transform_on_the_meta_device():
    with torch.device("meta"):
        model = timm.create_model("resnet18", pretrained=False)
    out = normswap.transform(model, "l1bn")
    assert out.bn1.weight.device.type == "meta"
    assert len(normswap.report(out).converted) == 20


def test_transformed_model_pickles_with_torch_save(tmp_path):
    import io as _io
    model = normswap.transform(timm.create_model("efficientnet_b0", pretrained=False), "bn*")
    x = torch.randn(2, 3, 64, 64)
    model(x)
    normswap.penalty(model)  # installs the per-forward hook
    buf = _io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.bn1).__name__ == "BatchNormStar2dAct"
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    assert normswap.report(loaded).counts() == normswap.report(model).counts()
