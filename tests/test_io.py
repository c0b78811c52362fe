"""Converted checkpoints: round trips, atomic writes, clear errors, export to vanilla timm."""
import json
import os

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import normswap
from normswap import CheckpointError, Spec

from .test_transform import FunctionalLN

RESNET_PRESETS = ["l1bn", "topkbn", "bn-s", "bn*", "meanonly", "dn", "dn*", "bwn", "bwn-g"]
VIT_PRESETS = ["ln-s", "ln*", "dn", "dn*", Spec("bwn", kwargs={"fallback": "ln-s"})]


def _resnet():
    return timm.create_model("resnet18", pretrained=False)


def _vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)


def _trained(make, spec, size):
    torch.manual_seed(0)
    model = normswap.transform(make(), spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        (model(torch.randn(8, 3, size, size)).square().mean() + normswap.penalty(model)).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("make,spec,size", [(_resnet, p, 64) for p in RESNET_PRESETS] + [(_vit, p, 32) for p in VIT_PRESETS],
                         ids=[f"resnet18-{p}" for p in RESNET_PRESETS] + [f"vit-{p if isinstance(p, str) else 'bwn-fallback'}" for p in VIT_PRESETS])
def test_round_trip_bit_for_bit(tmp_path, make, spec, size):
    model = _trained(make, spec, size)
    path = tmp_path / "m.safetensors"
    normswap.save(model, path)
    loaded = normswap.load(path, make()).eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.randn(2, 3, size, size)
    assert torch.equal(model(x), loaded(x))
    meta = normswap.io.read(path)[1]
    assert Spec.from_json(meta["spec"]) == Spec.coerce(spec)
    assert meta["architecture"] == model.pretrained_cfg["architecture"]
    for k in ("normswap_version", "torch_version", "timm_version"):
        assert meta[k]


def test_shared_tensors_are_stored_once_and_restored(tmp_path):
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(FunctionalLN(), torch.nn.ReLU())
    model = normswap.transform(make(), Spec("ln-s", kwargs={"affine": True}))
    assert model[0].layer_norm.weight is model[0].ln_weight
    path = tmp_path / "m.safetensors"
    normswap.save(model, path)
    raw = load_file(str(path))
    assert "0.ln_weight" in raw and "0.layer_norm.weight" not in raw
    loaded = normswap.load(path, make())
    assert loaded[0].layer_norm.weight is loaded[0].ln_weight
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), model(x))


def test_atomic_write_leaves_no_half_file(tmp_path, monkeypatch):
    model = normswap.transform(_resnet(), "l1bn")
    path = tmp_path / "m.safetensors"
    normswap.save(model, path)
    before = path.read_bytes()
    import safetensors.torch as st

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("No space left on device")
    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError, match="No space left"):
        normswap.save(normswap.transform(_resnet(), "topkbn"), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary left behind
    with pytest.raises(OSError):
        normswap.save(model, tmp_path / "new.safetensors")
    assert not (tmp_path / "new.safetensors").exists()


def test_load_errors(tmp_path):
    model = normswap.transform(_resnet(), "l1bn")
    good = tmp_path / "good.safetensors"
    normswap.save(model, good)
    text = tmp_path / "text.safetensors"
    text.write_text("hello, not tensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        normswap.load(text, _resnet())
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        normswap.load(trunc, _resnet())
    with pytest.raises(CheckpointError, match="no such file"):
        normswap.load(tmp_path / "missing.safetensors", _resnet())
    plain = tmp_path / "plain.safetensors"
    save_file(_resnet().state_dict(), str(plain))
    with pytest.raises(CheckpointError, match="no normswap metadata.*load it into the model first"):
        normswap.load(plain, _resnet())
    tensors, meta = normswap.io.read(good)
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={**meta, "normswap_format": "99"})
    with pytest.raises(CheckpointError, match="newer normswap"):
        normswap.load(newer, _resnet())
    future_spec = tmp_path / "future_spec.safetensors"
    save_file(tensors, str(future_spec), metadata={**meta, "spec": json.dumps({"format": 7, "preset": "l1bn"})})
    with pytest.raises(CheckpointError, match="newer than this normswap"):
        normswap.load(future_spec, _resnet())
    dropped = {k: v for k, v in tensors.items() if k != "fc.bias"}
    dropped["extra.weight"] = torch.zeros(1)
    bad_keys = tmp_path / "keys.safetensors"
    save_file(dropped, str(bad_keys), metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): fc.bias.*unexpected keys \(1\): extra.weight"):
        normswap.load(bad_keys, _resnet())
    with pytest.raises(CheckpointError, match=r"shape mismatches \(2\): fc.bias: file \(1000,\) vs model \(10,\)"):
        normswap.load(good, timm.create_model("resnet18", pretrained=False, num_classes=10))
    with pytest.raises(CheckpointError, match="holds a resnet18; the model given is a resnet34"):
        normswap.load(good, timm.create_model("resnet34", pretrained=False))
    with pytest.raises(CheckpointError, match="fresh, untransformed"):
        normswap.load(good, model)
    with pytest.raises(CheckpointError, match="was not transformed"):
        normswap.save(_resnet(), tmp_path / "x.safetensors")


@pytest.mark.parametrize("spec", ["l1bn", "topkbn", "bn-s", "bwn", "bwn-g", "meanonly"])
def test_export_folds_into_vanilla_timm(tmp_path, spec):
    model = _trained(_resnet, spec, 64)
    path = tmp_path / "vanilla.safetensors"
    normswap.export(model, path)
    vanilla = _resnet()
    vanilla.load_state_dict(load_file(str(path)), strict=True)
    vanilla.eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        want, got = model(x), vanilla(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        assert not torch.allclose(_resnet().eval()(x), want)  # the export carried the trained weights
    assert normswap.io.read(path)[1]["kind"] == "vanilla"


@pytest.mark.parametrize("spec", ["ln*", "dn"])
def test_export_refuses_per_example_statistics(tmp_path, spec):
    model = _trained(_vit, spec, 32)
    with pytest.raises(CheckpointError, match=r"(?s)cannot fold into the original architecture.*blocks.0.norm1 \(LayerNorm"):
        normswap.export(model, tmp_path / "v.safetensors")
    assert not (tmp_path / "v.safetensors").exists()
    sd = normswap.export(model, tmp_path / "v.safetensors", fold=False)
    assert set(load_file(str(tmp_path / "v.safetensors"))) == set(sd) == set(model.state_dict())
