"""On-disk CIFAR loaders: CIFAR-10/100-C (.npy, memory-mapped) and the binary distributions.

Every test writes small files in the real layouts into ``tmp_path`` (``n`` images per severity
instead of 10000, a few records per ``.bin`` file instead of 10000); pixel values encode the row,
so the tests can tell exactly which rows were read.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest

from torch_dmc.data.cifar import CifarC, open_cifar, open_cifar_c
from torch_dmc.data.corruptions import COMMON_CORRUPTIONS, VALIDATION_CORRUPTIONS
from torch_dmc.data.sources import ArraySet

N = 12  # images per severity


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _c_images(total: int, salt: int = 0) -> np.ndarray:
    """``total×32×32×3`` uint8 whose pixel [r, y, x, c] encodes the row r (and the channel)."""
    r = np.arange(total).reshape(-1, 1, 1, 1)
    c = np.arange(3).reshape(1, 1, 1, 3)
    return np.broadcast_to((r + 7 * c + salt) % 256, (total, 32, 32, 3)).astype(np.uint8)


def _write_c(folder: Path, corruptions=("gaussian_noise", "fog"), classes=10, n=N) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    base = (np.arange(n) * 7) % classes
    np.save(folder / "labels.npy", np.tile(base, 5).astype(np.int64))
    for i, c in enumerate(corruptions):
        np.save(folder / f"{c}.npy", _c_images(5 * n, salt=100 * i))
    return base


@pytest.fixture(autouse=True)
def _no_pickle(monkeypatch):
    """Nothing here may unpickle: make every pickle entry point fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)


# ---------------------------------------------------------------- CIFAR-10-C / CIFAR-100-C


def test_cifar_c_reads_exact_rows_every_severity(tmp_path):
    base = _write_c(tmp_path)
    data = open_cifar_c(tmp_path, 10)
    assert isinstance(data, CifarC)
    assert data.spec == f"cifar10-c:{tmp_path}" and data.num_classes == 10 and data.n == N
    assert data.corruptions() == ["gaussian_noise", "fog"]
    assert data.describe()["preprocessing"]["decode"] is None
    full = _c_images(5 * N, salt=100)  # fog
    rows = np.array([3, 0, 11, 3, 5])
    for s in range(1, 6):
        d = data.corrupted("fog", s)
        assert isinstance(d, ArraySet) and len(d) == N
        np.testing.assert_array_equal(d.read(rows), full[(s - 1) * N + rows])
        np.testing.assert_array_equal(d.labels, base)
        assert d.labels.dtype == np.int64
        batches = list(d.iter_batches([rows[:2], rows[2:]]))
        np.testing.assert_array_equal(np.concatenate(batches), full[(s - 1) * N + rows])


def test_cifar_c_is_memory_mapped(tmp_path):
    _write_c(tmp_path)
    d = open_cifar_c(tmp_path, 10).corrupted("gaussian_noise", 2)
    assert isinstance(d.images, np.memmap)
    assert d.images.shape == (N, 32, 32, 3)
    assert not d.images.flags.writeable


def test_cifar_c_files_hashed_once(tmp_path, monkeypatch):
    _write_c(tmp_path)
    import torch_dmc.data.cifar as cifar

    calls = []
    real = cifar.sha256_file
    monkeypatch.setattr(cifar, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    data = open_cifar_c(tmp_path, 10)
    expected = {"fog.npy": _sha(tmp_path / "fog.npy"), "labels.npy": _sha(tmp_path / "labels.npy")}
    for s in (1, 2, 5):
        assert data.corrupted("fog", s).files() == expected
    data.corrupted("gaussian_noise", 3)
    assert sorted(calls) == ["fog.npy", "gaussian_noise.npy", "labels.npy"]


def test_cifar_c_order_extras_and_subfolder(tmp_path):
    folder = tmp_path / "CIFAR-100-C"
    every = list(reversed(COMMON_CORRUPTIONS + VALIDATION_CORRUPTIONS))
    _write_c(folder, corruptions=every, classes=100, n=5)
    np.save(folder / "notes.npy", np.zeros(3))  # unknown .npy: ignored
    data = open_cifar_c(tmp_path, 100)  # the parent folder is accepted
    assert data.corruptions() == list(COMMON_CORRUPTIONS + VALIDATION_CORRUPTIONS)
    assert data.directory == folder and data.spec == f"cifar100-c:{tmp_path}"
    assert data.corrupted("saturate", 5).read(np.array([4])).shape == (1, 32, 32, 3)


@pytest.mark.parametrize(
    ("corruption", "severity", "match"),
    [
        ("fog", 6, "severity 6"),
        ("fog", 0, "severity 0"),
        ("fogg", 1, "unknown corruption 'fogg'"),
        ("snow", 1, r"snow\.npy: no such file.*present: gaussian_noise, fog"),
    ],
)
def test_cifar_c_bad_requests(tmp_path, corruption, severity, match):
    _write_c(tmp_path)
    with pytest.raises(ValueError, match=match) as err:
        open_cifar_c(tmp_path, 10).corrupted(corruption, severity)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((5 * N, 32, 32, 3), np.float32), "dtype float32"),
        (np.zeros((5 * N, 32, 32), np.uint8), r"shape \(60, 32, 32\)"),
        (np.zeros((5 * N, 3, 32, 32), np.uint8), r"shape \(60, 3, 32, 32\)"),
        (np.zeros((5 * N - 1, 32, 32, 3), np.uint8), "holds 59 images"),
    ],
)
def test_cifar_c_malformed_corruption_file(tmp_path, array, match):
    _write_c(tmp_path)
    np.save(tmp_path / "fog.npy", array)
    data = open_cifar_c(tmp_path, 10)
    with pytest.raises(ValueError, match=match) as err:
        data.corrupted("fog", 1)
    assert "fog.npy" in str(err.value) and "\n" not in str(err.value)


