#!/usr/bin/env python
"""Train a timm model with bounded weight norm + mean-only batch norm (Hoffer et al. 2018)
through Hugging Face Accelerate.

    accelerate launch recipes/imagenet_bwn.py                      # built-in digits data, ~1 min on CPU
    accelerate launch recipes/imagenet_bwn.py --data /imagenet --model resnet50 --mixed-precision fp16
    python recipes/imagenet_bwn.py --spec l1bn --lr-correction none --weight-decay 1e-4

The model is built with timm (pretrained=False), converted with ``normswap.transform``
(default spec: ``bwn``; sites it cannot convert follow ``l1bn``), trained with SGD
(momentum 0.9) on parameter groups from ``normswap.param_groups``, with the L1 penalty
``normswap.penalty`` added to the loss; ``--lr-correction online|reference`` trains the
scale-invariant weights without weight decay and ``normswap.LRCorrection`` in its place. Each epoch writes
metrics to ``OUTPUT/metrics.jsonl`` and ``accelerator.save_state`` to
``OUTPUT/checkpoint_epochN``; the end writes ``OUTPUT/model.safetensors`` with
``normswap.save`` (load it back with ``normswap.load``).

Without ``--data`` the data are scikit-learn's digits (1797 real 8x8 handwritten digits,
10 classes), upsampled to 32x32 for a small ResNet; with ``--data DIR`` an
ImageNet-style folder (``DIR/train/<class>/*``, ``DIR/val/<class>/*``) goes through
timm's dataset and transforms.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

IMAGENET_DEFAULTS = dict(model="resnet50", epochs=90, batch_size=64, lr=0.1, img_size=224, warmup_epochs=5,
                         weight_decay=1e-4)
DIGITS_DEFAULTS = dict(model="resnet18", epochs=8, batch_size=64, lr=0.02, img_size=32, warmup_epochs=1,
                       weight_decay=5e-4)
DEFAULT_SPEC = {"preset": "bwn", "kwargs": {"fallback": "l1bn"}}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Train a timm model with normswap's bounded weight norm "
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
                         "(exact for plain SGD, an approximation with momentum: see the README)")
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
                    help="default: Accelerate's config / launch flags")
    ap.add_argument("--output-dir", default="outputs/imagenet_bwn")
    ap.add_argument("--resume", help="a checkpoint_epochN folder written by an earlier run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps-per-epoch", type=int, help="cap the training steps of each epoch (smoke runs)")
    ap.add_argument("--stop-after-epoch", type=int,
                    help="end this run after that many epochs (pre-emptible jobs; resume later)")
    args = ap.parse_args(argv)
    defaults = IMAGENET_DEFAULTS if args.data else DIGITS_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return ap, args


def validate(ap, args):
    """Every mistake we can catch before any training starts."""
    import normswap
    from normswap.cli import load_spec
    if args.data:
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(args.data, split)):
                ap.error(f"--data {args.data}: expected an ImageNet-style folder with {split}/<class>/ "
                         f"subfolders; {os.path.join(args.data, split)} does not exist")
    try:
        args.spec_obj = load_spec(args.spec) if args.spec else normswap.Spec.from_dict(DEFAULT_SPEC)
    except normswap.SpecError as e:
        ap.error(f"--spec: {e}")
    if args.lr_correction == "reference" and not (args.reference_norms and os.path.isfile(args.reference_norms)):
        ap.error("--lr-correction reference needs --reference-norms FILE (written by --record-norms)")
    if args.resume and not os.path.isdir(args.resume):
        ap.error(f"--resume {args.resume}: no such checkpoint folder")
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


def accuracy(logits, target, ks=(1, 5)):
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top.eq(target[:, None])
    return [hit[:, :min(k, logits.shape[1])].any(dim=1).float().mean().item() * 100.0 for k in ks]


def train(args) -> dict:
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from timm.scheduler import create_scheduler_v2
    from tqdm.auto import tqdm
    import normswap

    kw = {}
    if args.mixed_precision:
        kw["mixed_precision"] = args.mixed_precision
    import warnings
    with warnings.catch_warnings():  # "all" trackers: whichever are installed, if any
        warnings.filterwarnings("ignore", message=".*no supported trackers.*")
        accelerator = Accelerator(log_with="all", project_dir=args.output_dir,
                                  dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True), **kw)
    set_seed(args.seed)
    if args.data:
        train_ds, val_ds, num_classes, in_chans = folder_datasets(args.data, args.img_size)
    else:
        train_ds, val_ds, num_classes, in_chans = digits_datasets(args.img_size)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                               num_workers=args.workers if args.data else 0)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=args.batch_size * 2, shuffle=False,
                                             num_workers=args.workers if args.data else 0)
    model = build_model(args, num_classes, in_chans).to(accelerator.device)
    lr = args.lr * args.batch_size * accelerator.num_processes / 256 if args.data else args.lr
    correction = args.lr_correction != "none"
    groups = normswap.param_groups(model, lr, args.weight_decay,
                                   scale_invariant_weight_decay=0.0 if correction else None)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=args.momentum)
    if correction:
        optimizer = normswap.LRCorrection(optimizer, model, weight_decay=args.weight_decay, mode=args.lr_correction,
                                          reference=args.reference_norms)
    recorder = normswap.NormRecorder(model) if args.record_norms else None
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = len(train_loader) if not args.steps_per_epoch else min(args.steps_per_epoch, len(train_loader))
    scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                       warmup_epochs=args.warmup_epochs, warmup_lr=lr * 0.01,
                                       decay_milestones=[int(args.epochs * f) for f in (0.33, 0.66, 0.9)],
                                       updates_per_epoch=steps_per_epoch, step_on_epochs=False)
    start_epoch, global_step = 0, 0
    if args.resume:
        accelerator.load_state(args.resume)
        with open(os.path.join(args.resume, "trainer_state.json")) as f:
            st = json.load(f)
        start_epoch, global_step = st["epoch"] + 1, st["global_step"]
    os.makedirs(args.output_dir, exist_ok=True)
    accelerator.init_trackers("imagenet_bwn", config={k: v for k, v in vars(args).items()
                                                      if isinstance(v, (int, float, str, bool))})
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    last = {}
    end_epoch = args.epochs if args.stop_after_epoch is None else min(args.epochs, start_epoch + args.stop_after_epoch)
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
            tot_loss += loss.detach()
            tot_pen += pen.detach()
            n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        scheduler.step(epoch + 1)
        if recorder is not None:
            recorder.record(epoch)
        val = evaluate(model, val_loader, accelerator)
        stats = accelerator.reduce(torch.stack([tot_loss / max(n, 1), tot_pen / max(n, 1)]), reduction="mean")
        last = {"epoch": epoch + 1, "train_loss": stats[0].item(), "penalty": stats[1].item(),
                "val_top1": val[0], "val_top5": val[1], "lr": optimizer.param_groups[0]["lr"],
                "skipped_steps": skipped, "seconds": round(time.time() - t0, 2)}
        accelerator.log(last, step=global_step)
        if accelerator.is_main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            accelerator.print(f"epoch {epoch + 1}: loss {last['train_loss']:.4f} penalty {last['penalty']:.4f} "
                              f"val top-1 {val[0]:.2f} top-5 {val[1]:.2f} ({last['seconds']}s)")
        ckpt = os.path.join(args.output_dir, f"checkpoint_epoch{epoch + 1}")
        accelerator.save_state(ckpt)
        if accelerator.is_main_process:
            with open(os.path.join(ckpt, "trainer_state.json"), "w") as f:
                json.dump({"epoch": epoch, "global_step": global_step}, f)
        accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        normswap.save(unwrapped, os.path.join(args.output_dir, "model.safetensors"))
        with open(os.path.join(args.output_dir, "report.json"), "w") as f:
            f.write(normswap.report(unwrapped).to_json(indent=1))
        if recorder is not None:
            recorder.save(os.path.join(args.output_dir, "norms.safetensors"))
    accelerator.end_training()
    return {"metrics": last, "model": unwrapped, "accelerator": accelerator}


def evaluate(model, loader, accelerator):
    import torch
    model.eval()
    logits_all, y_all = [], []
    with torch.no_grad():
        for x, y in loader:
            with accelerator.autocast():
                logits = model(x)
            logits, y = accelerator.gather_for_metrics((logits.float(), y))
            logits_all.append(logits)
            y_all.append(y)
    return accuracy(torch.cat(logits_all), torch.cat(y_all))


def main(argv=None) -> int:
    ap, args = parse_args(argv)
    validate(ap, args)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
