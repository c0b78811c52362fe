"""Compiled CPU kernels: the standardizing normalizers in one pass each way per group.

Every area lays its input out as ``(P, G, Q)`` (normswap/norms/areas.py); the values of
one group ``g`` share statistics. PyTorch has fused kernels for the L2 case of some areas
(``batch_norm``, ``layer_norm``, ``group_norm``); the L1 and top-k operations written
with PyTorch operations take about eight passes over the data each step. ``rows.c`` does
a group's statistics, output and gradient while its values are in cache, with the same
formulas as :class:`normswap.norms.functional.StatNormFn` (see its docstring), and finds
a group's k largest ``|v|`` by a bound and a count instead of ``torch.topk``.
``newton.h`` (included by it) runs IterNorm's Newton iteration and its backward for a
batch of small covariance matrices in one call (in PyTorch, dozens of small products per
layer and step); ``whiten.h`` IterNorm's whole training step for groups of 16 channels
(covariances, the iteration and the whitening product per group, one call each way);
``divisive.h`` the divisive normalization of rows (DivisiveNorm1d), a vector's worth of
rows side by side, whose sliding windows are sums of a block's suffix and the next block's
prefix (no cancellation); ``bwn.h`` bounded weight norm with p = 2, a weight's output channel
at a time (read once each way). On CUDA,
``triton_newton.py`` runs the Newton iteration and its backward as one Triton kernel each
way (float32), where PyTorch operations are about 130 launches of 16 x 16 products.

The C file is compiled on first use with the system C compiler (``$CC``, else ``cc``;
about a second) into a cache directory (``$NORMSWAP_CACHE_DIR``, else
``$XDG_CACHE_HOME/normswap`` or ``~/.cache/normswap``), keyed by the source, the flags,
the compiler and the processor, and loaded with ctypes (``$NORMSWAP_CFLAGS``: more
compiler flags, e.g. ``-mno-avx512f`` to build the portable paths on a processor that has
AVX-512). It is used in eager mode on
CPU for float32 / float64 inputs; under ``torch.compile`` inductor generates its own
kernels from the PyTorch formulation. Without a compiler, or with
``NORMSWAP_KERNELS=0`` in the environment, everything runs the PyTorch formulation
(same results within rounding)::

    >>> import normswap.kernels as kernels
    >>> with kernels.disabled():          # the PyTorch formulation, e.g. to compare
    ...     pass
    >>> isinstance(kernels.available(), bool)
    True
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = ["available", "ready", "disabled", "switched_off", "library", "call", "SUFFIX", "cache_dir"]

_SOURCE = Path(__file__).with_name("rows.c")
_HEADERS = tuple(sorted(_SOURCE.parent.glob("*.h")))   # every header rows.c includes: part of the cache key
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-std=c99")
_OPENMP = ("-fopenmp",)


def _flags() -> tuple:
    """The compiler flags: ``_FLAGS`` and those of ``$NORMSWAP_CFLAGS``."""
    return _FLAGS + tuple(shlex.split(os.environ.get("NORMSWAP_CFLAGS", "")))

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False
_off = 0   # depth of `disabled()` blocks
_ENV_OFF = os.environ.get("NORMSWAP_KERNELS", "1") == "0"


def cache_dir() -> Path:
    """Where the compiled library is kept."""
    if os.environ.get("NORMSWAP_CACHE_DIR"):
        return Path(os.environ["NORMSWAP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normswap"


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc")


def _processor() -> str:
    """What -march=native depends on: the machine and its instruction-set flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return platform.machine() + flags


