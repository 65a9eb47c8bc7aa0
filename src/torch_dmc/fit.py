"""Fit the reference: one observer per site, in three plain steps (docs/method.md § Reference fit).

Like ``torch.ao.quantization``'s observers: `SiteObserver` records a site's outputs (observe),
absorbs another observer of the same site (merge: across data shards or processes) and turns what
it saw into the site's tables (finalize). `fit` is prepare → calibrate → convert: observers on
hooks, the model run over the data, `ReferenceStats` out. The model is never changed.
`fit_part` stops before the last step: its `FitPart` merges with the parts of other data shards
(``dmc fit`` under torchrun: one per process) and is finalized once.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._version import __version__
from .sites import (
    SiteSpec,
    channel_axis_for,
    channel_axis_overrides,
    check_channel_axis,
    check_declared_channels,
    model_device,
    register_output_hooks,
    select_sites,
    site_fingerprint,
)
from .sketch import QuantileSketch, channel_extremes
from .stats_io import ReferenceStats
from .transport import summed_quantiles

__all__ = ["SiteObserver", "FitPart", "fit", "fit_part", "batch_input", "per_sample_rows"]


def batch_input(batch) -> Tensor:
    """The input tensor of a batch: the batch itself, or the first element of a tuple/list/dict."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in ("x", "image", "images", "input", "inputs", "pixel_values"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    raise TypeError(f"expected each batch to be a tensor or an (x, y, ...) tuple, found "
                    f"{type(batch).__name__}")


def per_sample_rows(output: Tensor, axis: int, samples: int | None,
                    generator: torch.Generator | None = None) -> Tensor | None:
    """``B'·C×P`` rows, ordered (sample, channel): each sample's channel over its ``P`` positions.

    Axis 0 is the batch axis. ``samples`` draws that many samples at random without replacement
    (``None``: all). ``None`` when a sample has fewer than 2 positions per channel.
    """
    if axis == 0:
        raise ValueError("per-sample correction needs the batch on axis 0 and channels elsewhere")
    b, c = output.shape[0], output.shape[axis]
    positions = output.numel() // max(b * c, 1)
    if positions < 2:
        return None
    if samples is not None and samples < b:
        pick = torch.randperm(b, generator=generator)[:samples].to(output.device)
        output = output.index_select(0, pick)
        b = samples
    return output.detach().movedim(axis, 1).reshape(b * c, positions)


