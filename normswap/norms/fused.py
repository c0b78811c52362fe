"""The eager training forward of a normalizer as one compiled region, on devices where
normswap has no kernels of its own (CUDA).

Written in PyTorch operations, a normalizer such as ``L1BatchNorm2d`` is 10 to 20 small
kernels forward and backward (means, ``|v|`` sums, the output, the running statistics,
the backward's sums), where ``nn.BatchNorm2d`` is one cuDNN kernel each way. On a GPU
every one of them costs a launch, and the layer runs at the launch rate, not at the
memory bandwidth (measured on an H200: 4x the native layer). On CPU the C kernels of
:mod:`normswap.kernels` do the work in one pass per row; on CUDA this module runs the
layer's training forward through ``torch.compile`` instead: inductor fuses the
operations into a few Triton kernels, forward and backward, the running-statistic
update included, the same code a compiled model gets.

- One compiled function for every normalizer (:func:`fused_call`), with dynamic shapes,
  so that layers of one configuration share their graphs whatever their sizes: the
  first training steps compile a few graphs (seconds each), later steps reuse them.
- Only where it helps and is safe: not under an enclosing ``torch.compile`` (that
  compiles the layer anyway), not on CPU (the C kernels are faster there), not for
  statistics synchronized over processes.
- ``NORMSWAP_FUSED=0`` turns it off (``=1``: on CPU too, which the tests use to run the
  CUDA code path on a machine without a GPU); :func:`disabled` for a block of code. If
  compiling fails (a platform torch.compile does not support), normswap warns once and
  runs the layers op by op from then on.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable

import torch

_ENV = os.environ.get("NORMSWAP_FUSED", "").strip().lower()
_DEVICES = {"cuda"} | ({"cpu"} if _ENV in ("1", "true", "yes", "on", "cpu") else set())
_state = {"off": _ENV in ("0", "false", "no", "off"), "failed": False, "compiled": None}
_RECOMPILE_LIMIT = 64   # configurations x dynamic graphs one model can need


def wanted(x: torch.Tensor) -> bool:
    """Whether a training forward on ``x`` should run compiled."""
    return (x.device.type in _DEVICES and not _state["off"] and not _state["failed"]
            and not torch.compiler.is_compiling())


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
    _state["failed"] = True
    warnings.warn(f"normswap: compiling the normalizers' training forward failed "
                  f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); running them op by op "
                  f"(slower on GPU). Set NORMSWAP_FUSED=0 to skip the attempt.", RuntimeWarning, stacklevel=3)
    return fn(*args)
