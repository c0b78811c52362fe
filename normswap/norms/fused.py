"""The eager training forward of a normalizer as one compiled region (opt-in:
``NORMSWAP_FUSED=1``).

Written in PyTorch operations, a normalizer such as ``L1BatchNorm2d`` is about 30 small
kernels forward and backward (``scripts/count_ops.py``: means, ``|v|`` sums, the output,
the running statistics, the backward's sums and coefficients), where ``nn.BatchNorm2d`` is
one cuDNN kernel each way. On a GPU every one of them costs a launch, and the layer runs
at the launch rate, not at the memory bandwidth (measured on an H200: 4.4x the native
layer eager, with 53 operations then). On CPU the C kernels of :mod:`normswap.kernels` do
the work in one pass per row. This module runs a layer's training forward through
``torch.compile`` instead: inductor fuses the operations into a few kernels, forward and
backward, the running-statistic update included, the same code a compiled model gets
(compiled on the H200: 1.14x the compiled native layer).

- One compiled function for every normalizer (:func:`fused_call`), with dynamic shapes,
  so that layers of one configuration share their graphs whatever their sizes.
- Never under an enclosing ``torch.compile`` (that compiles the layer anyway), nor for
  statistics synchronized over processes.
- Off by default: its first calls compile (12 to 16 s per layer configuration on the
  project's CPU with an empty inductor cache; on the H200 51 s for the first layer, 3-7 s
  for further configurations), and it saves little, as its backward stays op by op (H200:
  ``L1BatchNorm2d`` 3.73x / 3.83x the native layer op by op, 3.94x / 3.15x fused; a resnet50
  ``l1bn`` step 3.29x against 3.02x). Layers that are PyTorch's own kernel (a fixed
  sigma) keep it. ``NORMSWAP_FUSED=1`` turns it on for CUDA tensors, ``=cpu`` for CPU
  tensors as well; :func:`enabled` and :func:`disabled` do the same for a block of code
  (the tests use ``enabled("cpu")``).
- As with any compiled function, a double backward (``create_graph=True``) is not
  supported through it, and ``retain_graph=True`` needs
  ``torch._functorch.config.donated_buffer = False`` set before the first call (a
  ``config.patch`` around the call does not reach the backward, compiled later).
- If compiling fails (a platform torch.compile does not support), normswap warns once
  and runs the layers op by op from then on.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable

import torch

_ENV_VALUES = {"": set(), "0": set(), "off": set(), "1": {"cuda"}, "on": {"cuda"}, "cuda": {"cuda"},
               "cpu": {"cuda", "cpu"}}


def _devices_from_env() -> set:
    value = os.environ.get("NORMSWAP_FUSED", "").strip().lower()
    if value not in _ENV_VALUES:
        warnings.warn(f"normswap: NORMSWAP_FUSED={value!r} is not understood; expected one of "
                      f"{sorted(v for v in _ENV_VALUES if v)} (1: CUDA tensors, cpu: CPU ones too); "
                      f"the fused forward stays off", RuntimeWarning)
        return set()
    return set(_ENV_VALUES[value])


_state = {"devices": _devices_from_env(), "off": False, "failed": False, "compiled": None}
_RECOMPILE_LIMIT = 64   # configurations x dynamic graphs one model can need


def wanted(x: torch.Tensor) -> bool:
    """Whether a training forward on ``x`` should run compiled."""
    return (x.device.type in _state["devices"] and not _state["off"] and not _state["failed"]
            and not torch.compiler.is_compiling())


@contextlib.contextmanager
def enabled(*device_types: str):
    """Run training forwards on tensors of these device types (default: "cuda") compiled
    inside this block, whatever ``NORMSWAP_FUSED`` says."""
    before = (_state["devices"], _state["off"])
    _state["devices"], _state["off"] = set(device_types or ("cuda",)), False
    try:
        yield
    finally:
        _state["devices"], _state["off"] = before


@contextlib.contextmanager
def disabled():
    """Run normalizers op by op inside this block (e.g. to compare or to debug)."""
    before = _state["off"]
    _state["off"] = True
    try:
        yield
    finally:
        _state["off"] = before


def _call(fn: Callable, *args):
    return fn(*args)


def fused_call(fn: Callable, *args):
    """``fn(*args)`` through the shared compiled function (see the module doc).

    ``fn`` is a bound method of a normalizer that does all of its training forward:
    parameters, buffers and the recorded penalty are read and written through it."""
    if _state["compiled"] is None:
        _state["compiled"] = torch.compile(_call, dynamic=True)
    cfg = torch._dynamo.config
    limits = {k: max(getattr(cfg, k), _RECOMPILE_LIMIT)
              for k in ("recompile_limit", "cache_size_limit") if hasattr(cfg, k)}
    if hasattr(cfg, "force_parameter_static_shapes"):   # one graph for every width, too
        limits["force_parameter_static_shapes"] = False
    try:
        with torch._dynamo.config.patch(**limits):
            return _state["compiled"](fn, *args)
    except (ValueError, TypeError, RuntimeError) as e:
        if type(e).__module__.startswith("torch._dynamo") or type(e).__module__.startswith("torch._inductor"):
            return _give_up(e, fn, *args)
        raise
    except Exception as e:  # backend failures (no compiler, unsupported platform)
        return _give_up(e, fn, *args)


def _give_up(err: Exception, fn: Callable, *args):
    """Run ``fn`` op by op; only if that succeeds was the error the compiler's (then the
    fused path is off from now on, with a warning). An error of the layer itself (a wrong
    input, raised again op by op) propagates and leaves the fused path on."""
    out = fn(*args)
    _state["failed"] = True
    warnings.warn(f"normswap: compiling the normalizers' training forward failed "
                  f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); running them op by op "
                  f"(slower on GPU). Set NORMSWAP_FUSED=0 to skip the attempt.", RuntimeWarning, stacklevel=3)
    return out
