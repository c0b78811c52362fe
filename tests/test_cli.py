"""The normswap command, run as a subprocess."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import normswap
from normswap import cli


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


def in_process(*args):
    """Run the command in this process; an uncaught exception fails the test (= a traceback)."""
    return cli.main([str(a) for a in args])


def one_line_error(capsys, rc):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A plain resnet18 checkpoint with a 10-class head (.pth and .safetensors), a text file,
    a garbage .pth and a spec file."""
    tmp_path = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    plain = timm.create_model("resnet18", pretrained=False, num_classes=10)
    torch.save(plain.state_dict(), tmp_path / "plain10.pth")
    save_file(plain.state_dict(), str(tmp_path / "plain10.safetensors"))
    (tmp_path / "text.safetensors").write_text("hello, not tensors")
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x02garbage")
    (tmp_path / "spec.json").write_text(json.dumps({"preset": "topkbn", "kwargs": {"k": 5}}))
    return tmp_path


@pytest.mark.parametrize("args,message", [
    (("inspect", "resnt18"), "unknown timm model 'resnt18'; close names: resnet18"),
    (("inspect", "resnet18", "--spec", "{d}/missing.json"), "--spec file {d}/missing.json: no such file"),
    (("inspect", "resnet18", "--spec", "{d}/nested/spec"), "--spec file {d}/nested/spec: no such file"),
    (("inspect", "resnet18", "--spec", "{d}"), "--spec {d}: is a directory"),
    (("inspect", "resnet18", "--spec", "{d}/text.safetensors"), "--spec file {d}/text.safetensors"),
    (("inspect", "resnet18", "--spec", '{{"preset": "topkbn", "kwargs": {{"k": -1}}}}'), "k"),
    (("inspect", "resnet18", "--spec", '{{"preset": "l1bn", "kwargs": [1]}}'), "'kwargs' must be an object"),
    (("inspect", "resnet18", "--spec", "[" * 5000 + "]" * 5000), "not a preset name, a JSON object or a file"),
    (("inspect", "resnet18", "--spec", '{{"exclude": ' + "[" * 5000 + "]" * 5000 + "}}"), "nested 5001 levels deep"),
    (("inspect", "resnet18", "--model-kwargs", "{{nope"), "--model-kwargs '{{nope' is not JSON"),
    (("inspect", "resnet18", "--model-kwargs", "[1]"), "--model-kwargs must be a JSON object"),
    (("inspect", "resnet18", "--model-kwargs", '{{"pretrained": true}}'), "pretrained not accepted"),
    (("inspect", "resnet18", "--model-kwargs", '{{"no_such_arg": 1}}'), "unexpected keyword argument 'no_such_arg'"),
    (("inspect", "resnet18", "--num-classes", "-1"), "--num-classes -1: must be >= 0"),
    (("inspect", "resnet18", "--num-classes", "3", "--model-kwargs", '{{"num_classes": 4}}'), "disagree"),
    (("inspect", "resnet18", "--json", "--format", "markdown"), "--json and --format markdown disagree"),
    (("inspect", "tests.test_cli:no_such_factory"), "cannot import 'tests.test_cli:no_such_factory'"),
    (("convert", "resnet18", "--spec", "l1bn", "--checkpoint", "{d}/plain10.pth", "--out", "{d}/o.safetensors"),
     "checkpoint {d}/plain10.pth does not fit ResNet: shape mismatches (2): fc.bias: file (10,) vs model (1000,)"),
    (("convert", "resnet18", "--spec", "l1bn", "--checkpoint", "{d}/plain10.safetensors", "--out", "{d}/o.safetensors"),
     "the file's head fc has 10 classes: pass --num-classes 10"),
    (("convert", "resnet18", "--spec", "l1bn", "--checkpoint", "{d}/text.safetensors", "--out", "{d}/o.safetensors"),
     "checkpoint {d}/text.safetensors: not a safetensors file that loads with weights_only=True"),
    (("convert", "resnet18", "--spec", "l1bn", "--checkpoint", "{d}/garbage.pth", "--out", "{d}/o.safetensors"),
     "checkpoint {d}/garbage.pth: not a safetensors file or a torch checkpoint"),
    (("convert", "resnet18", "--spec", "l1bn", "--checkpoint", "{d}/missing.pth", "--out", "{d}/o.safetensors"),
     "checkpoint {d}/missing.pth: no such file"),
    (("convert", "resnet18", "--spec", "l1bn", "--out", "{d}"), "cannot write {d}: it is a directory"),
    (("convert", "resnet18", "--spec", "l1bn", "--out", "{d}/no/such/o.safetensors"), "folder {d}/no/such does not exist"),
    (("export", "{d}/text.safetensors", "--out", "{d}/o.safetensors"), "not a readable safetensors file"),
    (("export", "{d}/plain10.safetensors", "--out", "{d}/o.safetensors"), "no normswap metadata"),
])
def test_every_user_error_is_one_line_and_exit_code_2(files, capsys, args, message):
    before = sorted(os.listdir(files))
    rc = in_process(*(a.format(d=files) for a in args))
    line = one_line_error(capsys, rc)
    assert line.startswith(f"normswap {args[0]}: error: ") and message.format(d=files) in line, line
    assert sorted(os.listdir(files)) == before  # nothing written


