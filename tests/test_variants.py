"""The presets that keep each site's own area (l1, topk, gn-s, in-s), whitening, and
bwn's fallback on every family, on real model families."""
import pytest
import timm
import torch
import torchvision
from torch import nn

import normswap
import normswap.norms as N
from normswap import Spec

AREA_CASES = [  # model, input size, {site class -> expected new class}
    ("resnet18", 64, {"BatchNorm2d": "L1BatchNorm2d"}),
    ("convnext_atto", 64, {"LayerNorm2d": "L1LayerNorm2d", "LayerNorm": "L1LayerNorm"}),
    ("vit_tiny_patch16_224", 32, {"LayerNorm": "L1LayerNorm"}),
    ("resnet50_gn", 64, {"GroupNorm": "L1GroupNorm"}),
    ("poolformerv2_s12", 64, {"LayerNorm2dNoBias": "L1LayerNorm2d", "LayerNorm2d": "L1LayerNorm2d",
                              "GroupNorm1NoBias": "L1GroupNorm"}),
]


@pytest.mark.parametrize("name,size,expect", AREA_CASES, ids=[c[0] for c in AREA_CASES])
def test_l1_keeps_every_site_area_and_runs(name, size, expect):
    kw = {"img_size": size} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, **kw)
    out = normswap.transform(model, "l1")
    rep = normswap.report(out)
    assert not rep.skipped and rep.counts()["unmatched"] == 0
    for s in rep.sites:
        assert s.becomes == expect[s.original], s
    x = torch.randn(2, 3, size, size)
    y = out.train()(x)
    y.square().mean().backward()
    with torch.no_grad():
        assert torch.isfinite(y).all() and torch.isfinite(out.eval()(x)).all()


def test_topk_on_instance_and_group_norms():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8, affine=True), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), nn.GroupNorm(2, 8))
    out = normswap.transform(model, Spec("topk", kwargs={"k": 3}))
    assert isinstance(out[1], N.TopKInstanceNorm2d) and isinstance(out[4], N.TopKGroupNorm)
    assert out[1].weight is model[1].weight or torch.equal(out[1].weight, model[1].weight)
    y = out(torch.randn(2, 3, 10, 10))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("preset,site", [("gn-s", nn.GroupNorm(2, 8)), ("in-s", nn.InstanceNorm2d(8, affine=True))])
def test_sigma_zero_keeps_group_and_instance_norms_exactly(preset, site):
    with torch.no_grad():
        site.weight.uniform_(0.5, 2)
        site.bias.normal_()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), site)
    out = normswap.transform(model, Spec(preset, kwargs={"sigma": 0.0}))
    assert normswap.report(out)["1"].preserves_function
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(out(x), model(x))
    out2 = normswap.transform(model, preset)
    assert not normswap.report(out2)["1"].preserves_function
    assert not torch.allclose(out2(x), model(x))


@pytest.mark.parametrize("channels", [32, 40])
def test_iternorm_from_a_trained_batch_norm_keeps_eval_outputs(channels):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2)
        bn.running_mean.normal_()
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    model = nn.Sequential(nn.Conv2d(3, channels, 1), bn).eval()
    out = normswap.transform(model, "iternorm")
    assert isinstance(out[1], N.IterNorm2d) and normswap.report(out)["1"].preserves_function
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    y = out.train()(torch.randn(8, 3, 5, 5))
    assert torch.isfinite(y).all()


def test_bwn_fallback_converts_layernorm_only_models():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    out = normswap.transform(vit, {"preset": "bwn", "kwargs": {"fallback": "l1"}})
    rep = normswap.report(out)
    assert not rep.skipped and len(rep.converted) == len(rep.sites)
    cnx = torchvision.models.convnext_tiny(weights=None)
    out = normswap.transform(cnx, {"preset": "bwn", "kwargs": {"fallback": {"to": "l1", "eps": 1e-4}}})
    rep = normswap.report(out)
    assert len(rep.converted) == len(rep.sites) == 23, rep
    assert all(s.kwargs.get("eps") == 1e-4 for s in rep.converted if s.preset == "l1")
    y = out(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(y).all()


def test_pure_half_l1_layer_norm_model_stays_finite():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))
    out = normswap.transform(model, "l1").half()
    x = (torch.randn(8, 16) * 3000).half()
    y = out(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
