"""Converted checkpoints in safetensors.

``save(model, path)``   every parameter and buffer of a transformed model, with the spec
                        and versions in the metadata; shared tensors stored once; atomic.
``load(path, model)``   replay the stored spec on a fresh model of the same architecture
                        and load the weights strictly (bit for bit).
``export(model, path)`` a vanilla state dict for the original architecture: eval-mode
                        batch-statistics normalizers fold into BatchNorm buffers, bounded
                        weight norm into the plain weight.

A file never chooses code to run: its metadata is validated (known keys, types, sizes,
nesting) before use, and nothing read from it is imported, looked up by a dotted path or
called. The spec it stores is resolved only against the presets registered in the
running process.

Folding (eval mode, per channel): a normswap batch normalizer computes
``y = gamma * (x - running_mean) / d + beta`` with ``d`` from its running statistics
(L1: ``C_L1 * running_mad + eps``; top-k: ``running_std + eps``; BN-s:
``sqrt(running_var + sigma^2 + eps)``; mean-only: 1). A vanilla BatchNorm with eps ``e``
computes the same with ``running_var = d^2 - e``.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import stat
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

FORMAT = 1
META_KEY = "normswap_format"
MAX_JSON_BYTES = 1 << 20   # a JSON metadata field (spec, aliases) holds at most 1 MiB
MAX_JSON_DEPTH = 16        # a spec is 4 levels deep; refuse anything nested deeper than this
MAX_TEXT = 256             # short metadata strings (architecture, versions, class name)
MAX_PATTERN = 1000         # a regular expression in a spec (regex rules, exclude)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; says why."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written; the message names the target path."""


@dataclass
class KeyMismatch:
    """How a file's tensors differ from a model's state dict."""
    missing: List[str] = field(default_factory=list)       # in the model, not in the file
    unexpected: List[str] = field(default_factory=list)    # in the file, not in the model
    shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)  # key, file, model

    @classmethod
    def between(cls, model_sd: Mapping[str, torch.Tensor], file_sd: Mapping[str, torch.Tensor]) -> "KeyMismatch":
        return cls(missing=sorted(set(model_sd) - set(file_sd)),
                   unexpected=sorted(set(file_sd) - set(model_sd)),
                   shapes=sorted((k, tuple(file_sd[k].shape), tuple(model_sd[k].shape))
                                 for k in set(model_sd) & set(file_sd)
                                 if tuple(model_sd[k].shape) != tuple(file_sd[k].shape)))

    def describe(self, keys: bool = True, shapes: bool = True) -> str:
        parts = []
        if keys and self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {', '.join(self.missing[:20])}")
        if keys and self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected[:20])}")
        if shapes and self.shapes:
            parts.append(f"shape mismatches ({len(self.shapes)}): " + "; ".join(
                f"{k}: file {f} vs model {m}" for k, f, m in self.shapes[:20]))
        return " | ".join(parts)


class CheckpointMismatchError(CheckpointError):
    """The file's tensors do not fit the model (keys or shapes); ``mismatch`` says how."""

    def __init__(self, message: str, mismatch: KeyMismatch):
        super().__init__(message)
        self.mismatch = mismatch


