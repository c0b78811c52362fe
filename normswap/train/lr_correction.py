"""Weight-decay-equivalent learning-rate correction (Hoffer et al. 2018; Li & Arora 2019).

A weight ``w`` whose output channels are each normalized is scale invariant:
``grad(c w) = grad(w) / c``, so weight decay acts only through ``||w_c||``, which sets the
effective step ``eta/||w_c||^2``. Training *without* weight decay and correcting each
channel's step reproduces training *with* it.

**online** (exact for SGD with or without momentum, dampening or a changing LR). Let the
run with weight decay lambda be ``b <- mu b + kappa (g + lambda w)``, ``w <- w - eta b``
(PyTorch's SGD; ``kappa = 1 - dampening``, 1 on the first step). Its weights stay an exact
scalar multiple of the run without weight decay, ``w_t = C_t w~_t``, and its momentum buffer
is ``b_t = P_t b~_t + Q_t w~_t`` (``P_t = C_{t-1}``; a radial part ``Q`` that the run without
weight decay lacks). Substituting into SGD's update gives, with ``C_0 = 1``, ``Q_0 = 0``, per step::

    Q_{t+1} = mu Q_t + kappa lambda C_t          (weight decay gathered in the momentum)
    C_{t+1} = C_t - eta_t Q_{t+1}                (the shrink it causes)
    gradient  *= 1 / (C_t C_{t+1})               (the learning-rate correction)
    momentum buffer *= P_t / C_{t+1}              (before the step; P_t = C_{t-1})

The last line is needed: the run with weight decay behaves as if its momentum were
``mu C_{t-1}/C_{t+1}`` (about ``mu (1 + 2 eta lambda/(1 - mu))``), and no learning rate,
per channel or not, can reproduce a different momentum; rescaling the wrapped optimizer's
buffer does, exactly. For plain SGD the gradient factor is PAPERS.md's
``eta_hat = eta ||w||^2 / ((1 - eta lambda) rho^2)`` with ``rho = C ||w~||``. ``C`` is the
same for every channel (it depends on eta, lambda, mu only): the correction is an
exponentially growing learning rate, and the weights without weight decay grow like
``1/C``. When ``C`` falls below ``renormalize`` (2**-16) the weights and their buffers are
multiplied by ``C`` rounded to a power of two, and ``C`` divided by it: the network
function is unchanged (scale invariance) and the bookkeeping stays exact.

With **Nesterov** momentum (PyTorch's form ``w <- w - eta (d + mu b)``) weight decay enters
both the buffer and the direct term, and one more correction makes it exact: with
``C_{t+1} = C_t (1 - eta lambda) - eta mu Q_{t+1}`` and ``P_{t+1} = C_{t+1} + eta mu Q_{t+1}``
(``P_{t+1} = C_t`` above), the buffer is scaled by ``P_t / C_{t+1}`` before the step and
``eta Q_{t+1} / P_{t+1}`` times the corrected gradient is added to it after the step.

**reference**: ``gradient *= ||w~_c||^2 / ||w_c^WD||^2`` with ``||w_c^WD||`` recorded per
epoch (or per any period: ``record`` / ``set_epoch`` take an index) from a run with weight
decay (:class:`NormRecorder`); with momentum the buffer gets the same factor
``P_t/C_{t+1}`` as online mode (it does not depend on the data). With ``steps_per_epoch``
the recorded norms are interpolated geometrically within an epoch (from the initial norms
in epoch 0). An approximation: exact only as far as the recorded norms are fine-grained.

The correction multiplies each channel's gradient before the wrapped SGD step, so the
wrapped optimizer, its LR schedule and its state are used as they are.
Exact on exactly scale-invariant weights; a normalizer's ``eps`` breaks that slightly.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

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
                 leaf_modules: Sequence = (), renormalize: float = 2.0 ** -16,
                 steps_per_epoch: Optional[int] = None):
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
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be a positive int or None, got {steps_per_epoch!r}")
        if not 0.0 <= renormalize < 1.0:
            raise ValueError(f"renormalize must be in [0, 1) (0 never renormalizes), got {renormalize}")
        self.optimizer = optimizer
        self.mode = mode
        self.weight_decay = float(weight_decay)
        self.renormalize = float(renormalize)
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0
        self._epoch_step = 0  # steps taken since set_epoch (reference interpolation)
        self._initial: Dict[str, torch.Tensor] = {}
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
                    if group.get("maximize", False):
                        raise ValueError(f"LRCorrection: optimizer group {gi} has maximize=True; the "
                                         f"correction is derived for minimization")
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
        # per weight: (P_t, C_t, Q_t) of the docstring's recurrence, float64 scalars
        self._scale: Dict[str, List[float]] = {}
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
        if int(epoch) != self.epoch:
            self._epoch_step = 0
        self.epoch = int(epoch)

    # -- the correction --------------------------------------------------------------
    def _advance(self, name: str, group) -> Tuple[float, float, float]:
        """One step of the (P, C, Q) recurrence of the module docstring.

        Returns (gradient factor, buffer factor before the step, multiple of the corrected
        gradient added to the buffer after the step)."""
        lr, mu = float(group["lr"]), float(group.get("momentum", 0.0))
        p, c, q = self._scale.get(name, (1.0, 1.0, 0.0))
        first = name not in self._scale
        kappa = 1.0 if first else 1.0 - float(group.get("dampening", 0.0))
        q_next = mu * q + kappa * self.weight_decay * c
        if group.get("nesterov", False):
            c_next = c * (1.0 - lr * self.weight_decay) - lr * mu * q_next
            p_next = c_next + lr * mu * q_next
            add = lr * q_next / p_next
        else:
            c_next = c - lr * q_next
            p_next = c_next + lr * q_next
            add = 0.0
        if c_next <= 0 or lr * self.weight_decay > (1.0 - math.sqrt(mu)) ** 2:
            # C_t solves C_{t+1} = (1 + mu - eta lambda) C_t - mu C_{t-1}: it decays without
            # oscillating only if eta lambda <= (1 - sqrt(mu))^2; past that it crosses zero,
            # where the run without weight decay would need infinite weights
            raise ValueError(f"LRCorrection: lr * weight_decay too large for the correction (lr={lr}, "
                             f"weight_decay={self.weight_decay}, momentum={mu}): it needs lr * weight_decay "
                             f"<= (1 - sqrt(momentum))^2 = {(1.0 - math.sqrt(mu)) ** 2:.4g}, where the weight "
                             f"decay's shrink factor C_t decays without crossing zero")
        self._scale[name] = [p_next, c_next, q_next]
        return 1.0 / (c * c_next), p / c_next, add

    @torch.no_grad()
    def _correct(self) -> List[Tuple[torch.Tensor, float]]:
        """Scale each channel's gradient and momentum buffer before the wrapped step; returns
        the (weight, multiple) whose corrected gradient is added to the buffer after it."""
        self.last_factors = {}
        pending = []
        group_of = {id(q): g for g in self.optimizer.param_groups for q in g["params"]}
        for s in self._si:
            p = s.param
            if p.grad is None:  # SGD skips it; so does the run with weight decay
                continue
            group = group_of[id(p)]
            grad_factor, buf_factor, add = self._advance(s.name, group)
            if self.mode == "online":
                factor = torch.full((channel_sq_norms(p, s).shape[0],), grad_factor, dtype=torch.float64,
                                    device=p.device)
            else:
                w2 = channel_sq_norms(p, s)
                factor = w2 / self._reference_sq_norm(s.name, w2)
            self.last_factors[s.name] = factor
            scale_channels_(p.grad, factor, s)
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None and buf_factor != 1.0:
                buf.mul_(buf_factor)
            if add:
                pending.append((p, add))
        return pending

    def _reference_sq_norm(self, name: str, w2: torch.Tensor) -> torch.Tensor:
        """Recorded ``||w_c^WD||^2`` for this step: the record of the current epoch, or with
        ``steps_per_epoch`` the geometric interpolation from the previous record (the
        initial norms for epoch 0) to it."""
        ref = self._ref[name].to(w2.device)
        e = min(self.epoch, ref.shape[0] - 1)
        end = ref[e].square()
        if self.steps_per_epoch is None or self.epoch >= ref.shape[0]:
            return end
        start = ref[e - 1].square() if e > 0 else self._initial.setdefault(name, w2.clone())
        t = min(self._epoch_step / self.steps_per_epoch, 1.0)
        return start ** (1.0 - t) * end ** t

    @torch.no_grad()
    def _renormalize(self) -> None:
        """Multiply weights and buffers by a power of two once C is small (function unchanged)."""
        if self.renormalize <= 0:
            return
        for s in self._si:
            st = self._scale.get(s.name)
            if st is None or st[1] >= self.renormalize:
                continue
            k = 2.0 ** round(math.log2(st[1]))
            if self.mode == "online":  # reference mode uses C only through ratios
                s.param.mul_(k)
                buf = self.optimizer.state.get(s.param, {}).get("momentum_buffer")
                if buf is not None:
                    buf.mul_(k)
            self._scale[s.name] = [st[0] / k, st[1] / k, st[2] / k]

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending = self._correct()
        self.optimizer.step()
        with torch.no_grad():
            for p, add in pending:  # Nesterov only
                self.optimizer.state[p]["momentum_buffer"].add_(p.grad, alpha=add)
        self._renormalize()
        self._epoch_step += 1
        return loss

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(),
                "correction": {"mode": self.mode, "weight_decay": self.weight_decay, "epoch": self.epoch,
                               "epoch_step": self._epoch_step,
                               "initial": {k: v.clone() for k, v in self._initial.items()},
                               "scale": {k: list(v) for k, v in self._scale.items()}}}

    def load_state_dict(self, state_dict) -> None:
        if "optimizer" not in state_dict or "correction" not in state_dict:
            raise ValueError("LRCorrection.load_state_dict expects the dict LRCorrection.state_dict() "
                             "returned (keys 'optimizer' and 'correction')")
        c = state_dict["correction"]
        if c["mode"] != self.mode:
            raise ValueError(f"state is for mode={c['mode']!r}, this LRCorrection has mode={self.mode!r}")
        if "scale" not in c:
            raise ValueError("LRCorrection.load_state_dict: this state was saved by an older normswap "
                             "(per-channel shadow norms); the exact correction cannot resume from it")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.epoch = int(c["epoch"])
        self._scale = {k: [float(x) for x in v] for k, v in c["scale"].items()}
        self._epoch_step = int(c.get("epoch_step", 0))
        self._initial = {k: v.clone().double() for k, v in c.get("initial", {}).items()}
