"""The ``normswap`` command: presets, inspect, convert, export.

    normswap presets
    normswap inspect resnet50 --spec l1bn --format markdown
    normswap convert resnet50 --spec bwn-g --checkpoint plain.pth --num-classes 10 --out resnet50_bwn.safetensors
    normswap export resnet50_bwn.safetensors --num-classes 10 --out resnet50_vanilla.safetensors

Every mistake the user can fix is one line on stderr and exit code 2. A model is a timm
name or, when given on the command line, ``package.module:factory``; a name read from a
file is only ever a timm name (a file never chooses code to run).
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import re
import sys
import warnings
from typing import Any, Dict, List, Optional

EXAMPLES = {
    "presets": "example: normswap presets",
    "inspect": "example: normswap inspect resnet50 --spec '{\"preset\": \"bwn\", \"kwargs\": {\"fallback\": \"l1bn\"}}' "
               "--format markdown",
    "convert": "example: normswap convert resnet18 --spec l1bn --checkpoint resnet18.pth --num-classes 10 "
               "--out resnet18_l1bn.safetensors",
    "export": "example: normswap export resnet18_l1bn.safetensors --num-classes 10 --out resnet18_vanilla.safetensors",
}
FORMATS = ("table", "json", "markdown")
# create_model arguments that would fetch or load weights: normswap takes weights from --checkpoint only
REFUSED_MODEL_KWARGS = ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay")


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# -- models --------------------------------------------------------------------------------
def model_kwargs(args) -> Dict[str, Any]:
    """``--model-kwargs JSON`` and ``--num-classes N`` -> keyword arguments for the model."""
    kw: Dict[str, Any] = {}
    if args.model_kwargs:
        try:
            kw = json.loads(args.model_kwargs)
        except ValueError as e:
            raise UserError(f"--model-kwargs {args.model_kwargs!r} is not JSON ({e}); example: "
                            f"--model-kwargs '{{\"drop_rate\": 0.1, \"in_chans\": 1}}'") from None
        if not isinstance(kw, dict):
            raise UserError(f"--model-kwargs must be a JSON object of argument -> value, got {args.model_kwargs!r}")
    refused = [k for k in REFUSED_MODEL_KWARGS if k in kw]
    if refused:
        raise UserError(f"--model-kwargs: {', '.join(refused)} not accepted: normswap builds the model with "
                        f"pretrained=False and never downloads; give the weights with --checkpoint")
    if args.num_classes is not None:
        if args.num_classes < 0:
            raise UserError(f"--num-classes {args.num_classes}: must be >= 0 (0 = no classifier head)")
        if "num_classes" in kw and kw["num_classes"] != args.num_classes:
            raise UserError(f"--num-classes {args.num_classes} and --model-kwargs num_classes="
                            f"{kw['num_classes']!r} disagree; give one")
        kw["num_classes"] = args.num_classes
    return kw


def timm_model(name: str, kwargs: Dict[str, Any]):
    """``timm.create_model(name, pretrained=False, **kwargs)`` for a registered timm name."""
    import timm
    if not timm.is_model(name):
        pool = timm.list_models()
        close = [m for m in pool if name.lower() in m][:3]
        close += [m for m in difflib.get_close_matches(name, pool, n=5, cutoff=0.6) if m not in close]
        raise UserError(f"unknown timm model {name!r}" + (f"; close names: {', '.join(close[:5])}" if close else
                                                          "; see timm.list_models()"))
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm reports bad arguments with several types
        raise UserError(f"timm.create_model({name!r}, pretrained=False, **{kwargs}) failed: {_first_line(e)}") from None


def model_from_command_line(name: str, kwargs: Dict[str, Any]):
    """A timm model name, or ``package.module:factory`` for a model of your own (the user
    typed it, so importing it is what they asked for)."""
    if ":" not in name:
        return timm_model(name, kwargs)
    mod_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"cannot import {name!r} ({e}); use a timm model name or package.module:factory") from None
    try:
        model = factory(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's own factory
        raise UserError(f"{name}(**{kwargs}) failed: {_first_line(e)}") from None
    import torch
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def model_from_file(architecture: str, kwargs: Dict[str, Any], path: str):
    """The architecture a checkpoint names: only a timm model name, never code to import."""
    import timm
    if not timm.is_model(architecture):
        raise UserError(f"{path} names the architecture {architecture!r}, which is not a timm model; "
                        f"normswap never imports or calls code named by a file: if it is your own model, "
                        f"pass --model package.module:factory")
    return timm_model(architecture, kwargs)


def _head_hint(model, file_shapes: Dict[str, tuple]) -> str:
    """When the classifier is what differs, the --num-classes that fits the file."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") if isinstance(cfg, dict) else None
    for head in ([heads] if isinstance(heads, str) else list(heads or [])):
        shape = file_shapes.get(f"{head}.weight")
        if shape:
            return f"; the file's head {head} has {shape[0]} classes: pass --num-classes {shape[0]}"
    return "; if the model was built with other arguments, pass them (--num-classes, --model-kwargs)"