# -- writing ---------------------------------------------------------------------------------
def _temp_file(folder: str) -> str:
    """Create an empty ``.tmp-*`` file in ``folder`` with mode 0666 minus the umask (as
    ``open(path, "w")`` would; ``tempfile.mkstemp`` would give 0600). Its mode is how the
    umask is read without changing it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".tmp-{secrets.token_hex(8)}.safetensors")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name in {folder}")


def atomic_save_file(tensors: Dict[str, torch.Tensor], path: Union[str, os.PathLike],
                     metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a safetensors file atomically: to a ``.tmp-*`` file in the same folder,
    fsync'd, then renamed over ``path``. A failure (including an interrupt) leaves
    ``path`` as it was and no temporary file; the error names ``path``.

    A new file gets the mode ``open()`` would give it (0666 minus the umask, 0644 by
    default); a file that is replaced keeps its mode."""
    from safetensors.torch import save_file
    path = os.fspath(path)
    target = os.path.abspath(path)
    folder = os.path.dirname(target)
    if os.path.isdir(target):
        raise CheckpointWriteError(f"cannot write {path}: it is a directory; give a file name such as "
                                   f"{os.path.join(path, 'model.safetensors')}")
    if not os.path.isdir(folder):
        raise CheckpointWriteError(f"cannot write {path}: folder {folder} does not exist")
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    keep_mode = stat.S_IMODE(os.stat(target).st_mode) if os.path.isfile(target) else None
    tmp: Optional[str] = None
    try:
        tmp = _temp_file(folder)
        mode = keep_mode if keep_mode is not None else stat.S_IMODE(os.stat(tmp).st_mode)
        save_file(data, tmp, metadata=metadata)
        os.chmod(tmp, mode)   # safetensors >= 0.7 writes through its own 0600 temporary file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp = None
        _fsync_folder(folder)
    except OSError as e:
        raise CheckpointWriteError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _fsync_folder(folder: str) -> None:
    """Make the rename durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _dedupe(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Keep one key per shared tensor; return (tensors, alias -> kept key)."""
    seen: Dict[Tuple, str] = {}
    out, aliases = {}, {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype) \
            if v.device.type != "meta" else (id(v),)
        if key in seen and v.numel() > 0:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            out[k] = v
    return out, aliases


