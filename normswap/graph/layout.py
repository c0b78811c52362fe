"""Learn which axes a norm module normalizes from what it does.

A subclass of ``nn.LayerNorm`` (or of an instance norm) that overrides ``forward`` may
normalize the trailing dims (as ``nn.LayerNorm``) or the channels of a channels-first
input (timm's ``LayerNorm2d``, transformers' ``ConvNextLayerNorm(data_format=
"channels_first")``, poolformer's ``LayerNorm2dNoBias``). Its class name does not say
which. :func:`probe_layout` runs the module on a small CPU input for each candidate
layout, with its own weights (random ones when it lives on the meta device), and
compares with the reference computation of that layout. Sizes are chosen so that no
spatial size equals the channel count, so a module that permutes cannot pass for the
other layout by accident.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .sites import act_and_drop

_H, _W, _L = 3, 5, 7   # spatial sizes used by the probe (made distinct from C below)


def _cpu_state(m: nn.Module, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    state = {}
    for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
        if t is None:
            continue
        if t.is_floating_point():
            if t.device.type == "meta":
                val = torch.rand(t.shape, generator=gen) + 0.5
            else:
                val = t.detach().to("cpu", torch.float32).clone()
        else:
            val = torch.zeros(t.shape, dtype=t.dtype) if t.device.type == "meta" else t.detach().cpu().clone()
        state[name] = val
    return state


def _post(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the module applies after normalizing: its drop then activation, if any."""
    act, drop = act_and_drop(m)
    if act is None:
        return lambda y: y
    return lambda y: act(drop(y)) if drop is not None else act(y)


def _spatial(c: int, n: int) -> List[int]:
    sizes = [_H, _W, _L][:n]
    return [s + 8 if s == c else s for s in sizes]


def _layer_candidates(m: nn.Module, state) -> List[Tuple[str, torch.Tensor, Callable]]:
    shape = tuple(int(s) for s in m.normalized_shape)
    w, b, eps = state.get("weight"), state.get("bias"), float(getattr(m, "eps", 1e-5))
    out = [("last", torch.randn(2, *_spatial(shape[0], 2), *shape),
            lambda x: F.layer_norm(x, shape, w, b, eps))]
    if len(shape) == 1:
        c = shape[0]
        out.append(("2d", torch.randn(2, c, *_spatial(c, 2)),
                    lambda x: F.layer_norm(x.permute(0, 2, 3, 1), shape, w, b, eps).permute(0, 3, 1, 2)))
    return out


def _instance_candidates(m: nn.Module, state) -> List[Tuple[str, torch.Tensor, Callable]]:
    c = int(m.num_features)
    w, b, eps = state.get("weight"), state.get("bias"), float(getattr(m, "eps", 1e-5))
    out = []
    for layout, nd in (("1d", 1), ("2d", 2), ("3d", 3)):
        x = torch.randn(2, c, *_spatial(c, nd))
        out.append((layout, x, lambda x: F.instance_norm(x, None, None, w, b, True, 0.0, eps)))
    return out


CANDIDATES = {"layernorm": _layer_candidates, "instancenorm": _instance_candidates}


@dataclass(frozen=True)
class Probed:
    """What :func:`probe_layout` learned: the layout (None, with the reason, when no
    candidate matched), and whether the module returned a contiguous channels-first input's
    result in the channels-last memory format (timm's ``LayerNorm2d`` does: permute, norm,
    permute back), which its replacement then keeps (the layout of every later layer
    follows it)."""
    layout: Optional[str]
    reason: Optional[str] = None
    channels_last_out: bool = False


def _channels_last(x: torch.Tensor, y) -> bool:
    return (isinstance(y, torch.Tensor) and x.dim() == 4 and x.is_contiguous() and not y.is_contiguous()
            and y.is_contiguous(memory_format=torch.channels_last))


@torch.no_grad()
def probe_layout(m: nn.Module, family: str) -> Probed:
    """The layout when the module's forward matches one candidate layout, else the reason
    it matches none."""
    make = CANDIDATES.get(family)
    if make is None:
        return Probed(None, f"no layout probe for a {family} module")
    gen = torch.Generator().manual_seed(0)
    state = _cpu_state(m, gen)
    post = _post(m)
    was_training = m.training
    tried = []
    try:
        m.train(False)   # dropout in a *Act norm must not disturb the comparison
        for layout, x, ref in make(m, state):
            try:
                y = functional_call(m, state, (x,), strict=False)
            except Exception as e:  # noqa: BLE001 - a layout the module rejects
                tried.append(f"{layout}: {type(e).__name__}")
                continue
            expect = post(ref(x))
            if isinstance(y, torch.Tensor) and y.shape == expect.shape and torch.allclose(
                    y.float(), expect, rtol=1e-4, atol=1e-4):
                return Probed(layout, channels_last_out=_channels_last(x, y))
            tried.append(f"{layout}: different values")
    finally:
        m.train(was_training)
    return Probed(None, f"its forward matches no known layout of a {family} "
                        f"(probed {', '.join(tried)}); convert it by hand or exclude it")
