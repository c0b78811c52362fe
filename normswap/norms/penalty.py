"""``normswap.penalty(model)``: the L1 activation penalty of the last forward.

    L_L1 = sum over normalization sites of l1_alpha * mean(|x - mu|)

(Ren et al. Eq. 5). Each site records its term during its own training forward (no
extra pass); this function adds them up.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import NormalizerBase

_HOOK_ATTR = "_normswap_penalty_hook"


def _wrapper_types() -> tuple:
    """Module classes that hold the user's model as ``.module`` (data parallel wrappers)."""
    types = [nn.DataParallel, nn.parallel.DistributedDataParallel]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        types.append(FullyShardedDataParallel)
    except Exception:  # pragma: no cover - torch without distributed
        pass
    return tuple(types)


def wrapped_inner(model: nn.Module):
    """The module a DDP / DataParallel / FSDP1 / torch.compile wrapper holds, or None."""
    if isinstance(model, _wrapper_types()):
        return model.module
    orig = getattr(model, "_orig_mod", None)   # torch.compile's OptimizedModule
    return orig if isinstance(orig, nn.Module) else None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / torch.compile wrappers."""
    inner = wrapped_inner(model)
    while inner is not None:
        model, inner = inner, wrapped_inner(inner)
    return model


def _normalizers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, NormalizerBase)]


def _clear_penalty_terms(module: nn.Module, _args) -> None:
    """Forward pre-hook of the root: a new forward starts with no recorded terms.
    (Module level, so that a model with the hook still pickles.)"""
    for m in _normalizers(module):  # looked up each time: the model may change
        m._penalty_terms = []
        m._penalty_accumulate = True


def install_penalty_hook(model: nn.Module) -> None:
    """Clear every site's recorded terms when ``model``'s forward starts, so that a
    module called several times in one forward contributes every call."""
    root = unwrap_model(model)
    for m in _normalizers(root):
        m._penalty_accumulate = True
    if root.__dict__.get(_HOOK_ATTR, False):
        return
    root.register_forward_pre_hook(_clear_penalty_terms)
    object.__setattr__(root, _HOOK_ATTR, True)   # a flag, not the handle: torch.compile reads it


def penalty(model: nn.Module) -> torch.Tensor:
    """Sum of ``l1_alpha * mean|v|`` over the normalizers of ``model`` from its last
    training forward; a zero tensor when there is none. Works on DDP-wrapped models."""
    root = unwrap_model(model)
    if not root.__dict__.get(_HOOK_ATTR, False):
        install_penalty_hook(root)
    total = None
    for m in _normalizers(root):
        t = m.penalty_term()
        if t is not None:
            total = t if total is None else total + t
    if total is None:
        p = next(root.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return total
