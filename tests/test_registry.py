"""A variant registered from outside the package works with every verb:
transform, plan, report, penalty, param_groups, save/load, export's refusal."""
import pytest
import torch
from torch import nn

import normswap
from normswap import args as A
from normswap.norms import NormalizerBase, register_normalizer
from normswap.variants import VARIANTS, Built, LayoutError, Variant, VariantError


@register_normalizer
class HalfScaleNorm(NormalizerBase):
    """Toy: ``y = scale * (x - mean_C(x))`` per example and position, ``scale`` learned
    per channel (a custom normalizer written by a user)."""

    def __init__(self, num_channels: int, scale: float = 0.5, l1_alpha: float = 0.0):
        super().__init__(l1_alpha=l1_alpha)
        self.weight = nn.Parameter(torch.full((num_channels,), float(scale)))

    def forward(self, x):
        v = x - x.mean(dim=1, keepdim=True)
        if self._wants_penalty():
            self._record_penalty(v.abs().mean())
        return v * self.weight.view(1, -1, *([1] * (x.dim() - 2)))


class HalfScale(Variant):
    name = "halfscale-test"
    families = ("batchnorm", "groupnorm")
    args = (A.Arg("scale", A.number(0.0, strict=True), "a number > 0"), A.L1_ALPHA)
    defaults = {"scale": 0.5}
    summary = "toy variant registered by a test"
    formula = "y = scale * (x - mean_C x)"

    def build(self, facts, kw):
        if facts.layout not in ("2d", "any"):
            raise LayoutError("needs channels in dim 1")
        return Built(HalfScaleNorm(facts.num_features, kw["scale"], kw.get("l1_alpha", 0.0)), False,
                     "toy: outputs change")


@pytest.fixture(scope="module", autouse=True)
def registered():
    normswap.register_variant(HalfScale(), replace=True)
    yield
    VARIANTS.pop("halfscale-test")
    normswap.variants.PRESETS.pop("halfscale-test")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.Flatten(), nn.Linear(6 * 16, 3))


def test_registered_variant_is_a_preset_with_checked_keywords():
    assert "halfscale-test" in normswap.presets()
    with pytest.raises(normswap.SpecError, match="scale=-1"):
        normswap.Spec("halfscale-test", kwargs={"scale": -1})
    with pytest.raises(VariantError, match="already registered"):
        normswap.register_variant(HalfScale())


def test_transform_plan_report_penalty_with_a_registered_variant():
    model = _model()
    rep = normswap.plan(model, {"preset": "halfscale-test", "kwargs": {"scale": 2.0, "l1_alpha": 0.1}})
    assert [s.status for s in rep.sites] == ["converted", "converted"]
    out = normswap.transform(model, {"preset": "halfscale-test", "kwargs": {"scale": 2.0, "l1_alpha": 0.1}})
    assert isinstance(out[1], HalfScaleNorm) and out[1].weight[0].item() == 2.0
    x = torch.randn(2, 3, 4, 4)
    y = out.train()(x)
    h = out[0](x)
    expect = 0.1 * (h - h.mean(1, keepdim=True)).abs().mean()
    assert normswap.penalty(out).item() > expect.item() * 0.99   # both sites add a term
    assert torch.isfinite(y).all()
    groups = normswap.param_groups(out, lr=0.1, weight_decay=1e-4)
    assert {g["name"] for g in groups} >= {"decay", "no_decay"}


def test_save_and_load_replay_a_registered_variant(tmp_path):
    out = normswap.transform(_model(), {"preset": "halfscale-test", "kwargs": {"scale": 3.0}})
    with torch.no_grad():
        out[1].weight.mul_(1.5)
    path = tmp_path / "toy.safetensors"
    normswap.save(out, path)
    back = normswap.load(path, _model())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(back.eval()(x), out.eval()(x), rtol=0, atol=0)
    assert normswap.report(back)["1"].becomes == "HalfScaleNorm"
    # once unregistered, the file names a variant this process does not know: a clear error
    v = VARIANTS.pop("halfscale-test")
    p = normswap.variants.PRESETS.pop("halfscale-test")
    try:
        with pytest.raises(Exception, match="halfscale-test"):
            normswap.load(path, _model())
    finally:
        VARIANTS[v.name] = v
        normswap.variants.PRESETS[p.name] = p
