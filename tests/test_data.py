"""Tests for torch_dmc.data: IDX and .npz loading, tensors, batches, corruptions, cache."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_dmc.data import (
    ALL_CORRUPTIONS,
    COMMON_CORRUPTIONS,
    FASHION_MNIST_CLASSES,
    VALIDATION_CORRUPTIONS,
    CorruptionCache,
    ImageData,
    batches,
    corrupt,
    load_fashion_mnist,
    load_npz,
    resolve_corruptions,
    to_tensor,
)
from torch_dmc.data import corruptions as corruptions_mod
from torch_dmc.data.fashion_mnist import DEFAULT_DATA_DIR, read_idx

HAVE_FMNIST = os.path.isfile(os.path.join(DEFAULT_DATA_DIR, "train-images-idx3-ubyte.gz"))
try:
    import imagecorruptions  # noqa: F401

    HAVE_IC = True
except ImportError:  # pragma: no cover - the extra is installed in CI
    HAVE_IC = False
needs_ic = pytest.mark.skipif(not HAVE_IC, reason="imagecorruptions-imaug not installed")


# ---------------------------------------------------------------- IDX / Fashion-MNIST


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> None:
    """Write ``array`` in the gzip IDX layout (magic, big-endian sizes, data)."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(">u1" if type_code == 0x08 else ">i4").tobytes())


def fake_fmnist(folder: Path, n_train: int = 5, n_test: int = 3, size: int = 6):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": np.array([9, 0, 3][:n_test], dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(folder / name, arr)
    return arrays


def test_load_fashion_mnist_parses_idx(tmp_path):
    arrays = fake_fmnist(tmp_path)
    data = load_fashion_mnist(tmp_path)
    np.testing.assert_array_equal(data.x_train, arrays["train-images-idx3-ubyte.gz"])
    np.testing.assert_array_equal(data.y_test, [9, 0, 3])
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int64
    assert data.name == "fashion-mnist"
    assert data.num_classes == 10 and data.in_channels == 1 and data.image_size == (6, 6)


def test_load_fashion_mnist_env_var(tmp_path, monkeypatch):
    fake_fmnist(tmp_path)
    monkeypatch.setenv("DMC_DATA_DIR", str(tmp_path))
    assert load_fashion_mnist().x_train.shape == (5, 6, 6)


def test_load_fashion_mnist_missing_file(tmp_path):
    fake_fmnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz") as err:
        load_fashion_mnist(tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert "DMC_DATA_DIR" in str(err.value)


def test_idx_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\x12\x34\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"abc")
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short)
    ok = tmp_path / "ok.gz"
    write_idx(ok, np.arange(4, dtype=np.uint8))
    with pytest.raises(ValueError, match="expected 3"):
        read_idx(ok, ndim=3)


def test_idx_other_dtype_and_uncompressed(tmp_path):
    arr = np.array([[1, -2], [300, 4]], dtype=np.int32)
    path = tmp_path / "ints.idx"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 2) + arr.astype(">i4").tobytes())
    out = read_idx(path)
    np.testing.assert_array_equal(out, arr)
    assert out.dtype.isnative


def test_idx_count_mismatch(tmp_path):
    fake_fmnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    data = load_fashion_mnist(DEFAULT_DATA_DIR)
    assert data.x_train.shape == (60000, 28, 28) and data.x_test.shape == (10000, 28, 28)
    assert data.num_classes == len(FASHION_MNIST_CLASSES) == 10
    assert np.bincount(data.y_test).tolist() == [1000] * 10


# ---------------------------------------------------------------- .npz


def good_arrays(channels: int | None = None):
    rng = np.random.default_rng(1)
    shape = (8, 5, 5) if channels is None else (8, 5, 5, channels)
    return {
        "x_train": rng.integers(0, 256, shape, dtype=np.uint8),
        "y_train": np.arange(8) % 4,
        "x_test": rng.integers(0, 256, (3,) + shape[1:], dtype=np.uint8),
        "y_test": np.array([0, 1, 6]),
    }


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_load_npz_good(tmp_path, channels):
    path = tmp_path / "toy-set.npz"
    arrays = good_arrays(channels)
    np.savez(path, **arrays)
    data = load_npz(path)
    assert isinstance(data, ImageData)
    assert data.name == "toy-set"
    assert data.num_classes == 7
    assert data.in_channels == (1 if channels is None else channels)
    assert data.image_size == (5, 5)
    assert data.y_train.dtype == np.int64
    np.testing.assert_array_equal(data.x_test, arrays["x_test"])


