"""Image-tree loaders: ImageNet-C, Tiny-ImageNet-C and a folder of class folders, decoded by row.

Three kinds of data spec lie on disk as trees of image files (see :mod:`torch_dmc.data.specs`)::

    imagenet-c:DIR        DIR/<corruption>/<severity>/<wnid>/*.JPEG   224×224, 1000 classes
    tiny-imagenet-c:DIR   DIR/<corruption>/<severity>/<wnid>/*.JPEG   64×64, 200 classes
    imagefolder:DIR       DIR/<class>/*.{JPEG,jpg,jpeg,png}           any size, resized + cropped

ImageNet-C is also accepted as distributed in groups, ``DIR/<group>/<corruption>/<severity>/...``
with ``group`` one of ``noise, blur, weather, digital, extra``.

Files are decoded with Pillow (``Image.open(...).convert("RGB")``) into ``uint8`` ``H×W×3``
arrays; :class:`ImageFiles` reads them by row (:class:`~torch_dmc.data.sources.ImageSet`), in this
process or in ``torch.utils.data.DataLoader`` worker processes that decode the next batches while
the model runs on the current one (at most ``2 × workers`` batches in flight, so memory does not
grow with the number of images). Class index ``k`` is the ``k``-th class folder in sorted order (the
ImageNet and ``torchvision.datasets.ImageFolder`` convention); images are listed by class, then by
file name.

Every file is read once as bytes, hashed (SHA-256) and decoded from memory, so that
:meth:`ImageFiles.files` can say exactly what was read (the bench records it in ``config.json``).

Example:
    >>> from torch_dmc.data.imagenet import open_imagenet_c
    >>> data = open_imagenet_c("/data/ImageNet-C")                    # doctest: +SKIP
    >>> s = data.corrupted("fog", 5)                                  # doctest: +SKIP
    >>> rows = data.select(5000)  # a seeded subset of 5000 images    # doctest: +SKIP
    >>> for x in s.iter_batches([rows[i:i + 200] for i in range(0, 5000, 200)], workers=4):  # doctest: +SKIP
    ...     pass  # x: uint8 200×224×224×3, the next batches decoded meanwhile
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from .corruptions import ALL_CORRUPTIONS, COMMON_CORRUPTIONS, VALIDATION_CORRUPTIONS
from .sources import ImageSet, TestData, as_rows

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageFiles",
    "ImageNetC",
    "open_imagenet_c",
    "open_imagefolder",
    "read_image_ids",
    "subset_rows",
    "digest_entries",
]

#: File suffixes taken as images (compared case-insensitively).
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
#: The group folders of ImageNet-C as distributed (noise.tar, blur.tar, ...).
IMAGENET_C_GROUPS = ("noise", "blur", "weather", "digital", "extra")
#: Seconds a ``DataLoader`` worker may take for one batch before the read fails (a dead or hung
#: worker then raises instead of blocking the bench forever).
WORKER_TIMEOUT_S = 300.0

_LAYOUT = "DIR/<corruption>/<severity 1-5>/<wnid>/*.JPEG"
_SUFFIX_TEXT = "*.JPEG, *.jpg, *.jpeg, *.png"


# ---------------------------------------------------------------------------------------------
# decoding (module level: DataLoader workers import it)
# ---------------------------------------------------------------------------------------------


def _pil():
    """Pillow's ``Image`` module (imported when first needed: Pillow is no core dependency)."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("decoding image files needs Pillow, which is not installed: "
                          "pip install pillow") from None
    return Image


