"""CIFAR on disk: the corrupted test sets (CIFAR-10-C, CIFAR-100-C) and the binary distributions.

Two layouts, neither of which this module ever downloads:

- ``cifar10-c:DIR`` / ``cifar100-c:DIR`` (Hendrycks & Dietterich's CIFAR-10-C / CIFAR-100-C):
  ``DIR/<corruption>.npy``, ``uint8`` of shape ``5n×32×32×3`` (``n = 10000``), severities 1..5
  stacked in order (severity ``s`` is rows ``(s-1)·n .. s·n-1``), and ``DIR/labels.npy``, the ``n``
  test labels repeated five times. :func:`open_cifar_c` opens it as a :class:`CifarC`; every
  corruption file is memory-mapped, so a batch reads only its own rows and a 150 MB file is never
  loaded whole.
- ``cifar10:DIR`` / ``cifar100:DIR``: the *binary* distributions (``cifar-10-binary.tar.gz``,
  ``cifar-100-binary.tar.gz``), records of label byte(s) followed by 3072 planar RGB pixel bytes.
  :func:`open_cifar` reads one split as ``uint8`` ``N×32×32×3`` images.

The pickled "python version" (``cifar-10-batches-py/``, ``cifar-100-python/``) is refused on
purpose: reading it means unpickling, which runs whatever code the file holds. ``.npy`` files are
read with ``allow_pickle=False`` for the same reason.

Every set records the SHA-256 of each file it read (:meth:`~torch_dmc.data.sources.ImageSet.files`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .corruptions import COMMON_CORRUPTIONS, VALIDATION_CORRUPTIONS
from .sources import ArraySet, TestData, sha256_file

__all__ = ["CifarC", "open_cifar_c", "open_cifar", "CIFAR_SHAPE"]

#: Shape of one CIFAR image, channels last.
CIFAR_SHAPE = (32, 32, 3)
_PIXELS = 32 * 32 * 3
_SEVERITIES = 5
_KNOWN = COMMON_CORRUPTIONS + VALIDATION_CORRUPTIONS

_C_FOLDER = {10: "CIFAR-10-C", 100: "CIFAR-100-C"}
_C_EXPECTED = (
    "a CIFAR-{k}-C folder: <corruption>.npy (uint8 5n×32×32×3, severities 1..5 stacked) and "
    "labels.npy (the n test labels repeated 5 times), as extracted from CIFAR-{k}-C.tar"
)

# The binary distributions: folder name, label bytes per record, which label byte, files per split.
_BIN = {
    10: {
        "folder": "cifar-10-batches-bin",
        "tar": "cifar-10-binary.tar.gz",
        "label_bytes": 1,
        "splits": {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
    },
    100: {
        "folder": "cifar-100-binary",
        "tar": "cifar-100-binary.tar.gz",
        "label_bytes": 2,
        "splits": {"train": ("train.bin",), "test": ("test.bin",)},
    },
}
# The pickled python version: folder name, and the files that identify it.
_PICKLED = {
    10: ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
    100: ("cifar-100-python", "cifar-100-python.tar.gz"),
}


def _check_classes(classes: int, what: str) -> int:
    if isinstance(classes, bool) or classes not in (10, 100):
        raise ValueError(f"{what}: classes must be 10 (CIFAR-10) or 100 (CIFAR-100); found {classes!r}.")
    return int(classes)


class _Digests:
    """SHA-256 of files, each hashed once (re-hashed only if its size or modification time change)."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[int, int, str]] = {}

    def __call__(self, path: Path) -> str:
        st = path.stat()
        hit = self._cache.get(path)
        if hit is not None and hit[:2] == (st.st_size, st.st_mtime_ns):
            return hit[2]
        digest = sha256_file(path)
        self._cache[path] = (st.st_size, st.st_mtime_ns, digest)
        return digest


