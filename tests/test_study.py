"""The study's data loaders (on tiny files written here), its verdict rule, and the quick
mode end to end."""
import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from scripts.study import claims as C
from scripts.study import data as D

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _write_idx(path, arr: np.ndarray, code: int = 0x08, gz: bool = True):
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(
        arr.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


def test_read_idx_plain_gzipped_and_big_endian(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    _write_idx(tmp_path / "a", a, gz=False)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "a"), a)
    b = np.array([1, -2, 70000], dtype=np.int32)
    _write_idx(tmp_path / "b", b, code=0x0C, gz=False)
    assert D.read_idx(tmp_path / "b").tolist() == [1, -2, 70000]


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an idx file"):
        D.read_idx(tmp_path / "bad")
    a = np.zeros((2, 2), dtype=np.uint8)
    _write_idx(tmp_path / "short", a, gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="needs 4"):
        D.read_idx(tmp_path / "short")


def _fake_fashion(d, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(d / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(d / f"{split}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))


def test_load_fashion_mnist_from_a_folder(tmp_path):
    _fake_fashion(tmp_path)
    d = D.load_fashion_mnist(str(tmp_path), n_train=8, n_val=5)
    assert d.x_train.shape == (8, 1, 28, 28) and d.x_val.shape == (5, 1, 28, 28)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    # standardized with the training subset's statistics
    assert abs(float(d.x_train.mean())) < 1e-5 and abs(float(d.x_train.std(unbiased=False)) - 1) < 1e-4
    full = D.load_fashion_mnist(str(tmp_path))
    assert len(full.x_train) == 20 and full.y_val.tolist() == [i % 10 for i in range(10)]
    # the subset is the same images and labels as the full set, in a fixed order
    raw = D.read_idx(tmp_path / "train-labels-idx1-ubyte.gz")
    assert set(d.y_train.tolist()) <= set(raw.tolist())


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(D.MissingDataError, match="apt-get install dataset-fashion-mnist"):
        D.load_fashion_mnist(str(tmp_path))
    with pytest.raises(D.MissingDataError, match="is not a directory"):
        D.load_fashion_mnist(str(tmp_path / "nope"))


def test_text_corpus(tmp_path):
    t = D.encode_text("abcabcabcd", val_fraction=0.2)
    assert t.alphabet == "abcd"
    assert "".join(t.alphabet[i] for i in torch.cat([t.train, t.val]).tolist()) == "abcabcabcd"
    assert len(t.val) == 2
    with pytest.raises(ValueError, match="val_fraction"):
        D.encode_text("abc", val_fraction=1.0)
    src = tmp_path / "topics.py"
    body = "Some help text. " * 20
    src.write_text(f"topics = {{'a': {body!r}, 'b': 'short'}}\n")
    t = D.load_stdlib_text(path=str(src))
    assert len(t.train) + len(t.val) == len(body)  # the long literal only, decoded
    with pytest.raises(D.MissingDataError, match="pydoc_data"):
        D.load_stdlib_text(path=str(tmp_path / "missing.py"))
    assert D.stdlib_text_path().is_file()


def test_verdict_rule():
    runs = {("s", "a"): [80.0, 81.0, 82.0], ("s", "b"): [70.0, 71.0, 72.0], ("s", "c"): [80.5, 81.5, 82.5]}
    # difference 10, standard error sqrt(1/3 + 1/3) = 0.816: well outside 2 se
    assert C.verdict(C.Comparison("s", "a", "b"), runs, False) == "reproduces"
    assert C.verdict(C.Comparison("s", "b", "a"), runs, False) == "does not reproduce (opposite)"
    assert C.verdict(C.Comparison("s", "a", "c"), runs, False).startswith("inconclusive")
    assert C.verdict(C.Comparison("s", "a", "c", "close"), runs, False) == "reproduces"
    assert C.verdict(C.Comparison("s", "a", "b", "close"), runs, False) == "does not reproduce"
    assert C.verdict(C.Comparison("s", "b", "a"), runs, True) == "reproduces"  # lower is better


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    """Every claim's table rows come out with numbers (not their verdicts)."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
    docs = tmp_path / "study.md"
    docs.write_text("# Study\n\nnarrative kept\n")
    r = subprocess.run([sys.executable, os.path.join("scripts", "study.py"), "--quick", "--seeds", "1", "--out",
                        str(tmp_path / "out"), "--docs", str(docs)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    text = docs.read_text()
    assert text.startswith("# Study\n\nnarrative kept\n")
    for c, settings in C.CLAIM_VARIANTS.items():
        assert f"### Claim {c}" in text
        for setting, variants in settings.items():
            for v in variants:
                row = [l for l in text.splitlines() if l.startswith(f"| {setting} | {v} | ")]
                assert row and "n/a" not in row[0], (c, setting, v)
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert not [r for _, r in doc["runs"] if "error" in r]
    for name in ("claim1_curves.png", "claim5_fp16_loss.png", "claim7_effective_step.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000