def test_load_npz_accepts_small_integer_images(tmp_path):
    arrays = good_arrays()
    arrays["x_train"] = arrays["x_train"].astype(np.int32)
    arrays["y_train"] = arrays["y_train"].astype(np.uint8)
    np.savez(tmp_path / "a.npz", **arrays)
    data = load_npz(tmp_path / "a.npz")
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int64


def _bad(change):
    arrays = good_arrays()
    change(arrays)
    return arrays


BAD_CASES = {
    "missing key": (lambda a: a.pop("y_test"), KeyError, "y_test"),
    "float images": (
        lambda a: a.__setitem__("x_test", a["x_test"] / 255.0),
        TypeError,
        "'x_test'.*float64",
    ),
    "int images out of range": (
        lambda a: a.__setitem__("x_train", a["x_train"].astype(np.int16) * 2),
        ValueError,
        "'x_train'.*0..255",
    ),
    "wrong ndim": (lambda a: a.__setitem__("x_train", a["x_train"][0]), ValueError, "'x_train'"),
    "channels first": (
        lambda a: a.__setitem__("x_train", np.zeros((8, 3, 32, 32), np.uint8)),
        ValueError,
        "channels-first",
    ),
    "label count": (lambda a: a.__setitem__("y_train", a["y_train"][:-1]), ValueError, "7 labels"),
    "float labels": (
        lambda a: a.__setitem__("y_test", a["y_test"].astype(np.float32)),
        TypeError,
        "'y_test'.*float32",
    ),
    "negative labels": (
        lambda a: a.__setitem__("y_test", np.array([0, -1, 2])),
        ValueError,
        "'y_test'.*negative",
    ),
    "2-D labels": (lambda a: a.__setitem__("y_test", np.eye(3)), ValueError, "'y_test'"),
    "split shapes": (
        lambda a: a.__setitem__("x_test", np.zeros((3, 6, 6), np.uint8)),
        ValueError,
        "same H",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_load_npz_bad(tmp_path, case):
    change, exc, pattern = BAD_CASES[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **_bad(change))
    with pytest.raises(exc, match=pattern):
        load_npz(path)


def test_load_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="x_train"):
        load_npz(tmp_path / "nope.npz")


# ---------------------------------------------------------------- tensors, batches


def test_to_tensor_shapes_and_range():
    grey = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    t = to_tensor(grey)
    assert t.shape == (1, 1, 2, 2) and t.dtype == torch.float32
    assert t.min() == 0.0 and t.max() == 1.0 and abs(t[0, 0, 1, 0].item() - 0.2) < 1e-7
    rgb = np.zeros((4, 3, 5, 3), np.uint8)
    rgb[..., 2] = 255
    t = to_tensor(rgb)
    assert t.shape == (4, 3, 3, 5) and t.is_contiguous()
    assert t[:, 2].eq(1).all() and t[:, :2].eq(0).all()
    with pytest.raises(TypeError, match="uint8"):
        to_tensor(grey.astype(np.float32))
    with pytest.raises(ValueError, match="N×H×W"):
        to_tensor(np.zeros((2, 2), np.uint8))


def test_batches():
    x = torch.arange(10.0).view(10, 1)
    y = torch.arange(10)
    b = batches(x, y, 4)
    assert len(b) == 3
    assert [len(yb) for _, yb in b] == [4, 4, 2]
    assert torch.cat([yb for _, yb in b]).tolist() == list(range(10))
    s = batches(x, y, 3, shuffle=True, seed=5)
    first = torch.cat([yb for _, yb in s])
    assert sorted(first.tolist()) == list(range(10)) and first.tolist() != list(range(10))
    assert torch.equal(first, torch.cat([yb for _, yb in s]))  # re-iterable, same order
    assert torch.equal(first, torch.cat([yb for _, yb in batches(x, y, 3, shuffle=True, seed=5)]))
    assert not torch.equal(first, torch.cat([yb for _, yb in batches(x, y, 3, shuffle=True, seed=6)]))
    for xb, yb in s:
        assert torch.equal(xb[:, 0].long(), yb)
    only_x = list(batches(x, None, 6))
    assert all(isinstance(t, torch.Tensor) for t in only_x) and [len(t) for t in only_x] == [6, 4]
    with pytest.raises(ValueError, match="batch_size"):
        batches(x, y, 0)
    with pytest.raises(ValueError, match="one label per sample"):
        batches(x, y[:3], 2)


# ---------------------------------------------------------------- corruptions


def test_corruption_lists():
    assert len(COMMON_CORRUPTIONS) == 15 and len(VALIDATION_CORRUPTIONS) == 4
    assert COMMON_CORRUPTIONS[0] == "gaussian_noise" and COMMON_CORRUPTIONS[-1] == "jpeg_compression"
    assert ALL_CORRUPTIONS == COMMON_CORRUPTIONS + VALIDATION_CORRUPTIONS


def test_resolve_corruptions():
    assert resolve_corruptions("common") == list(COMMON_CORRUPTIONS)
    assert resolve_corruptions("validation") == list(VALIDATION_CORRUPTIONS)
    assert resolve_corruptions("fog, contrast,fog") == ["fog", "contrast"]
    assert resolve_corruptions(["spatter", "validation"]) == [
        "spatter",
        "speckle_noise",
        "gaussian_blur",
        "saturate",
    ]
    assert resolve_corruptions("Gaussian-Noise") == ["gaussian_noise"]
    with pytest.raises(ValueError, match="unknown corruption 'fogg'.*gaussian_noise"):
        resolve_corruptions("fog,fogg")
    with pytest.raises(ValueError, match="no corruption"):
        resolve_corruptions(" , ")


def tiny_images(n: int = 6, size: int = 28, channels: int | None = None) -> np.ndarray:
    """Fashion-MNIST-like: black background, a bright blob with texture."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:size, :size]
    blob = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 3) ** 2
    img = np.where(blob[None], rng.integers(80, 230, (n, size, size)), 0).astype(np.uint8)
    if channels:
        img = np.stack([img, img[:, ::-1], img[:, :, ::-1]][:channels], axis=-1)
    return img


@needs_ic
@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_corrupt_deterministic_per_index(name):
    x = tiny_images(5)
    full = corrupt(x, name, 3, seed=7, progress=False)
    assert full.dtype == np.uint8 and full.shape == x.shape
    again = corrupt(x, name, 3, seed=7, progress=False)
    np.testing.assert_array_equal(full, again)
    order = np.array([4, 1, 3])
    part = corrupt(x[order], name, 3, seed=7, indices=order, progress=False)
    np.testing.assert_array_equal(part, full[order])


@needs_ic
def test_corrupt_changes_images_and_seeds_matter():
    x = tiny_images(4)
    for name in ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "snow", "fog"):
        a = corrupt(x, name, 5, seed=0, progress=False)
        b = corrupt(x, name, 5, seed=1, progress=False)
        assert not np.array_equal(a, b), name
        assert not np.array_equal(a, x), name
    # different indices of the same image give different noise
    same = np.repeat(x[:1], 2, axis=0)
    c = corrupt(same, "gaussian_noise", 2, progress=False)
    assert not np.array_equal(c[0], c[1])
    # deterministic corruptions do not depend on the seed
    np.testing.assert_array_equal(
        corrupt(x, "contrast", 2, seed=0, progress=False), corrupt(x, "contrast", 2, seed=9, progress=False)
    )


@needs_ic
def test_corrupt_leaves_global_numpy_state():
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    corrupt(tiny_images(2), "snow", 2, progress=False)
    np.testing.assert_array_equal(np.random.random(3), expected)


@needs_ic
@pytest.mark.parametrize(
    "shape",
    [(3, 28, 28), (3, 28, 28, 1), (2, 28, 28, 3), (2, 16, 20, 3), (2, 34, 33, 3), (2, 40, 36)],
)
def test_corrupt_shapes(shape):
    channels = shape[3] if len(shape) == 4 else None
    x = tiny_images(shape[0], max(shape[1:3]), channels)[:, : shape[1], : shape[2]]
    x = np.ascontiguousarray(x)
    for name in ("gaussian_noise", "frost", "zoom_blur", "jpeg_compression", "pixelate"):
        y = corrupt(x, name, 4, progress=False)
        assert y.shape == x.shape and y.dtype == np.uint8, name


@needs_ic
def test_corrupt_grey_equals_channel_mean_of_library():
    """The protocol: pad to 32, RGB, library function, crop, channel mean, round."""
    from imagecorruptions import corruption_dict
    from PIL import Image

    x = tiny_images(1)
    padded = np.repeat(np.pad(x[0], 2)[..., None], 3, axis=-1)
    ref = np.asarray(corruption_dict["defocus_blur"](Image.fromarray(padded), 2), float)
    ref = np.rint(np.clip(ref[2:30, 2:30], 0, 255).mean(-1)).astype(np.uint8)
    np.testing.assert_array_equal(corrupt(x, "defocus_blur", 2, progress=False)[0], ref)


@needs_ic
def test_fast_frost_matches_library():
    from imagecorruptions.corruptions import frost
    from PIL import Image

    img = Image.fromarray(np.repeat(np.pad(tiny_images(1)[0], 2)[..., None], 3, axis=-1))
    for seed in range(8):
        for sev in (1, 5):
            np.random.seed(seed)
            ref = frost(img, sev)
            after_ref = np.random.random()
            np.random.seed(seed)
            ours = corruptions_mod._frost(img, sev)
            np.testing.assert_array_equal(ours, ref)
            assert np.random.random() == after_ref  # same random draws consumed


@needs_ic
def test_corrupt_bad_arguments():
    x = tiny_images(2)
    with pytest.raises(ValueError, match="one corruption"):
        corrupt(x, "common", 1, progress=False)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "rain", 1, progress=False)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "fog", 6, progress=False)
    with pytest.raises(TypeError, match="uint8"):
        corrupt(x.astype(float), "fog", 1, progress=False)
    with pytest.raises(ValueError, match="indices"):
        corrupt(x, "fog", 1, indices=[0], progress=False)
    with pytest.raises(ValueError, match="N×H×W"):
        corrupt(np.zeros((2, 28, 28, 2), np.uint8), "fog", 1, progress=False)


@needs_ic
def test_corrupt_workers_identical():
    # one corruption: every spawned worker pays the imports (and numba would compile again)
    x = tiny_images(6)
    one = corrupt(x, "shot_noise", 2, seed=3, progress=False)
    try:
        two = corrupt(x, "shot_noise", 2, seed=3, workers=2, progress=False)
    finally:
        corruptions_mod.shutdown_pool()
    np.testing.assert_array_equal(one, two)


def test_missing_package_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("imagecorruptions"):
            raise ImportError("No module named 'imagecorruptions'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install torch-dmc\[corruptions\]"):
        corrupt(tiny_images(1), "fog", 1, progress=False)


# ---------------------------------------------------------------- cache


@needs_ic
def test_cache_reuses_files(tmp_path, monkeypatch):
    calls = []
    real = corruptions_mod.corrupt

    def counting(*args, **kwargs):
        calls.append(args[1:3])
        return real(*args, **kwargs)

    monkeypatch.setattr(corruptions_mod, "corrupt", counting)
    x = tiny_images(3)
    cache = CorruptionCache(tmp_path)
    a = cache.get(x, "shot_noise", 2, seed=4, progress=False)
    path = cache.path(x, "shot_noise", 2, seed=4)
    assert path.is_file() and path.parent.name == "4" and path.name == "shot_noise-2.npy"
    assert path.parent.parent.parent == tmp_path and len(path.parent.parent.name) == 16
    b = cache.get(x, "shot_noise", 2, seed=4, progress=False)
    assert calls == [("shot_noise", 2)]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, real(x, "shot_noise", 2, seed=4, progress=False))
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]
    # other images, seed or severity: other files
    cache.get(x, "shot_noise", 3, seed=4, progress=False)
    cache.get(x[:2], "shot_noise", 2, seed=4, progress=False)
    assert len(calls) == 3
    # a damaged file is recomputed, with a warning
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="ignoring cached"):
        c = cache.get(x, "shot_noise", 2, seed=4, progress=False)
    np.testing.assert_array_equal(a, c)
    assert len(calls) == 4


def test_cache_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DMC_CACHE_DIR", str(tmp_path / "c"))
    assert CorruptionCache().root == tmp_path / "c"
    monkeypatch.delenv("DMC_CACHE_DIR")
    assert CorruptionCache().root == Path.home() / ".cache" / "torch_dmc" / "corruptions"
    x = np.zeros((2, 3, 3), np.uint8)
    assert CorruptionCache.key(x) != CorruptionCache.key(x.reshape(2, 9, 1))
    with pytest.raises(ValueError, match="unknown corruption"):
        CorruptionCache(tmp_path).get(x, "rain", 1)