def _load_npy(path: Path, mmap: bool, expected: str) -> np.ndarray:
    """``np.load`` one ``.npy`` without pickle (memory-mapped if ``mmap``); one-line ``ValueError``."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        detail = " ".join(str(err).split())
        raise ValueError(
            f"{path}: not a readable numeric .npy file ({type(err).__name__}: {detail}); expected "
            f"{expected}. Re-extract the file from the original archive."
        ) from err
    if not isinstance(arr, np.ndarray):  # an .npz archive
        arr.close()
        raise ValueError(f"{path}: is an .npz archive, not an .npy array; expected {expected}.")
    return arr


class CifarC(TestData):
    """CIFAR-10-C or CIFAR-100-C on disk: one memory-mapped ``.npy`` per corruption.

    Open it with :func:`open_cifar_c`, which checks ``labels.npy`` once; each corruption file is
    checked (dtype, shape, length) when :meth:`corrupted` opens it.

    Attributes:
        spec: ``"cifar10-c:DIR"`` or ``"cifar100-c:DIR"`` (``DIR`` as given).
        num_classes: 10 or 100.
        preprocessing: how the files become images (none: they are ``uint8`` already).
        directory: the folder holding the ``.npy`` files.
        n: images per severity (10000 for the real data): ``len(labels.npy) // 5``.
        labels: the ``n`` test labels (``int64``), the same at every severity.
    """

    def __init__(self, directory: Path, classes: int, spec: str, labels: np.ndarray) -> None:
        self.directory = directory
        self.num_classes = classes
        self.spec = spec
        self.n = len(labels)
        self.labels = labels
        self.preprocessing = {
            "decode": None,
            "resize": None,
            "layout": (
                f"uint8 N×32×32×3 from <corruption>.npy, memory-mapped; severity s = rows "
                f"(s-1)·{self.n}..s·{self.n}-1; labels.npy"
            ),
        }
        self._digest = _Digests()

    def corruptions(self) -> list[str]:
        """The corruptions whose ``<corruption>.npy`` is present: the 15 common ones, then the 4
        validation ones, each in the standard order. Other ``.npy`` files are ignored."""
        return [c for c in _KNOWN if (self.directory / f"{c}.npy").is_file()]

    def corrupted(self, corruption: str, severity: int) -> ArraySet:
        """The ``n`` test images under ``corruption`` at ``severity`` (1..5), memory-mapped.

        Returns:
            an :class:`~torch_dmc.data.sources.ArraySet` over rows ``(s-1)·n .. s·n-1`` of
            ``<corruption>.npy`` (``uint8`` ``n×32×32×3``, a ``numpy.memmap``: reading a batch
            reads only its rows) with the ``n`` labels; its ``files()`` are the SHA-256 of
            ``<corruption>.npy`` and ``labels.npy`` (each file hashed once per :class:`CifarC`).

        Raises:
            ValueError: an unknown corruption, a severity outside 1..5, a missing file, or a file
                of the wrong dtype or shape (one line naming the file).
        """
        if corruption not in _KNOWN:
            raise ValueError(
                f"{self.spec}: unknown corruption {corruption!r}; expected one of {', '.join(_KNOWN)}."
            )
        if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not (
            1 <= severity <= _SEVERITIES
        ):
            raise ValueError(
                f"{self.spec}: severity {severity!r} for {corruption}; expected an integer 1..5."
            )
        path = self.directory / f"{corruption}.npy"
        if not path.is_file():
            present = ", ".join(self.corruptions()) or "none"
            raise ValueError(
                f"{path}: no such file, so corruption {corruption} is not available in {self.spec} "
                f"(corruptions present: {present}); extract {corruption}.npy from "
                f"{_C_FOLDER[self.num_classes]}.tar into {self.directory} or choose other corruptions."
            )
        expected = f"uint8 of shape ({_SEVERITIES * self.n}, 32, 32, 3), severities 1..5 stacked"
        mm = _load_npy(path, mmap=True, expected=expected)
        if mm.dtype != np.uint8 or mm.ndim != 4 or tuple(mm.shape[1:]) != CIFAR_SHAPE:
            raise ValueError(
                f"{path}: found dtype {mm.dtype}, shape {tuple(mm.shape)}; expected {expected}. "
                f"Re-extract it from {_C_FOLDER[self.num_classes]}.tar."
            )
        if len(mm) != _SEVERITIES * self.n:
            raise ValueError(
                f"{path}: holds {len(mm)} images but labels.npy has {_SEVERITIES * self.n} labels; "
                f"expected {expected} (one image per label). Re-extract it (a truncated copy?)."
            )
        s = int(severity)
        images = mm[(s - 1) * self.n : s * self.n]
        files = {
            path.name: self._digest(path),
            "labels.npy": self._digest(self.directory / "labels.npy"),
        }
        return ArraySet(images, self.labels, files=files)


def _has_c_files(folder: Path) -> bool:
    return (folder / "labels.npy").is_file() or any((folder / f"{c}.npy").is_file() for c in _KNOWN)


def open_cifar_c(directory: str | Path, classes: int) -> CifarC:
    """Open a CIFAR-10-C (``classes=10``) or CIFAR-100-C (``classes=100``) folder.

    ``directory`` holds ``<corruption>.npy`` files (``uint8`` ``5n×32×32×3``; severities 1..5
    stacked: severity ``s`` is rows ``(s-1)·n .. s·n-1``) and ``labels.npy`` (``5n`` labels: the
    ``n`` test labels repeated once per severity). ``n`` is derived from ``labels.npy`` (10000 for
    the real data). A folder holding a ``CIFAR-10-C/`` (``CIFAR-100-C/``) subfolder is accepted too.
    Only ``labels.npy`` is read here; corruption files are opened, memory-mapped, by
    :meth:`CifarC.corrupted`.

    Raises:
        ValueError: ``classes`` not 10 or 100; no such folder; ``labels.npy`` or every corruption
            file missing; labels not ``5n`` integers in ``0..classes-1`` repeating the same ``n``
            labels (one line naming the file).
    """
    classes = _check_classes(classes, "open_cifar_c")
    spec = f"cifar{classes}-c:{directory}"
    root = Path(directory)
    expected = _C_EXPECTED.format(k=classes)
    if not root.is_dir():
        raise ValueError(f"{spec}: no such folder {str(root)!r}; expected {expected}.")
    folder = root
    if not _has_c_files(root) and _has_c_files(root / _C_FOLDER[classes]):
        folder = root / _C_FOLDER[classes]
    present = [c for c in _KNOWN if (folder / f"{c}.npy").is_file()]
    labels_path = folder / "labels.npy"
    if not labels_path.is_file():
        if not present:
            other = sorted(p.name for p in folder.glob("*.npy"))[:5]
            found = f"found only {', '.join(other)}" if other else "found no .npy file"
            raise ValueError(f"{folder}: not a CIFAR-{classes}-C folder ({found}); expected {expected}.")
        raise ValueError(
            f"{labels_path}: no such file (corruption files are present); expected {expected}. "
            f"Extract labels.npy from CIFAR-{classes}-C.tar."
        )
    if not present:
        raise ValueError(
            f"{folder}: holds labels.npy but no corruption file (none of {', '.join(_KNOWN)}.npy); "
            f"expected {expected}."
        )
    labels = _load_npy(labels_path, mmap=False, expected="a 1-D integer array of labels")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{labels_path}: found dtype {labels.dtype}, shape {labels.shape}; expected a 1-D integer "
            f"array of 5n labels (n test labels repeated for severities 1..5)."
        )
    total = len(labels)
    if total == 0 or total % _SEVERITIES:
        raise ValueError(
            f"{labels_path}: holds {total} labels; expected a positive multiple of 5 (n test labels "
            f"repeated for severities 1..5, 50000 for the real data)."
        )
    n = total // _SEVERITIES
    blocks = labels.reshape(_SEVERITIES, n)
    for s in range(1, _SEVERITIES):
        if not np.array_equal(blocks[s], blocks[0]):
            first = int(np.flatnonzero(blocks[s] != blocks[0])[0])
            raise ValueError(
                f"{labels_path}: the labels of severity {s + 1} (rows {s * n}..{(s + 1) * n - 1}) "
                f"differ from those of severity 1 (first at row {s * n + first}: {int(blocks[s, first])} "
                f"vs {int(blocks[0, first])}); expected the same {n} test labels repeated 5 times."
            )
    lo, hi = int(blocks[0].min()), int(blocks[0].max())
    if lo < 0 or hi >= classes:
        raise ValueError(
            f"{labels_path}: labels lie in {lo}..{hi}; expected 0..{classes - 1} for CIFAR-{classes}-C"
            + (" (is this CIFAR-100-C? use cifar100-c:DIR)" if classes == 10 and 0 <= lo and hi < 100 else "")
            + "."
        )
    return CifarC(folder, classes, spec, blocks[0].astype(np.int64))


def _pickled_message(classes: int, folder: Path) -> str:
    py_folder, py_tar = _PICKLED[classes]
    info = _BIN[classes]
    names = ", ".join(n for split in ("train", "test") for n in info["splits"][split])
    return (
        f"{folder}: this is the pickled python version of CIFAR-{classes} ({py_folder}/ from {py_tar}), "
        f"which would have to be unpickled (running arbitrary code from the file), so torch-dmc does "
        f"not read it; use the binary version instead: {info['tar']}, extracted to {info['folder']}/ "
        f"with {names}."
    )


def _is_pickled(classes: int, folder: Path) -> bool:
    if classes == 10:
        return (folder / "batches.meta").is_file() or (folder / "data_batch_1").is_file()
    return (folder / "meta").is_file() and ((folder / "train").is_file() or (folder / "test").is_file())


def _find_binary(root: Path, classes: int, split: str) -> tuple[Path, tuple[str, ...]]:
    """The folder holding the binary files of ``split`` (``root`` or its standard subfolder)."""
    info = _BIN[classes]
    names: tuple[str, ...] = info["splits"][split]
    candidates = [root, root / info["folder"]]
    for folder in candidates:
        present = [n for n in names if (folder / n).is_file()]
        if len(present) == len(names):
            return folder, names
        if present:
            missing = ", ".join(n for n in names if n not in present)
            raise ValueError(
                f"{folder}: the CIFAR-{classes} {split} split is incomplete: missing {missing}; "
                f"expected {', '.join(names)}. Re-extract {info['tar']}."
            )
    py_folder = _PICKLED[classes][0]
    for folder in (root, root / py_folder):
        if folder.is_dir() and _is_pickled(classes, folder):
            raise ValueError(_pickled_message(classes, folder))
    other = 100 if classes == 10 else 10
    for folder in (root, root / _BIN[other]["folder"]):
        if all((folder / n).is_file() for n in _BIN[other]["splits"][split]):
            raise ValueError(
                f"{folder}: holds the CIFAR-{other} binary files, not CIFAR-{classes}'s "
                f"({', '.join(names)}); use cifar{other}:DIR, or point to the CIFAR-{classes} folder."
            )
    hint = ""
    if (root / info["tar"]).is_file():
        hint = f" {info['tar']} is here: extract it first (tar xzf {root / info['tar']} -C {root})."
    raise ValueError(
        f"{root}: no CIFAR-{classes} binary {split} files ({', '.join(names)}) here or in "
        f"{info['folder']}/; expected the binary version ({info['tar']}, extracted).{hint}"
    )


def _read_records(path: Path, classes: int, out: np.ndarray, start: int) -> np.ndarray:
    """Decode one binary file into ``out[start:start+k]``; return its ``k`` labels (``int64``)."""
    label_bytes = _BIN[classes]["label_bytes"]
    record = label_bytes + _PIXELS
    size = path.stat().st_size
    layout = (
        "1 label byte" if classes == 10 else "1 coarse-label byte, 1 fine-label byte"
    ) + f" + {_PIXELS} pixel bytes"
    if size == 0 or size % record:
        raise ValueError(
            f"{path}: size {size} bytes is not a positive multiple of the {record}-byte record "
            f"({layout}); a truncated or different file? Re-extract {_BIN[classes]['tar']}."
        )
    k = size // record
    rec = np.memmap(path, dtype=np.uint8, mode="r", shape=(k, record))
    try:
        labels = np.array(rec[:, label_bytes - 1], dtype=np.int64)
        if classes == 100:
            coarse = rec[:, 0]
            if int(coarse.max()) >= 20:
                raise ValueError(
                    f"{path}: coarse labels reach {int(coarse.max())}; expected 0..19 in the first byte "
                    f"of each record ({layout}). Is this CIFAR-100's binary train.bin/test.bin?"
                )
        if int(labels.max()) >= classes:
            where = "the first" if classes == 10 else "the second (fine-label)"
            raise ValueError(
                f"{path}: labels reach {int(labels.max())}; expected 0..{classes - 1} in {where} byte of "
                f"each record ({layout}). Is this the CIFAR-{classes} binary version?"
            )
        planes = rec[:, label_bytes:].reshape(k, 3, 32, 32)
        out[start : start + k] = planes.transpose(0, 2, 3, 1)
    finally:
        del rec
    return labels


def open_cifar(directory: str | Path, classes: int, split: str) -> ArraySet:
    """Read one split of the CIFAR-10 / CIFAR-100 *binary* distribution.

    - CIFAR-10 (``cifar-10-binary.tar.gz`` → ``cifar-10-batches-bin/``): ``data_batch_1.bin`` ..
      ``data_batch_5.bin`` (train), ``test_batch.bin`` (test); records of 1 label byte + 3072 pixel
      bytes.
    - CIFAR-100 (``cifar-100-binary.tar.gz`` → ``cifar-100-binary/``): ``train.bin``, ``test.bin``;
      records of 1 coarse-label byte, 1 fine-label byte + 3072 pixel bytes. The fine label is used.

    Pixels are planar (1024 R, 1024 G, 1024 B bytes, each 32×32 row-major) and are returned
    channels last. ``directory`` is the folder holding the files, or the folder holding
    ``cifar-10-batches-bin/`` (``cifar-100-binary/``). The pickled "python version" is refused
    (unpickling would run code from the file).

    Args:
        directory: the folder.
        classes: 10 or 100.
        split: ``"train"`` or ``"test"``.

    Returns:
        an :class:`~torch_dmc.data.sources.ArraySet` of ``uint8`` ``N×32×32×3`` images (in memory)
        and ``int64`` labels in ``0..classes-1``, in file order; ``files()`` maps each ``.bin`` file
        read to its SHA-256.

    Raises:
        ValueError: bad ``classes`` or ``split``; no such folder; no binary files (or the pickled
            version); a file whose size is not a whole number of records, or labels out of range.
    """
    classes = _check_classes(classes, "open_cifar")
    if split not in ("train", "test"):
        raise ValueError(f"open_cifar: split must be 'train' or 'test'; found {split!r}.")
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(
            f"cifar{classes}:{directory}: no such folder {str(root)!r}; expected the CIFAR-{classes} "
            f"binary version ({_BIN[classes]['tar']}, extracted)."
        )
    folder, names = _find_binary(root, classes, split)
    record = _BIN[classes]["label_bytes"] + _PIXELS
    paths = [folder / n for n in names]
    counts = [p.stat().st_size // record for p in paths]
    images = np.empty((sum(counts),) + CIFAR_SHAPE, dtype=np.uint8)
    labels = []
    start = 0
    for path, k in zip(paths, counts, strict=True):
        labels.append(_read_records(path, classes, images, start))
        start += k
    files = {p.name: sha256_file(p) for p in paths}
    return ArraySet(images, np.concatenate(labels), files=files)