def architecture_of(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return None


def _versions() -> Dict[str, str]:
    import normswap
    v = {"normswap_version": normswap.__version__, "torch_version": torch.__version__}
    try:
        import timm
        v["timm_version"] = timm.__version__
    except Exception:  # pragma: no cover
        pass
    return v


def _file_text(value: str) -> Optional[str]:
    """A short metadata string as written (None when it would not pass the reader's checks)."""
    return value if len(value) <= MAX_TEXT and value.isprintable() else None


def save(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Save a transformed model: all tensors + spec + versions, atomically."""
    from .norms.penalty import unwrap_model
    from .transform import spec_of
    model = unwrap_model(model)
    spec = spec_of(model)
    if spec is None:
        raise CheckpointError(f"{type(model).__name__} was not transformed by normswap.transform; save a "
                              f"plain model with safetensors.torch.save_model or torch.save(state_dict)")
    tensors, aliases = _dedupe(model.state_dict())
    meta = {META_KEY: str(FORMAT), "kind": "converted", "spec": spec.to_json(),
            "aliases": json.dumps(aliases, sort_keys=True), **_versions()}
    if _file_text(type(model).__name__):
        meta["model_class"] = type(model).__name__
    arch = architecture_of(model)
    if arch and _file_text(arch):
        meta["architecture"] = arch
    atomic_save_file(tensors, path, meta)


# -- reading: every metadata field is checked before it is used ------------------------------
@dataclass(frozen=True)
class CheckpointMeta:
    """The validated metadata of a normswap file. Plain data: nothing in it is code."""
    format: int
    kind: str                                   # "converted" | "vanilla"
    spec: Optional[Any] = None                  # a Spec (converted files)
    from_spec: Optional[Dict[str, Any]] = None  # the spec a vanilla export came from (JSON object)
    aliases: Dict[str, str] = field(default_factory=dict)
    architecture: Optional[str] = None          # a name to compare or to check with timm.is_model
    model_class: Optional[str] = None
    versions: Dict[str, str] = field(default_factory=dict)


TEXT_FIELDS = ("architecture", "model_class", "normswap_version", "torch_version", "timm_version",
               "format")   # "format": "pt" is what transformers writes; accepted and ignored
JSON_FIELDS = ("spec", "from_spec", "aliases")
KNOWN_FIELDS = (META_KEY, "kind") + TEXT_FIELDS + JSON_FIELDS
KINDS = ("converted", "vanilla")
SPEC_FIELDS = ("format", "preset", "kwargs", "types", "regex", "names", "exclude")

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """Deepest nesting of ``[`` / ``{`` in JSON text, found without recursion (strings,
    where brackets are text, are skipped), so depth can be checked before ``json.loads``."""
    steps = (1 if b in "[{" else -1 for b in _JSON_BRACKET.findall(_JSON_STRING.sub('""', text)))
    return max(itertools.accumulate(steps, initial=0))


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (JSON has no NaN or Infinity)")


def parse_json_field(text: str, what: str) -> Any:
    """JSON text from a file -> value, refusing what is too big, too deep, not JSON or
    not UTF-8, each with a message that names ``what``."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{what} is {size / 2**20:.1f} MiB of JSON; normswap reads at most "
                              f"{MAX_JSON_BYTES // 2**20} MiB there")
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise CheckpointError(f"{what} is JSON nested {depth} levels deep; normswap reads at most "
                              f"{MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError as e:  # JSONDecodeError included
        raise CheckpointError(f"{what} is not valid JSON: {e}") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{what} is not valid UTF-8 text (it holds an unpaired surrogate)") from None
    return value


_SCALARS = (bool, int, float, str, type(None))


def _is_value(v: Any) -> bool:
    """An argument value a spec may hold: a JSON scalar or a flat list of scalars."""
    return isinstance(v, _SCALARS) or (isinstance(v, list) and all(isinstance(x, _SCALARS) for x in v))


def check_spec_json(d: Any, what: str) -> None:
    """The spec's JSON has the types ``Spec.from_dict`` expects (so a crafted value gives a
    CheckpointError, not a TypeError somewhere inside normswap)."""
    def bad(where: str, expected: str, got: Any) -> CheckpointError:
        return CheckpointError(f"{what}: {where} must be {expected}, got {type(got).__name__} "
                               f"{json.dumps(got)[:80]}")
    if not isinstance(d, dict):
        raise bad("the spec", "a JSON object", d)
    unknown = sorted(set(d) - set(SPEC_FIELDS))
    if unknown:
        raise CheckpointError(f"{what}: unknown spec field(s) {', '.join(map(repr, unknown))}; a spec has "
                              f"{', '.join(SPEC_FIELDS)}")
    if "format" in d and (not isinstance(d["format"], int) or isinstance(d["format"], bool)):
        raise bad("'format'", "an integer", d["format"])
    if d.get("preset") is not None and not isinstance(d["preset"], str):
        raise bad("'preset'", "a preset name (string) or null", d["preset"])
    kwargs = d.get("kwargs", {})
    if not isinstance(kwargs, dict) or not all(_is_value(v) for v in kwargs.values()):
        raise bad("'kwargs'", "an object of argument -> number, string, bool, null or list of those", kwargs)
    for kind in ("types", "regex", "names"):
        rules = d.get(kind, {})
        if not isinstance(rules, dict):
            raise bad(f"{kind!r}", "an object of key -> rule", rules)
        for key, rule in rules.items():
            if isinstance(rule, str):
                continue
            if not isinstance(rule, dict):
                raise bad(f"{kind}[{key!r}]", "a preset name or an object like {\"to\": \"l1bn\", \"k\": 5}", rule)
            if rule.get("to") is not None and not isinstance(rule["to"], str):
                raise bad(f"{kind}[{key!r}]['to']", "a preset name (string)", rule["to"])
            if not all(_is_value(v) for k, v in rule.items() if k != "to"):
                raise bad(f"{kind}[{key!r}]", "an object of argument -> number, string, bool, null or list of those", rule)
    exclude = d.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise bad("'exclude'", "a list of names or regular expressions (strings)", exclude)
    for where, pattern in [(f"regex[{p[:40]!r}]", p) for p in d.get("regex", {})] + \
            [(f"exclude[{i}]", p) for i, p in enumerate(exclude)]:
        _check_pattern(pattern, f"{what}: {where}")


def _paren_depth(pattern: str) -> int:
    """Nesting of groups in a regular expression (escaped parentheses skipped; one inside
    a character class counts too, which can only over-estimate)."""
    steps = (1 if c == "(" else -1 for c in re.findall(r"\\.|[()]", pattern, re.S) if c in "()")
    return max(itertools.accumulate(steps, initial=0))


def _check_pattern(pattern: str, where: str) -> None:
    """A regular expression short and flat enough for ``re.compile`` (whose parser
    recurses: a few hundred nested groups are a RecursionError)."""
    depth = _paren_depth(pattern)
    if depth > MAX_JSON_DEPTH:
        raise CheckpointError(f"{where}: a regular expression with groups nested {depth} deep; normswap "
                              f"reads at most {MAX_JSON_DEPTH}")
    if len(pattern) > MAX_PATTERN:
        raise CheckpointError(f"{where}: a regular expression of {len(pattern)} characters; normswap "
                              f"reads at most {MAX_PATTERN}")


def registered_presets() -> List[str]:
    """The preset/variant names this process knows (named in the message for an unknown one;
    the one place to point at the variant registry)."""
    from .spec import presets
    return list(presets())


def _named_presets(d: Dict[str, Any]) -> List[str]:
    names = [d.get("preset")]
    for kind in ("types", "regex", "names"):
        for rule in d.get(kind, {}).values():
            names.append(rule if isinstance(rule, str) else rule.get("to"))
    return [n for n in names if n is not None]


def spec_from_file(text: str, what: str):
    """The stored spec, checked (size, depth, types) before it is built. The spec's own
    validation looks every preset up among those registered in this process; an unknown
    name becomes a CheckpointError that says how to register it."""
    from .spec import Spec, SpecError
    d = parse_json_field(text, what)
    check_spec_json(d, what)
    try:
        return Spec.from_dict(d)
    except SpecError as e:
        known = set(registered_presets())
        unknown = [n for n in dict.fromkeys(_named_presets(d)) if n not in known]
        if unknown:
            raise CheckpointError(
                f"{what} names variant {', '.join(repr(n) for n in unknown)}, which is not registered in "
                f"this process; normswap never imports code named by a file: import the package that "
                f"defines it (it calls normswap.register_variant(...)) before loading. Registered: "
                f"{', '.join(sorted(known))}") from None
        raise CheckpointError(f"{what}: {e}") from None
    except (TypeError, ValueError, re.error, RecursionError) as e:  # what the spec's checks did not expect
        raise CheckpointError(f"{what}: {type(e).__name__}: {e}") from None


def _text_field(value: str, what: str) -> str:
    if len(value) > MAX_TEXT:
        raise CheckpointError(f"{what} is {len(value)} characters long; normswap reads at most {MAX_TEXT}")
    if not value.isprintable():
        raise CheckpointError(f"{what} {value[:40]!r} holds control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{what} is not valid UTF-8 text") from None
    return value


def parse_metadata(raw: Mapping[str, str], path) -> CheckpointMeta:
    """Validate a normswap file's metadata: known keys, types and sizes only."""
    if META_KEY not in raw:
        raise CheckpointError(f"{path}: no normswap metadata; for a plain checkpoint load it into the "
                              f"model first (model.load_state_dict or timm's load_checkpoint), then "
                              f"call normswap.transform")
    fmt_text = raw[META_KEY]
    if not (isinstance(fmt_text, str) and re.fullmatch(r"[0-9]{1,6}", fmt_text)):
        raise CheckpointError(f"{path}: bad normswap format field {str(fmt_text)[:40]!r} (a whole number)")
    fmt = int(fmt_text)
    if fmt > FORMAT:
        raise CheckpointError(f"{path}: written by a newer normswap (format {fmt}; this one reads "
                              f"{FORMAT}); upgrade normswap")
    unknown = sorted(set(raw) - set(KNOWN_FIELDS))
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:10])
        raise CheckpointError(f"{path}: unknown metadata key(s) {shown} (written by a newer normswap, or "
                              f"edited); a normswap file has {', '.join(KNOWN_FIELDS)}")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise CheckpointError(f"{path}: metadata {key!r} must be text, got {type(value).__name__}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise CheckpointError(f"{path}: metadata 'kind' is {str(kind)[:40]!r}; a normswap file is one of "
                              f"{', '.join(KINDS)}")
    text = {k: _text_field(raw[k], f"{path}: metadata {k!r}") for k in TEXT_FIELDS if k in raw}
    aliases = parse_json_field(raw.get("aliases", "{}"), f"{path}: metadata 'aliases'")
    if not (isinstance(aliases, dict) and all(isinstance(v, str) for v in aliases.values())):
        raise CheckpointError(f"{path}: metadata 'aliases' must be a JSON object of key -> stored key")
    spec = from_spec = None
    if kind == "converted":
        if "spec" not in raw:
            raise CheckpointError(f"{path}: a converted checkpoint without its 'spec' metadata")
        spec = spec_from_file(raw["spec"], f"{path}: the stored spec")
    if "from_spec" in raw:
        from_spec = parse_json_field(raw["from_spec"], f"{path}: metadata 'from_spec'")
        check_spec_json(from_spec, f"{path}: metadata 'from_spec'")
    return CheckpointMeta(format=fmt, kind=kind, spec=spec, from_spec=from_spec, aliases=aliases,
                          architecture=text.get("architecture"), model_class=text.get("model_class"),
                          versions={k: v for k, v in text.items() if k.endswith("_version")})


def read(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, raw metadata) of a safetensors file, with a clear error for a bad file."""
    from safetensors import safe_open
    path = os.fspath(path)
    _check_is_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): "
                              f"{type(e).__name__}: {e}") from None
    return tensors, meta


def _check_is_file(path: str) -> None:
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a safetensors file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")


def read_metadata(path: Union[str, os.PathLike]) -> CheckpointMeta:
    """The validated metadata of a normswap file, without reading its tensors."""
    from safetensors import safe_open
    path = os.fspath(path)
    _check_is_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): "
                              f"{type(e).__name__}: {e}") from None
    return parse_metadata(raw, path)


def read_converted(path) -> Tuple[Dict[str, torch.Tensor], CheckpointMeta]:
    """Tensors (aliases restored) and validated metadata of a converted checkpoint."""
    tensors, raw = read(path)
    meta = parse_metadata(raw, path)
    if meta.kind != "converted":
        raise CheckpointError(f"{path}: a {meta.kind} file, not a converted checkpoint (load it into "
                              f"the plain model with load_state_dict)")
    for alias, key in meta.aliases.items():
        if alias in tensors:
            raise CheckpointError(f"{path}: metadata 'aliases' maps {alias[:80]!r}, which is also stored")
        if key not in tensors:
            raise CheckpointError(f"{path}: metadata 'aliases' maps {alias[:80]!r} to {key[:80]!r}, "
                                  f"which is not stored")
        tensors[alias] = tensors[key]
    return tensors, meta


def load(path: Union[str, os.PathLike], model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Replay the stored spec on ``model`` (fresh, untransformed, same architecture) and
    load the stored weights. Returns the transformed model; ``model`` itself is not changed.

    ``strict=True``: the file's keys and the model's must match exactly. ``strict=False``
    (as in ``nn.Module.load_state_dict``): keys missing from the file keep the model's
    values and keys the model lacks are ignored, both listed in a warning; a shape
    mismatch is still an error."""
    from .transform import spec_of, transform
    tensors, meta = read_converted(path)
    if spec_of(model) is not None:
        raise CheckpointError("load() takes a fresh, untransformed model (it replays the stored spec)")
    arch = meta.architecture
    if arch and architecture_of(model) and arch != architecture_of(model):
        raise CheckpointError(f"{path} holds a {arch}; the model given is a {architecture_of(model)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = transform(model, meta.spec)
    except (ValueError, TypeError) as e:  # SpecError / TransformError / a layer's own argument check
        raise CheckpointError(f"{path}: the stored spec cannot be applied to this "
                              f"{type(model).__name__}: {e}") from None
    check_keys(out.state_dict(), tensors, path, strict=strict)
    out.load_state_dict(tensors, strict=False)  # keys and shapes checked above
    return out


def check_keys(expected: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor], path, *,
               strict: bool = True) -> KeyMismatch:
    """Raise CheckpointMismatchError when ``got`` (the file) does not fit ``expected``
    (the model): always for a shape mismatch, for missing/unexpected keys when ``strict``
    (otherwise a warning lists them)."""
    m = KeyMismatch.between(expected, got)
    if m.shapes or (strict and (m.missing or m.unexpected)):
        raise CheckpointMismatchError(f"{path} does not fit this model (same architecture, model "
                                      f"arguments such as num_classes, and spec?): "
                                      + m.describe(keys=strict), m)
    if m.missing or m.unexpected:
        warnings.warn(f"{path} loaded with strict=False: " + m.describe(shapes=False)
                      + " (missing keys keep the model's values; unexpected keys are ignored)",
                      stacklevel=3)
    return m


# -- export -------------------------------------------------------------------------------
def fold_site(model: nn.Module, site) -> Dict[str, torch.Tensor]:
    """The vanilla layer's tensors of one converted site (eval mode), or a
    CheckpointError saying why it cannot fold. The site's variant decides
    (``Variant.fold``); the original is what ``transform`` recorded."""
    from .transform import state_of
    from .variants import FoldError
    where = f"{site.name} ({site.original} -> {site.becomes})"
    if site.kind != "module":
        raise CheckpointError(f"{where}: not a module site")
    state = state_of(model)
    original = state.originals.get(site.name)
    variant = state.variant_of(site.name)
    if original is None or variant is None:
        raise CheckpointError(f"{where}: nothing recorded about the original layer")
    try:
        out = variant.fold(model.get_submodule(site.name), original)
    except FoldError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return {f"{site.name}.{k}": v for k, v in out.items()}


def export(model: nn.Module, path: Union[str, os.PathLike], *, fold: bool = True) -> Dict[str, torch.Tensor]:
    """Write a vanilla state dict for the original architecture (eval-mode function).

    With ``fold=True`` every converted site must fold (batch-statistics normalizers
    converted from a BatchNorm, bounded weight norm); otherwise a CheckpointError lists
    the sites that cannot (per-example statistics: LN-s, LN*, DN...). With
    ``fold=False`` those sites keep their normswap tensors. Returns the tensors written.
    """
    from .norms.bwn import BoundedWeightNorm
    from .norms.penalty import unwrap_model
    from .transform import report, spec_of
    model = unwrap_model(model)
    rep = report(model)
    sd = dict(model.state_dict())
    bad: List[str] = []
    folded: Dict[str, torch.Tensor] = {}
    for site in rep.converted:
        try:
            fold_t = fold_site(model, site)
        except CheckpointError as e:
            bad.append(str(e))
            continue
        for k in list(sd):
            if k.startswith(site.name + ".") and k[len(site.name) + 1:].count(".") == 0:
                del sd[k]
        folded.update(fold_t)
    if bad and fold:
        raise CheckpointError("these sites cannot fold into the original architecture (export with "
                              "fold=False to keep them as normswap tensors):\n  " + "\n  ".join(bad))
    # bounded weight norm -> plain weight
    for name, m in model.named_modules():
        plist = getattr(getattr(m, "parametrizations", None), "weight", None)
        if plist is not None and any(isinstance(p, BoundedWeightNorm) for p in plist):
            prefix = f"{name}.parametrizations.weight." if name else "parametrizations.weight."
            for k in [k for k in sd if k.startswith(prefix)]:
                del sd[k]
            folded[f"{name}.weight" if name else "weight"] = m.weight.detach().clone()
    sd.update(folded)
    tensors, aliases = _dedupe(sd)
    meta = {META_KEY: str(FORMAT), "kind": "vanilla", "aliases": json.dumps(aliases), **_versions(),
            "from_spec": spec_of(model).to_json()}
    arch = architecture_of(model)
    if arch and _file_text(arch):
        meta["architecture"] = arch
    atomic_save_file(tensors, path, meta)
    return sd
