"""What a benchmark run reads: its test sets, its clean set and its fit images, from data specs.

:func:`open_bench_data` turns a protocol's ``data``, ``clean_data``, ``fit_data`` and
``image_ids`` (:mod:`torch_dmc.data.specs`) into a :class:`BenchData`; :func:`open_fit_images`
is the training side alone (``dmc fit --data``). Nothing is read in full here: on-disk sets are
memory-mapped or decoded batch by batch when a cell runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data import arrays
from ..data.corruptions import CorruptionCache
from ..data.sources import ArraySet, ImageSet, SubsetSet, TestData, sha256_file
from ..data.specs import CLEAN_KINDS, FIT_KINDS, TEST_KINDS, DataSpec

__all__ = ["BenchData", "open_bench_data", "bench_data_from_arrays", "open_fit_images", "load_generated"]


def load_generated(spec: DataSpec) -> arrays.ImageData:
    """The arrays of a ``fmnist`` or ``.npz`` spec (the whole data set, in memory)."""
    if spec.kind == "fmnist":
        from ..data import fashion_mnist

        return fashion_mnist.load_fashion_mnist()
    return arrays.load_npz(spec.path)


def _split(spec: DataSpec, split: str, flag: str) -> ImageSet:
    """The ``train`` or ``test`` split of a clean spec (``fmnist``, npz, cifar, imagefolder)."""
    if spec.kind in ("fmnist", "npz"):
        if spec.kind == "npz" and split == "train":  # `dmc fit --data` needs only x_train
            x = arrays.load_npz_images(spec.path, "x_train")
            return ArraySet(x, np.zeros(len(x), np.int64), {Path(spec.path).name: sha256_file(spec.path)})
        data = load_generated(spec)
        files = {Path(spec.path).name: sha256_file(spec.path)} if spec.path else {}
        x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
        return ArraySet(x, y, files)
    if spec.kind in ("cifar10", "cifar100"):
        from ..data.cifar import open_cifar

        return open_cifar(spec.path, 10 if spec.kind == "cifar10" else 100, split)
    if spec.kind == "imagefolder":
        from ..data.imagenet import open_imagefolder

        return open_imagefolder(spec.path)
    raise ValueError(f"{flag} {spec}: a {spec.kind} spec has no {split} split.")  # check_role prevents


def open_fit_images(text: str | None, flag: str = "--fit-data") -> tuple[DataSpec, ImageSet]:
    """The training images of a fit spec (``fmnist``, ``.npz``, ``cifar10:DIR``, ...)."""
    spec = DataSpec.parse(text, flag).check_role(FIT_KINDS, flag)
    return spec, _split(spec, "train", flag)


def _read_ids(path: str) -> list[str]:
    from ..data.imagenet import read_image_ids

    return read_image_ids(path)


@dataclass
class BenchData:
    """The images of one benchmark run.

    Attributes:
        test: the corrupted sets (:class:`~torch_dmc.data.sources.TestData`).
        clean: the clean test set (``None``: no clean cells).
        fit: the training images for the reference (``None``: the stats must be given).
        rows: the rows of every corrupted set that the run uses (``None``: all).
        specs: ``{"data": ..., "clean_data": ..., "fit_data": ...}`` as parsed.
        images: which images are used, for the report (``selection``: all, first, ids).
    """

    test: TestData
    clean: ImageSet | None
    fit: ImageSet | None
    rows: np.ndarray | None = None
    specs: dict[str, DataSpec | None] = field(default_factory=dict)
    images: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.test.num_classes

    def corrupted(self, corruption: str, severity: int) -> ImageSet:
        """One corrupted set, restricted to :attr:`rows`."""
        s = self.test.corrupted(corruption, severity)
        return s if self.rows is None else SubsetSet(s, self.rows)

    def check_corruptions(self, names: list[str], hint: str) -> None:
        """Refuse, before any work, corruptions the data does not hold (``hint``: what to do)."""
        have = self.test.corruptions()
        missing = [c for c in names if c not in have]
        if missing:
            raise ValueError(f"--data {self.test.spec}: no {', '.join(missing)} (it holds "
                             f"{', '.join(have) or 'no corruption'}); {hint}")

    def sample(self, n: int = 2) -> np.ndarray:
        """The first ``n`` images of the clean set (else of the first corrupted set): to check
        that the model takes them."""
        if self.clean is not None:
            s = self.clean
        else:
            s = self._first_corrupted()
        return s.read(np.arange(min(n, len(s))))

    def _first_corrupted(self) -> ImageSet:
        """The first corrupted set that exists (standard order, severities 1..5)."""
        names = self.test.corruptions()
        if not names:
            raise ValueError(f"--data {self.test.spec}: holds no corrupted set.")
        first_error = None
        for severity in range(1, 6):
            try:
                return self.corrupted(names[0], severity)
            except ValueError as err:
                first_error = first_error or err
        raise first_error

    def describe(self) -> dict:
        """``config.json``'s ``data`` entry (files are added as they are read)."""
        test = self.specs.get("data")
        return {
            "kind": test.kind if test else "object",
            "spec": str(test) if test else self.test.spec,
            "clean_spec": str(self.specs["clean_data"]) if self.specs.get("clean_data") else None,
            "fit_spec": str(self.specs["fit_data"]) if self.specs.get("fit_data") else None,
            "num_classes": self.num_classes,
            "preprocessing": dict(self.test.preprocessing),
            "n_clean": None if self.clean is None else len(self.clean),
            "n_fit": None if self.fit is None else len(self.fit),
            "images": dict(self.images),
        }


