"""The normswap command, run as a subprocess."""
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

import normswap


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "normswap.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_presets_and_help():
    r = run("presets")
    assert r.returncode == 0 and "l1bn" in r.stdout and "bwn-g" in r.stdout and "y = " in r.stdout
    for sub in ("presets", "inspect", "convert", "export"):
        r = run(sub, "--help")
        assert r.returncode == 0 and "example: normswap" in r.stdout


def test_inspect_timm_and_factory():
    r = run("inspect", "resnet18", "--spec", "l1bn")
    assert r.returncode == 0 and "layer1.0.bn1" in r.stdout and "20 converted" in r.stdout
    r = run("inspect", "tests.test_transform:BN1dNet", "--spec", "bn*", "--json")
    assert r.returncode == 0 and '"seq_bn"' in r.stdout


def test_convert_with_plain_checkpoint_then_export(tmp_path):
    torch.manual_seed(0)
    plain = timm.create_model("resnet18", pretrained=False)
    with torch.no_grad():
        plain.bn1.running_var.fill_(4.0)
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    out = tmp_path / "conv.safetensors"
    r = run("convert", "resnet18", "--spec", "l1bn", "--checkpoint", str(tmp_path / "plain.pth"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    model = normswap.load(out, timm.create_model("resnet18", pretrained=False))
    assert torch.allclose(model.bn1.running_mad, torch.full((64,), (2.0 + 1e-5 / 4) * (2 / torch.pi) ** 0.5 - 1e-5 * (2 / torch.pi) ** 0.5), atol=1e-5)
    van = tmp_path / "vanilla.safetensors"
    r = run("export", str(out), "--out", str(van))
    assert r.returncode == 0, r.stderr
    vanilla = timm.create_model("resnet18", pretrained=False)
    vanilla.load_state_dict(load_file(str(van)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vanilla.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args,msg", [
    (("inspect", "resnet18", "--spec", "l1b"), "unknown preset 'l1b'"),
    (("inspect", "resnet_nope"), "unknown timm model 'resnet_nope'"),
    (("inspect", "nomodule.x:f"), "cannot import 'nomodule.x:f'"),
    (("export", "missing.safetensors", "--out", "x.safetensors"), "no such file"),
    (("inspect", "vit_tiny_patch16_224", "--spec", "l1bn"), None),  # plan: reports, does not fail
])
def test_user_errors_are_one_line_without_traceback(args, msg):
    r = run(*args)
    if msg is None:
        assert r.returncode == 0 and "25 unmatched" in r.stdout
        return
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
