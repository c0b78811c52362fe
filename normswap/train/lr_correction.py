"""Weight-decay-equivalent learning-rate correction (Hoffer et al. 2018; PAPERS.md §2).

A weight ``w`` whose output channels are each normalized is scale invariant: weight
decay then acts only through ``||w_c||``, which sets the effective step ``eta/||w_c||^2``.
Training *without* weight decay and correcting each output channel's step reproduces
training *with* it:

    mode="reference"  eta_hat_c = eta * ||w_c||^2 / ||w_c^WD||^2
                      with ||w_c^WD|| recorded per epoch from a run with weight decay
                      (:class:`NormRecorder`)
    mode="online"     shadow norm rho_c (init ||w_c||), every step, for the reference
                      weight decay lambda:
                        eta_hat_c = eta * ||w_c||^2 / ((1 - eta*lambda) * rho_c^2)
                        rho_c^2  <- (1 - eta*lambda)^2 rho_c^2 + eta^2 ||g_c||^2 ||w_c||^2 / rho_c^2

With momentum mu, weight decay sits inside the momentum buffer of the reference run,
so its radial pull builds up to about eta*lambda/(1 - mu) per step. normswap tracks it
per channel, ``D_c <- mu D_c + lambda rho_c``, uses ``1 - eta D_c / rho_c`` in place of
``1 - eta lambda``, and updates rho from the step actually taken,
``rho'^2 = (1 - eta D/rho)^2 rho^2 ||w'_c||^2 / ||w_c||^2`` (momentum also moves w radially);
both reduce exactly to the formulas above when mu = 0.

The correction multiplies each channel's gradient by ``eta_hat_c / eta`` before the
wrapped SGD step, so the wrapped optimizer, its LR schedule and its state are used
as they are. Exact for plain SGD on exactly scale-invariant weights; with momentum it
is an approximation (measured in the tests and the README).
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.optim import Optimizer

from ..graph.producers import ScaleInvariant, scale_invariant_params
from ..norms.bwn import out_channel_view
from ..norms.penalty import unwrap_model


def channel_sq_norms(t: torch.Tensor, si: ScaleInvariant) -> torch.Tensor:
    """``||t_c||^2`` per output channel, in float64 for the bookkeeping."""
    return out_channel_view(t.detach(), si.transposed, si.groups).double().square().sum(dim=1)


def scale_channels_(t: torch.Tensor, factor: torch.Tensor, si: ScaleInvariant) -> None:
    """Multiply each output channel of ``t`` in place by ``factor[c]``."""
    f = factor.to(t.dtype)
    if not si.transposed:
        t.mul_(f.view((-1,) + (1,) * (t.dim() - 1)))
        return
    cin, cout_g = t.shape[0], t.shape[1]
    g = si.groups
    t.view(g, cin // g, cout_g, -1).mul_(f.view(g, 1, cout_g, 1))


class NormRecorder:
    """Record the per-channel norms of a model's scale-invariant weights, per epoch.

    ``rec = NormRecorder(model); ...; rec.record(epoch)`` at the end of each epoch of a
    run *with* weight decay; ``rec.save("norms.safetensors")``. Each tensor is
    (epochs, channels).
    """

    def __init__(self, model: nn.Module, leaf_modules: Sequence = ()):
        self.model = unwrap_model(model)
        self.params = scale_invariant_params(self.model, leaf_modules)
        self.history: Dict[str, List[torch.Tensor]] = {s.name: [] for s in self.params}

    @torch.no_grad()
    def record(self, epoch: Optional[int] = None) -> None:
        for s in self.params:
            hist = self.history[s.name]
            if epoch is not None and epoch != len(hist):
                raise ValueError(f"NormRecorder.record: expected epoch {len(hist)}, got {epoch}")
            hist.append(channel_sq_norms(s.param, s).sqrt().float().cpu())

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {k: torch.stack(v) for k, v in self.history.items() if v}

    def save(self, path: Union[str, os.PathLike]) -> None:
        from ..io import atomic_save_file
        atomic_save_file(self.tensors(), path, metadata={"normswap": "norm-recorder"})

    @staticmethod
    def load(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
        from safetensors.torch import load_file
        return load_file(str(path))


class LRCorrection(Optimizer):
    """Wrap an SGD optimizer so that scale-invariant weights trained without weight decay
    follow the trajectory (direction) they would follow with weight decay.

        groups = normswap.param_groups(model, lr, weight_decay=5e-4, scale_invariant_weight_decay=0)
        opt = normswap.LRCorrection(torch.optim.SGD(groups, lr=lr, momentum=0.9), model,
                                    weight_decay=5e-4, mode="online")

    ``step``, ``zero_grad``, ``param_groups``, ``state_dict`` / ``load_state_dict`` behave
    as the wrapped optimizer's; the state dict also holds the correction's state.
    """

    def __init__(self, optimizer: Optimizer, model: nn.Module, weight_decay: float, *,
                 mode: str = "online", reference: Optional[Union[str, Dict[str, torch.Tensor]]] = None,
                 leaf_modules: Sequence = ()):
        if not isinstance(optimizer, torch.optim.SGD):
            raise ValueError(f"LRCorrection supports torch.optim.SGD (with or without momentum); got "
                             f"{type(optimizer).__name__}. The correction is derived for SGD's update; "
                             f"for adaptive optimizers keep ordinary weight decay.")
        if mode not in ("online", "reference"):
            raise ValueError(f"mode must be 'online' or 'reference', got {mode!r}")
        if mode == "reference" and reference is None:
            raise ValueError("mode='reference' needs reference= recorded norms (NormRecorder file or dict)")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.optimizer = optimizer
        self.mode = mode
        self.weight_decay = float(weight_decay)
        self.epoch = 0
        model = unwrap_model(model)
        found = {id(s.param): s for s in scale_invariant_params(model, leaf_modules)}
        self._si: List[ScaleInvariant] = []
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) in found:
                    if group.get("weight_decay", 0) != 0:
                        raise ValueError(
                            f"LRCorrection: scale-invariant weight {found[id(p)].name} is in optimizer group "
                            f"{gi} with weight_decay={group['weight_decay']}; the correction replaces weight "
                            f"decay on these weights: build groups with normswap.param_groups(model, lr, wd, "
                            f"scale_invariant_weight_decay=0)")
                    self._si.append(found[id(p)])
        if not self._si:
            raise ValueError("LRCorrection: none of the optimizer's parameters is a scale-invariant weight "
                             "(a conv/linear weight feeding a batch normalizer, or a bounded-weight-norm v)")
        self._ref = None
        if mode == "reference":
            ref = NormRecorder.load(reference) if isinstance(reference, (str, os.PathLike)) else reference
            missing = [s.name for s in self._si if s.name not in ref]
            if missing:
                raise ValueError(f"LRCorrection: the reference norms lack {missing[:5]}; record them with "
                                 f"NormRecorder on the same architecture")
            self._ref = {s.name: ref[s.name].double() for s in self._si}
        if mode == "online" and any(g.get("momentum", 0) for g in optimizer.param_groups):
            warnings.warn("LRCorrection(mode='online') with momentum SGD is an approximation (exact only for "
                          "plain SGD); measured deviations are in the README (scripts/lr_correction_study.py)",
                          stacklevel=2)
        self._rho2: Dict[str, torch.Tensor] = {}
        self._radial: Dict[str, torch.Tensor] = {}
        self.last_factors: Dict[str, torch.Tensor] = {}

    # -- the Optimizer interface, delegated --------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, group) -> None:
        self.optimizer.add_param_group(group)

    def __repr__(self):
        return f"LRCorrection(mode={self.mode}, weight_decay={self.weight_decay}, {len(self._si)} weights,\n{self.optimizer!r})"

    def set_epoch(self, epoch: int) -> None:
        """Reference mode: use the norms recorded for this epoch (the last one past the end)."""
        self.epoch = int(epoch)

    # -- the correction --------------------------------------------------------------
    @torch.no_grad()
    def _correct(self):
        """Scale each channel's gradient; returns what ``_update_shadow`` needs after the step."""
        self.last_factors = {}
        pending = []
        group_of = {id(q): g for g in self.optimizer.param_groups for q in g["params"]}
        for s in self._si:
            p = s.param
            if p.grad is None:
                continue
            group = group_of[id(p)]
            lr, mu = float(group["lr"]), float(group.get("momentum", 0.0))
            w2 = channel_sq_norms(p, s)
            if self.mode == "online":
                rho2 = self._rho2.get(s.name)
                if rho2 is None:
                    rho2 = w2.clone()
                rho = rho2.sqrt()
                # radial momentum of weight decay in the reference run (u units):
                # D <- mu * D + lambda * rho; for plain SGD D = lambda * rho
                radial = mu * self._radial.get(s.name, torch.zeros_like(rho)) + self.weight_decay * rho
                shrink = 1.0 - lr * radial / rho
                factor = w2 / (shrink * rho2)
                pending.append((s, p.detach().clone(), w2, rho2, shrink, radial))
            else:
                ref = self._ref[s.name]
                ref_norm = ref[min(self.epoch, ref.shape[0] - 1)].to(w2.device)
                factor = w2 / ref_norm.square()
            self.last_factors[s.name] = factor
            scale_channels_(p.grad, factor, s)
        return pending

    @torch.no_grad()
    def _update_shadow(self, pending) -> None:
        """rho'^2 = shrink^2 rho^2 ||w'_c||^2 / ||w_c||^2: after its decay, the reference
        weight's norm changes by the same ratio as the step just taken changed ``w_c``'s.

        For plain SGD (``dw = -eta_hat g``, orthogonal to w) this is PAPERS.md's
        rho'^2 = (1 - eta lambda)^2 rho^2 + eta^2 ||g_c||^2 ||w_c||^2 / rho^2.
        """
        for s, before, w2, rho2, shrink, radial in pending:
            w2_after = channel_sq_norms(s.param, s)
            self._rho2[s.name] = shrink * shrink * rho2 * (w2_after / w2)
            self._radial[s.name] = radial

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending = self._correct()
        self.optimizer.step()
        self._update_shadow(pending)
        return loss

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(),
                "correction": {"mode": self.mode, "weight_decay": self.weight_decay, "epoch": self.epoch,
                               "rho2": {k: v.clone() for k, v in self._rho2.items()},
                               "radial": {k: v.clone() for k, v in self._radial.items()}}}

    def load_state_dict(self, state_dict) -> None:
        if "optimizer" not in state_dict or "correction" not in state_dict:
            raise ValueError("LRCorrection.load_state_dict expects the dict LRCorrection.state_dict() "
                             "returned (keys 'optimizer' and 'correction')")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        c = state_dict["correction"]
        if c["mode"] != self.mode:
            raise ValueError(f"state is for mode={c['mode']!r}, this LRCorrection has mode={self.mode!r}")
        self.epoch = int(c["epoch"])
        self._rho2 = {k: v.clone().double() for k, v in c["rho2"].items()}
        self._radial = {k: v.clone().double() for k, v in c.get("radial", {}).items()}