# -- specs and plain checkpoints ------------------------------------------------------------------
def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.lower().endswith(".json")


def load_spec(text: str):
    """``--spec``: a preset name, JSON, or the path of a JSON file."""
    from .io import CheckpointError, check_spec_json, parse_json_field
    from .spec import Spec, SpecError
    stripped = text.strip()
    if stripped.startswith("{"):
        source, what = stripped, "--spec"
    elif os.path.isdir(text):
        raise UserError(f"--spec {text}: is a directory (a spec is a preset name, JSON, or a JSON file)")
    elif os.path.isfile(text):
        try:
            with open(text, encoding="utf-8") as f:
                source = f.read()
        except UnicodeDecodeError:
            raise UserError(f"--spec file {text}: not UTF-8 text") from None
        what = f"--spec file {text}"
        source = source.strip()   # JSON, or just a preset name
    elif _looks_like_path(text):
        raise UserError(f"--spec file {text}: no such file (a spec is a preset name, JSON, or the path "
                        f"of a JSON file)")
    else:
        source, what = stripped, "--spec"
    if not source.startswith("{") and not re.fullmatch(r"[\w.*+-]{1,64}", source):
        raise UserError(f"{what} {source[:40]!r}{'...' if len(source) > 40 else ''}: not a preset name, "
                        f"a JSON object or a file" if what == "--spec" else
                        f"{what}: holds neither a JSON object nor a preset name")
    try:
        if source.startswith("{"):
            d = parse_json_field(source, what)
            check_spec_json(d, what)
            return Spec.from_dict(d)
        return Spec.coerce(source)
    except (SpecError, CheckpointError) as e:
        raise UserError(f"{what}: {e}" if not str(e).startswith(what) else str(e)) from None


