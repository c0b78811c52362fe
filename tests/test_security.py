"""A checkpoint never chooses code to run: crafted files get a clear error, nothing runs,
nothing is written."""
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import normswap
from normswap import CheckpointError, cli
from normswap.io import CheckpointMismatchError, read

PROBE = "normswap_probe_module"
PROBE_SOURCE = '''
import pathlib
pathlib.Path(__file__).with_name("IMPORTED").write_text("imported")

def build(**kwargs):
    import torch
    pathlib.Path(__file__).with_name("CALLED").write_text("called")
    return tiny_model()

def tiny_model():
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
'''


def tiny_model():
    """The same model as the probe's (built here without importing the probe)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())


@pytest.fixture
def good(tmp_path):
    """(tensors, metadata) of a genuine converted checkpoint of tiny_model."""
    path = tmp_path / "good.safetensors"
    normswap.save(normswap.transform(tiny_model(), "l1bn"), path)
    tensors, meta = read(path)
    path.unlink()
    return tensors, meta


def craft(folder, tensors, meta, name="crafted.safetensors"):
    path = folder / name
    save_file(tensors, str(path), metadata=meta)
    return path


def files(folder):
    return sorted(os.listdir(folder))


@pytest.fixture
def no_transform(monkeypatch):
    """Fail the test if normswap.transform runs (the file must be refused before)."""
    mod = sys.modules["normswap.transform"]

    def refuse(*a, **k):
        raise AssertionError("transform ran on a crafted file")
    monkeypatch.setattr(mod, "transform", refuse)


def run_cli(*args, env_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(env_path), os.getcwd()]))
    return subprocess.run([sys.executable, "-m", "normswap.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(env_path))


# -- an architecture naming code is never imported -------------------------------------------
@pytest.mark.parametrize("arch", [f"{PROBE}:build", f"{PROBE}.build", PROBE])
def test_architecture_naming_code_is_never_imported(tmp_path, good, arch):
    (tmp_path / f"{PROBE}.py").write_text(PROBE_SOURCE)
    tensors, meta = good
    crafted = craft(tmp_path, tensors, {**meta, "architecture": arch})
    before = files(tmp_path)
    r = run_cli("export", str(crafted), "--out", str(tmp_path / "out.safetensors"), env_path=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"names the architecture {arch!r}, which is not a timm model" in r.stderr
    assert "--model package.module:factory" in r.stderr
    assert not (tmp_path / "IMPORTED").exists() and not (tmp_path / "CALLED").exists()
    assert files(tmp_path) == before  # no output, no temporary file


def test_probe_detects_an_import_when_the_user_names_the_factory(tmp_path, good):
    """Control for the test above: the same probe, named on the command line, is imported
    and called (so the absence of its markers there means something)."""
    (tmp_path / f"{PROBE}.py").write_text(PROBE_SOURCE)
    tensors, meta = good
    crafted = craft(tmp_path, tensors, {**meta, "architecture": f"{PROBE}:build"})
    out = tmp_path / "out.safetensors"
    r = run_cli("export", str(crafted), "--out", str(out), "--model", f"{PROBE}:build", env_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "IMPORTED").exists() and (tmp_path / "CALLED").exists() and out.exists()


def test_api_load_never_imports_the_architecture(tmp_path, good, monkeypatch):
    (tmp_path / f"{PROBE}.py").write_text(PROBE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    tensors, meta = good
    crafted = craft(tmp_path, tensors, {**meta, "architecture": f"{PROBE}:build"})
    model = normswap.load(crafted, tiny_model())  # the name is data: only compared, never imported
    assert torch.equal(model[1].running_mad, tensors["1.running_mad"])
    assert PROBE not in sys.modules and not (tmp_path / "IMPORTED").exists()


# -- variants are looked up only among those registered in this process ------------------------
@pytest.mark.parametrize("spec", [
    {"format": 1, "preset": "my_unregistered_norm"},
    {"format": 1, "preset": "l1bn", "names": {"1": {"to": "my_unregistered_norm", "eps": 0.1}}},
    {"format": 1, "types": {"BatchNorm2d": "my_unregistered_norm"}},
])
def test_unregistered_variant(tmp_path, good, no_transform, capsys, spec):
    tensors, meta = good
    crafted = craft(tmp_path, tensors, {**meta, "spec": json.dumps(spec)})
    with pytest.raises(CheckpointError, match=r"names variant 'my_unregistered_norm', which is not registered "
                                              r"in this process.*normswap.register_variant"):
        normswap.load(crafted, tiny_model())
    assert_cli_refuses(tmp_path, crafted, capsys, "my_unregistered_norm")


def assert_cli_refuses(folder, crafted, capsys, message):
    before = files(folder)
    rc = cli.main(["export", str(crafted), "--out", str(folder / "out.safetensors"),
                   "--model", "tests.test_security:tiny_model"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert files(folder) == before


# -- sizes and nesting ----------------------------------------------------------------------
def test_oversized_spec(tmp_path, good, no_transform, capsys):
    tensors, meta = good
    spec = {"format": 1, "preset": "l1bn", "exclude": ["x" * 1000 + str(i) for i in range(2100)]}
    crafted = craft(tmp_path, tensors, {**meta, "spec": json.dumps(spec)})
    with pytest.raises(CheckpointError, match=r"the stored spec is 2.0 MiB of JSON; normswap reads at most 1 MiB"):
        normswap.load(crafted, tiny_model())
    assert_cli_refuses(tmp_path, crafted, capsys, "MiB of JSON")


@pytest.mark.parametrize("field", ["spec", "aliases"])
def test_deeply_nested_json(tmp_path, good, no_transform, capsys, field):
    tensors, meta = good
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(RecursionError):  # what json.loads alone would do with it
        json.loads(deep)
    text = ('{"format": 1, "preset": "l1bn", "exclude": %s}' if field == "spec" else '{"a": %s}') % deep
    crafted = craft(tmp_path, tensors, {**meta, field: text})
    with pytest.raises(CheckpointError, match=r"is JSON nested 100001 levels deep; normswap reads at most 16 levels"):
        normswap.load(crafted, tiny_model())
    assert_cli_refuses(tmp_path, crafted, capsys, "levels deep")


def test_depth_ignores_brackets_inside_strings():
    from normswap.io import json_depth
    assert json_depth('{"a": ["[[[{{{", {"b": "\\"]]]"}]}') == 3
    assert json_depth('"just text"') == 0


# -- metadata with unexpected keys, types or text ------------------------------------------------
BAD_METADATA = [
    ({"normswap_format": "one"}, "bad normswap format field 'one'"),
    ({"kind": "pickle"}, "metadata 'kind' is 'pickle'"),
    ({"loader": "os:system"}, "unknown metadata key(s) 'loader'"),
    ({"architecture": "resnet18\nimport os"}, "metadata 'architecture' 'resnet18\\nimport os' holds control characters"),
    ({"architecture": "r" * 5000}, "metadata 'architecture' is 5000 characters long"),
    ({"aliases": '["0.weight"]'}, "metadata 'aliases' must be a JSON object"),
    ({"aliases": '{"x": 3}'}, "metadata 'aliases' must be a JSON object"),
    ({"aliases": '{"x": "nope"}'}, "maps 'x' to 'nope', which is not stored"),
    ({"aliases": '{"0.weight": "1.weight"}'}, "maps '0.weight', which is also stored"),
    ({"spec": "[1, 2]"}, "the spec must be a JSON object, got list"),
    ({"spec": "{not json"}, "the stored spec is not valid JSON"),
    ({"spec": '{"preset": "l1bn", "kwargs": {"eps": NaN}}'}, "the stored spec is not valid JSON"),
    ({"spec": '{"preset": "\\ud800"}'}, "the stored spec is not valid UTF-8"),
    ({"spec": '{"preset": 5}'}, "'preset' must be a preset name (string) or null, got int"),
    ({"spec": '{"format": true, "preset": "l1bn"}'}, "'format' must be an integer"),
    ({"spec": '{"preset": "l1bn", "kwargs": [1]}'}, "'kwargs' must be an object"),
    ({"spec": '{"preset": "l1bn", "kwargs": {"eps": {"__class__": "os.system"}}}'}, "'kwargs' must be an object"),
    ({"spec": '{"preset": "l1bn", "exclude": "bn1"}'}, "'exclude' must be a list"),
    ({"spec": '{"preset": "l1bn", "types": {"BatchNorm2d": 3}}'}, "types['BatchNorm2d'] must be a preset name"),
    ({"spec": '{"preset": "l1bn", "names": {"1": {"to": ["l1bn"]}}}'}, "names['1']['to'] must be a preset name"),
    ({"spec": '{"preset": "l1bn", "loader": "os:system"}'}, "unknown spec field(s) 'loader'"),
    ({"spec": None}, "a converted checkpoint without its 'spec' metadata"),
    ({"spec": json.dumps({"preset": "l1bn", "regex": {"(" * 1000 + ")" * 1000: "keep"}})},
     "a regular expression with groups nested 1000 deep"),  # a RecursionError in re.compile
    ({"spec": json.dumps({"preset": "l1bn", "exclude": ["x" * 1001]})}, "exclude[0]: a regular expression of 1001 characters"),
]


@pytest.mark.parametrize("change,message", BAD_METADATA, ids=[m for _, m in BAD_METADATA])
def test_metadata_with_unexpected_keys_or_types(tmp_path, good, no_transform, capsys, change, message):
    tensors, meta = good
    meta = {k: v for k, v in {**meta, **change}.items() if v is not None}
    crafted = craft(tmp_path, tensors, meta)
    with pytest.raises(CheckpointError) as info:
        normswap.load(crafted, tiny_model())
    assert message in str(info.value)
    assert_cli_refuses(tmp_path, crafted, capsys, message.split("\n")[0][:30])


def _raw_safetensors(header: bytes) -> bytes:
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + b"\0" * 4


def test_non_utf8_metadata(tmp_path, capsys):
    header = (b'{"__metadata__": {"normswap_format": "1", "kind": "converted", "spec": "\xff\xfe"}, '
              b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}')
    crafted = tmp_path / "crafted.safetensors"
    crafted.write_bytes(_raw_safetensors(header))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        normswap.load(crafted, tiny_model())
    assert_cli_refuses(tmp_path, crafted, capsys, "not a readable safetensors file")


def test_non_safetensors_file(tmp_path, capsys):
    crafted = tmp_path / "crafted.safetensors"
    torch.save(tiny_model().state_dict(), crafted)  # a pickle-based file under a safetensors name
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        normswap.load(crafted, tiny_model())
    assert_cli_refuses(tmp_path, crafted, capsys, "not a readable safetensors file")


# -- tensors that disagree with the spec --------------------------------------------------------
def test_tensors_disagreeing_with_the_spec(tmp_path, good, capsys):
    tensors, meta = good
    as_bns = craft(tmp_path, tensors, {**meta, "spec": json.dumps({"format": 1, "preset": "bn-s"})},
                   "bns.safetensors")  # bn-s keeps running_var, the file holds running_mad
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): 1.running_var.*"
                                                      r"unexpected keys \(1\): 1.running_mad"):
        normswap.load(as_bns, tiny_model())
    assert_cli_refuses(tmp_path, as_bns, capsys, "missing keys (1): 1.running_var")
    wrong_shape = craft(tmp_path, {**tensors, "1.running_mad": torch.ones(7)}, meta, "shape.safetensors")
    for strict in (True, False):
        with pytest.raises(CheckpointMismatchError, match=r"shape mismatches \(1\): 1.running_mad: file \(7,\) vs model \(4,\)"):
            normswap.load(wrong_shape, tiny_model(), strict=strict)
    assert_cli_refuses(tmp_path, wrong_shape, capsys, "shape mismatches (1)")
    bad_value = craft(tmp_path, tensors, {**meta, "spec": json.dumps({"format": 1, "preset": "topkbn",
                                                                      "kwargs": {"k": -1}})}, "k.safetensors")
    # refused by the stored spec's own value checks, before any model is built
    with pytest.raises(CheckpointError, match=r"the stored spec: .*'topkbn'.*k=-1: expected an int >= 1"):
        normswap.load(bad_value, tiny_model())
    assert_cli_refuses(tmp_path, bad_value, capsys, "k=-1: expected an int >= 1")


def test_genuine_file_still_loads_bit_for_bit(tmp_path, good):
    """The checks refuse nothing a normswap.save file holds (shared tensors, all presets' fields)."""
    tensors, meta = good
    path = craft(tmp_path, tensors, meta)
    model = normswap.load(path, tiny_model())
    for k, v in model.state_dict().items():
        assert torch.equal(v, tensors[k]), k
