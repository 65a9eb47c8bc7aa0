"""Labelled image sets read by row: the one interface every data spec's loader implements.

A benchmark cell reads its test images batch by batch in the order of a stream
(:mod:`torch_dmc.bench.streams`), and a fit reads training images chunk by chunk. Both only need
to know how many images a set has, their labels, and how to read a list of rows as ``uint8``
images. :class:`ImageSet` is that contract; :class:`ArraySet` implements it over an array (in
memory or memory-mapped, so that a CIFAR-10-C file is never loaded whole), :class:`ConcatSet`
over several sets (the mixed-domain protocol's stream), :class:`SubsetSet` over chosen rows of
another set (``--n-test``, a file of image ids). Loaders that decode files (ImageNet-C) override
:meth:`ImageSet.iter_batches` to decode in ``DataLoader`` workers, ahead of the model.

Every set says what it read from disk (:meth:`ImageSet.files`: name → SHA-256), which the bench
records in ``config.json``.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "ImageSet",
    "ArraySet",
    "ConcatSet",
    "SubsetSet",
    "sha256_file",
    "as_rows",
]

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def as_rows(rows: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """``rows`` as an ``int64`` array, checked to lie in ``0..n-1`` (``IndexError`` otherwise)."""
    out = np.asarray(rows, dtype=np.int64).reshape(-1)
    if out.size and (out.min() < 0 or out.max() >= n):
        bad = out[(out < 0) | (out >= n)][0]
        raise IndexError(f"row {int(bad)} out of range for a set of {n} images.")
    return out


class ImageSet(abc.ABC):
    """A finite, ordered set of labelled ``uint8`` images that can be read by row.

    Subclasses implement :attr:`labels` and :meth:`read`; the rest has defaults.
    """

    @property
    @abc.abstractmethod
    def labels(self) -> np.ndarray:
        """Class index of every image: ``int64`` array of shape ``N``."""

    @abc.abstractmethod
    def read(self, rows: np.ndarray) -> np.ndarray:
        """The images of ``rows`` (``int64``, any order, repeats allowed), in that order.

        Returns:
            ``uint8`` array ``n×H×W`` (grey) or ``n×H×W×C`` (channels last), as
            :func:`torch_dmc.data.arrays.to_tensor` takes.
        """

    def __len__(self) -> int:
        return len(self.labels)

    def iter_batches(self, batches: Sequence[np.ndarray], workers: int = 0) -> Iterator[np.ndarray]:
        """``read(rows)`` for every ``rows`` of ``batches``, in order.

        ``workers``: processes that may read ahead (sets that decode files use them; the default
        reads in this process, one batch at a time).
        """
        for rows in batches:
            yield self.read(as_rows(rows, len(self)))

    def files(self) -> dict[str, str]:
        """What the set read from disk: a name (relative path or group) → SHA-256 hex.

        Empty for data held in memory. For a tree of image files, one digest per folder over its
        files' digests (see the loader). The bench records it in ``config.json``.
        """
        return {}


class ArraySet(ImageSet):
    """Images of an array (``numpy`` or ``numpy.memmap``) with their labels.

    Reading fancy-indexes the array, so a memory-mapped file is only read for the rows asked.

    Args:
        images: ``uint8`` ``N×H×W`` or ``N×H×W×C``.
        labels: ``N`` class indices (any integer dtype; stored as ``int64``).
        files: what the arrays were read from, name → SHA-256 (see :meth:`ImageSet.files`).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, files: dict[str, str] | None = None):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(
                f"expected uint8 images N×H×W or N×H×W×C; found dtype {images.dtype}, shape "
                f"{tuple(images.shape)}."
            )
        labels = np.asarray(labels)
        if labels.shape != (len(images),):
            raise ValueError(
                f"expected one label per image ({len(images)}); found labels of shape {labels.shape}."
            )
        self.images = images
        self._labels = labels.astype(np.int64, copy=False)
        self._files = dict(files or {})

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def read(self, rows: np.ndarray) -> np.ndarray:
        rows = as_rows(rows, len(self))
        return np.ascontiguousarray(self.images[rows])

    def files(self) -> dict[str, str]:
        return dict(self._files)


class SubsetSet(ImageSet):
    """The rows ``rows`` of ``base``, in that order (e.g. the first ``n_test`` images, or those a
    file of image ids names)."""

    def __init__(self, base: ImageSet, rows: Sequence[int] | np.ndarray):
        self.base = base
        self.rows = as_rows(rows, len(base))
        self._labels = base.labels[self.rows]

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self.base.read(self.rows[as_rows(rows, len(self))])

    def iter_batches(self, batches: Sequence[np.ndarray], workers: int = 0) -> Iterator[np.ndarray]:
        return self.base.iter_batches([self.rows[as_rows(b, len(self))] for b in batches], workers)

    def files(self) -> dict[str, str]:
        return self.base.files()


