"""The one definition of "fit the reference on N training images", for ``dmc fit``, ``dmc bench``
and ``dmc tune``.

The images are the training set's rows :func:`fit_subset` picks (all, or a seeded random subset,
in row order), read in batches of :data:`FIT_BATCH_SIZE`, with the fit's own sampling seeded by
the same seed. So ``dmc fit --images N --seed s`` and ``dmc bench --fit-images N --fit-seed s``
write the same statistics (a test checks the checksums agree).

Under torchrun, ``dmc fit`` shares the same batches out (:func:`fit_reference_part` with
``rank`` and ``world_size``: batch ``i`` goes to rank ``i mod N``); each rank fits its share with
its own sampling seed (:func:`shard_seed`), and rank 0 merges the parts and finalizes them
(:func:`finish_reference`). The result is not the single-process file bit for bit (other random
draws) but agrees with it within the sketch's rank-error bound (docs/distributed.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from torch import nn

from ..data import arrays
from ..data.sources import ImageSet

__all__ = ["FIT_BATCH_SIZE", "fit_subset", "fit_reference", "fit_reference_part", "finish_reference",
           "shard_seed", "check_per_sample", "obtain_stats"]

#: Images per batch of a reference fit (the batching changes the sketch's sampling, so it is part
#: of the definition).
FIT_BATCH_SIZE = 500


def fit_subset(n_train: int, fit_images: int | None, seed: int) -> np.ndarray:
    """Rows of the training images used for the fit: all (``fit_images`` None or ≥ ``n_train``),
    else ``sort(numpy.random.default_rng(seed).permutation(n_train)[:fit_images])``."""
    if fit_images is None or fit_images >= n_train:
        return np.arange(n_train)
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n_train)[:fit_images])


def shard_seed(seed: int, rank: int) -> int:
    """The sampling seed of rank ``rank``'s share of a fit: ``seed`` itself for rank 0 (so one
    process under torchrun fits what ``dmc fit`` fits), else a number drawn from
    ``numpy.random.SeedSequence([seed, rank])``."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])


