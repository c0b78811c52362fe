"""Checkpoint files: atomic safetensors writes (more in later issues)."""
from __future__ import annotations

import os
import tempfile
from typing import Dict, Optional, Union

import torch


def atomic_save_file(tensors: Dict[str, torch.Tensor], path: Union[str, os.PathLike],
                     metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a safetensors file atomically: to a temporary file in the same folder,
    fsync'd, then renamed over ``path``. A failure leaves ``path`` as it was."""
    from safetensors.torch import save_file
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
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
