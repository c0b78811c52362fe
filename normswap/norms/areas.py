"""Areas: which values share statistics, as a ``(P, G, Q)`` layout of the input.

An area lays its input out as a ``(P, G, Q)`` view; statistics are taken per ``g``
over the ``P * Q`` values ``x[:, g, :]``. For an input ``(N, C, *S)`` (``L = prod(S)``):

=============  ===========================  ======================================
area           layout (P, G, Q)             values sharing statistics
=============  ===========================  ======================================
batch          (N, C, L)                    one channel over the batch and positions
layer          (1, B, D)                    one example's trailing normalized_shape
channels       (1, N * L, C)                the channels at one position (LayerNorm2d)
group          (1, N * G, C / G * L)        one example's group of C / G channels
instance       (1, N * C, L)                one example's channel over the positions
=============  ===========================  ======================================

The recovery (gamma, beta) is fused into the normalization: on the ``G`` axis where
the channels are that axis (batch; instance with gamma repeated N times), otherwise
in place on a view of the output that exposes the parameters' axis (layer and
channels: ``(1, B, D)``; group: ``(N, G, C / G, L)``), so that only ``v`` is saved for
backward. ``batch_stats`` marks the areas whose statistics
mix examples, the only ones that may keep running statistics (instance norm's
optional ``track_running_stats`` follows torch: running statistics are the batch
average of the per-example ones).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, FrozenSet, Optional, Tuple

import torch
import torch.nn.functional as F

from .base import check_channels, check_int


@dataclass(frozen=True)
class Area:
    """Base of the areas. ``num_channels``: the size of the channel dim (dim 1)."""

    kind: ClassVar[str] = ""
    batch_stats: ClassVar[bool] = False   # statistics mix the examples of a batch
    fused: ClassVar[bool] = False         # per-channel recovery runs on the G axis
    # the statistics that run the CPU kernels as an operator under torch.compile
    # (normswap/norms/rows.py) rather than inductor's code from the PyTorch formulation
    compiled_kernel_stats: ClassVar[FrozenSet[str]] = frozenset({"l2", "l1", "topk"})

    def validate(self, layer) -> None:
        """Raise a ValueError naming ``layer`` for a bad configuration."""

    def check(self, layer, x: torch.Tensor) -> None:
        """Raise a ValueError naming ``layer`` and the expected shape."""

    def param_shape(self) -> Tuple[int, ...]:
        """Shape of gamma and beta."""
        return (self.num_channels,)

    def to_pgq(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pgq_source(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``x`` where :meth:`to_pgq` is ``x.reshape(...)`` (a view of it, or a copy), else
        None: what the kernels' operator is given under torch.compile (see
        :func:`~normswap.norms.functional.stat_norm`)."""
        return x

    def from_pgq(self, y3: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y3.view(x.shape)

    def values_per_group(self, x: torch.Tensor) -> int:
        """``P * Q``: how many values share one statistic (from the shape only)."""
        raise NotImplementedError

    def group_params(self, x, weight, bias):
        """gamma, beta laid out on the G axis (fused areas only)."""
        return weight, bias

    def post_params(self, x, weight, bias):
        """(gamma, beta, view shape): gamma and beta shaped to broadcast against
        ``y3.view(view shape)`` (areas whose recovery is not on the G axis)."""
        raise NotImplementedError

    def bshape(self, x: torch.Tensor) -> Tuple[int, ...]:
        """Broadcast shape of a per-channel vector against ``x``."""
        return (1, -1) + (1,) * (x.dim() - 2)

    def per_channel(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A per-group statistic as the per-channel value a running statistic tracks."""
        return t

    def native_l2(self, x, weight, bias, eps: float, running_mean, running_var, momentum: float):
        """PyTorch's own kernel for the L2 operation on this area (None: there is none)."""
        return None

    def native_takes_mixed(self, device: torch.device) -> bool:
        """Whether ``native_l2``'s kernel on ``device`` takes float16 / bfloat16 input with
        float32 parameters and statistics itself (else it is given a float32 copy of such
        input, which it then keeps for backward). ATen's CPU kernels of every area do;
        on CUDA layer and group norm want one dtype (autocast gives them float32)."""
        return device.type == "cpu"


@dataclass(frozen=True)
class BatchArea(Area):
    """Per channel over the batch and every position: ``(N, C, L)``.

    ``channel_dim``: where the channels are (1 for ``(N, C, *)``; -1 for the tokens
    ``(N, L, C)`` of a transformer). The accepted input ranks are the layer's ``_dims``.
    """
    num_channels: int
    channel_dim: int = 1

    kind: ClassVar[str] = "batch"
    batch_stats: ClassVar[bool] = True
    fused: ClassVar[bool] = True
    # inductor fuses the L2 and L1 statistics and the output with the activation around
    # them; an opaque operator costs those passes back (compiled resnet18 step, one
    # thread: l1bn 0.99x with inductor's code, 1.13x with the operator). Top-k goes to
    # aten.topk there, on a transposed copy of |x - mu|: the operator costs less.
    compiled_kernel_stats: ClassVar[FrozenSet[str]] = frozenset({"topk"})

    def validate(self, layer):
        check_int(layer, "num_features", self.num_channels)
        if isinstance(self.channel_dim, bool) or not isinstance(self.channel_dim, int):
            raise ValueError(f"{type(layer).__name__}: channel_dim must be an int, got {self.channel_dim!r}")

    def check(self, layer, x):
        if self.channel_dim != 1:
            check_channels(layer, x, tuple(range(2, 9)), self.num_channels, self.channel_dim,
                           what=f"with channels in dim {self.channel_dim}")
        else:
            check_channels(layer, x, layer._dims or tuple(range(2, 9)), self.num_channels)

    def _moved(self, x):
        return x if self.channel_dim == 1 else x.movedim(self.channel_dim, 1)

    def to_pgq(self, x):
        x = self._moved(x)
        return x.reshape(x.shape[0], x.shape[1], -1)

    def pgq_source(self, x):
        return x if self.channel_dim == 1 else None

    def from_pgq(self, y3, x):
        if self.channel_dim == 1:
            return y3.view(x.shape)
        return y3.view(self._moved(x).shape).movedim(1, self.channel_dim)

    def values_per_group(self, x):
        return x.numel() // max(x.shape[self.channel_dim], 1)

    def bshape(self, x):
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return tuple(shape)

    def native_l2(self, x, weight, bias, eps, running_mean, running_var, momentum):
        y = F.batch_norm(self._moved(x), running_mean, running_var, weight, bias, True, momentum, eps)
        return y if self.channel_dim == 1 else y.movedim(1, self.channel_dim)

    def native_takes_mixed(self, device):
        return True   # cuDNN's and ATen's batch norm: what nn.BatchNorm2d runs under autocast


@dataclass(frozen=True)
class InstanceArea(Area):
    """Per (example, channel) over the positions: ``(1, N * C, L)``."""
    num_channels: int

    kind: ClassVar[str] = "instance"
    batch_stats: ClassVar[bool] = True   # only through the optional running statistics
    fused: ClassVar[bool] = True

    def validate(self, layer):
        check_int(layer, "num_features", self.num_channels)

    def check(self, layer, x):
        check_channels(layer, x, layer._dims or tuple(range(3, 9)), self.num_channels)

    def to_pgq(self, x):
        return x.reshape(1, x.shape[0] * x.shape[1], -1)

    def values_per_group(self, x):
        return x[0, 0].numel()

    def group_params(self, x, weight, bias):
        n = x.shape[0]
        return (weight.repeat(n) if weight is not None else None,
                bias.repeat(n) if bias is not None else None)

    def per_channel(self, t, x):
        return t.view(x.shape[0], x.shape[1]).mean(0)

    def native_l2(self, x, weight, bias, eps, running_mean, running_var, momentum):
        return F.instance_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)


@dataclass(frozen=True)
class LayerArea(Area):
    """Per example over the trailing ``normalized_shape``: ``(1, B, D)`` (nn.LayerNorm).
    Gamma and beta are per element of ``normalized_shape``."""
    normalized_shape: Tuple[int, ...]

    kind: ClassVar[str] = "layer"

    def validate(self, layer):
        if not self.normalized_shape:
            raise ValueError(f"{type(layer).__name__}: normalized_shape must not be empty")
        for s in self.normalized_shape:
            check_int(layer, "normalized_shape (each size)", s)

    def check(self, layer, x):
        nd = len(self.normalized_shape)
        if x.dim() < nd or tuple(x.shape[-nd:]) != self.normalized_shape:
            raise ValueError(f"{type(layer).__name__}: expected an input whose last {nd} dims are "
                             f"{self.normalized_shape}, got shape {tuple(x.shape)}")

    def param_shape(self):
        return self.normalized_shape

    def _size(self):
        d = 1
        for s in self.normalized_shape:
            d *= s
        return d

    def to_pgq(self, x):
        return x.reshape(1, -1, self._size())

    def post_params(self, x, weight, bias):
        d = self._size()
        return (weight.reshape(1, 1, d) if weight is not None else None,
                bias.reshape(1, 1, d) if bias is not None else None, (1, x.numel() // d, d))

    def values_per_group(self, x):
        return self._size()

    def native_l2(self, x, weight, bias, eps, running_mean, running_var, momentum):
        return F.layer_norm(x, self.normalized_shape, weight, bias, eps)


@dataclass(frozen=True)
class ChannelsArea(Area):
    """Per (example, position) over the channels of ``(N, C, *S)``: ``(1, N * L, C)``
    (timm's LayerNorm2d on NCHW)."""
    num_channels: int

    kind: ClassVar[str] = "channels"

    def validate(self, layer):
        check_int(layer, "num_channels", self.num_channels)

    def check(self, layer, x):
        check_channels(layer, x, layer._dims or tuple(range(3, 9)), self.num_channels,
                       what="(N, C, H, W)" if layer._dims == (4,) else "(N, C, ...)")

    def to_pgq(self, x):
        return x.movedim(1, -1).reshape(1, -1, x.shape[1])

    def pgq_source(self, x):
        return None

    def post_params(self, x, weight, bias):
        c = x.shape[1]
        return (weight.view(1, 1, c) if weight is not None else None,
                bias.view(1, 1, c) if bias is not None else None, (1, x.numel() // c, c))

    def from_pgq(self, y3, x):
        return y3.view(x.movedim(1, -1).shape).movedim(-1, 1)

    def values_per_group(self, x):
        return x.shape[1]

    def native_l2(self, x, weight, bias, eps, running_mean, running_var, momentum):
        return F.layer_norm(x.movedim(1, -1), (self.num_channels,), weight, bias, eps).movedim(-1, 1)


@dataclass(frozen=True)
class GroupArea(Area):
    """Per (example, group of ``num_channels / num_groups`` channels) over those channels
    and every position: ``(1, N * G, C / G * L)`` (nn.GroupNorm)."""
    num_groups: int
    num_channels: int

    kind: ClassVar[str] = "group"

    def validate(self, layer):
        check_int(layer, "num_groups", self.num_groups)
        check_int(layer, "num_channels", self.num_channels)
        if self.num_channels % self.num_groups:
            raise ValueError(f"{type(layer).__name__}: num_groups must divide num_channels, got "
                             f"num_groups={self.num_groups}, num_channels={self.num_channels}")

    def check(self, layer, x):
        check_channels(layer, x, layer._dims or tuple(range(2, 9)), self.num_channels)

    def to_pgq(self, x):
        return x.reshape(1, x.shape[0] * self.num_groups, -1)

    def post_params(self, x, weight, bias):
        g, cg = self.num_groups, self.num_channels // self.num_groups
        shape = (1, g, cg, 1)
        return (weight.view(shape) if weight is not None else None,
                bias.view(shape) if bias is not None else None, (x.shape[0], g, cg, x[0, 0].numel()))

    def values_per_group(self, x):
        return x[0].numel() // self.num_groups

    def native_l2(self, x, weight, bias, eps, running_mean, running_var, momentum):
        return F.group_norm(x, self.num_groups, weight, bias, eps)


AREAS = {a.kind: a for a in (BatchArea, InstanceArea, LayerArea, ChannelsArea, GroupArea)}