def test_convert_and_export_a_fine_tuned_checkpoint(files, tmp_path, capsys):
    out, van = tmp_path / "conv.safetensors", tmp_path / "vanilla.safetensors"
    assert in_process("convert", "resnet18", "--spec", files / "spec.json", "--num-classes", 10,
                      "--checkpoint", files / "plain10.safetensors", "--out", out) == 0
    assert in_process("export", out, "--out", van) == 2
    assert "pass --num-classes 10" in capsys.readouterr().err and not van.exists()
    assert in_process("export", out, "--num-classes", 10, "--out", van) == 0
    converted = normswap.load(out, timm.create_model("resnet18", pretrained=False, num_classes=10))
    assert normswap.report(converted)["bn1"].becomes == "TopKBatchNorm2d"
    assert normswap.report(converted)["bn1"].kwargs["k"] == 5
    plain = timm.create_model("resnet18", pretrained=False, num_classes=10)
    plain.load_state_dict(torch.load(files / "plain10.pth", weights_only=True))
    vanilla = timm.create_model("resnet18", pretrained=False, num_classes=10)
    vanilla.load_state_dict(load_file(str(van)), strict=True)
    assert torch.equal(vanilla.fc.weight, plain.fc.weight)


def test_model_kwargs_reach_create_model(tmp_path):
    out = tmp_path / "c.safetensors"
    assert in_process("convert", "resnet18", "--spec", "l1bn", "--out", out,
                      "--model-kwargs", '{"in_chans": 1, "num_classes": 3}') == 0
    t = load_file(str(out))
    assert tuple(t["conv1.weight"].shape) == (64, 1, 7, 7) and tuple(t["fc.weight"].shape) == (3, 512)


def test_inspect_formats(capsys):
    outputs = {}
    for args in (("--format", "table"), ("--format", "json"), ("--json",), ("--format", "markdown"), ()):
        assert in_process("inspect", "resnet18", "--spec", "l1bn", *args) == 0
        outputs[args] = capsys.readouterr().out
    assert outputs[()] == outputs[("--format", "table")] and "layer1.0.bn1" in outputs[()]
    assert outputs[("--json",)] == outputs[("--format", "json")]
    rep = json.loads(outputs[("--json",)])
    assert rep["counts"]["converted"] == 20 and len(rep["sites"]) == 20
    md = outputs[("--format", "markdown")].splitlines()
    assert md[0] == "| site | kind | original | becomes / why not | kwargs |" and md[1] == "|---|---|---|---|---|"
    rows = [line for line in md[2:] if line.startswith("| ")]
    assert len(rows) == 20 and all(line.count(" | ") == 4 for line in rows)
    assert "| `layer1.0.bn1` | module | BatchNorm2d | L1BatchNorm2d" in outputs[("--format", "markdown")]


@pytest.mark.parametrize("args,message", [
    (("convert", "resnet18"), "normswap convert: error: the following arguments are required: --spec, --out"),
    (("inspect", "resnet18", "--num-classes", "ten"), "argument --num-classes: invalid int value: 'ten'"),
    (("inspect", "resnet18", "--format", "html"), "argument --format: invalid choice: 'html'"),
    (("frobnicate",), "argument command: invalid choice: 'frobnicate'"),
])
def test_usage_errors_are_one_line_too(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        in_process(*args)
    line = one_line_error(capsys, info.value.code)
    assert message in line and line.endswith("--help)"), line
