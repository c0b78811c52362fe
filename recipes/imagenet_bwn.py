#!/usr/bin/env python
"""Train a timm model with bounded weight norm + mean-only batch norm (Hoffer et al. 2018)
through Hugging Face Accelerate.

    python recipes/imagenet_bwn.py                                  # built-in digits data, one process
    accelerate launch --config_file recipes/accelerate_cpu2.yaml recipes/imagenet_bwn.py   # 2 CPU processes
    accelerate launch --multi_gpu --num_processes 8 recipes/imagenet_bwn.py --data /imagenet --mixed-precision fp16
    python recipes/imagenet_bwn.py --spec l1bn --lr-correction online --pure-half

The model is built with timm (pretrained=False), converted with ``normswap.transform``
(default spec: ``bwn``; sites it cannot convert follow ``l1bn``), trained with SGD
(momentum 0.9) on parameter groups from ``normswap.param_groups``, with the L1 penalty
``normswap.penalty`` added to the loss; ``--lr-correction online|reference`` trains the
scale-invariant weights without weight decay and ``normswap.LRCorrection`` in its place.

Everything goes to ``--output-dir`` (refused when it already holds files, unless
``--resume`` or ``--overwrite``): ``metrics.jsonl`` (one row per epoch),
``checkpoints/checkpoint_<epoch>`` (``accelerator.save_state``; the last
``--keep-checkpoints`` are kept, through Accelerate's automatic checkpoint naming),
``model.safetensors`` (``normswap.save``; load it back with ``normswap.load``),
``report.json`` (what each normalization site became), ``curves.png`` (when matplotlib
is installed) and ``summary.json`` (the closing summary, also printed).

Without ``--data`` the data are scikit-learn's digits (1797 real 8x8 handwritten digits,
10 classes), upsampled to 32x32 for a small ResNet; with ``--data DIR`` an
ImageNet-style folder (``DIR/train/<class>/*``, ``DIR/val/<class>/*``) goes through
timm's dataset and transforms.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import List, Optional

# Idle OpenMP threads sleep instead of spinning. On a CPU shared with other jobs, spinning
# threads made each epoch of the digits demo 6-9x slower (loaded 2-core machine: 114-209 s
# per epoch without this, 17-24 s with it). Read when torch loads, so set before importing
# it; an OMP_WAIT_POLICY already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

IMAGENET_DEFAULTS = dict(model="resnet50", epochs=90, batch_size=64, lr=0.1, img_size=224, warmup_epochs=5,
                         weight_decay=1e-4)
DIGITS_DEFAULTS = dict(model="resnet18", epochs=8, batch_size=64, lr=0.02, img_size=32, warmup_epochs=1,
                       weight_decay=5e-4)
DEFAULT_SPEC = {"preset": "bwn", "kwargs": {"fallback": "l1bn"}}
# what this recipe writes into --output-dir (removed by --overwrite; nothing else is touched)
OUTPUTS = ("metrics.jsonl", "checkpoints", "model.safetensors", "report.json", "norms.safetensors",
           "curves.png", "summary.json")
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class RecipeArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2), printed by the first process only."""

    def error(self, message):  # noqa: D401 (argparse API)
        if _is_rank0():
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> RecipeArgumentParser:
    ap = RecipeArgumentParser(prog="imagenet_bwn.py",
                              description="Train a timm model with normswap's bounded weight norm "
                                          "(or any spec) through Accelerate.")
    ap.add_argument("--data", help="ImageNet-style folder with train/ and val/ (default: scikit-learn digits)")
    ap.add_argument("--model", help="timm model name (default: resnet50; resnet18 on the digits)")
    ap.add_argument("--spec", default=None,
                    help="normswap spec: preset, inline JSON or a JSON file (default: bwn, rest l1bn)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int, help="per process")
    ap.add_argument("--lr", type=float, help="peak learning rate for a global batch of 256 on ImageNet "
                                             "(scaled linearly); used as is on the digits")
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--lr-correction", choices=["none", "online", "reference"], default="none",
                    help="replace weight decay on scale-invariant weights by normswap.LRCorrection "
                         "(exact for SGD with or without momentum: see the README)")
    ap.add_argument("--reference-norms", help="NormRecorder file for --lr-correction reference")
    ap.add_argument("--record-norms", action="store_true",
                    help="record per-epoch norms of scale-invariant weights (a reference for later runs)")
    ap.add_argument("--l1-alpha", type=float, help="L1 penalty coefficient on every normswap normalizer")
    ap.add_argument("--sync-norm", action="store_true", help="batch statistics over all processes")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--sched", default="cosine", choices=["cosine", "step"], help="timm scheduler")
    ap.add_argument("--warmup-epochs", type=float)
    ap.add_argument("--img-size", type=int)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                    help="default: Accelerate's config / launch flags. fp16 needs a CUDA device "
                         "(refused elsewhere: use bf16 or --pure-half)")
    ap.add_argument("--pure-half", action="store_true",
                    help="train the model itself in float16 (weights, activations, gradients; no autocast, "
                         "no loss scaling), which L1 / top-k batch norm keep finite; works on CPU")
    ap.add_argument("--cpu", action="store_true",
                    help="train on the CPU even when a GPU is available (always the case without one)")
    ap.add_argument("--output-dir", default="outputs/imagenet_bwn")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the results of an earlier run in --output-dir")
    ap.add_argument("--resume", help="an output folder of an earlier run (its last checkpoint) "
                                     "or one of its checkpoints/checkpoint_N folders")
    ap.add_argument("--keep-checkpoints", type=int, default=1,
                    help="how many of the last per-epoch checkpoints to keep (0: none; default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps-per-epoch", type=int, help="cap the training steps of each epoch (smoke runs)")
    ap.add_argument("--stop-after-epoch", type=int,
                    help="end this run after that many epochs (pre-emptible jobs; resume later)")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check every argument; a mistake ends the program with one line and exit code 2
    before anything is created or written."""
    ap = build_parser()
    args = ap.parse_args(argv)
    defaults = IMAGENET_DEFAULTS if args.data else DIGITS_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    validate(ap, args)
    return args


def _check_number(ap, args, name: str, minimum, strict: bool = False, optional: bool = False):
    value = getattr(args, name.replace("-", "_"))
    if value is None and optional:
        return
    if value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        ap.error(f"--{name} {value}: must be {bound}")


def find_checkpoint(path: str) -> Optional[str]:
    """The checkpoint folder ``path`` names: itself when it holds a trainer state, else the
    newest ``checkpoints/checkpoint_N`` inside it; None when there is none."""
    if os.path.isfile(os.path.join(path, TRAINER_STATE)):
        return path
    root = os.path.join(path, CHECKPOINTS)
    if not os.path.isdir(root):
        return None
    found = []
    for name in os.listdir(root):
        num = name.rsplit("_", 1)[-1]
        if name.startswith("checkpoint_") and num.isdigit() and os.path.isfile(os.path.join(root, name, TRAINER_STATE)):
            found.append((int(num), os.path.join(root, name)))
    return max(found)[1] if found else None


def validate(ap, args) -> None:
    """Every mistake we can catch before any training starts."""
    for name, minimum in (("epochs", 1), ("batch-size", 1), ("img-size", 1)):
        _check_number(ap, args, name, minimum)
    for name in ("steps-per-epoch", "stop-after-epoch"):
        _check_number(ap, args, name, 1, optional=True)
    for name in ("keep-checkpoints", "workers"):
        _check_number(ap, args, name, 0)
    _check_number(ap, args, "lr", 0.0, strict=True)
    for name in ("weight-decay", "warmup-epochs", "momentum"):
        _check_number(ap, args, name, 0.0)
    _check_number(ap, args, "l1-alpha", 0.0, optional=True)
    if args.data:
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(args.data, split)):
                ap.error(f"--data {args.data}: expected an ImageNet-style folder with train/<class>/ and "
                         f"val/<class>/ subfolders; {os.path.join(args.data, split)} does not exist")
    if args.pure_half and args.mixed_precision in ("fp16", "bf16"):
        ap.error(f"--pure-half with --mixed-precision {args.mixed_precision}: choose one "
                 f"(--pure-half trains the model itself in float16, mixed precision autocasts a float32 model)")
    args.resume_dir = None
    if args.resume and args.overwrite:
        ap.error("--resume and --overwrite: choose one (--overwrite deletes the run --resume would continue)")
    if args.resume:
        if not os.path.isdir(args.resume):
            ap.error(f"--resume {args.resume}: no such folder")
        args.resume_dir = find_checkpoint(args.resume)
        if args.resume_dir is None:
            ap.error(f"--resume {args.resume}: no checkpoint there (expected an output folder of this recipe "
                     f"with {CHECKPOINTS}/checkpoint_N/, or such a checkpoint folder)")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not (args.resume or args.overwrite):
        held = sorted(os.listdir(args.output_dir))
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        ap.error(f"--output-dir {args.output_dir} is not empty ({shown}): pass --overwrite to replace "
                 f"that run, --resume {args.output_dir} to continue it, or another --output-dir")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        ap.error(f"--output-dir {args.output_dir}: exists and is not a folder")
    import normswap
    from normswap.cli import UserError, load_spec
    try:
        args.spec_obj = load_spec(args.spec) if args.spec else normswap.Spec.from_dict(DEFAULT_SPEC)
    except UserError as e:      # already names --spec
        ap.error(str(e))
    except normswap.SpecError as e:
        ap.error(f"--spec: {e}")
    if args.lr_correction == "reference" and not (args.reference_norms and os.path.isfile(args.reference_norms)):
        ap.error("--lr-correction reference needs --reference-norms FILE (written by --record-norms)")
    import timm
    if not timm.is_model(args.model):
        ap.error(f"--model {args.model}: not a timm model")


# -- data -----------------------------------------------------------------------------
def digits_datasets(img_size: int):
    """scikit-learn's digits: 1437 train / 360 val, upsampled to img_size, 1 channel."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target)
    tr, va = train_test_split(list(range(len(y))), test_size=0.2, random_state=0, stratify=d.target)
    ds = torch.utils.data.TensorDataset
    return ds(x[tr], y[tr]), ds(x[va], y[va]), 10, 1


