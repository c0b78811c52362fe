"""recipes/imagenet_bwn.py: built-in run, summary, bad input, 2 processes, resume, precision."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import normswap

from .distributed import free_port, run_processes

HERE = os.path.dirname(__file__)
ROOT = os.path.abspath(os.path.join(HERE, ".."))
RECIPE = os.path.join(ROOT, "recipes", "imagenet_bwn.py")


def _recipe():
    spec = importlib.util.spec_from_file_location("imagenet_bwn", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["imagenet_bwn"] = mod  # dataclasses look their module up there
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
    return recipe.train(recipe.parse_args(argv))


FAST = ["--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "16", "--model", "resnet10t"]


def test_builtin_run_writes_metrics_state_a_summary_and_a_loadable_model(tmp_path, capsys):
    out = _run(FAST + ["--output-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["epoch"] for l in lines] == [1, 2]
    for l in lines:
        assert 0 <= l["val_top1"] <= l["val_top5"] <= 100 and l["train_loss"] > 0
    # --keep-checkpoints 1 (default): Accelerate's automatic naming keeps only the last epoch's state
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint_2"]
    assert json.load(open(tmp_path / "checkpoints" / "checkpoint_2" / "trainer_state.json"))["epoch"] == 1
    assert "keeping the last 1 checkpoint" in printed
    model = normswap.load(tmp_path / "model.safetensors",
                          timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1))
    rep = json.load(open(tmp_path / "report.json"))
    assert rep["counts"]["converted"] > 0
    assert any(s["preset"] == "bwn" for s in rep["sites"])
    assert any(isinstance(m, normswap.norms.MeanOnlyBatchNorm2d) for m in model.modules())
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(model.eval()(x), out["model"].eval()(x))
    # the closing summary: the numbers of metrics.jsonl, the files, and code that loads the model back
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["final_top1"] == lines[-1]["val_top1"] and summary["final_top5"] == lines[-1]["val_top5"]
    assert summary["best_top1"] == max(l["val_top1"] for l in lines)
    assert summary["best_epoch"] == max(lines, key=lambda l: l["val_top1"])["epoch"]
    assert summary["num_processes"] == 1 and summary["epochs_done"] == 2
    assert summary["wall_seconds"] >= summary["train_seconds"] > 0
    for f in summary["files"]:
        assert (tmp_path / f).exists(), f
    assert {"model.safetensors", "metrics.jsonl", "curves.png", "checkpoints/checkpoint_2"} <= set(summary["files"])
    assert str(tmp_path) in printed and summary["load_code"].splitlines()[-1] in printed
    scope = {}
    exec(summary["load_code"], scope)
    torch.testing.assert_close(scope["model"].eval()(x), model(x))
    assert open(tmp_path / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the default spec has no L1 term: no penalty column
    epoch_lines = [l for l in printed.splitlines() if l.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("penalty" not in l for l in epoch_lines)


def test_curves_without_matplotlib_is_a_one_line_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rows = [{"epoch": 1, "train_loss": 2.0, "penalty": 0.0, "val_top1": 10.0}]
    note = _recipe().plot_curves(rows, str(tmp_path / "curves.png"), show_penalty=False)
    assert "matplotlib is not installed" in note and "\n" not in note
    assert not (tmp_path / "curves.png").exists()


def _nonempty(tmp_path):
    d = tmp_path / "earlier_run"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return ["--output-dir", str(d)]


def _empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty")


@pytest.mark.parametrize("argv,msg", [
    (lambda t: ["--data", "/nonexistent/imagenet"], "expected an ImageNet-style folder"),
    (lambda t: ["--data", _empty_dir(t)], "train/<class>/ and val/<class>/ subfolders"),
    (lambda t: ["--epochs", "0"], "--epochs 0: must be >= 1"),
    (lambda t: ["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (lambda t: ["--lr", "0"], "--lr 0.0: must be > 0.0"),
    (lambda t: ["--keep-checkpoints", "-1"], "--keep-checkpoints -1: must be >= 0"),
    (lambda t: ["--epochs", "x"], "invalid int value: 'x'"),
    (lambda t: ["--resume", _empty_dir(t)], "no checkpoint there"),
    (lambda t: ["--resume", "/nonexistent/run"], "no such folder"),
    (lambda t: ["--resume", _empty_dir(t), "--overwrite"], "--resume and --overwrite: choose one"),
    (lambda t: ["--pure-half", "--mixed-precision", "bf16"], "choose one"),
    (lambda t: _nonempty(t), "is not empty (metrics.jsonl): pass --overwrite"),
    (lambda t: ["--spec", "l1b"], "unknown preset 'l1b'"),
    (lambda t: ["--spec", '{"preset": "bwn", "kwargs": {"pp": 3}}'], "unknown argument(s) pp"),
    (lambda t: ["--model", "resnet_nope"], "not a timm model"),
    (lambda t: ["--lr-correction", "reference"], "needs --reference-norms"),
])
def test_bad_input_is_one_line_before_anything_starts(tmp_path, capsys, argv, msg):
    recipe = _recipe()
    argv = argv(tmp_path)
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        recipe.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err
    assert err.count("\n") == 1 and err.startswith("imagenet_bwn.py: error: ")
    assert not (tmp_path / "out").exists()


def test_fp16_autocast_where_accelerate_cannot_run_it_is_refused(tmp_path, capsys):
    """Accelerate silently trains in float32 when fp16 autocast is asked for on the CPU."""
    with pytest.raises(SystemExit) as e:
        _run(FAST + ["--cpu", "--mixed-precision", "fp16", "--output-dir", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--mixed-precision bf16" in err and "--pure-half" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_pure_half_trains_the_float16_model_and_shows_the_penalty(tmp_path, capsys):
    out = _run(FAST + ["--epochs", "1", "--pure-half", "--l1-alpha", "0.005", "--output-dir", str(tmp_path)])
    model = out["model"]
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    line = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert torch.isfinite(torch.tensor(line["train_loss"])) and line["penalty"] > 0
    printed = capsys.readouterr().out
    assert "float16 (pure" in printed
    assert [l for l in printed.splitlines() if l.startswith("epoch 1:")][0].count("penalty") == 1
    assert json.load(open(tmp_path / "summary.json"))["precision"].startswith("float16")


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
def test_resume_matches_an_uninterrupted_run_and_overwrite_starts_afresh(tmp_path):
    full = _run(FAST + ["--output-dir", str(tmp_path / "full")])
    part = str(tmp_path / "part")
    _run(FAST + ["--output-dir", part, "--stop-after-epoch", "1", "--keep-checkpoints", "2"])
    assert os.listdir(tmp_path / "part" / "checkpoints") == ["checkpoint_1"]
    # --resume takes the output folder (its last checkpoint) and continues the same metrics.jsonl
    resumed = _run(FAST + ["--output-dir", part, "--resume", part, "--keep-checkpoints", "2"])
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = [json.loads(l) for l in open(tmp_path / "part" / "metrics.jsonl")]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert sorted(os.listdir(tmp_path / "part" / "checkpoints")) == ["checkpoint_1", "checkpoint_2"]
    summary = json.load(open(tmp_path / "part" / "summary.json"))
    assert summary["epochs_done"] == 2 and summary["best_top1"] == max(l["val_top1"] for l in lines)
    # --overwrite removes the recipe's own outputs (not other files) instead of appending to them
    (tmp_path / "part" / "notes.txt").write_text("mine")
    _run(FAST + ["--output-dir", part, "--overwrite", "--epochs", "1", "--keep-checkpoints", "0"])
    lines = [json.loads(l) for l in open(tmp_path / "part" / "metrics.jsonl")]
    assert [l["epoch"] for l in lines] == [1]
    assert not (tmp_path / "part" / "checkpoints").exists()
    assert (tmp_path / "part" / "notes.txt").read_text() == "mine"


def _launch(args, tmp_path, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_shipped_accelerate_config_starts_two_cpu_processes(tmp_path):
    """`accelerate launch --num_processes 2 --cpu` starts one process (Accelerate 1.x without
    mpirun); recipes/accelerate_cpu2.yaml really starts two, in one process group."""
    out = tmp_path / "out"
    res = _launch(["--config_file", os.path.join(ROOT, "recipes", "accelerate_cpu2.yaml"),
                   "--main_process_port", str(free_port()), RECIPE,
                   "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8", "--model", "resnet10t",
                   "--output-dir", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.load(open(out / "summary.json"))
    assert summary["num_processes"] == 2
    assert res.stdout.count("2 processes on cpu") == 1  # printed by the main process only
    assert [json.loads(l)["epoch"] for l in open(out / "metrics.jsonl")] == [1]


@pytest.mark.slow
def test_bad_argument_under_accelerate_launch_is_one_line_without_traceback(tmp_path):
    res = _launch(["-q", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", RECIPE, "--epochs", "0", "--output-dir", str(tmp_path / "out")],
                  tmp_path, timeout=300)
    assert res.returncode != 0
    assert "imagenet_bwn.py: error: --epochs 0: must be >= 1" in res.stderr
    assert "Traceback" not in res.stderr, res.stderr


def test_skipped_fp16_steps_do_not_advance_the_lr_schedule(tmp_path, monkeypatch):
    """Accelerate reports an overflowed fp16 step as skipped (GPU only); fake it here."""
    from accelerate import Accelerator
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
    _run(FAST + ["--epochs", "1", "--warmup-epochs", "1", "--lr", "0.05", "--output-dir", str(tmp_path)])
    line = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert line["skipped_steps"] == 3
    state = json.load(open(tmp_path / "checkpoints" / "checkpoint_1" / "trainer_state.json"))
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
