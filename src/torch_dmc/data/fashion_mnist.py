"""Fashion-MNIST from its four gzip-compressed IDX files (no network access, no torchvision).

On Debian and Ubuntu the files come with ``sudo apt-get install dataset-fashion-mnist`` and lie in
``/usr/share/datasets/fashion-mnist``; elsewhere, download them once and point ``DMC_DATA_DIR`` at the
folder.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from .arrays import ImageData

__all__ = ["FASHION_MNIST_CLASSES", "DEFAULT_DATA_DIR", "load_fashion_mnist", "read_idx"]

#: Class names, index = label.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Where the Debian package ``dataset-fashion-mnist`` installs the files.
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"

_FILES = {
    "x_train": ("train-images-idx3-ubyte.gz", 3),
    "y_train": ("train-labels-idx1-ubyte.gz", 1),
    "x_test": ("t10k-images-idx3-ubyte.gz", 3),
    "y_test": ("t10k-labels-idx1-ubyte.gz", 1),
}

# IDX type codes (third byte of the magic number) -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path, *, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (gzip-compressed if the name ends in ``.gz``).

    The IDX layout: a 4-byte magic number ``0x00 0x00 <type code> <ndim>``, then ``ndim`` big-endian
    ``uint32`` sizes, then the data in C order.

    Args:
        path: the file.
        ndim: the expected number of dimensions (3 for images, 1 for labels), or None to accept any.

    Returns:
        The array, shape given by the header (e.g. ``N×28×28`` ``uint8`` for images), in native
        byte order.

    Raises:
        ValueError: the magic number, the rank or the data length is not what the header promises.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'}; expected "
            f"00 00 <type code 08..0e> <ndim>). Is the file truncated or of another format?"
        )
    dtype, file_ndim = _IDX_DTYPES[raw[2]], raw[3]
    if ndim is not None and file_ndim != ndim:
        raise ValueError(
            f"{path}: IDX header says {file_ndim} dimension(s); expected {ndim}. Are the image and "
            f"label files swapped?"
        )
    header = 4 + 4 * file_ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header truncated ({len(raw)} bytes, need {header}).")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=file_ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header promises shape {shape} ({expected} data bytes) but the file has "
            f"{len(raw) - header} data bytes; the file is truncated or corrupt, reinstall it."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _resolve_dir(data_dir: str | Path | None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get("DMC_DATA_DIR") or DEFAULT_DATA_DIR)


def load_fashion_mnist(data_dir: str | Path | None = None) -> ImageData:
    """Load Fashion-MNIST (60 000 train and 10 000 test images, 28×28 grey, 10 classes).

    Args:
        data_dir: folder with ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
            ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``. Default: the
            environment variable ``DMC_DATA_DIR``, else ``/usr/share/datasets/fashion-mnist``.

    Returns:
        :class:`ImageData` named ``"fashion-mnist"``: ``x_* uint8 N×28×28``, ``y_* int64 N``.

    Raises:
        FileNotFoundError: a file is missing (the message says which, and how to install it).
        ValueError: a file is corrupt, or image and label counts disagree.
    """
    folder = _resolve_dir(data_dir)
    arrays: dict[str, np.ndarray] = {}
    for key, (fname, ndim) in _FILES.items():
        path = folder / fname
        if not path.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {fname} not found in {folder}. Install the data with "
                f"`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four "
                f"IDX .gz files in a folder and set DMC_DATA_DIR to it (or pass data_dir)."
            )
        arrays[key] = read_idx(path, ndim=ndim)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or y.dtype != np.uint8:
            raise ValueError(
                f"{folder}: Fashion-MNIST {split} files must hold uint8 data; found images "
                f"{x.dtype}, labels {y.dtype}."
            )
        if len(x) != len(y):
            raise ValueError(
                f"{folder}: {split} split has {len(x)} images but {len(y)} labels; expected "
                f"equal counts. Reinstall the data."
            )
    return ImageData(
        x_train=arrays["x_train"],
        y_train=arrays["y_train"].astype(np.int64),
        x_test=arrays["x_test"],
        y_test=arrays["y_test"].astype(np.int64),
        name="fashion-mnist",
    )