def folder_datasets(root: str, img_size: int):
    from timm.data import create_dataset, create_transform
    train = create_dataset("", root=root, split="train", is_training=True)
    val = create_dataset("", root=root, split="val")
    train.transform = create_transform(img_size, is_training=True)
    val.transform = create_transform(img_size, is_training=False)
    return train, val, len(train.reader.class_to_idx), 3


# -- training -------------------------------------------------------------------------
def build_model(args, num_classes: int, in_chans: int):
    import timm
    import normswap
    model = timm.create_model(args.model, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    model = normswap.transform(model, args.spec_obj, inplace=True)
    if args.l1_alpha is not None:
        for m in model.modules():
            if isinstance(m, normswap.norms.NormalizerBase):
                m.l1_alpha = args.l1_alpha
    if args.sync_norm:
        normswap.convert_sync(model)
    return model


def penalty_active(model) -> bool:
    """Whether some normalizer of ``model`` adds an L1 penalty (l1_alpha > 0)."""
    return any(getattr(m, "l1_alpha", 0.0) > 0 for m in model.modules())


def accuracy(logits, target, ks=(1, 5)):
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top.eq(target[:, None])
    return [hit[:, :min(k, logits.shape[1])].any(dim=1).float().mean().item() * 100.0 for k in ks]


def _has_accelerator_device() -> bool:
    import torch
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def make_accelerator(args):
    """The Accelerator of this run. Checkpoints use Accelerate's automatic naming under
    OUTPUT/checkpoints with ``total_limit = --keep-checkpoints``. Without a GPU it is
    created with ``cpu=True``: then processes started by a launcher (``accelerate launch``
    with recipes/accelerate_cpu2.yaml, torchrun) join one gloo group instead of each
    training alone."""
    import warnings
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
    kw = {}
    if args.mixed_precision:
        kw["mixed_precision"] = args.mixed_precision
    project = ProjectConfiguration(project_dir=args.output_dir, automatic_checkpoint_naming=True,
                                   total_limit=max(args.keep_checkpoints, 1))
    with warnings.catch_warnings():  # "all" trackers: whichever are installed, if any
        warnings.filterwarnings("ignore", message=".*no supported trackers.*")
        accelerator = Accelerator(cpu=args.cpu or not _has_accelerator_device(), log_with="all",
                                  project_config=project,
                                  dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True), **kw)
    # the recipe says once at start that it keeps the last N; not a warning at every epoch
    import logging
    logging.getLogger("accelerate.accelerator").addFilter(
        lambda record: "to make room for new checkpoint" not in record.getMessage())
    return accelerator


