"""Data for the study: Fashion-MNIST (idx files), scikit-learn's digits, and a character
corpus from Python's standard library (``pydoc_data/topics.py``, the text of ``help()``)."""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
APT_HINT = ("Fashion-MNIST not found. On Debian/Ubuntu: `apt-get install dataset-fashion-mnist` "
            "(installs /usr/share/datasets/fashion-mnist/*.gz), or pass --data DIR with the four "
            "idx files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]).")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class MissingDataError(FileNotFoundError):
    """The data files are not where they were looked for; the message says how to get them."""


def read_idx(path) -> np.ndarray:
    """Read an idx file (optionally gzipped): magic ``0 0 type ndim``, ``ndim`` big-endian
    uint32 sizes, then the data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"read_idx: {path} is not an idx file (magic bytes {raw[:4]!r}; expected 0, 0, "
                         f"a type code in {sorted(_IDX_DTYPES)}, the number of dims)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    count = int(np.prod(shape)) if shape else 1
    body = raw[4 + 4 * ndim:]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"read_idx: {path} holds {len(body)} data bytes, its header {shape} of {dtype} "
                         f"needs {count * dtype.itemsize}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


@dataclass
class ImageData:
    """Train / validation tensors: images (N, 1, H, W) float32 standardized, labels int64."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int = 10


def _subset(x: np.ndarray, y: np.ndarray, n: Optional[int], seed: int) -> Tuple[np.ndarray, np.ndarray]:
    if n is None or n >= len(x):
        return x, y
    idx = np.random.default_rng(seed).permutation(len(x))[:n]
    return x[idx], y[idx]


def load_fashion_mnist(data_dir: Optional[str] = None, n_train: Optional[int] = None,
                       n_val: Optional[int] = None, seed: int = 0) -> ImageData:
    """Fashion-MNIST: ``n_train`` images from the 60k training set, ``n_val`` from the 10k
    test set (fixed random subsets), scaled to [0, 1] then standardized with the training
    subset's mean and std."""
    dirs = [Path(data_dir)] if data_dir else [Path(d) for d in FASHION_DIRS]
    if data_dir and not Path(data_dir).is_dir():
        raise MissingDataError(f"--data {data_dir!r} is not a directory. {APT_HINT}")
    for d in dirs:
        files = {k: [_find(d, s) for s in v] for k, v in FASHION_FILES.items()}
        if all(p is not None for v in files.values() for p in v):
            break
    else:
        raise MissingDataError(f"looked in {', '.join(map(str, dirs))}. {APT_HINT}")
    xtr, ytr = _subset(read_idx(files["train"][0]), read_idx(files["train"][1]), n_train, seed)
    xva, yva = _subset(read_idx(files["test"][0]), read_idx(files["test"][1]), n_val, seed + 1)
    if xtr.ndim != 3 or len(xtr) != len(ytr) or len(xva) != len(yva):
        raise ValueError(f"Fashion-MNIST files in {d} have unexpected shapes {xtr.shape}, {ytr.shape}, "
                         f"{xva.shape}, {yva.shape}")
    xtr = xtr.astype(np.float32) / 255.0
    xva = xva.astype(np.float32) / 255.0
    mean, std = float(xtr.mean()), float(xtr.std()) + 1e-8
    t = lambda a: torch.from_numpy((a - mean) / std).unsqueeze(1).contiguous()  # noqa: E731
    return ImageData("fashion-mnist", t(xtr), torch.from_numpy(ytr.astype(np.int64)),
                     t(xva), torch.from_numpy(yva.astype(np.int64)))


def load_digits(n_val: int = 360, seed: int = 0) -> ImageData:
    """scikit-learn's 8x8 digits (1797 images), a fixed random split, standardized."""
    from sklearn.datasets import load_digits as _ld
    d = _ld()
    x = d.images.astype(np.float32)
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(x))
    va, tr = idx[:n_val], idx[n_val:]
    mean, std = float(x[tr].mean()), float(x[tr].std())
    t = lambda a: torch.from_numpy((a - mean) / std).unsqueeze(1).contiguous()  # noqa: E731
    return ImageData("digits", t(x[tr]), torch.from_numpy(y[tr]), t(x[va]), torch.from_numpy(y[va]))


@dataclass
class TextData:
    """A character corpus: int64 ids of the training and validation text, the alphabet."""
    name: str
    train: torch.Tensor
    val: torch.Tensor
    alphabet: str


def encode_text(text: str, val_fraction: float = 0.1, name: str = "text") -> TextData:
    """Character ids over the sorted alphabet of ``text``; the last ``val_fraction`` is validation."""
    if not text:
        raise ValueError("encode_text: empty text")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"encode_text: val_fraction must be in (0, 1), got {val_fraction}")
    alphabet = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(alphabet)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
    cut = int(len(ids) * (1.0 - val_fraction))
    return TextData(name, ids[:cut], ids[cut:], alphabet)


def stdlib_text_path() -> Path:
    """``pydoc_data/topics.py`` of the running Python (the help() topics, ~0.5-0.8 MB of English)."""
    import pydoc_data
    return Path(os.path.dirname(pydoc_data.__file__)) / "topics.py"


def load_stdlib_text(max_chars: Optional[int] = None, path: Optional[str] = None) -> TextData:
    """The help topics as one string (the Python source's string literals, decoded), ASCII only."""
    p = Path(path) if path else stdlib_text_path()
    if not p.is_file():
        raise MissingDataError(f"text corpus {p} not found (it ships with CPython as pydoc_data/topics.py); "
                               f"pass --text FILE with any UTF-8 text")
    src = p.read_text(encoding="utf-8")
    if p.suffix == ".py":
        import ast
        tree = ast.parse(src)
        parts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                 and len(n.value) > 200]
        src = "\n".join(parts)
    text = src.encode("ascii", "ignore").decode("ascii")
    if max_chars:
        text = text[:max_chars]
    return encode_text(text, name=p.name)