def _resize_crop(img, size: int, resize: int):
    """torchvision's ``Resize(resize)`` (shorter side, bilinear) then ``CenterCrop(size)``, on a PIL
    image."""
    Image = _pil()
    w, h = img.size
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nw, nh = int(resize * w / h), resize
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), getattr(Image, "Resampling", Image).BILINEAR)
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _decode(path: str, size: int | None, resize: int | None, note: str) -> tuple[np.ndarray, bytes]:
    """Read ``path`` once: (``uint8`` ``H×W×3`` image after preprocessing, SHA-256 digest of its
    bytes, 32 raw bytes). ``ValueError`` (one line) for a file that cannot be read or decoded, or a
    stored size other than ``size×size`` when ``resize`` is None."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the file ({type(err).__name__}: {err.strerror or err}); "
                         "expected a readable image file.") from None
    digest = hashlib.sha256(data).digest()
    Image = _pil()
    try:
        with Image.open(io.BytesIO(data)) as im:
            img = im.convert("RGB")
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(f"{path}: cannot decode it as an image ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no detail'}); expected a JPEG "
                         "or PNG file: replace it with a good copy.") from None
    if resize is not None and size is not None:
        img = _resize_crop(img, size, resize)
    elif size is not None and img.size != (size, size):
        w, h = img.size
        raise ValueError(f"{path}: image is {w}×{h} pixels; expected {size}×{size}{note}.")
    return np.asarray(img, dtype=np.uint8), digest


class _Decoder(torch.utils.data.Dataset):
    """Map-style dataset for ``DataLoader`` workers: row → (row, image or None, digest, error).

    Errors travel as one-line text (``DataLoader`` would wrap an exception in a multi-line message);
    :meth:`collate` stacks a batch into one ``uint8`` tensor (shared memory between processes).
    """

    def __init__(self, paths: list[str], size: int | None, resize: int | None, note: str):
        self.paths, self.size, self.resize, self.note = paths, size, resize, note

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img, digest = _decode(self.paths[i], self.size, self.resize, self.note)
        except ValueError as err:
            return i, None, b"", str(err)
        return i, img, digest, None

    def collate(self, items: list) -> tuple[list[int], torch.Tensor | None, list[bytes], str | None]:
        """(rows, ``uint8`` ``n×H×W×3`` tensor, digests, first error or None) of one batch."""
        rows = [it[0] for it in items]
        for it in items:
            if it[3] is not None:
                return rows, None, [], it[3]
        if not items:
            return rows, None, [], None
        shape = items[0][1].shape
        for it in items:
            if it[1].shape != shape:
                return rows, None, [], _mixed_sizes(self.paths[items[0][0]], shape,
                                                    self.paths[it[0]], it[1].shape)
        stacked = np.stack([it[1] for it in items])
        return rows, torch.from_numpy(stacked), [it[2] for it in items], None


def _mixed_sizes(first: str, first_shape: tuple, path: str, shape: tuple) -> str:
    return (f"{path}: image is {shape[1]}×{shape[0]} pixels but {first} is {first_shape[1]}×"
            f"{first_shape[0]}; expected one size for every image of the set (give size= and "
            "resize= to resize and centre-crop them).")


def digest_entries(entries: Iterable[tuple[str, bytes]]) -> str:
    """SHA-256 (hex) of a set of files: over ``id.encode("utf-8") + b"\\0" + digest`` for every
    ``(id, digest)`` in sorted order of ``id`` (``digest``: the 32-byte SHA-256 of the file's
    bytes). What :meth:`ImageFiles.files` reports, so it can be recomputed with ``hashlib``."""
    h = hashlib.sha256()
    for rel, digest in sorted(entries):
        h.update(rel.encode("utf-8") + b"\0" + digest)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# a list of image files
# ---------------------------------------------------------------------------------------------


class ImageFiles(ImageSet):
    """Labelled image files decoded with Pillow into ``uint8`` ``n×H×W×3`` arrays.

    Preprocessing, image by image: ``Image.open(...).convert("RGB")``; then, when ``resize`` is
    given, the shorter side is resized to ``resize`` (bilinear, ``PIL.Image.BILINEAR``) and the
    centre ``size×size`` cropped (torchvision's ``Resize(256) + CenterCrop(224)``, as ImageNet-C
    was made from ImageNet's validation images). Without ``resize`` images are taken as stored and
    must be ``size×size`` (or, with ``size=None``, all of one size); another size is an error.

    Every file read is hashed; :meth:`files` returns ``{name: digest}`` over the files read so far
    (see :func:`digest_entries`) and :attr:`read_counts` ``{name: files read}``.

    Args:
        paths: the image files (absolute, or relative to the current folder), in row order.
        labels: class index of every file (``N``; stored as ``int64``).
        root: the folder the :attr:`ids` are relative to; every path must lie below it.
        size: the side of the square images returned (``None``: as stored, one size for all).
        resize: the shorter side before centre-cropping ``size`` (``None``: no resize); ``≥ size``.
        name: the key of :meth:`files` and :attr:`read_counts` (default ``str(root)``), e.g.
            ``"gaussian_noise/5"`` for an ImageNet-C folder.
        classes: the class names, label order (informative; e.g. the wnids).
        note: appended to the message of an image of the wrong size (what to do about it).

    Attributes:
        ids: path of every row relative to ``root``, ``/``-separated, e.g.
            ``"n01440764/ILSVRC2012_val_00000293.JPEG"``.
        read_counts: ``{name: number of distinct files read}`` (empty before any read).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], labels: np.ndarray, root: str | os.PathLike,
                 size: int | None = None, resize: int | None = None, *, name: str | None = None,
                 classes: Sequence[str] | None = None, note: str = ""):
        labels = np.asarray(labels)
        if labels.shape != (len(paths),):
            raise ValueError(f"expected one label per image file ({len(paths)}); found labels of "
                             f"shape {labels.shape}.")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"size: expected a positive integer or None; found {size!r}.")
        if resize is not None:
            if size is None:
                raise ValueError(f"resize={resize} needs a crop size; found size=None.")
            if not isinstance(resize, int) or resize < size:
                raise ValueError(f"resize: expected an integer ≥ size ({size}); found {resize!r}.")
        self.root = Path(root)
        self.size, self.resize = size, resize
        self.name = str(root) if name is None else name
        self.classes = None if classes is None else list(classes)
        self.note = note
        self._paths = [os.fspath(p) for p in paths]
        self._labels = labels.astype(np.int64, copy=False)
        prefix = os.fspath(root).rstrip(os.sep) + os.sep
        ids = []
        for p in self._paths:
            if not p.startswith(prefix):
                raise ValueError(f"{p}: not below the root folder {root}; expected every image file "
                                 "to lie in that folder.")
            ids.append(p[len(prefix):].replace(os.sep, "/"))
        self.ids: list[str] = ids
        self._digests: dict[int, bytes] = {}
        self._shape: tuple[int, ...] | None = None if size is None else (size, size, 3)
        self._first: str | None = None  # the file that fixed _shape when size is None

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def paths(self) -> list[str]:
        """The image files, in row order (``str``)."""
        return self._paths

    @property
    def preprocessing(self) -> dict:
        """How files become images, for ``config.json``."""
        return {"decode": "Pillow, RGB", "resize": self.resize,
                "crop": self.size if self.resize is not None else None, "size": self.size}

    @property
    def read_counts(self) -> dict[str, int]:
        """``{name: number of distinct files read so far}`` (empty before any read)."""
        return {self.name: len(self._digests)} if self._digests else {}

    def _check_shape(self, row: int, shape: tuple[int, ...]) -> None:
        if self._shape is None:
            self._shape, self._first = shape, self._paths[row]
        elif shape != self._shape:
            raise ValueError(_mixed_sizes(self._first or "the first image", self._shape,
                                          self._paths[row], shape))

    def _empty(self) -> np.ndarray:
        if self._shape is None:  # size=None and nothing read yet: learn the size from row 0
            if not self._paths:
                return np.zeros((0, 0, 0, 3), np.uint8)
            img, _ = _decode(self._paths[0], None, None, self.note)
            self._check_shape(0, img.shape)
        return np.zeros((0,) + tuple(self._shape), np.uint8)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Decode the files of ``rows`` in this process: ``uint8`` ``n×H×W×3``, in ``rows`` order.

        Raises:
            ValueError: a file that cannot be read or decoded, or of the wrong size (one line).
        """
        rows = as_rows(rows, len(self))
        if not len(rows):
            return self._empty()
        out = None
        for k, r in enumerate(rows.tolist()):
            img, digest = _decode(self._paths[r], self.size, self.resize, self.note)
            self._check_shape(r, img.shape)
            if out is None:
                out = np.empty((len(rows),) + img.shape, np.uint8)
            out[k] = img
            self._digests[r] = digest
        return out

    def iter_batches(self, batches: Sequence[np.ndarray], workers: int = 0) -> Iterator[np.ndarray]:
        """``read(rows)`` for every ``rows`` of ``batches``, in order, decoded by ``workers``
        processes ahead of the consumer (``0``: in this process, one batch at a time).

        With workers, a ``torch.utils.data.DataLoader`` (default start method: fork on Linux) takes
        ``batches`` as its ``batch_sampler``, so it yields exactly these batches in this order;
        ``prefetch_factor=2`` bounds what is in flight to ``2 × workers`` batches, and a worker
        that takes longer than :data:`WORKER_TIMEOUT_S` for one batch fails the read.

        Yields:
            ``uint8`` ``n×H×W×3`` arrays.

        Raises:
            ValueError: a file that cannot be read or decoded, or of the wrong size (one line).
        """
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers: expected an integer ≥ 0; found {workers!r}.")
        batches = [as_rows(b, len(self)) for b in batches]
        if workers == 0 or not batches:
            for rows in batches:
                yield self.read(rows)
            return
        _pil()  # no Pillow: one ImportError here rather than one per worker
        decoder = _Decoder(self._paths, self.size, self.resize, self.note)
        loader = torch.utils.data.DataLoader(
            decoder, batch_sampler=[b.tolist() for b in batches], num_workers=workers,
            collate_fn=decoder.collate, pin_memory=False, persistent_workers=False,
            prefetch_factor=2, timeout=WORKER_TIMEOUT_S)
        it = iter(loader)
        try:
            for rows, images, digests, error in it:
                if error is not None:
                    raise ValueError(error)
                if images is None:  # an empty batch
                    yield self._empty()
                    continue
                self._check_shape(rows[0], tuple(images.shape[1:]))
                for r, d in zip(rows, digests, strict=True):
                    self._digests[r] = d
                yield images.numpy()
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:  # stop the workers now, even when the consumer stopped early
                shutdown()
            del it

    @classmethod
    def concatenated(cls, parts: Sequence[ImageFiles]) -> ImageFiles:
        """One set of the parts' files one after the other (the mixed-domain stream of image
        files: decoded in workers like any set). Its ids are relative to the parts' common
        folder; the parts must share size and preprocessing."""
        first = parts[0]
        if any((p.size, p.resize) != (first.size, first.resize) for p in parts):
            raise ValueError("cannot concatenate image sets with different sizes or preprocessing.")
        root = Path(os.path.commonpath([os.fspath(p.root) for p in parts]))
        paths = [path for p in parts for path in p.paths]
        labels = np.concatenate([p.labels for p in parts])
        name = "+".join(p.name for p in parts)
        return cls(paths, labels, root, first.size, first.resize, name=name, classes=first.classes,
                   note=first.note)

    def files(self) -> dict[str, str]:
        """``{name: SHA-256 hex}`` over the files read so far (:func:`digest_entries` of their
        ``(id, file digest)`` pairs); empty before any read. :attr:`read_counts` says how many."""
        if not self._digests:
            return {}
        return {self.name: digest_entries((self.ids[r], d) for r, d in self._digests.items())}


# ---------------------------------------------------------------------------------------------
# listing folders
# ---------------------------------------------------------------------------------------------


def _subfolders(folder: Path) -> list[str]:
    """Sorted names of the folders in ``folder`` (hidden ones, ``.*``, left out)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _image_names(folder: Path) -> list[str]:
    """Sorted names of the image files in ``folder`` (suffix in :data:`IMAGE_SUFFIXES`)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries
                      if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file())


def _list_tree(folder: Path, classes: Sequence[str], what: str) -> tuple[list[str], np.ndarray]:
    """The ids ``<class>/<file>`` (by class, then file name) and labels of ``folder/<class>/*``."""
    ids: list[str] = []
    counts = []
    for c in classes:
        names = _image_names(folder / c)
        if not names:
            raise ValueError(f"{what}: class folder {folder / c} holds no images ({_SUFFIX_TEXT}); "
                             "expected every class folder to hold its images: re-extract it (or "
                             "remove it everywhere, which renumbers the classes).")
        ids.extend(f"{c}/{n}" for n in names)
        counts.append(len(names))
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
    return ids, labels


def _listed(names: Sequence[str], k: int = 6) -> str:
    shown = ", ".join(names[:k])
    return shown + (f", ... ({len(names)} in all)" if len(names) > k else "") if names else "none"


def subset_rows(n_total: int, n: int | None, seed: int) -> np.ndarray:
    """A seeded random subset of ``n`` of ``n_total`` rows, sorted (``int64``); all rows when ``n``
    is None or ``≥ n_total``: ``np.sort(np.random.default_rng(seed).permutation(n_total)[:n])``.

    The rule of ``--fit-images N`` (the same as ``torch_dmc.bench.runner.fit_subset``) and of
    ``--n-test N`` on image trees (seed 0), whose files are sorted by class, so that the first
    ``N`` would hold a few classes only.
    """
    if n is None or n >= n_total:
        return np.arange(n_total)
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n_total)[:n])


def read_image_ids(path: str | os.PathLike) -> list[str]:
    """The image ids listed in a text file: one per line, e.g.
    ``n01440764/ILSVRC2012_val_00000293.JPEG`` (relative to a corruption/severity folder); blank
    lines and lines starting with ``#`` are ignored, spaces around an id stripped.

    Raises:
        ValueError: no such file, or it lists no id (one line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; expected a text file of image ids, one per line "
                         "(e.g. n01440764/ILSVRC2012_val_00000293.JPEG).") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read it as UTF-8 text ({type(err).__name__}); expected a "
                         "text file of image ids, one per line.") from None
    ids = [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]
    if not ids:
        raise ValueError(f"{path}: lists no image id (only blank or # lines); expected one id per "
                         "line, e.g. n01440764/ILSVRC2012_val_00000293.JPEG.")
    return ids


# ---------------------------------------------------------------------------------------------
# ImageNet-C, Tiny-ImageNet-C
# ---------------------------------------------------------------------------------------------


class ImageNetC(TestData):
    """ImageNet-C or Tiny-ImageNet-C on disk: ``DIR/<corruption>/<severity>/<wnid>/*.JPEG``.

    Built by :func:`open_imagenet_c`. The classes are the wnid folders of the first
    corruption/severity folder found (standard corruption order, severities 1..5), sorted; every
    other folder must hold the same wnids and the same files (the same ids, in the same order), so
    that a row means the same image everywhere.

    Attributes:
        directory: ``DIR``.
        tiny: Tiny-ImageNet-C (64×64) rather than ImageNet-C (224×224).
        size: the side of the images (checked when decoding).
        classes: the wnids, label order.
        reference: the corruption/severity folder the classes and ids come from, e.g.
            ``"gaussian_noise/1"``.
    """

    def __init__(self, directory: str | os.PathLike, *, tiny: bool = False, size: int | None = None):
        self.directory = Path(directory)
        self.tiny = bool(tiny)
        kind = "tiny-imagenet-c" if tiny else "imagenet-c"
        self.spec = f"{kind}:{directory}"
        self.size = (64 if tiny else 224) if size is None else int(size)
        self.preprocessing = {"decode": "Pillow, RGB", "resize": None, "crop": None, "size": self.size}
        self._note = (" (imagenet-c as distributed holds 224×224 images, tiny-imagenet-c 64×64: "
                      "check the data spec's kind, or re-extract a folder whose images were re-encoded)")
        if not self.directory.is_dir():
            raise ValueError(f"{self.spec}: no such folder {str(directory)!r}; expected {kind}:DIR "
                             f"with the layout {_LAYOUT}.")
        self._folders = self._find_corruptions()
        if not self._folders:
            found = _subfolders(self.directory)
            raise ValueError(f"{self.spec}: no corruption folder in {directory} (found: "
                             f"{_listed(found)}); expected {_LAYOUT} with corruption names such as "
                             f"{', '.join(COMMON_CORRUPTIONS[:3])}.")
        self.reference = self._find_reference()
        c, s = self.reference
        ref_dir = self._folders[c] / str(s)
        self.classes = _subfolders(ref_dir)
        if not self.classes:
            raise ValueError(f"{self.spec}: {ref_dir} holds no class folders; expected {_LAYOUT} "
                             "(one folder per wnid, e.g. n01440764).")
        self.num_classes, self._label_of = self._class_index(kind)
        self._ref_ids: list[str] | None = None
        self._ref_labels: np.ndarray | None = None

    def _class_index(self, kind: str) -> tuple[int, np.ndarray]:
        """The number of classes and each wnid folder's class index.

        A class index is the wnid's position among all the data set's wnids, sorted (1000 for
        ImageNet-C, 200 for Tiny-ImageNet-C). A tree with fewer wnid folders needs ``DIR/wnids.txt``
        listing all of them (one per line), or its labels would not match the model's classes.
        """
        expected = 200 if self.tiny else 1000
        listed = self.directory / "wnids.txt"
        if listed.is_file():
            wnids = sorted({w.strip() for w in listed.read_text().splitlines() if w.strip()})
            unknown = [c for c in self.classes if c not in wnids]
            if unknown:
                raise ValueError(f"{self.spec}: class folder {unknown[0]} is not listed in {listed} "
                                 f"({len(unknown)} such); expected it to list every wnid.")
            return len(wnids), np.array([wnids.index(c) for c in self.classes], dtype=np.int64)
        if len(self.classes) != expected:
            raise ValueError(f"{self.spec}: {len(self.classes)} class folders, but {kind} has "
                             f"{expected}: a class index is the wnid's position among all {expected} "
                             f"sorted wnids, so labels would not match the model's classes. For a "
                             f"subset, list all {expected} wnids in {listed} (one per line).")
        return expected, np.arange(expected, dtype=np.int64)

    def _find_corruptions(self) -> dict[str, Path]:
        """Corruption name → its folder, flat (``DIR/c``) or grouped (``DIR/<group>/c``)."""
        found: dict[str, Path] = {}
        for c in ALL_CORRUPTIONS:
            if (self.directory / c).is_dir():
                found[c] = self.directory / c
            else:
                for g in IMAGENET_C_GROUPS:
                    if (self.directory / g / c).is_dir():
                        found[c] = self.directory / g / c
                        break
        return found

    def _severities(self, corruption: str) -> list[int]:
        return [s for s in range(1, 6) if (self._folders[corruption] / str(s)).is_dir()]

    def _find_reference(self) -> tuple[str, int]:
        for c in self.corruptions():
            sev = self._severities(c)
            if sev:
                return c, sev[0]
        raise ValueError(f"{self.spec}: no severity folder (1..5) in any corruption folder "
                         f"({_listed(list(self._folders))}); expected {_LAYOUT}.")

    def _rel(self, folder: Path) -> str:
        return folder.relative_to(self.directory).as_posix()

    def corruptions(self) -> list[str]:
        """The corruptions present, in the standard order: the 15 test ones
        (:data:`~torch_dmc.data.corruptions.COMMON_CORRUPTIONS`), then the validation ones
        (:data:`~torch_dmc.data.corruptions.VALIDATION_CORRUPTIONS`). Other folders are ignored."""
        return [c for c in COMMON_CORRUPTIONS + VALIDATION_CORRUPTIONS if c in self._folders]

    def _reference_listing(self) -> tuple[list[str], np.ndarray]:
        if self._ref_ids is None:
            c, s = self.reference
            self._ref_ids, folder_labels = _list_tree(self._folders[c] / str(s), self.classes, self.spec)
            self._ref_labels = self._label_of[folder_labels]
        return self._ref_ids, self._ref_labels

    @property
    def ids(self) -> list[str]:
        """The image ids of every corrupted set, row order: ``"<wnid>/<file>"`` (relative to a
        corruption/severity folder), as listed in the :attr:`reference` folder. Matches the ids of
        :func:`open_imagefolder` over ImageNet's validation images sorted into wnid folders."""
        return self._reference_listing()[0]

    def corrupted(self, corruption: str, severity: int) -> ImageFiles:
        """The images of ``corruption`` at ``severity`` (1..5): an :class:`ImageFiles` whose ids are
        relative to the severity folder (``"<wnid>/<file>"``), named ``"<corruption>/<severity>"``
        in :meth:`ImageFiles.files`.

        Raises:
            ValueError: an unknown corruption or severity, a missing folder, an empty class folder,
                class folders or files that differ from the reference folder's (one line).
        """
        if corruption not in ALL_CORRUPTIONS:
            raise ValueError(f"{self.spec}: unknown corruption {corruption!r}; expected one of "
                             f"{', '.join(ALL_CORRUPTIONS)}.")
        if corruption not in self._folders:
            raise ValueError(f"{self.spec}: no folder {self.directory / corruption} (corruptions "
                             f"present: {_listed(self.corruptions(), 19)}); expected {_LAYOUT}.")
        if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) \
                or not 1 <= severity <= 5:
            raise ValueError(f"{self.spec}: severity {severity!r}; expected an integer 1..5.")
        severity = int(severity)
        folder = self._folders[corruption] / str(severity)
        if not folder.is_dir():
            present = ", ".join(map(str, self._severities(corruption))) or "none"
            raise ValueError(f"{self.spec}: no folder {folder} (severities present for {corruption}: "
                             f"{present}); expected {_LAYOUT}.")
        wnids = _subfolders(folder)
        if wnids != self.classes:
            ref = self._folders[self.reference[0]] / str(self.reference[1])
            missing = sorted(set(self.classes) - set(wnids))
            extra = sorted(set(wnids) - set(self.classes))
            raise ValueError(f"{self.spec}: {folder} holds other class folders than {ref} (missing "
                             f"here: {_listed(missing, 3)}; extra here: {_listed(extra, 3)}); "
                             "expected every corruption/severity folder to hold the same wnid "
                             "folders: re-extract the archive.")
        ref_ids, ref_labels = self._reference_listing()
        ids, _ = _list_tree(folder, self.classes, self.spec)
        if ids != ref_ids:
            raise ValueError(f"{self.spec}: {folder} lists other files than the reference folder "
                             f"{self._rel(self._folders[self.reference[0]] / str(self.reference[1]))}"
                             f" ({_first_difference(ids, ref_ids)}); expected the same files in "
                             "every corruption/severity folder: re-extract the archive.")
        prefix = os.fspath(folder) + os.sep
        paths = [prefix + i.replace("/", os.sep) for i in ref_ids]
        return ImageFiles(paths, ref_labels, folder, self.size, None, name=f"{corruption}/{severity}",
                          classes=self.classes, note=self._note)

    def select(self, n: int | None, image_ids: Sequence[str] | None = None) -> np.ndarray | None:
        """Rows of every corrupted set to use.

        - ``image_ids`` (e.g. from :func:`read_image_ids`): the rows of these ids, in their order
          (ids relative to a corruption/severity folder, ``"<wnid>/<file>"``); with ``n``, the
          first ``n`` of them.
        - ``n`` alone: a seeded random subset, ``subset_rows(N, n, seed=0)`` (sorted), so that it
          holds images of all classes (the files are listed by class).
        - neither: ``None`` (all rows).

        Raises:
            ValueError: ``n < 1``, or an id that is not in the folders (one line, the first one).
        """
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
            raise ValueError(f"{self.spec}: expected a positive number of test images; found {n!r}.")
        if image_ids is None:
            if n is None:
                return None
            return subset_rows(len(self._reference_listing()[0]), int(n), 0)
        ids = list(image_ids)
        if not ids:
            raise ValueError(f"{self.spec}: the list of image ids is empty; expected ids such as "
                             "n01440764/ILSVRC2012_val_00000293.JPEG.")
        ref_ids, _ = self._reference_listing()
        index = {i: k for k, i in enumerate(ref_ids)}
        rows = []
        for i in ids:
            key = str(i).strip().replace("\\", "/").removeprefix("./")
            if key not in index:
                ref = self._folders[self.reference[0]] / str(self.reference[1])
                raise ValueError(f"{self.spec}: image id {i!r} is not in {ref} ({len(ref_ids)} "
                                 "images); expected ids relative to a corruption/severity folder, "
                                 f"such as {ref_ids[0]!r}.")
            rows.append(index[key])
        out = np.asarray(rows, dtype=np.int64)
        return out if n is None else out[: int(n)]


def _first_difference(ids: list[str], ref: list[str]) -> str:
    """Where two id lists first differ, in words."""
    for k, (a, b) in enumerate(zip(ids, ref, strict=False)):
        if a != b:
            return (f"{len(ids)} files against {len(ref)}; first difference at position {k}: {a!r} "
                    f"here, {b!r} there")
    if len(ids) < len(ref):
        return f"{len(ids)} files against {len(ref)}; {ref[len(ids)]!r} is missing here"
    return f"{len(ids)} files against {len(ref)}; {ids[len(ref)]!r} is extra here"


def open_imagenet_c(directory: str | os.PathLike, *, tiny: bool = False,
                    size: int | None = None) -> ImageNetC:
    """Open ImageNet-C (``tiny=False``, 224×224 images) or Tiny-ImageNet-C (``tiny=True``, 64×64)
    at ``directory``: ``DIR/<corruption>/<severity>/<wnid>/*.JPEG`` (or grouped,
    ``DIR/<group>/<corruption>/...``). Only the folder names are read here; files are listed when a
    corrupted set is opened, decoded when read.

    Args:
        directory: ``DIR``.
        tiny: Tiny-ImageNet-C.
        size: the side of the images (default 224, or 64 with ``tiny``); images of another size are
            refused when decoded.

    Raises:
        ValueError: no such folder, or no corruption/severity/class folder in it (one line).
    """
    return ImageNetC(directory, tiny=tiny, size=size)


# ---------------------------------------------------------------------------------------------
# a folder of class folders
# ---------------------------------------------------------------------------------------------


def open_imagefolder(directory: str | os.PathLike, *, size: int = 224,
                     resize: int | None = 256) -> ImageFiles:
    """The images of ``DIR/<class>/*.{JPEG,jpg,jpeg,png}`` (e.g. ImageNet's validation set sorted
    into wnid folders), as an :class:`ImageFiles`: class index = position of the class folder in
    sorted order (hidden folders left out), rows by class then file name.

    Preprocessing by default: shorter side resized to 256 (bilinear), centre 224×224 cropped, as
    ImageNet-C was made; ``resize=None`` takes the images as stored (they must then be
    ``size×size``).

    Raises:
        ValueError: no such folder, no class folder, or an empty class folder (one line).
    """
    folder = Path(directory)
    what = f"imagefolder:{directory}"
    if not folder.is_dir():
        raise ValueError(f"{what}: no such folder {str(directory)!r}; expected a folder of class "
                         f"folders, DIR/<class>/*.JPEG.")
    classes = _subfolders(folder)
    if not classes:
        raise ValueError(f"{what}: {folder} holds no class folders; expected DIR/<class>/*.JPEG "
                         f"(one folder per class, images {_SUFFIX_TEXT} in it).")
    ids, labels = _list_tree(folder, classes, what)
    prefix = os.fspath(folder) + os.sep
    paths = [prefix + i.replace("/", os.sep) for i in ids]
    note = (" (images are taken as stored when resize is None; give resize to resize the shorter "
            "side and centre-crop)")
    return ImageFiles(paths, labels, folder, size, resize, name=str(directory), classes=classes,
                      note=note)
