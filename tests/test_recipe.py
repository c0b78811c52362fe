"""recipes/imagenet_bwn.py: built-in run, bad input, 2 processes, resume."""
import importlib.util
import json
import os

import pytest
import timm
import torch

import normswap

from .distributed import run_processes

HERE = os.path.dirname(__file__)


def _recipe():
    spec = importlib.util.spec_from_file_location("imagenet_bwn", os.path.join(HERE, "..", "recipes", "imagenet_bwn.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _run(argv):
    _reset_accelerate()
    recipe = _recipe()
    ap, args = recipe.parse_args(argv)
    recipe.validate(ap, args)
    return recipe.train(args)


FAST = ["--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "16", "--model", "resnet10t"]


def test_builtin_run_writes_metrics_state_and_a_loadable_model(tmp_path):
    out = _run(FAST + ["--output-dir", str(tmp_path)])
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["epoch"] for l in lines] == [1, 2]
    for l in lines:
        assert 0 <= l["val_top1"] <= l["val_top5"] <= 100 and l["train_loss"] > 0
    assert (tmp_path / "checkpoint_epoch2" / "trainer_state.json").exists()
    model = normswap.load(tmp_path / "model.safetensors",
                          timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1))
    rep = json.load(open(tmp_path / "report.json"))
    assert rep["counts"]["converted"] > 0
    assert any(s["preset"] == "bwn" for s in rep["sites"])
    assert any(isinstance(m, normswap.norms.MeanOnlyBatchNorm2d) for m in model.modules())
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(model.eval()(x), out["model"].eval()(x))


@pytest.mark.parametrize("argv,msg", [
    (["--data", "/nonexistent/imagenet"], "expected an ImageNet-style folder"),
    (["--spec", "l1b"], "unknown preset 'l1b'"),
    (["--spec", '{"preset": "bwn", "kwargs": {"pp": 3}}'], "unknown argument(s) pp"),
    (["--model", "resnet_nope"], "not a timm model"),
    (["--lr-correction", "reference"], "needs --reference-norms"),
])
def test_bad_input_fails_before_training(tmp_path, capsys, argv, msg):
    recipe = _recipe()
    with pytest.raises(SystemExit) as e:
        recipe.main(argv + ["--output-dir", str(tmp_path / "out")])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _worker(rank, world, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    res = _run(FAST + ["--epochs", "1", "--sync-norm", "--output-dir", out_dir])
    model = res["model"]
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "metrics": res["metrics"],
            "sync": all(m.sync for m in model.modules() if isinstance(m, normswap.norms.BatchStatNorm))}


@pytest.mark.slow
def test_two_processes_agree_and_gather_metrics(tmp_path):
    r0, r1 = run_processes(_worker, 2, (str(tmp_path),))
    assert r0["sync"] and r1["sync"]
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["metrics"]["val_top1"] == r1["metrics"]["val_top1"]
    # the gathered accuracy is the accuracy of the final model on the whole validation set
    recipe = _recipe()
    _, val, _, _ = recipe.digits_datasets(32)
    model = normswap.load(tmp_path / "model.safetensors",
                          timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)).eval()
    x, y = val.tensors
    with torch.no_grad():
        top1 = recipe.accuracy(model(x), y)[0]
    assert top1 == pytest.approx(r0["metrics"]["val_top1"], abs=1e-6)


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(tmp_path):
    full = _run(FAST + ["--output-dir", str(tmp_path / "full")])
    _run(FAST + ["--output-dir", str(tmp_path / "part"), "--stop-after-epoch", "1"])
    resumed = _run(FAST + ["--output-dir", str(tmp_path / "part"),
                           "--resume", str(tmp_path / "part" / "checkpoint_epoch1")])
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = [json.loads(l) for l in open(tmp_path / "part" / "metrics.jsonl")]
    assert [l["epoch"] for l in lines] == [1, 2]


def test_skipped_fp16_steps_do_not_advance_the_lr_schedule(tmp_path, monkeypatch):
    """Accelerate reports an overflowed fp16 step as skipped (GPU only); fake it here."""
    from accelerate import Accelerator
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
    _run(FAST + ["--epochs", "1", "--warmup-epochs", "1", "--lr", "0.05", "--output-dir", str(tmp_path)])
    line = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert line["skipped_steps"] == 3
    state = json.load(open(tmp_path / "checkpoint_epoch1" / "trainer_state.json"))
    assert state["global_step"] == 0
    assert line["lr"] == pytest.approx(0.05 * 0.01)  # still the first warm-up value


def test_imagenet_style_folder_through_timm_data(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(4):
                arr = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(d / f"{i}.png")
    out = _run(["--data", str(tmp_path / "data"), "--model", "resnet10t", "--img-size", "32", "--epochs", "1",
                "--batch-size", "4", "--workers", "0", "--output-dir", str(tmp_path / "out")])
    assert out["model"].get_classifier().out_features == 2
    line = json.loads(open(tmp_path / "out" / "metrics.jsonl").readline())
    assert line["epoch"] == 1 and 0 <= line["val_top1"] <= 100