def fail(message: str) -> None:
    """A mistake found once the Accelerator exists: one line, exit code 2, nothing written."""
    if _is_rank0():
        sys.stderr.write(f"imagenet_bwn.py: error: {message}\n")
    sys.exit(2)


def check_precision(args, accelerator) -> str:
    """The precision this run really trains in; refuses fp16 autocast where Accelerate
    cannot run it (it would silently train in float32)."""
    if accelerator.mixed_precision == "fp16" and not accelerator.native_amp:
        source = "--mixed-precision fp16" if args.mixed_precision else "fp16 mixed precision (Accelerate's config)"
        fail(f"{source}: Accelerate runs fp16 autocast only on a CUDA-like device, and this run "
             f"is on {accelerator.device.type}, so it would train in float32; use --mixed-precision bf16 "
             f"(autocast to bfloat16 on {accelerator.device.type}) or --pure-half (the model itself in float16)")
    if args.pure_half:
        return "float16 (pure: weights, activations and gradients, no autocast)"
    if accelerator.mixed_precision in ("fp16", "bf16"):
        return f"{accelerator.mixed_precision} mixed precision (autocast, float32 weights)"
    return "float32"


def prepare_output_dir(args, accelerator, start_epoch: int) -> List[dict]:
    """Create the output folder; --overwrite removes this recipe's earlier outputs there;
    resuming into the same folder drops the rows and checkpoints after the resumed epoch.
    Returns the metric rows kept (the history of the resumed run)."""
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.overwrite:
            for name in OUTPUTS:
                p = os.path.join(args.output_dir, name)
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.remove(p)
    accelerator.wait_for_everyone()
    rows = []
    if args.resume and os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            rows = [r for r in (json.loads(line) for line in f if line.strip()) if r["epoch"] <= start_epoch]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and args.resume:
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        root = os.path.join(args.output_dir, CHECKPOINTS)
        if os.path.isdir(root):
            for name in os.listdir(root):
                num = name.rsplit("_", 1)[-1]
                if num.isdigit() and int(num) > start_epoch:
                    shutil.rmtree(os.path.join(root, name))
    accelerator.wait_for_everyone()
    return rows


