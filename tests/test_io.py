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


# -- persistence: failed writes, file modes, strict=False ---------------------------------------
def _small():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())


def _write_failing(monkeypatch, tmp_path, how):
    """Make the next write fail the way ``how`` says; return the expected error type and text."""
    import errno
    import safetensors.torch as st
    real_open, real_replace, real_save = os.open, os.replace, st.save_file
    if how == "read-only folder":  # as root a chmod'ed folder stays writable, so the OS error is injected
        def fake_open(path, flags, mode=0o777, **kw):
            if os.path.basename(os.fspath(path)).startswith(".tmp-"):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return real_open(path, flags, mode, **kw)
        monkeypatch.setattr(os, "open", fake_open)
        return CheckpointError, "Permission denied"
    if how == "disk full":
        def fake_save(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        monkeypatch.setattr(st, "save_file", fake_save)
        return OSError, "No space left on device"
    if how == "interrupted":
        def fake_save(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        monkeypatch.setattr(st, "save_file", fake_save)
        return KeyboardInterrupt, ""
    if how == "rename fails":
        def fake_replace(src, dst, **kw):
            raise OSError(errno.EXDEV, "Invalid cross-device link", src, dst)
        monkeypatch.setattr(os, "replace", fake_replace)
        return CheckpointError, "Invalid cross-device link"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["read-only folder", "disk full", "interrupted", "rename fails"])
@pytest.mark.parametrize("writer", ["save", "export"])
def test_failed_write_leaves_no_temporary_and_names_the_target(tmp_path, monkeypatch, how, writer):
    model = normswap.transform(_small(), "l1bn").eval()
    target = tmp_path / "m.safetensors"
    normswap.save(model, target)
    before = target.read_bytes()
    error, text = _write_failing(monkeypatch, tmp_path, how)
    with pytest.raises(error) as info:
        getattr(normswap, writer)(model, target)
    if text:
        msg = str(info.value)
        assert msg.startswith(f"cannot write {target}: ") and text in msg and ".tmp-" not in msg, msg
        assert isinstance(info.value, CheckpointError) and isinstance(info.value, OSError)
    assert os.listdir(tmp_path) == ["m.safetensors"] and target.read_bytes() == before


def test_write_to_a_folder_names_it(tmp_path):
    model = normswap.transform(_small(), "l1bn").eval()
    for writer in (normswap.save, normswap.export):
        with pytest.raises(CheckpointError, match=f"cannot write {tmp_path}: it is a directory; give a file name"):
            writer(model, tmp_path)
        with pytest.raises(CheckpointError, match="folder .*missing does not exist"):
            writer(model, tmp_path / "missing" / "m.safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_files_get_their_mode_from_the_umask(tmp_path, umask, mode):
    model = normswap.transform(_small(), "l1bn").eval()
    old = os.umask(umask)
    try:
        normswap.save(model, tmp_path / "m.safetensors")
        normswap.export(model, tmp_path / "v.safetensors")
    finally:
        os.umask(old)
    for name in ("m.safetensors", "v.safetensors"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(mode), name


def test_replacing_a_file_keeps_its_mode(tmp_path):
    model = normswap.transform(_small(), "l1bn").eval()
    path = tmp_path / "m.safetensors"
    normswap.save(model, path)
    os.chmod(path, 0o664)
    normswap.save(model, path)
    assert os.stat(path).st_mode & 0o777 == 0o664


def test_load_strict_false_is_torchs_strict_false(tmp_path):
    model = normswap.transform(_small(), "l1bn").eval()
    with torch.no_grad():
        model[1].running_mad.fill_(3.0)
    tensors, meta = normswap.io.read(_saved(model, tmp_path))
    partial = {k: v for k, v in tensors.items() if k != "1.bias"}
    partial["head.weight"] = torch.zeros(2)
    path = tmp_path / "partial.safetensors"
    save_file(partial, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): 1.bias \| unexpected keys \(1\): head.weight"):
        normswap.load(path, _small())
    fresh = _small()
    with pytest.warns(UserWarning, match=r"strict=False: missing keys \(1\): 1.bias \| unexpected keys \(1\): head.weight"):
        loaded = normswap.load(path, fresh, strict=False)
    assert torch.equal(loaded[1].running_mad, torch.full((4,), 3.0))   # from the file
    assert torch.equal(loaded[0].weight, model[0].weight)
    assert torch.equal(loaded[1].bias, fresh[1].bias)                  # not in the file: the model's own
    assert not hasattr(loaded, "head")
    wrong = {**tensors, "1.running_mad": torch.ones(5)}
    save_file(wrong, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): 1.running_mad: file \(5,\) vs model \(4,\)"):
        normswap.load(path, _small(), strict=False)


def _saved(model, folder):
    path = folder / "m.safetensors"
    normswap.save(model, path)
    return path