class SiteObserver:
    """Records one site's outputs during `fit`: its pooled sketch and, optionally, the sum of its
    per-sample quantile tables.

    Args:
        name: the site's module name (for messages).
        module: the site's module: its declared channel count is checked against the output.
        channel_axis: the axis of the site's output that holds the channels (``None``: decided
            from the module and the first output by `torch_dmc.sites.channel_axis_for`).
        levels: ``K`` of the per-sample tables.
        capacity, samples_per_batch: of the `torch_dmc.sketch.QuantileSketch`.
        generator: random source of the sketch's sampling.
        per_sample: also sum the per-sample quantile tables (docs/method.md § Per-sample reference).
        per_sample_images: samples per batch whose tables enter that sum (``None``: all).
        sample_generator: random source of the per-sample draw (its own stream, so the pooled
            reference does not depend on ``per_sample``).
        skip_nonfinite: leave out samples with a non-finite value at this site instead of
            refusing them.
    """

    def __init__(self, name: str, module: nn.Module, channel_axis: int | None, *, levels: int,
                 capacity: int,
                 samples_per_batch: int | None, generator: torch.Generator, per_sample: bool,
                 per_sample_images: int | None, sample_generator: torch.Generator,
                 skip_nonfinite: bool = False):
        self.name = name
        self.module = module
        self.channel_axis = channel_axis
        self.levels = levels
        self.capacity = capacity
        self.samples_per_batch = samples_per_batch
        self.generator = generator
        self.per_sample = per_sample
        self.per_sample_images = per_sample_images
        self.sample_generator = sample_generator
        self.skip_nonfinite = skip_nonfinite
        self.sketch: QuantileSketch | None = None
        self.sample_sum: Tensor | None = None  # C×K float64 sum of per-sample tables
        self.sample_count = 0
        self.skipped_values = 0
        self.skipped_samples = 0

    def observe(self, output: Tensor, batch_index: int) -> None:
        """Record one batch's output of the site (never kept as a view: in-place ops are safe).

        Raises:
            ValueError: the channel axis is out of range, ambiguous or not the module's declared
                channel count, the channel count changed, or the output has non-finite values
                (unless ``skip_nonfinite``).
        """
        if self.sketch is None:  # the first output decides the axis, once
            self.channel_axis = channel_axis_for(self.module, output.shape, self.channel_axis,
                                                 self.name)
            check_declared_channels(self.name, self.module, output,
                                    check_channel_axis(self.name, output, self.channel_axis))
        axis = check_channel_axis(self.name, output, self.channel_axis)
        output = output.detach()
        if output.numel() == 0:
            return
        # amin and amax propagate NaN and ±inf: both finite exactly when every value is
        extremes = channel_extremes(output, axis)
        if not bool(torch.isfinite(torch.stack(extremes)).all()):
            output, extremes = self._drop_nonfinite(output, axis, batch_index), None
            if output.shape[0] == 0:
                return
        if self.sketch is None:
            self.sketch = QuantileSketch(output.shape[axis], capacity=self.capacity,
                                         samples_per_batch=self.samples_per_batch,
                                         generator=self.generator)
        elif output.shape[axis] != self.sketch.channels:
            raise ValueError(f"site {self.name!r}: batch {batch_index} has {output.shape[axis]} "
                             f"channels on axis {self.channel_axis}, earlier batches had "
                             f"{self.sketch.channels} (output shape {tuple(output.shape)})")
        self.sketch.update_activation(output, axis, extremes=extremes)
        if self.per_sample:
            rows = per_sample_rows(output, axis, self.per_sample_images, self.sample_generator)
            if rows is not None:
                b = rows.shape[0] // output.shape[axis]
                table = summed_quantiles(rows, b, self.levels)
                self.sample_sum = table if self.sample_sum is None else self.sample_sum + table
                self.sample_count += b

    def _drop_nonfinite(self, output: Tensor, axis: int, batch_index: int) -> Tensor:
        """The samples (axis 0) without a non-finite value, or `ValueError` when not skipping."""
        finite = torch.isfinite(output)
        bad = int((~finite).sum())
        if not self.skip_nonfinite:
            raise ValueError(
                f"site {self.name!r}: batch {batch_index} has {bad} non-finite value(s) (NaN or "
                f"Inf) in its output of shape {tuple(output.shape)}; check the input data, or pass "
                "skip_nonfinite=True (dmc fit --skip-nonfinite) to leave those samples out of the "
                "reference and count them in stats.info")
        if axis == 0:
            raise ValueError(f"site {self.name!r}: cannot skip non-finite samples when the channel "
                             "axis is 0 (the batch axis)")
        keep = finite.flatten(1).all(dim=1)
        self.skipped_values += bad
        self.skipped_samples += int((~keep).sum())
        return output[keep]

    def merge(self, other: SiteObserver) -> SiteObserver:
        """Absorb an observer of the same site (e.g. from another data shard); returns ``self``.

        An observer that saw no output yet takes the other's channel axis (decided by its first
        output).
        """
        if self.sketch is None and other.sketch is not None:
            self.channel_axis = other.channel_axis
        if other.sketch is not None:
            self.sketch = other.sketch if self.sketch is None else self.sketch.merge(other.sketch)
        if other.sample_sum is not None:
            self.sample_sum = (other.sample_sum if self.sample_sum is None
                               else self.sample_sum + other.sample_sum)
        self.sample_count += other.sample_count
        self.skipped_values += other.skipped_values
        self.skipped_samples += other.skipped_samples
        return self

    def finalize(self, levels: int) -> tuple[Tensor, Tensor | None]:
        """The site's ``C×K`` reference table and its per-sample table (``None`` if not fitted).

        Raises:
            ValueError: the site produced no (finite) output.
        """
        if self.sketch is None:
            raise ValueError(f"site {self.name!r} produced no finite output during fit: it is not "
                             "used in the model's forward, or every sample was skipped")
        table = self.sketch.quantiles(levels).cpu()
        per_sample = None
        if self.sample_sum is not None:
            per_sample = (self.sample_sum / self.sample_count).float().cpu()
        return table, per_sample


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _check_fit_arguments(levels, samples_per_batch, capacity, per_sample_images, max_batches) -> None:
    def positive_int(value, name, none_ok=False, least=1):
        if value is None and none_ok:
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an int >= {least}{' or None' if none_ok else ''}, "
                             f"found {value!r}")

    positive_int(levels, "levels (quantile levels, both endpoints included)", least=2)
    positive_int(samples_per_batch, "samples_per_batch", none_ok=True)
    positive_int(capacity, "capacity", least=2)
    positive_int(per_sample_images, "per_sample_images", none_ok=True)
    positive_int(max_batches, "max_batches", none_ok=True)