def _build(cc: str) -> Path:
    source = b"".join(p.read_bytes() for p in (_SOURCE, *_HEADERS))
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join(x.encode() if isinstance(x, str) else x for x in
                                    (source, " ".join(_flags() + _OPENMP), version, _processor()))).hexdigest()[:16]
    target = cache_dir() / f"rows-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for extra in (_OPENMP, ()):   # without OpenMP (one thread) if the compiler has none
            done = subprocess.run([cc, *_flags(), *extra, str(_SOURCE), "-o", tmp, "-lm"],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(done.stderr.strip()[-2000:])
        os.replace(tmp, target)   # atomic: another process never sees a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    P, I64, I32, D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for suf in ("f32", "f64"):
        fwd = getattr(lib, f"ns_forward_{suf}")
        fwd.argtypes = [P, I64, I64, I64, I32, I64, D, D, D, P, P, I64, I64, I32, P, P, P, P, P, P, I32]
        fwd.restype = I32
        bwd = getattr(lib, f"ns_backward_{suf}")
        bwd.argtypes = [P, P, I64, I64, I64, I32, I64, D, P, P, P, I64, I64, P, P, P, P, P, P, I32]
        bwd.restype = I32
        cfwd = getattr(lib, f"ns_cols_forward_{suf}")
        cfwd.argtypes = [P, I64, I64, I32, I64, D, D, D, P, P, I32, P, P, P, P, P, P, I32]
        cfwd.restype = I32
        cbwd = getattr(lib, f"ns_cols_backward_{suf}")
        cbwd.argtypes = [P, P, I64, I64, I32, I64, D, P, P, P, P, P, P, P, P, P, I32]
        cbwd.restype = I32
        nfwd = getattr(lib, f"ns_newton_forward_{suf}")
        nfwd.argtypes = [P, I64, I64, I32, P, I32]
        nfwd.restype = I32
        nbwd = getattr(lib, f"ns_newton_backward_{suf}")
        nbwd.argtypes = [P, P, I64, I64, I32, P, I32]
        nbwd.restype = I32
        dn = getattr(lib, f"ns_dn_rows_{suf}")
        dn.argtypes = [P, P, I64, I64, I64, I64, D, D, P, P, I32]
        dn.restype = I32
        wfwd = getattr(lib, f"ns_whiten_forward_{suf}")
        wfwd.argtypes = [P, I64, I64, I64, I32, I32, D, P, P, P, P, P, P, P, I32]
        wfwd.restype = I32
        wbwd = getattr(lib, f"ns_whiten_backward_{suf}")
        wbwd.argtypes = [P, P, I64, I64, I64, I32, I32, P, P, P, P, P, P, P, P, I32]
        wbwd.restype = I32
        bfwd = getattr(lib, f"ns_bwn_forward_{suf}")
        bfwd.argtypes = [P, I64, I64, P, I32, D, P, P, P, I32]
        bfwd.restype = I32
        bbwd = getattr(lib, f"ns_bwn_backward_{suf}")
        bbwd.argtypes = [P, P, I64, I64, P, P, P, P, I32]
        bbwd.restype = I32


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels (compiled on the first call), or None where they cannot be
    built or are switched off."""
    global _lib, _tried
    if _off or _ENV_OFF:
        return None
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                cc = _compiler()
                if cc is None:
                    raise RuntimeError("no C compiler found (set $CC)")
                lib = ctypes.CDLL(str(_build(cc)))
                _declare(lib)
                _lib = lib
            except Exception as err:  # noqa: BLE001 - any failure means: use the PyTorch path
                warnings.warn(f"normswap: the compiled CPU kernels are unavailable ({err}); "
                              f"using the PyTorch formulation (slower, same results)", RuntimeWarning)
            _tried = True
    return _lib


def switched_off() -> bool:
    """Whether ``NORMSWAP_KERNELS=0`` or a :func:`disabled` block turns every normswap
    kernel off (the GPU ones of ``triton_newton.py`` too)."""
    return bool(_off or _ENV_OFF)


SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
"""The dtypes the kernels take, and the suffix of their entry points for each."""


def call(name: str, dtype: torch.dtype, *args) -> None:
    """Run the entry point ``ns_<name>_f32`` / ``ns_<name>_f64`` (by ``dtype``) with ``args``
    (ints, floats, pointers). Every entry point returns nonzero when its scratch buffers
    could not be allocated: then a MemoryError names it. The kernels must be loaded
    (:func:`library` not None)."""
    entry = f"ns_{name}_{SUFFIX[dtype]}"
    if getattr(library(), entry)(*args):
        raise MemoryError(f"normswap kernel {entry}: out of memory for its scratch buffers")


def ready() -> bool:
    """Whether the kernels are loaded and switched on, without building them (what
    torch.compile can ask while tracing)."""
    return _lib is not None and not _off and not _ENV_OFF


def available() -> bool:
    """Whether the compiled kernels are in use (compiles them on the first call)."""
    return library() is not None


@contextlib.contextmanager
def disabled():
    """Run the PyTorch formulation inside the block (for comparisons and benchmarks)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1