def train(args) -> dict:
    t_start = time.time()
    import torch
    import torch.nn.functional as F
    from accelerate.utils import set_seed
    from timm.scheduler import create_scheduler_v2
    from tqdm.auto import tqdm
    import normswap

    accelerator = make_accelerator(args)
    precision = check_precision(args, accelerator)
    set_seed(args.seed)
    if args.data:
        train_ds, val_ds, num_classes, in_chans = folder_datasets(args.data, args.img_size)
        data_name = args.data
    else:
        train_ds, val_ds, num_classes, in_chans = digits_datasets(args.img_size)
        data_name = "scikit-learn digits"
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                               num_workers=args.workers if args.data else 0)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=args.batch_size * 2, shuffle=False,
                                             num_workers=args.workers if args.data else 0)
    model = build_model(args, num_classes, in_chans).to(accelerator.device)
    if args.pure_half:
        model.half()
    lr = args.lr * args.batch_size * accelerator.num_processes / 256 if args.data else args.lr
    correction = args.lr_correction != "none"
    groups = normswap.param_groups(model, lr, args.weight_decay,
                                   scale_invariant_weight_decay=0.0 if correction else None)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=args.momentum)
    if correction:
        optimizer = normswap.LRCorrection(optimizer, model, weight_decay=args.weight_decay, mode=args.lr_correction,
                                          reference=args.reference_norms)
    recorder = normswap.NormRecorder(model) if args.record_norms else None
    show_penalty = penalty_active(model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = len(train_loader) if not args.steps_per_epoch else min(args.steps_per_epoch, len(train_loader))
    scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                       warmup_epochs=args.warmup_epochs, warmup_lr=lr * 0.01,
                                       decay_milestones=[int(args.epochs * f) for f in (0.33, 0.66, 0.9)],
                                       updates_per_epoch=steps_per_epoch, step_on_epochs=False)
    start_epoch, global_step = 0, 0
    if args.resume_dir:
        accelerator.load_state(args.resume_dir)
        with open(os.path.join(args.resume_dir, TRAINER_STATE)) as f:
            st = json.load(f)
        start_epoch, global_step = st["epoch"] + 1, st["global_step"]
    history = prepare_output_dir(args, accelerator, start_epoch)
    accelerator.init_trackers("imagenet_bwn", config={k: v for k, v in vars(args).items()
                                                      if isinstance(v, (int, float, str, bool))})
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    end_epoch = args.epochs if args.stop_after_epoch is None else min(args.epochs, start_epoch + args.stop_after_epoch)
    n_proc = accelerator.num_processes
    accelerator.print(
        f"imagenet_bwn: {args.model} on {data_name} ({len(train_ds)} train / {len(val_ds)} val), "
        f"spec {args.spec or 'bwn (rest l1bn)'}, {n_proc} process{'es' if n_proc > 1 else ''} on "
        f"{accelerator.device.type}, {precision}; epochs {start_epoch + 1}-{end_epoch} of {args.epochs}\n"
        f"  output: {args.output_dir}; "
        + (f"keeping the last {args.keep_checkpoints} checkpoint{'s' if args.keep_checkpoints > 1 else ''} "
           f"in {os.path.join(args.output_dir, CHECKPOINTS)} (--keep-checkpoints)"
           if args.keep_checkpoints else "no checkpoints (--keep-checkpoints 0)"))
    last = history[-1] if history else {}
    train_seconds = 0.0
    for epoch in range(start_epoch, end_epoch):
        t0 = time.time()
        model.train()
        train_loader.set_epoch(epoch)
        if correction:  # the LRCorrection sits inside Accelerate's AcceleratedOptimizer
            optimizer.optimizer.set_epoch(epoch)
        tot_loss = torch.zeros((), device=accelerator.device)
        tot_pen = torch.zeros((), device=accelerator.device)
        n, skipped = 0, 0
        bar = tqdm(total=steps_per_epoch, disable=not accelerator.is_local_main_process,
                   desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for step, (x, y) in enumerate(train_loader):
            if step >= steps_per_epoch:
                break
            if args.pure_half:
                x = x.half()
            with accelerator.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            pen = normswap.penalty(model)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss + pen)
            optimizer.step()
            if accelerator.optimizer_step_was_skipped:
                skipped += 1  # an fp16 overflow: the LR schedule does not advance
            else:
                global_step += 1
                scheduler.step_update(num_updates=global_step)
            tot_loss += loss.detach().float()
            tot_pen += torch.as_tensor(pen).detach().float()
            n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        scheduler.step(epoch + 1)
        if recorder is not None:
            recorder.record(epoch)
        val = evaluate(model, val_loader, accelerator, half=args.pure_half)
        stats = accelerator.reduce(torch.stack([tot_loss / max(n, 1), tot_pen / max(n, 1)]), reduction="mean")
        last = {"epoch": epoch + 1, "train_loss": stats[0].item(), "penalty": stats[1].item(),
                "val_top1": val[0], "val_top5": val[1], "lr": optimizer.param_groups[0]["lr"],
                "skipped_steps": skipped, "seconds": round(time.time() - t0, 2)}
        train_seconds += time.time() - t0
        history.append(last)
        accelerator.log(last, step=global_step)
        if accelerator.is_main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
        accelerator.print(f"epoch {epoch + 1}: loss {last['train_loss']:.4f} "
                          + (f"penalty {last['penalty']:.4f} " if show_penalty else "")
                          + f"val top-1 {val[0]:.2f} top-5 {val[1]:.2f} ({last['seconds']}s)")
        if args.keep_checkpoints:
            accelerator.project_configuration.iteration = epoch + 1  # checkpoints/checkpoint_<epoch>
            ckpt = accelerator.save_state()
            if accelerator.is_main_process:
                with open(os.path.join(ckpt, TRAINER_STATE), "w") as f:
                    json.dump({"epoch": epoch, "global_step": global_step}, f)
            accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    summary = None
    if accelerator.is_main_process:
        normswap.save(unwrapped, os.path.join(args.output_dir, "model.safetensors"))
        with open(os.path.join(args.output_dir, "report.json"), "w") as f:
            f.write(normswap.report(unwrapped).to_json(indent=1))
        if recorder is not None:
            recorder.save(os.path.join(args.output_dir, "norms.safetensors"))
        note = plot_curves(history, os.path.join(args.output_dir, "curves.png"), show_penalty)
        if note:
            accelerator.print(note)
        summary = make_summary(args, history, num_classes, in_chans, n_proc, precision,
                               wall_seconds=time.time() - t_start, train_seconds=train_seconds)
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(dataclasses.asdict(summary), f, indent=1)
        accelerator.print(summary.text())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"metrics": last, "model": unwrapped, "accelerator": accelerator, "summary": summary}