def _read_state_dict(path: str) -> Dict[str, Any]:
    """A plain state dict from a safetensors file or a torch checkpoint (weights only),
    recognised by content, not by extension."""
    import torch
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path}: is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path}: no such file")
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) > 8 and head[8:9] == b"{":
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise UserError(f"checkpoint {path}: not a readable safetensors file ({_first_line(e)})") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file
        kind = "a safetensors file" if path.endswith(".safetensors") else "a safetensors file or a torch checkpoint"
        raise UserError(f"checkpoint {path}: not {kind} that loads with weights_only=True "
                        f"({_first_line(e)})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"checkpoint {path}: expected a state dict of tensors (or one under 'state_dict', "
                        f"'model' or 'model_state_dict')")
    return sd


def load_plain_checkpoint(model, path: str) -> None:
    """Load a plain (unconverted) checkpoint strictly, after checking keys and shapes."""
    from .io import KeyMismatch
    sd = _read_state_dict(path)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    m = KeyMismatch.between(model.state_dict(), sd)
    if m.missing or m.unexpected or m.shapes:
        hint = _head_hint(model, {k: tuple(v.shape) for k, v in sd.items()})
        raise UserError(f"checkpoint {path} does not fit {type(model).__name__}: {m.describe()}{hint}")
    model.load_state_dict(sd, strict=True)


# -- commands ----------------------------------------------------------------------------
def cmd_presets(args) -> int:
    from .spec import presets
    for name, text in presets().items():
        print(f"{name:9} {text}")
    return 0


def _escape_md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def report_markdown(rep) -> str:
    """A Report as a GitHub markdown table (for issues, PRs and docs)."""
    lines = ["| site | kind | original | becomes / why not | kwargs |", "|---|---|---|---|---|"]
    for s in rep.sites:
        if s.status == "converted":
            what = s.becomes + (" (eval outputs kept)" if s.preserves_function else "")
        elif s.status == "kept":
            what = "kept"
        else:
            what = f"{s.status}: {s.reason or ''}"
        kw = ", ".join(f"{k}={v}" for k, v in s.kwargs.items())
        lines.append("| " + " | ".join(_escape_md(c) for c in (f"`{s.name}`", s.kind, s.original, what, kw)) + " |")
    lines.append("")
    lines.append(", ".join(f"{v} {k}" for k, v in rep.counts().items() if v) or "no sites")
    lines += [f"- warning: {_escape_md(w)}" for w in rep.warnings]
    return "\n".join(lines)


def _transform_step(fn, spec_text: str):
    """Run plan/transform; a layer's own argument check (ValueError) is the user's to fix."""
    from .io import CheckpointError
    from .spec import SpecError
    from .transform import TransformError
    try:
        return fn()
    except (SpecError, TransformError, CheckpointError, UserError):
        raise
    except ValueError as e:
        raise UserError(f"--spec {spec_text}: {e}") from None


def cmd_inspect(args) -> int:
    import normswap
    fmt = args.format or ("json" if args.json else "table")
    if args.json and fmt != "json":
        raise UserError(f"--json and --format {fmt} disagree; give one")
    model = model_from_command_line(args.model, model_kwargs(args))
    spec = load_spec(args.spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = _transform_step(lambda: normswap.plan(model, spec), args.spec)
    print({"table": str, "json": lambda r: r.to_json(indent=1), "markdown": report_markdown}[fmt](rep))
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    import normswap
    model = model_from_command_line(args.model, model_kwargs(args))
    spec = load_spec(args.spec)
    if args.checkpoint:
        load_plain_checkpoint(model, args.checkpoint)
    if args.eval:
        model.eval()
    out = _transform_step(lambda: normswap.transform(model, spec, strict=args.strict), args.spec)
    normswap.save(out, args.out)
    c = normswap.report(out).counts()
    print(f"wrote {args.out}: " + ", ".join(f"{v} {k}" for k, v in c.items() if v))
    return 0


def cmd_export(args) -> int:
    import normswap
    from .io import CheckpointMismatchError, read_metadata
    meta = read_metadata(args.file)   # validated before anything is built
    if meta.kind != "converted":
        raise UserError(f"{args.file} is a {meta.kind} file; export takes a checkpoint written by "
                        f"normswap convert / normswap.save")
    kwargs = model_kwargs(args)
    if args.model:
        name, model = args.model, model_from_command_line(args.model, kwargs)
    elif meta.architecture:
        name, model = meta.architecture, model_from_file(meta.architecture, kwargs, args.file)
    else:
        raise UserError(f"{args.file} does not name its architecture; pass --model NAME (timm) or "
                        f"--model package.module:factory")
    try:
        model = normswap.load(args.file, model).eval()
    except CheckpointMismatchError as e:
        raise UserError(str(e) + _head_hint(model, {k: f for k, f, _ in e.mismatch.shapes})) from None
    normswap.export(model, args.out, fold=not args.no_fold)
    print(f"wrote {args.out} (loads into the plain {name})")
    return 0


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-classes", type=int, help="classifier size (timm's num_classes; 0 = no head)")
    p.add_argument("--model-kwargs", metavar="JSON",
                   help="other arguments for timm.create_model (or your factory) as a JSON object, "
                        "e.g. '{\"drop_rate\": 0.1}'; the model is always built with pretrained=False")


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line like every other error (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="normswap", description="Swap a model's normalizations for BN*, LN*, DN*, "
                                 "L1 / top-k batch norm or bounded weight norm, and manage the checkpoints.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("presets", help="list the presets with formula and defaults", epilog=EXAMPLES["presets"])
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("inspect", help="show the plan for a model", epilog=EXAMPLES["inspect"])
    p.add_argument("model", help="timm model name or package.module:factory")
    p.add_argument("--spec", default="l1bn", help="preset, JSON, or a JSON file (default l1bn)")
    p.add_argument("--format", choices=FORMATS, help="output: table (default), json or markdown")
    p.add_argument("--json", action="store_true", help="same as --format json")
    _model_options(p)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("convert", help="build, load a plain checkpoint, transform, save", epilog=EXAMPLES["convert"])
    p.add_argument("model", help="timm model name or package.module:factory")
    p.add_argument("--spec", required=True, help="preset, JSON, or a JSON file")
    p.add_argument("--checkpoint", help="plain checkpoint to load first (safetensors, or a torch file "
                                        "read with weights_only=True)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--strict", action="store_true", help="fail if a matched site would be skipped")
    p.add_argument("--eval", action="store_true", help="convert in eval mode")
    _model_options(p)
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("export", help="fold a converted checkpoint into a plain one", epilog=EXAMPLES["export"])
    p.add_argument("file", help="a checkpoint written by normswap convert / normswap.save")
    p.add_argument("--out", required=True, help="output .safetensors file for the plain architecture")
    p.add_argument("--model", help="architecture: a timm name or package.module:factory (default: the timm "
                                   "name recorded in the file; a file never names code to import)")
    p.add_argument("--no-fold", action="store_true", help="keep unfoldable sites as normswap tensors")
    _model_options(p)
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
        msg = str(e)
    except OSError as e:  # a file the user named cannot be read or written
        msg = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
    msg = " ".join(msg.split())   # one line
    print(f"normswap {args.command}: error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