class FitPart:
    """An un-finalised fit: the observers of every site after some batches, and the counts.

    `fit_part` returns one, `merge` absorbs another fitted on other batches of the same model
    (e.g. another process's share of the data: the sketches, per-sample sums and non-finite
    counts all merge), and `finalize` turns it into the `ReferenceStats` that `fit` returns. Sent
    between processes, a part goes through `portable` first: it then holds no module and no
    random generator, only tensors and numbers (pickled with ``torch.save``).

    Attributes:
        observers: site name → its `SiteObserver`, in model order.
        module_types: site name → class name of the site's module.
        images, batches, empty: images and non-empty batches seen, empty batches skipped.
        settings: the fit's options recorded in ``info`` (``levels``, ``samples_per_batch``,
            ``capacity``, ``seed``, ``per_sample``, ``per_sample_images``, ``skip_nonfinite``).
    """

    def __init__(self, observers: dict[str, SiteObserver], module_types: dict[str, str],
                 settings: dict, images: int = 0, batches: int = 0, empty: int = 0):
        self.observers = observers
        self.module_types = module_types
        self.settings = settings
        self.images, self.batches, self.empty = images, batches, empty

    def merge(self, other: FitPart) -> FitPart:
        """Absorb a part of the same sites fitted on other batches; returns ``self``.

        Raises:
            ValueError: the parts have other sites or other settings (``seed`` may differ).
        """
        if list(other.observers) != list(self.observers):
            raise ValueError(f"cannot merge fits of other sites: {list(other.observers)} into "
                             f"{list(self.observers)}")
        mine = {k: v for k, v in self.settings.items() if k != "seed"}
        theirs = {k: v for k, v in other.settings.items() if k != "seed"}
        if mine != theirs:
            raise ValueError(f"cannot merge fits of other settings: {theirs} into {mine}")
        for name, observer in self.observers.items():
            observer.merge(other.observers[name])
        self.images += other.images
        self.batches += other.batches
        self.empty += other.empty
        return self

    def portable(self) -> FitPart:
        """A copy to send to another process: no modules, no generators (tensors are shared)."""
        observers = {}
        for name, o in self.observers.items():
            c = copy.copy(o)
            c.module = c.generator = c.sample_generator = None
            if o.sketch is not None:
                c.sketch = copy.copy(o.sketch)
                c.sketch.generator = None
            observers[name] = c
        return FitPart(observers, dict(self.module_types), dict(self.settings), self.images,
                       self.batches, self.empty)

    def finalize(self, model: nn.Module) -> ReferenceStats:
        """The `ReferenceStats` of everything seen (``model``: the fitted one, for the
        fingerprint).

        Raises:
            ValueError: no batch with images was seen, or a site produced no finite output.
        """
        if self.batches == 0:
            raise ValueError("fit received no batches with images: `data` "
                             f"{'held only empty batches' if self.empty else 'is empty'}")
        s = self.settings
        observers = self.observers
        tables = {n: o.finalize(s["levels"]) for n, o in observers.items()}
        channels = {n: t[0].shape[0] for n, t in tables.items()}
        info = {
            "torch_dmc_version": __version__,
            "images": self.images,
            "batches": self.batches,
            "samples_per_batch": s["samples_per_batch"],
            "capacity": s["capacity"],
            "seed": s["seed"],
            "rank_error_bound": max(o.sketch.rank_error_bound() for o in observers.values()),
            "per_sample_images": s["per_sample_images"] if s["per_sample"] else None,
            "per_sample_samples": {n: o.sample_count for n, o in observers.items()
                                   if o.sample_sum is not None},
        }
        if self.empty:
            info["empty_batches"] = self.empty
        if s["skip_nonfinite"]:
            info["nonfinite_skipped"] = {n: {"values": o.skipped_values, "samples": o.skipped_samples}
                                         for n, o in observers.items() if o.skipped_values}
        return ReferenceStats(
            quantiles={n: t[0] for n, t in tables.items()},
            channel_axes={n: o.channel_axis for n, o in observers.items()},
            module_types=dict(self.module_types),
            fingerprint=site_fingerprint(model, channels),
            info=info,
            per_sample={n: t[1] for n, t in tables.items() if t[1] is not None},
        )