class ConcatSet(ImageSet):
    """Several sets one after the other: row ``r`` of the whole is row ``r - start_i`` of set ``i``.

    The mixed-domain protocol's stream is the concatenation of one severity's corrupted sets,
    shuffled; :meth:`source_of` tells which set (corruption) each row came from.
    """

    def __init__(self, sets: Sequence[ImageSet]):
        if not sets:
            raise ValueError("ConcatSet needs at least one set.")
        self.sets = list(sets)
        sizes = [len(s) for s in self.sets]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._labels = np.concatenate([s.labels for s in self.sets]).astype(np.int64, copy=False)
        self._read_files: dict[str, str] = {}

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def source_of(self, rows: np.ndarray) -> np.ndarray:
        """Index of the set each of ``rows`` belongs to (``int64``, same shape)."""
        rows = as_rows(rows, len(self))
        return np.searchsorted(self.starts, rows, side="right") - 1

    def read(self, rows: np.ndarray) -> np.ndarray:
        rows = as_rows(rows, len(self))
        which = self.source_of(rows)
        out = None
        for i in np.unique(which):
            pick = np.flatnonzero(which == i)
            part = self.sets[i].read(rows[pick] - self.starts[i])
            if out is None:
                out = np.empty((len(rows),) + part.shape[1:], dtype=part.dtype)
            elif part.shape[1:] != out.shape[1:]:
                raise ValueError(
                    f"the concatenated sets hold images of different shapes: {out.shape[1:]} and "
                    f"{part.shape[1:]}."
                )
            out[pick] = part
        if out is None:  # no rows
            out = self.sets[0].read(np.zeros(0, np.int64))
        return out

    def iter_batches(self, batches: Sequence[np.ndarray], workers: int = 0) -> Iterator[np.ndarray]:
        """As :meth:`ImageSet.iter_batches`; when every part is of one type that can be
        concatenated (a classmethod ``concatenated(parts)``, e.g. image files), the batches are read
        from that concatenation, so its own read-ahead (decoding in workers) applies."""
        kinds = {type(s) for s in self.sets}
        (kind,) = kinds if len(kinds) == 1 else (None,)
        if workers > 0 and kind is not None and hasattr(kind, "concatenated"):
            merged = kind.concatenated(self.sets)
            yield from merged.iter_batches([as_rows(b, len(self)) for b in batches], workers)
            self._read_files.update(merged.files())
        else:
            yield from super().iter_batches(batches, workers)

    def files(self) -> dict[str, str]:
        merged: dict[str, str] = dict(self._read_files)
        for s in self.sets:
            merged.update(s.files())
        return merged


class TestData(abc.ABC):
    """The test side of a data spec: the corrupted sets on disk (or generated), by name.

    Every corrupted set of one data spec lists the same images in the same order (ImageNet-C's
    folders hold the same files; CIFAR-10-C's rows are the test set's at every severity), so the
    same rows select the same images everywhere (``--n-test``, a file of image ids).

    Attributes:
        spec: the data spec it was opened from, e.g. ``"cifar10-c:/data/CIFAR-10-C"``.
        num_classes: classes ``K`` (labels lie in ``0..K-1``).
        preprocessing: how files become ``uint8`` images (recorded in ``config.json``), e.g.
            ``{"decode": "Pillow RGB", "resize": None}``.
    """

    __test__ = False  # not a pytest class

    spec: str
    num_classes: int
    preprocessing: dict

    @abc.abstractmethod
    def corruptions(self) -> list[str]:
        """The corruptions this data holds, in the standard order (15 test ones, then the
        validation ones when present)."""

    @abc.abstractmethod
    def corrupted(self, corruption: str, severity: int) -> ImageSet:
        """The images of one corruption at ``severity`` (1..5).

        Raises:
            ValueError: an unknown corruption or severity, or files missing or malformed (one line:
                which file, what was expected, what was found).
        """

    def select(self, n: int | None, image_ids: Sequence[str] | None = None) -> np.ndarray | None:
        """Rows of every set to use: ``None`` for all; the first ``n`` (arrays); the rows whose ids
        are listed (image trees, ids relative to a corruption/severity folder). Default: the first
        ``n``; ``image_ids`` refused."""
        if image_ids is not None:
            raise ValueError(f"{self.spec}: a file of image ids applies to image-tree data "
                             "(imagenet-c, tiny-imagenet-c), not to this spec; use --n-test.")
        return None if n is None else np.arange(n)

    def describe(self) -> dict:
        """What to record in ``config.json``: spec, classes, preprocessing."""
        return {"spec": self.spec, "num_classes": self.num_classes,
                "preprocessing": dict(self.preprocessing)}