def evaluate(model, loader, accelerator, half: bool = False):
    import torch
    model.eval()
    logits_all, y_all = [], []
    with torch.no_grad():
        for x, y in loader:
            with accelerator.autocast():
                logits = model(x.half() if half else x)
            logits, y = accelerator.gather_for_metrics((logits.float(), y))
            logits_all.append(logits)
            y_all.append(y)
    return accuracy(torch.cat(logits_all), torch.cat(y_all))


# -- the end of a run -----------------------------------------------------------------
def plot_curves(rows: List[dict], path: str, show_penalty: bool) -> Optional[str]:
    """Write training loss, the L1 penalty (when some site has one) and val top-1 per epoch
    to ``path``. Returns a one-line note when it cannot (matplotlib not installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "curves.png not written: matplotlib is not installed (pip install matplotlib)"
    epochs = [r["epoch"] for r in rows]
    panels = [("train loss", "train_loss")] + ([("L1 penalty", "penalty")] if show_penalty else []) \
        + [("val top-1 (%)", "val_top1")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, key) in zip(axes[0], panels):
        ax.plot(epochs, [r[key] for r in rows], marker="o")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


@dataclasses.dataclass
class RunSummary:
    """What a run produced; printed at the end and written to OUTPUT/summary.json."""
    output_dir: str
    epochs_done: int
    final_top1: Optional[float]
    final_top5: Optional[float]
    best_top1: Optional[float]
    best_top5: Optional[float]
    best_epoch: Optional[int]
    wall_seconds: float
    train_seconds: float
    num_processes: int
    precision: str
    files: List[str]
    load_code: str

    def text(self) -> str:
        out = self.output_dir
        lines = [f"Done: {self.epochs_done} epoch(s) in {self.wall_seconds:.0f} s "
                 f"({self.train_seconds:.0f} s training, {self.num_processes} process(es), {self.precision}).",
                 f"Results in {out}/"]
        if self.final_top1 is not None:
            lines.append(f"  val top-1 {self.final_top1:.2f} top-5 {self.final_top5:.2f} (final); "
                         f"best top-1 {self.best_top1:.2f} (epoch {self.best_epoch}), best top-5 {self.best_top5:.2f}")
        lines.append("  files: " + ", ".join(self.files))
        lines.append("Load the model back (Python):")
        lines += ["  " + line for line in self.load_code.splitlines()]
        return "\n".join(lines)


def make_summary(args, rows, num_classes, in_chans, num_processes, precision, *, wall_seconds, train_seconds):
    files = [name for name in OUTPUTS if name not in (CHECKPOINTS, "summary.json")
             and os.path.exists(os.path.join(args.output_dir, name))] + ["summary.json"]
    root = os.path.join(args.output_dir, CHECKPOINTS)
    if os.path.isdir(root):
        files += sorted(f"{CHECKPOINTS}/{name}" for name in os.listdir(root))
    path = os.path.join(args.output_dir, "model.safetensors")
    load_code = ("import timm, normswap\n"
                 f"model = normswap.load({path!r}, timm.create_model({args.model!r}, pretrained=False, "
                 f"num_classes={num_classes}, in_chans={in_chans}))")
    best = max(rows, key=lambda r: r["val_top1"]) if rows else None
    final = rows[-1] if rows else None
    return RunSummary(output_dir=args.output_dir, epochs_done=final["epoch"] if final else 0,
                      final_top1=final and final["val_top1"], final_top5=final and final["val_top5"],
                      best_top1=best and best["val_top1"], best_epoch=best and best["epoch"],
                      best_top5=max(r["val_top5"] for r in rows) if rows else None,
                      wall_seconds=round(wall_seconds, 1), train_seconds=round(train_seconds, 1),
                      num_processes=num_processes, precision=precision, files=files, load_code=load_code)


def main(argv=None) -> int:
    args = parse_args(argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