def fit_part(model: nn.Module, data: Iterable, *, sites: SiteSpec = "norm", levels: int = 1024,
             max_batches: int | None = None, device: torch.device | str | None = None,
             progress: bool = True, channel_axes: int | Mapping[str, int] | None = None,
             samples_per_batch: int | None = 1024, capacity: int = 4096, seed: int = 0,
             per_sample: bool = False, per_sample_images: int | None = 32,
             skip_nonfinite: bool = False) -> FitPart:
    """`fit` without its last step: the `FitPart` of ``data``, to merge with others.

    Takes the arguments of `fit` (see there). ``fit(model, data, **kw)`` is
    ``fit_part(model, data, **kw).finalize(model)``. Unlike `fit`, data without a batch is not
    an error here (a process's share may be empty); `FitPart.finalize` raises then.
    """
    _check_fit_arguments(levels, samples_per_batch, capacity, per_sample_images, max_batches)
    names = select_sites(model, sites)
    overrides = channel_axis_overrides(names, channel_axes)
    modules = dict(model.named_modules())
    device = torch.device(device) if device is not None else model_device(model)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    sample_generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    observers = {
        n: SiteObserver(n, modules[n], overrides[n], levels=levels, capacity=capacity,
                        samples_per_batch=samples_per_batch, generator=generator,
                        per_sample=per_sample, per_sample_images=per_sample_images,
                        sample_generator=sample_generator, skip_nonfinite=skip_nonfinite)
        for n in names
    }
    counter = {"batch": 0}
    handles = register_output_hooks(
        model, names, lambda name, output: observers[name].observe(output, counter["batch"]))
    modes = _modes(model)
    images = batches = empty = 0
    total = max_batches
    if total is None and hasattr(data, "__len__"):
        total = len(data)
    try:
        model.eval()
        with torch.inference_mode():
            for index, batch in enumerate(tqdm(data, total=total, desc="fit", unit="batch",
                                               disable=not progress)):
                if max_batches is not None and batches >= max_batches:
                    break
                x = batch_input(batch)
                if x.shape[0] == 0:
                    empty += 1
                    continue
                counter["batch"] = index
                model(x.to(device))
                images += x.shape[0]
                batches += 1
    finally:
        for h in handles:
            h.remove()
        for module, mode in modes:
            module.training = mode
    settings = {"levels": levels, "samples_per_batch": samples_per_batch, "capacity": capacity,
                "seed": seed, "per_sample": per_sample, "per_sample_images": per_sample_images,
                "skip_nonfinite": skip_nonfinite}
    return FitPart(observers, {n: type(modules[n]).__name__ for n in names}, settings,
                   images, batches, empty)


