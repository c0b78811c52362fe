"""Converted checkpoints in safetensors.

``save(model, path)``   every parameter and buffer of a transformed model, with the spec
                        and versions in the metadata; shared tensors stored once; atomic.
``load(path, model)``   replay the stored spec on a fresh model of the same architecture
                        and load the weights strictly (bit for bit).
``export(model, path)`` a vanilla state dict for the original architecture: eval-mode
                        batch-statistics normalizers fold into BatchNorm buffers, bounded
                        weight norm into the plain weight.

Folding (eval mode, per channel): a normswap batch normalizer computes
``y = gamma * (x - running_mean) / d + beta`` with ``d`` from its running statistics
(L1: ``C_L1 * running_mad + eps``; top-k: ``running_std + eps``; BN-s:
``sqrt(running_var + sigma^2 + eps)``; mean-only: 1). A vanilla BatchNorm with eps ``e``
computes the same with ``running_var = d^2 - e``.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

FORMAT = 1
META_KEY = "normswap_format"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; says why."""


def atomic_save_file(tensors: Dict[str, torch.Tensor], path: Union[str, os.PathLike],
                     metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a safetensors file atomically: to a temporary file in the same folder,
    fsync'd, then renamed over ``path``. A failure leaves ``path`` as it was."""
    from safetensors.torch import save_file
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CheckpointError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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
            "aliases": json.dumps(aliases, sort_keys=True), "model_class": type(model).__name__,
            **_versions()}
    arch = architecture_of(model)
    if arch:
        meta["architecture"] = arch
    atomic_save_file(tensors, path, meta)


def read(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, metadata) of a safetensors file, with a clear error for a bad file."""
    from safetensors import safe_open
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): "
                              f"{type(e).__name__}: {e}") from None
    return tensors, meta


def read_converted(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    tensors, meta = read(path)
    if META_KEY not in meta:
        raise CheckpointError(f"{path}: no normswap metadata; for a plain checkpoint load it into the "
                              f"model first (model.load_state_dict or timm's load_checkpoint), then "
                              f"call normswap.transform")
    try:
        fmt = int(meta[META_KEY])
    except ValueError:
        raise CheckpointError(f"{path}: bad normswap format field {meta[META_KEY]!r}") from None
    if fmt > FORMAT:
        raise CheckpointError(f"{path}: written by a newer normswap (format {fmt}; this one reads "
                              f"{FORMAT}); upgrade normswap")
    if meta.get("kind") != "converted":
        raise CheckpointError(f"{path}: a {meta.get('kind')} file, not a converted checkpoint")
    aliases = json.loads(meta.get("aliases", "{}"))
    for alias, key in aliases.items():
        tensors[alias] = tensors[key]
    return tensors, meta


def load(path: Union[str, os.PathLike], model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Replay the stored spec on ``model`` (fresh, untransformed, same architecture) and
    load the stored weights strictly. Returns the transformed model; ``model`` itself
    is not changed."""
    from .spec import Spec, SpecError
    from .transform import spec_of, transform
    tensors, meta = read_converted(path)
    if spec_of(model) is not None:
        raise CheckpointError("load() takes a fresh, untransformed model (it replays the stored spec)")
    try:
        spec = Spec.from_json(meta["spec"])
    except SpecError as e:
        raise CheckpointError(f"{path}: {e}") from None
    arch = meta.get("architecture")
    if arch and architecture_of(model) and arch != architecture_of(model):
        raise CheckpointError(f"{path} holds a {arch}; the model given is a {architecture_of(model)}")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = transform(model, spec)
    check_keys(out.state_dict(), tensors, path)
    out.load_state_dict(tensors, strict=strict)
    return out


def check_keys(expected: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor], path) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(f"{k}: file {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:20])}")
        raise CheckpointError(f"{path} does not fit this model (same architecture and spec?): "
                              + " | ".join(parts))


# -- export -------------------------------------------------------------------------------
def _fold_norm(mod, prefix: str, original: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Vanilla BatchNorm tensors for a normswap batch normalizer (eval mode)."""
    from .norms.batch import BatchStatNorm
    if not isinstance(mod, BatchStatNorm) or not mod.track_running_stats:
        raise CheckpointError(f"{prefix}: {type(mod).__name__} without running statistics cannot fold")
    with torch.no_grad():
        d = mod._running_denominator().double()
        e = float(original["eps"])
        var = d * d - e
        if (var < 0).any():
            raise CheckpointError(f"{prefix}: a scale below sqrt(eps) cannot be written as a BatchNorm variance")
        out = {"running_mean": mod.running_mean.detach().clone().float(),
               "running_var": var.float()}
        gamma = mod.weight.detach().float() if mod.weight is not None else torch.ones_like(out["running_mean"])
        beta = mod.bias.detach().float() if mod.bias is not None else torch.zeros_like(out["running_mean"])
        if original["affine"]:
            out["weight"], out["bias"] = gamma.clone(), beta.clone()
        elif not (torch.all(gamma == 1) and torch.all(beta == 0)):
            raise CheckpointError(f"{prefix}: the original BatchNorm had no affine; the learned gamma/beta "
                                  f"cannot be folded into it")
        if original["num_batches_tracked"]:
            out["num_batches_tracked"] = mod.num_batches_tracked.detach().clone()
    return {f"{prefix}.{k}": v for k, v in out.items()}


FOLDABLE = ("l1bn", "topkbn", "bn-s", "meanonly", "bwn")


def export(model: nn.Module, path: Union[str, os.PathLike], *, fold: bool = True) -> Dict[str, torch.Tensor]:
    """Write a vanilla state dict for the original architecture (eval-mode function).

    With ``fold=True`` every converted site must fold (batch-statistics normalizers
    converted from a BatchNorm, bounded weight norm); otherwise a CheckpointError lists
    the sites that cannot (per-example statistics: LN-s, LN*, DN...). With
    ``fold=False`` those sites keep their normswap tensors. Returns the tensors written.
    """
    from .norms.bwn import BoundedWeightNorm
    from .norms.penalty import unwrap_model
    from .transform import report, spec_of, state_of
    model = unwrap_model(model)
    rep = report(model)
    sd = dict(model.state_dict())
    bad: List[str] = []
    folded: Dict[str, torch.Tensor] = {}
    for site in rep.converted:
        mod = model.get_submodule(site.name)
        o = state_of(model).originals.get(site.name)
        original = None if o is None else {"family": o.family, "eps": o.eps, "affine": o.affine,
                                           "num_batches_tracked": o.num_batches_tracked}
        variant_ok = site.preset is not None and (site.preset.startswith("bwn") or
                                                  site.preset.rstrip("*").replace("-s", "") in
                                                  ("l1bn", "topkbn", "bn", "meanonly"))
        if original is None or original.get("family") != "batchnorm" or site.kind != "module" or not variant_ok:
            bad.append(f"{site.name} ({site.original} -> {site.becomes}): "
                       + ("per-example or local statistics do not fold into a BatchNorm"
                          if site.family != "batchnorm" or not variant_ok else "not a module site"))
            continue
        try:
            fold_t = _fold_norm(mod, site.name, original)
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
    if arch:
        meta["architecture"] = arch
    atomic_save_file(tensors, path, meta)
    return sd
