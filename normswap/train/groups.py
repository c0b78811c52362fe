"""Optimizer parameter groups that respect scale invariance.

    (a) scale-invariant weights: conv/linear weights whose output feeds a per-channel
        batch normalizer, and bounded-weight-norm directions ``v``;
    (b) no weight decay: normalizer gains/biases, every bias, learned sigma/gain, every
        1-d parameter;
    (c) everything else: ordinary weight decay.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from torch import nn

from ..graph.producers import scale_invariant_params
from ..graph.sites import module_family
from ..norms.base import NormalizerBase
from ..norms.bwn import BoundedWeightNorm
from ..norms.penalty import unwrap_model


def _no_decay_names(model: nn.Module) -> set:
    names = set()
    for mname, m in model.named_modules():
        is_norm = module_family(m) is not None or isinstance(m, (NormalizerBase, BoundedWeightNorm))
        for pname, p in m.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if is_norm or pname == "bias" or p.ndim <= 1:
                names.add(full)
    return names


def param_groups(model: nn.Module, lr: float, weight_decay: float, *,
                 scale_invariant_weight_decay: Optional[float] = None,
                 leaf_modules: Sequence = ()) -> List[Dict[str, Any]]:
    """Three optimizer groups: ``scale_invariant``, ``no_decay``, ``decay`` (empty ones dropped).

    ``scale_invariant_weight_decay`` defaults to ``weight_decay``; set it to 0 when
    training with :class:`normswap.LRCorrection`, which then supplies the effect of
    weight decay on those weights through the learning rate.
    """
    model = unwrap_model(model)
    si = {s.name for s in scale_invariant_params(model, leaf_modules)}
    no_decay = _no_decay_names(model)
    groups = {"scale_invariant": [], "no_decay": [], "decay": []}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        key = "scale_invariant" if name in si else "no_decay" if name in no_decay else "decay"
        groups[key].append(p)
    si_wd = weight_decay if scale_invariant_weight_decay is None else scale_invariant_weight_decay
    wd = {"scale_invariant": si_wd, "no_decay": 0.0, "decay": weight_decay}
    return [{"params": ps, "lr": lr, "weight_decay": wd[k], "name": k} for k, ps in groups.items() if ps]