class _FitBatches:
    """Float batches of an image set's rows, read lazily (``len``: batches, for the progress bar).

    ``rank``/``world_size``: only the batches ``rank``, ``rank + world_size``, ... of the whole.
    """

    def __init__(self, images: ImageSet, rows: np.ndarray, batch_size: int, workers: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.images, self.workers = images, workers
        chunks = [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
        self.chunks = chunks[rank::world_size]

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator:
        return (arrays.to_tensor(x) for x in self.images.iter_batches(self.chunks, self.workers))


def fit_reference(model: nn.Module, images: ImageSet | np.ndarray, *, n: int | None = None,
                  seed: int = 0, levels: int = 1024, batch_size: int = FIT_BATCH_SIZE,
                  workers: int = 0, progress: bool = True, **fit_options):
    """Fit DMC reference statistics on ``n`` training images (see the module doc).

    Args:
        model: the classifier.
        images: the training images (an :class:`~torch_dmc.data.sources.ImageSet`, or a ``uint8``
            array ``N×H×W[×C]``).
        n: how many (``None``: all); a random subset drawn with ``seed`` when fewer.
        seed: the subset's and the fit's sampling seed.
        levels: quantile levels ``K`` per channel.
        batch_size: images per batch (default :data:`FIT_BATCH_SIZE`; another value gives other
            statistics).
        workers: processes decoding image files ahead (image-tree data).
        progress: progress bar.
        **fit_options: passed to :func:`torch_dmc.fit` (``sites``, ``per_sample``,
            ``channel_axes``, ``skip_nonfinite``, ...).

    Returns:
        The :class:`~torch_dmc.ReferenceStats`; ``info["fit_images"]`` records how many images.
    """
    part = fit_reference_part(model, images, n=n, seed=seed, levels=levels, batch_size=batch_size,
                              workers=workers, progress=progress, **fit_options)
    return finish_reference(part, model, images=part.images, batch_size=batch_size)


def fit_reference_part(model: nn.Module, images: ImageSet | np.ndarray, *, n: int | None = None,
                       seed: int = 0, levels: int = 1024, batch_size: int = FIT_BATCH_SIZE,
                       workers: int = 0, progress: bool = True, rank: int = 0,
                       world_size: int = 1, **fit_options):
    """One rank's share of :func:`fit_reference`, not finalized (a :class:`~torch_dmc.fit.FitPart`).

    The rows and batches are those of :func:`fit_reference`; rank ``rank`` of ``world_size`` fits
    the batches ``rank, rank + world_size, ...`` with the sampling seed :func:`shard_seed`. Merge
    the parts of every rank (in rank order) and pass the result to :func:`finish_reference`.
    The other arguments are those of :func:`fit_reference`.
    """
    from ..data.sources import ArraySet
    from ..fit import fit_part

    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in 0..{world_size - 1}, found {rank}")
    if isinstance(images, np.ndarray):
        images = ArraySet(images, np.zeros(len(images), np.int64))
    rows = fit_subset(len(images), n, seed)
    batches = _FitBatches(images, rows, batch_size, workers, rank, world_size)
    return fit_part(model, batches, levels=levels, progress=progress,
                    seed=shard_seed(seed, rank), **fit_options)


def finish_reference(part, model: nn.Module, *, images: int, batch_size: int,
                     world_size: int | None = None):
    """The :class:`~torch_dmc.ReferenceStats` of a (merged) :class:`~torch_dmc.fit.FitPart`.

    ``info`` records ``fit_images`` (``images``), ``fit_batch_size`` and, for a fit shared out
    by torchrun, ``world_size`` (absent: one process).
    """
    stats = part.finalize(model)
    stats.info["fit_images"] = int(images)
    stats.info["fit_batch_size"] = int(batch_size)
    if world_size is not None:
        stats.info["world_size"] = int(world_size)
    return stats


def check_per_sample(stats, where: str, needed: bool) -> None:
    """Raise if ``needed`` and ``stats`` (read from ``where``) hold no per-sample reference."""
    if needed and not stats.per_sample:
        raise ValueError(
            f"the stats in {where} have no per-sample reference, which the per-sample estimate "
            "(dmc-per-sample) needs; fit a file with it (`dmc fit --per-sample --out FILE`, or "
            "torch_dmc.fit(..., per_sample=True)) and pass it with --stats, or delete the file "
            "so that it is fitted again"
        )


def obtain_stats(
    model: nn.Module,
    images: ImageSet | None,
    path: Path,
    *,
    fit_images: int | None,
    fit_seed: int,
    fit_levels: int,
    reuse: bool,
    progress: bool = True,
    log: Callable[[str], None] = print,
    per_sample: bool = False,
    workers: int = 0,
):
    """Load ``path`` if ``reuse`` and it exists (checked against the model); else fit, save.

    ``per_sample``: the stats must hold the per-sample reference (fitted if so; a reused file
    without it raises ``ValueError``). The file is written atomically.
    """
    from .. import ReferenceStats
    from .._files import atomic_path

    if reuse and path.is_file():
        stats = ReferenceStats.load(path, model=model)
        check_per_sample(stats, str(path), per_sample)
        log(f"reusing DMC stats {path} ({len(stats.sites)} sites, K={stats.levels})")
        return stats
    if images is None:
        raise ValueError("the DMC reference must be fitted but no training images were given; "
                         "pass --fit-data SPEC or --stats FILE.")
    n = len(fit_subset(len(images), fit_images, fit_seed))
    what = " with the per-sample reference" if per_sample else ""
    log(f"fitting DMC stats{what} on {n} training images (K={fit_levels}) -> {path}")
    stats = fit_reference(model, images, n=fit_images, seed=fit_seed, levels=fit_levels,
                          progress=progress, per_sample=per_sample, workers=workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        stats.save(tmp)
    return stats
