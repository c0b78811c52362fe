"""The ``normswap`` command: presets, inspect, convert, export.

    normswap presets
    normswap inspect resnet50 --spec l1bn
    normswap convert resnet50 --spec bwn-g --checkpoint plain.pth --out resnet50_bwn.safetensors
    normswap export resnet50_bwn.safetensors --out resnet50_vanilla.safetensors
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import List, Optional

EXAMPLES = {
    "presets": "example: normswap presets",
    "inspect": "example: normswap inspect resnet50 --spec '{\"preset\": \"bwn\", \"kwargs\": {\"fallback\": \"l1bn\"}}'",
    "convert": "example: normswap convert resnet18 --spec l1bn --checkpoint resnet18.pth --out resnet18_l1bn.safetensors",
    "export": "example: normswap export resnet18_l1bn.safetensors --out resnet18_vanilla.safetensors",
}


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2."""


def build_model(name: str):
    """A timm model name, or ``package.module:factory`` for a model of your own."""
    if ":" in name:
        mod_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise UserError(f"cannot import {name!r} ({e}); use a timm model name or module.path:factory")
        return factory()
    import timm
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        raise UserError(f"unknown timm model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    return timm.create_model(name, pretrained=False)


def load_spec(text: str):
    from .spec import Spec
    if os.path.isfile(text):
        with open(text) as f:
            text = f.read()
    return Spec.coerce(text)


def load_plain_checkpoint(model, path: str) -> None:
    import torch
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
    if not isinstance(sd, dict):
        raise UserError(f"checkpoint {path}: expected a state dict")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    res = model.load_state_dict(sd, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise UserError(f"checkpoint {path} does not fit the model: missing {res.missing_keys[:5]}, "
                        f"unexpected {res.unexpected_keys[:5]}")


def cmd_presets(args) -> int:
    from .spec import presets
    for name, text in presets().items():
        print(f"{name:9} {text}")
    return 0


def cmd_inspect(args) -> int:
    import normswap
    model = build_model(args.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = normswap.plan(model, load_spec(args.spec))
    print(rep.to_json(indent=1) if args.json else rep)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    import normswap
    model = build_model(args.model)
    if args.checkpoint:
        load_plain_checkpoint(model, args.checkpoint)
    if args.eval:
        model.eval()
    out = normswap.transform(model, load_spec(args.spec), strict=args.strict)
    normswap.save(out, args.out)
    c = normswap.report(out).counts()
    print(f"wrote {args.out}: " + ", ".join(f"{v} {k}" for k, v in c.items() if v))
    return 0


def cmd_export(args) -> int:
    import normswap
    from .io import read_converted
    _, meta = read_converted(args.file)
    name = args.model or meta.get("architecture")
    if not name:
        raise UserError(f"{args.file} does not name its architecture; pass --model NAME or module:factory")
    model = normswap.load(args.file, build_model(name)).eval()
    normswap.export(model, args.out, fold=not args.no_fold)
    print(f"wrote {args.out} (loads into the plain {name})")
    return 0


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="normswap", description="Swap a model's normalizations for BN*, LN*, DN*, "
                                 "L1 / top-k batch norm or bounded weight norm, and manage the checkpoints.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("presets", help="list the presets with formula and defaults", epilog=EXAMPLES["presets"])
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("inspect", help="show the plan for a model", epilog=EXAMPLES["inspect"])
    p.add_argument("model", help="timm model name or module.path:factory")
    p.add_argument("--spec", default="l1bn", help="preset, JSON, or a JSON file (default l1bn)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("convert", help="build, load a plain checkpoint, transform, save", epilog=EXAMPLES["convert"])
    p.add_argument("model", help="timm model name or module.path:factory")
    p.add_argument("--spec", required=True, help="preset, JSON, or a JSON file")
    p.add_argument("--checkpoint", help="plain checkpoint to load first (.safetensors, .pth, .pt)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--strict", action="store_true", help="fail if a matched site would be skipped")
    p.add_argument("--eval", action="store_true", help="convert in eval mode")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("export", help="fold a converted checkpoint into a plain one", epilog=EXAMPLES["export"])
    p.add_argument("file", help="a checkpoint written by normswap convert / normswap.save")
    p.add_argument("--out", required=True, help="output .safetensors file for the plain architecture")
    p.add_argument("--model", help="architecture (default: the one recorded in the file)")
    p.add_argument("--no-fold", action="store_true", help="keep unfoldable sites as normswap tensors")
    p.set_defaults(func=cmd_export)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    from .io import CheckpointError
    from .spec import SpecError
    from .transform import TransformError
    try:
        return args.func(args)
    except (UserError, SpecError, TransformError, CheckpointError) as e:
        msg = str(e).replace("\n", " ")
        print(f"normswap {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
