"""Converted models compile without a graph break, in train and eval mode, for every
preset that applies (``torch._dynamo.explain`` traces; it does not run inductor)."""
import pytest
import timm
import torch

import normswap

from .helper_models import functional_model

# one preset per kind of layer (bwn-g covers mean-only BN and the weight parametrization)
RESNET_PRESETS = ["l1bn", "topkbn", "bn*", "dn*", "iternorm", "bwn-g"]
CASES = [("resnet18", {}, (4, 3, 64, 64), p) for p in RESNET_PRESETS] + [
    ("efficientnet_b0", {}, (4, 3, 64, 64), "topkbn"),      # *Act norms; >= k values per channel
    ("vit_tiny_patch16_224", {"img_size": 32}, (2, 3, 32, 32), "l1"),
    ("convnext_atto", {}, (2, 3, 64, 64), "ln*"),
    ("convnext_atto", {}, (2, 3, 64, 64), {"preset": "bwn", "kwargs": {"fallback": "l1"}}),
]


def _ids(c):
    spec = c[3] if isinstance(c[3], str) else "bwn+fallback"
    return f"{c[0]}-{spec}"


def _breaks(model, x):
    torch._dynamo.reset()
    e = torch._dynamo.explain(model)(x)
    return e.graph_break_count, [str(r.reason)[:300] for r in e.break_reasons]


@pytest.mark.slow
@pytest.mark.parametrize("name,kw,shape,spec", CASES, ids=[_ids(c) for c in CASES])
def test_converted_timm_model_has_no_graph_break(name, kw, shape, spec):
    torch.manual_seed(0)
    model = normswap.transform(timm.create_model(name, pretrained=False, **kw), spec)
    x = torch.randn(*shape)
    for mode in (True, False):
        n, reasons = _breaks(model.train(mode), x)
        assert n == 0, (mode, reasons)


@pytest.mark.parametrize("spec", ["ln-s", "ln*", "l1", "dn"])
def test_rewritten_functional_calls_have_no_graph_break(spec):
    model = normswap.transform(functional_model(), spec)
    x = torch.randn(2, 3, 8)
    for mode in (True, False):
        n, reasons = _breaks(model.train(mode), x)
        assert n == 0, (mode, reasons)
