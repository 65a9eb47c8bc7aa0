"""Test data whose corrupted sets are generated here: Fashion-MNIST and ``.npz`` files.

The corrupted images are a pure function of ``(gen_seed, corruption, severity, index)``
(:func:`torch_dmc.data.corruptions.corrupt`), computed once and kept in a
:class:`~torch_dmc.data.corruptions.CorruptionCache`.
"""

from __future__ import annotations

import numpy as np

from .arrays import ImageData
from .corruptions import ALL_CORRUPTIONS, CorruptionCache, resolve_corruptions
from .sources import ArraySet, TestData

__all__ = ["GeneratedTestData"]


class GeneratedTestData(TestData):
    """The first ``n_test`` test images of ``data``, clean and corrupted (generated, cached).

    Args:
        spec: the data spec text (``"fmnist"`` or the ``.npz`` path), for the record.
        data: the data set.
        n_test: the first ``n_test`` test images (``None``: all).
        gen_seed: the corruption generation seed.
        cache: where corrupted sets are kept (default: :class:`CorruptionCache`'s default).
        workers: processes that generate a missing corrupted set.
        progress: progress bar while generating.
    """

    def __init__(self, spec: str, data: ImageData, *, n_test: int | None = None, gen_seed: int = 0,
                 cache: CorruptionCache | None = None, workers: int = 1, progress: bool = True):
        n = len(data.x_test) if n_test is None else min(n_test, len(data.x_test))
        self.spec, self.data = spec, data
        self.num_classes = data.num_classes
        self.preprocessing = {"corruptions": "generated (torch_dmc.data.corruptions.corrupt)",
                              "gen_seed": int(gen_seed)}
        self.x, self.y = data.x_test[:n], data.y_test[:n]
        self.gen_seed, self.workers, self.progress = gen_seed, workers, progress
        self.cache = cache if cache is not None else CorruptionCache()

    def corruptions(self) -> list[str]:
        return list(ALL_CORRUPTIONS)

    def clean(self) -> ArraySet:
        """The clean test images (the first ``n_test``)."""
        return ArraySet(self.x, self.y)

    def corrupted(self, corruption: str, severity: int) -> ArraySet:
        (name,) = resolve_corruptions(corruption)
        if not 1 <= int(severity) <= 5:
            raise ValueError(f"severity must lie in 1..5; found {severity}.")
        images = self.cache.get(self.x, name, int(severity), seed=self.gen_seed,
                                workers=max(1, self.workers), progress=self.progress)
        return ArraySet(images, self.y)

    def select(self, n: int | None, image_ids=None) -> np.ndarray | None:
        """``None``: the sets already hold only the first ``n_test`` images."""
        if image_ids is not None:
            return super().select(n, image_ids)
        return None