def fit(model: nn.Module, data: Iterable, *, sites: SiteSpec = "norm", levels: int = 1024,
        max_batches: int | None = None, device: torch.device | str | None = None,
        progress: bool = True, channel_axes: int | Mapping[str, int] | None = None,
        samples_per_batch: int | None = 1024, capacity: int = 4096, seed: int = 0,
        per_sample: bool = False, per_sample_images: int | None = 32,
        skip_nonfinite: bool = False) -> ReferenceStats:
    """Fit the reference quantile function of every site's channels on source data.

    Runs the unmodified model in eval mode under ``torch.inference_mode`` and streams every site's
    output into a `SiteObserver` (a `torch_dmc.sketch.QuantileSketch`): memory at most
    ``8 · capacity · channels`` values, independent of the dataset size; values are sampled at
    random positions, never strided, and copied (an in-place op after a site cannot change them).
    The model's parameters, buffers and every submodule's train/eval mode are left as they were.

    Args:
        model: the trained network.
        data: iterable of input tensors or ``(x, y, ...)`` tuples (e.g. a ``DataLoader``). Empty
            batches are skipped and counted in ``info["empty_batches"]``.
        sites: which module outputs to correct (see `torch_dmc.sites.select_sites`); every entry
            must name a module.
        levels: ``K``, quantile levels stored per channel, endpoints included.
        max_batches: stop after this many batches.
        device: where batches are sent (default: the model's device).
        progress: show a progress bar.
        channel_axes: channel axis for all sites (int) or per fnmatch pattern (dict); by default
            decided per site from the module and its output (`torch_dmc.sites.channel_axis_for`:
            -1 for LayerNorm/RMSNorm, the axis of size ``C`` for LayerNorm2d-style modules, else 1).
            Every site's channel count is checked against the one its module declares.
        samples_per_batch: values drawn per channel from each batch (``None``: all values).
        capacity: points per channel per sketch summary (sets the compression error).
        seed: seed of the random sampling.
        per_sample: also fit the reference of the ``per-sample`` estimate in the same pass: per
            site with at least 2 positions per sample, the mean over samples of each sample's
            quantile function of a channel over its positions (axis 0 is the batch axis). Off by
            default: it sorts every drawn sample's positions, which doubles the cost of the fit
            and the size of the stats; only the ``per-sample`` estimate reads it.
        per_sample_images: samples per batch, drawn at random, whose quantile functions enter
            that mean (``None``: all); the mean is exact over the drawn samples.
        skip_nonfinite: a non-finite value (NaN, Inf) at a site raises `ValueError` naming the site
            and the batch; with ``True``, the samples holding one are left out of that site's
            reference instead, and ``info["nonfinite_skipped"]`` counts them per site.

    Returns:
        The `ReferenceStats`, with ``info`` recording the images seen and the rank-error bound.

    Raises:
        ValueError: bad arguments, no images, non-finite values, a channel axis out of range, or
            a site the forward never reaches.

    Example:
        >>> stats = fit(model, train_loader)                          # doctest: +SKIP
        >>> stats.save("model.dmc.safetensors")                       # doctest: +SKIP
    """
    return fit_part(model, data, sites=sites, levels=levels, max_batches=max_batches, device=device,
                    progress=progress, channel_axes=channel_axes,
                    samples_per_batch=samples_per_batch, capacity=capacity, seed=seed,
                    per_sample=per_sample, per_sample_images=per_sample_images,
                    skip_nonfinite=skip_nonfinite).finalize(model)