def test_cifar_c_refuses_pickled_npy(tmp_path):
    _write_c(tmp_path)
    (tmp_path / "fog.npy").write_bytes(b"\x80\x04not an npy file")
    with pytest.raises(ValueError, match=r"fog\.npy: not a readable numeric \.npy"):
        open_cifar_c(tmp_path, 10).corrupted("fog", 1)


def _labels_case(tmp_path, labels):
    _write_c(tmp_path)
    np.save(tmp_path / "labels.npy", labels)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.concatenate([np.zeros(4 * N, int), np.ones(N, int)]), "severity 5.*differ"),
        (np.zeros(5 * N + 1, int), "multiple of 5"),
        (np.full(5 * N, 10), r"labels lie in 10\.\.10; expected 0\.\.9"),
        (np.full(5 * N, -1), "expected 0..9"),
        (np.zeros(5 * N, np.float64), "dtype float64"),
        (np.zeros((5, N), int), "shape"),
    ],
)
def test_cifar_c_bad_labels(tmp_path, labels, match):
    _labels_case(tmp_path, labels)
    with pytest.raises(ValueError, match=match) as err:
        open_cifar_c(tmp_path, 10)
    assert "labels.npy" in str(err.value) and "\n" not in str(err.value)


def test_cifar_c_refuses_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        open_cifar_c(tmp_path / "missing", 10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a CIFAR-10-C folder"):
        open_cifar_c(tmp_path / "empty", 10)
    _write_c(tmp_path / "nolabels")
    (tmp_path / "nolabels" / "labels.npy").unlink()
    with pytest.raises(ValueError, match=r"labels\.npy: no such file"):
        open_cifar_c(tmp_path / "nolabels", 10)
    _write_c(tmp_path / "onlylabels", corruptions=())
    with pytest.raises(ValueError, match="no corruption file"):
        open_cifar_c(tmp_path / "onlylabels", 10)
    with pytest.raises(ValueError, match="classes must be 10"):
        open_cifar_c(tmp_path, 1000)


# ---------------------------------------------------------------- binary CIFAR-10 / CIFAR-100


def _record_pixels(k: int, salt: int) -> np.ndarray:
    """``k×3×32×32`` planar pixels: R = y + salt + k', G = x + 50, B = 200 - k' (k' the record)."""
    y = np.arange(32).reshape(1, 32, 1)
    x = np.arange(32).reshape(1, 1, 32)
    r = np.arange(k).reshape(k, 1, 1)
    shape = (k, 32, 32)
    planes = [(y + salt + r) % 256, x + 50, (200 - r) % 256]
    return np.stack([np.broadcast_to(p, shape) for p in planes], axis=1).astype(np.uint8)


def _write_bin(path: Path, labels: list[list[int]], pixels: np.ndarray) -> None:
    head = np.asarray(labels, np.uint8).reshape(len(pixels), -1)
    path.write_bytes(np.concatenate([head, pixels.reshape(len(pixels), -1)], axis=1).tobytes())


def _write_cifar10(folder: Path, per_file: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for i, name in enumerate(names):
        labels = [[(i + j) % 10] for j in range(per_file)]
        _write_bin(folder / name, labels, _record_pixels(per_file, salt=10 * i))


def test_cifar10_binary_planar_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    _write_cifar10(folder)
    test = open_cifar(folder, 10, "test")
    assert test.images.shape == (3, 32, 32, 3) and test.images.dtype == np.uint8
    assert test.labels.dtype == np.int64 and test.labels.tolist() == [5, 6, 7]
    img = test.read(np.array([2]))[0]
    assert img[4, 9, 0] == (4 + 50 + 2) % 256  # R plane: y + salt + record
    assert img[4, 9, 1] == 9 + 50  # G plane: x + 50
    assert img[4, 9, 2] == 198  # B plane: 200 - record
    assert test.files() == {"test_batch.bin": _sha(folder / "test_batch.bin")}

    train = open_cifar(tmp_path, 10, "train")  # the parent folder is accepted
    assert len(train) == 15
    assert train.labels.tolist() == [(i + j) % 10 for i in range(5) for j in range(3)]
    assert train.read(np.array([7]))[0, 0, 0, 0] == 20 + 1  # data_batch_3, record 1
    assert set(train.files()) == {f"data_batch_{i}.bin" for i in range(1, 6)}
    assert train.files()["data_batch_4.bin"] == _sha(folder / "data_batch_4.bin")


def test_cifar100_binary_uses_fine_label(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    _write_bin(folder / "train.bin", [[19, 99], [3, 42]], _record_pixels(2, salt=0))
    _write_bin(folder / "test.bin", [[0, 7]], _record_pixels(1, salt=30))
    train = open_cifar(folder, 100, "train")
    assert train.labels.tolist() == [99, 42]
    np.testing.assert_array_equal(train.images, _record_pixels(2, 0).transpose(0, 2, 3, 1))
    test = open_cifar(tmp_path, 100, "test")
    assert test.labels.tolist() == [7] and test.read(np.array([0]))[0, 5, 0, 0] == 35
    assert test.files() == {"test.bin": _sha(folder / "test.bin")}


def test_binary_refuses_pickled_python_version(tmp_path):
    py10 = tmp_path / "cifar-10-batches-py"
    py10.mkdir()
    for name in ("data_batch_1", "batches.meta", "test_batch"):
        (py10 / name).write_bytes(b"\x80\x04dummy")
    for where in (tmp_path, py10):
        with pytest.raises(ValueError, match="pickled python version") as err:
            open_cifar(where, 10, "test")
        msg = str(err.value)
        assert "arbitrary code" in msg and "cifar-10-binary.tar.gz" in msg and "test_batch.bin" in msg
    py100 = tmp_path / "cifar-100-python"
    py100.mkdir()
    for name in ("train", "test", "meta"):
        (py100 / name).write_bytes(b"\x80\x04dummy")
    with pytest.raises(ValueError, match="pickled python version.*cifar-100-binary.tar.gz") as err:
        open_cifar(tmp_path, 100, "train")
    assert "\n" not in str(err.value)


def test_binary_malformed_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    _write_cifar10(folder)
    good = (folder / "test_batch.bin").read_bytes()
    (folder / "test_batch.bin").write_bytes(good[:-5])  # truncated
    with pytest.raises(ValueError, match=r"test_batch\.bin: size 9214 bytes.*3073-byte record"):
        open_cifar(folder, 10, "test")
    bad = bytearray(good)
    bad[3073] = 10  # record 1's label
    (folder / "test_batch.bin").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match=r"test_batch\.bin: labels reach 10; expected 0\.\.9"):
        open_cifar(folder, 10, "test")
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(ValueError, match=r"incomplete: missing data_batch_3\.bin"):
        open_cifar(folder, 10, "train")

    c100 = tmp_path / "c100"
    c100.mkdir()
    _write_bin(c100 / "test.bin", [[1, 100]], _record_pixels(1, 0))
    with pytest.raises(ValueError, match=r"test\.bin: labels reach 100; expected 0\.\.99"):
        open_cifar(c100, 100, "test")


def test_binary_refuses_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        open_cifar(tmp_path / "missing", 10, "test")
    with pytest.raises(ValueError, match="no CIFAR-10 binary test files"):
        open_cifar(tmp_path, 10, "test")
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="extract it first"):
        open_cifar(tmp_path, 10, "test")
    _write_cifar10(tmp_path / "cifar-10-batches-bin")
    with pytest.raises(ValueError, match="holds the CIFAR-10 binary files.*cifar10:DIR"):
        open_cifar(tmp_path, 100, "test")
    with pytest.raises(ValueError, match="split must be"):
        open_cifar(tmp_path, 10, "valid")