def _align_clean(clean: ImageSet, test: TestData, rows: np.ndarray | None, flag: str) -> ImageSet:
    """The clean set restricted to the test rows, by image id when both sides have ids."""
    ids = getattr(clean, "ids", None)
    if rows is None or len(rows) == 0:
        return clean
    if ids is not None and hasattr(test, "ids"):
        test_ids = [test.ids[r] for r in rows]
        where = {i: k for k, i in enumerate(ids)}
        missing = [i for i in test_ids if i not in where]
        if missing:
            raise ValueError(f"{flag}: image {missing[0]!r} of the test selection is not in the "
                             f"clean set ({len(missing)} missing); give the matching clean folder.")
        return SubsetSet(clean, [where[i] for i in test_ids])
    if int(rows.max()) >= len(clean):
        raise ValueError(f"{flag}: the clean set has {len(clean)} images, fewer than the test "
                         f"selection needs ({int(rows.max()) + 1}).")
    return SubsetSet(clean, rows)


def open_bench_data(
    *,
    data: str | None,
    clean_data: str | None = None,
    fit_data: str | None = None,
    image_ids: str | None = None,
    n_test: int | None = None,
    gen_seed: int = 0,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
    need_fit: bool = True,
) -> BenchData:
    """Open the specs of a run (nothing is read in full).

    Args:
        data: the test spec (``--data``; ``None``: Fashion-MNIST).
        clean_data: the clean test set's spec (``--clean-data``; default: the test spec's own
            clean images, if it has them).
        fit_data: the fit images' spec (``--fit-data``; default: the test spec's training split,
            if it has one).
        image_ids: a file of image ids selecting the test images (image-tree specs).
        n_test: the first ``n_test`` images of every set (image trees: a seeded subset).
        gen_seed: the corruption seed of generated data.
        cache_dir: corruption cache of generated data.
        workers: processes generating corruptions.
        progress: progress bars.
        need_fit: whether the fit images are needed (a run that fits the reference); if so and
            no spec gives them, ``ValueError`` says to pass ``--fit-data`` or ``--stats``.
    """
    spec = DataSpec.parse(data, "--data").check_role(TEST_KINDS, "--data")
    clean_spec = (DataSpec.parse(clean_data, "--clean-data").check_role(CLEAN_KINDS, "--clean-data")
                  if clean_data is not None else None)
    fit_spec = (DataSpec.parse(fit_data, "--fit-data").check_role(FIT_KINDS, "--fit-data")
                if fit_data is not None else None)
    ids = _read_ids(image_ids) if image_ids is not None else None
    clean: ImageSet | None = None
    fit: ImageSet | None = None
    if spec.generated:
        from ..data.generated import GeneratedTestData

        whole = load_generated(spec)
        test: TestData = GeneratedTestData(str(spec), whole, n_test=n_test, gen_seed=gen_seed,
                                           cache=CorruptionCache(cache_dir), workers=workers,
                                           progress=progress)
        if ids is not None:
            test.select(n_test, ids)  # refuses, saying why
        files = {Path(spec.path).name: sha256_file(spec.path)} if spec.path else {}
        clean = ArraySet(test.x, test.y, files)
        fit = ArraySet(whole.x_train, whole.y_train, files)
        rows = None
        images = {"selection": "all" if n_test is None or n_test >= len(whole.x_test) else "first",
                  "n": len(test.x)}
    else:
        if spec.kind in ("cifar10-c", "cifar100-c"):
            from ..data.cifar import open_cifar_c

            test = open_cifar_c(spec.path, 10 if spec.kind == "cifar10-c" else 100)
        else:
            from ..data.imagenet import open_imagenet_c

            test = open_imagenet_c(spec.path, tiny=spec.kind == "tiny-imagenet-c")
        rows = test.select(n_test, ids)
        if ids is not None:
            images = {"selection": "ids", "n": len(rows), "ids_file": str(image_ids),
                      "ids_sha256": sha256_file(image_ids)}
        elif rows is not None:
            images = {"selection": "first" if spec.kind.startswith("cifar") else "seeded subset",
                      "n": len(rows)}
        else:
            images = {"selection": "all"}
    if clean_spec is not None:
        clean = _align_clean(_split(clean_spec, "test", "--clean-data"), test, rows, "--clean-data")
    if fit_spec is not None:
        fit = _split(fit_spec, "train", "--fit-data")
    if need_fit and fit is None:
        raise ValueError(f"--data {spec}: the reference statistics need training images, which this "
                         "spec does not hold; pass --fit-data (e.g. cifar10:DIR, imagefolder:DIR) or "
                         "--stats FILE (from `dmc fit`).")
    return BenchData(test, clean, fit, rows,
                     {"data": spec, "clean_data": clean_spec, "fit_data": fit_spec}, images)


def bench_data_from_arrays(data: arrays.ImageData, *, spec: str | None = None, n_test: int | None = None,
                           gen_seed: int = 0, cache_dir: str | Path | None = None, workers: int = 1,
                           progress: bool = True) -> BenchData:
    """A :class:`BenchData` over an in-memory data set: corruptions generated from its first
    ``n_test`` test images, clean cells on those, the fit on its training images."""
    from ..data.generated import GeneratedTestData

    test = GeneratedTestData(spec or data.name, data, n_test=n_test, gen_seed=gen_seed,
                             cache=CorruptionCache(cache_dir), workers=workers, progress=progress)
    full = n_test is None or n_test >= len(data.x_test)
    return BenchData(test, ArraySet(test.x, test.y), ArraySet(data.x_train, data.y_train),
                     images={"selection": "all" if full else "first", "n": len(test.x)})
