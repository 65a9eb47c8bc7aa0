"""Correct a model's activations: `DMC` = hooks × one estimate per site × one transport.

At every site the output's channel values ``x`` become ``y = x + λ·(T(x) - x)`` with ``T`` the
monotone quantile-matching map onto the reference (docs/method.md § Transport, § Strength).
Two seams, each a small object:

- a *transport* computes maps: `ExactTransport` (full sort) or `GridTransport` (histogram of a
  fixed random sample of positions, table lookup; docs/method.md § Exact mode, § Grid mode);
- an *estimate* decides which test distribution is matched and owns its state and fallback:
  `BatchEstimate`, `PriorEstimate`, `EMAEstimate`, `PerSampleEstimate` (docs/method.md
  § Estimates).

Modules and hooks here only route tensors to the math in `torch_dmc.transport`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .fit import per_sample_rows
from .options import AUTO_PRIOR_VALUES, DMCOptions, SiteOptions
from .sites import register_output_hooks
from .sketch import gather_positions, sample_positions
from .stats_io import ReferenceStats
from .transport import (
    apply_lut,
    empirical_quantiles,
    histogram_levels,
    histogram_quantiles,
    interp_quantiles,
    lut_from_quantiles,
    lut_from_sample,
    lut_grid,
    transport_exact,
    transport_quantiles,
)

__all__ = [
    "BLEND_LEVELS",
    "SHAPE_CACHE_SIZE",
    "DMC",
    "corrected",
    "ShapeCache",
    "ExactTransport",
    "GridTransport",
    "values_weight",
    "BatchEstimate",
    "PriorEstimate",
    "EMAEstimate",
    "PerSampleEstimate",
]

BLEND_LEVELS = 257
"""Levels of the quantile functions that grid mode blends for ``prior`` and ``ema`` (exact mode
uses the stats' ``K``): enough for the batch estimates, and 4× fewer searches than ``K = 1024``."""

SHAPE_CACHE_SIZE = 16
"""Activation shapes whose grid-mode buffers (sample positions, lookup coordinates) a `DMC` keeps;
the least recently used is dropped beyond that, so memory stays bounded whatever the input sizes."""


def _persistent(make):
    """Run ``make()`` outside inference mode: a cached tensor must stay usable in every mode."""
    with torch.inference_mode(False), torch.no_grad():
        return make()


class ShapeCache:
    """Grid mode's per-shape buffers, least recently used first out, at most ``size`` of them.

    Sample positions are a fixed function of ``(seed, shape, channel axis, m)``: a fresh generator
    seeded with ``seed`` draws them, so the same batch always gives the same output.
    """

    def __init__(self, seed: int, size: int = SHAPE_CACHE_SIZE):
        self.seed = seed
        self.size = size
        self._items: OrderedDict[tuple, object] = OrderedDict()

    def _get(self, key: tuple, make):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = _persistent(make)
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def positions(self, shape: torch.Size, axis: int, m: int, device: torch.device) -> tuple[Tensor, ...]:
        """``m`` random positions of an activation of ``shape`` (see `torch_dmc.sketch.sample_positions`)."""
        def make():
            generator = torch.Generator().manual_seed(self.seed)
            return sample_positions(shape, axis, m, generator, device)
        return self._get(("positions", tuple(shape), axis, m, device), make)

    def grid(self, shape: torch.Size, axis: int, device: torch.device) -> Tensor:
        """A `torch_dmc.transport.lut_grid` buffer for ``shape``."""
        return self._get(("grid", tuple(shape), axis, device), lambda: lut_grid(shape, axis, device))

    def clear(self) -> None:
        """Forget every buffer."""
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def _per_channel(output: Tensor, axis: int, transport) -> Tensor:
    """Apply a ``C×N → C×N`` map to an output's channel-major view; same shape back."""
    moved = output.movedim(axis, 0)
    y = transport(moved.reshape(moved.shape[0], -1))
    return y.reshape(moved.shape).movedim(0, axis).contiguous()


def _is_channels_last(output: Tensor, axis: int) -> bool:
    """Whether a 4-D ``N×C×H×W`` output (channels on axis 1) is stored channels-last (NHWC)."""
    return (output.dim() == 4 and axis == 1 and not output.is_contiguous()
            and output.is_contiguous(memory_format=torch.channels_last))


class _Site:
    """One corrected site: its name, module, strength, estimate and cached reference tables."""

    def __init__(self, name: str, module: nn.Module, options: SiteOptions, estimate,
                 stats: ReferenceStats):
        self.name = name
        self.module = module
        self.strength = options.strength
        self.estimate = estimate
        self.stats = stats
        self._tables: dict[tuple, Tensor] = {}

    def table(self, device: torch.device, *, per_sample: bool = False, levels: int | None = None) -> Tensor:
        """The reference table (pooled or per-sample) on ``device``, at ``levels`` levels if given."""
        key = (device, per_sample, levels)
        if key not in self._tables:
            source = self.stats.per_sample if per_sample else self.stats.quantiles
            full = source[self.name]

            def make():
                q = full.to(device=device, dtype=torch.float32)
                if levels is None or levels == q.shape[1]:
                    return q
                t = torch.linspace(0, 1, levels, device=device).expand(q.shape[0], -1)
                return interp_quantiles(q, t)
            self._tables[key] = _persistent(make)
        return self._tables[key]


class ExactTransport:
    """Maps from a full sort of every channel's values (the reference implementation)."""

    name = "exact"

    def blend_levels(self, stats_levels: int) -> int:
        """Levels at which ``prior``/``ema`` blend quantile functions: the stats' ``K``."""
        return stats_levels

    def match(self, output: Tensor, axis: int, q_ref: Tensor, cache: ShapeCache) -> Tensor:
        """The batch's values of every channel matched to ``q_ref`` (average ranks)."""
        return _per_channel(output, axis, lambda x: transport_exact(x, q_ref))

    def match_rows(self, rows: Tensor, q_ref: Tensor) -> Tensor:
        """Every ``B·C`` (sample, channel) row matched on its own (``per-sample``)."""
        return transport_exact(rows, q_ref)

    def batch_quantiles(self, output: Tensor, axis: int, levels: int, cache: ShapeCache):
        """The batch's ``C×levels`` quantile table (NaN rows: no finite value) and a context."""
        c = output.shape[axis]
        return empirical_quantiles(output.movedim(axis, 0).reshape(c, -1), levels), None

    def through(self, output: Tensor, axis: int, q_test: Tensor, q_ref: Tensor, context,
                cache: ShapeCache) -> Tensor:
        """``x ↦ Q_ref(F_test(x))`` with ``F_test`` the inverse of ``q_test``."""
        return _per_channel(output, axis, lambda x: transport_quantiles(x, q_test, q_ref))


class GridTransport:
    """Maps tabulated at knots from a histogram of a fixed random sample of positions.

    Args:
        knots: largest number of table nodes per channel; a site with ``M`` (sampled) values per
            channel uses ``min(knots, max(32, M // 4))`` (finer cells add cost, not accuracy).
        grid_sample: positions sampled per channel (``None``: all values).
    """

    name = "grid"

    def __init__(self, knots: int, grid_sample: int | None):
        self.knots = knots
        self.grid_sample = grid_sample

    def blend_levels(self, stats_levels: int) -> int:
        """Levels at which ``prior``/``ema`` blend: `BLEND_LEVELS` (or the stats' ``K`` if fewer)."""
        return min(BLEND_LEVELS, stats_levels)

    def _size(self, values: Tensor) -> int:
        return min(self.knots, max(32, values.shape[1] // 4))

    def _values(self, output: Tensor, axis: int, cache: ShapeCache) -> Tensor:
        """``C×M`` values: the fixed sample of positions, or all values when there are few."""
        c = output.shape[axis]
        n = output.numel() // c
        if self.grid_sample is not None and self.grid_sample < n:
            index = cache.positions(output.shape, axis, self.grid_sample, output.device)
            return gather_positions(output, axis, index)
        return output.movedim(axis, 0).reshape(c, n)

    def _apply(self, output: Tensor, axis: int, lut, cache: ShapeCache) -> Tensor:
        """`apply_lut` in the output's own memory layout (a channels-last output stays so)."""
        if _is_channels_last(output, axis):  # work on the NHWC view: no layout change
            view = output.permute(0, 2, 3, 1)
            return apply_lut(view, lut, 3, cache.grid(view.shape, 3, view.device)).permute(0, 3, 1, 2)
        return apply_lut(output, lut, axis, cache.grid(output.shape, axis, output.device))

    def match(self, output: Tensor, axis: int, q_ref: Tensor, cache: ShapeCache) -> Tensor:
        """The batch's values of every channel matched to ``q_ref`` through the tabulated map."""
        values = self._values(output, axis, cache)
        return self._apply(output, axis, lut_from_sample(values, q_ref, self._size(values)), cache)

    def match_rows(self, rows: Tensor, q_ref: Tensor) -> Tensor:
        """Every ``B·C`` (sample, channel) row matched on its own, all its positions used."""
        return apply_lut(rows, lut_from_sample(rows, q_ref, self._size(rows)), channel_axis=0)

    def batch_quantiles(self, output: Tensor, axis: int, levels: int, cache: ShapeCache):
        """The batch's quantile table from the histogram (no sort), and its knots as context."""
        values = self._values(output, axis, cache)
        size = self._size(values)
        lo, step, level = histogram_levels(values, size)
        return histogram_quantiles(lo, step, level, levels), (lo, step, size)

    def through(self, output: Tensor, axis: int, q_test: Tensor, q_ref: Tensor, context,
                cache: ShapeCache) -> Tensor:
        """``x ↦ Q_ref(F_test(x))`` tabulated at the batch's knots and looked up."""
        lo, step, size = context
        return self._apply(output, axis, lut_from_quantiles(q_test, q_ref, lo, step, size), cache)


MIN_BLEND_WEIGHT = 1e-3
"""Below this weight of the reference, ``prior_values`` is skipped (the batch path is used)."""


def _blend(site: _Site, output: Tensor, axis: int, transport, cache: ShapeCache, weight: float) -> Tensor:
    """Map through ``(1 − w)·Q_batch + w·Q_ref`` (a channel without finite values keeps ``Q_ref``)."""
    q_ref = site.table(output.device, levels=transport.blend_levels(site.stats.levels))
    q_batch, context = transport.batch_quantiles(output, axis, q_ref.shape[1], cache)
    q_test = torch.where(q_batch.isnan(), q_ref, torch.lerp(q_batch, q_ref, weight))
    return transport.through(output, axis, q_test, q_ref, context, cache)


def values_weight(output: Tensor, axis: int, prior_values: float | None) -> float:
    """The reference's weight ``V0/(n + V0)`` in the batch's quantile function, ``n`` the batch's
    values per channel (``None``: `AUTO_PRIOR_VALUES` where each image has one value per channel,
    else 0); 0 below `MIN_BLEND_WEIGHT`."""
    values = output.numel() / output.shape[axis]
    v0 = prior_values
    if v0 is None:
        v0 = AUTO_PRIOR_VALUES if values == output.shape[0] else 0.0
    weight = v0 / (v0 + values) if v0 > 0 else 0.0
    return weight if weight >= MIN_BLEND_WEIGHT else 0.0


class BatchEstimate:
    """``batch``: the current batch's values of each channel, as the quantile function
    ``(n·Q_batch + V0·Q_ref)/(n + V0)`` with ``V0`` = ``prior_values`` (see `values_weight`):
    ``V0 = 0`` is the plain transport of the batch."""

    name = "batch"
    fallback: str | None = None

    def __init__(self, prior_values: float | None = None):
        self.prior_values = prior_values

    def correct(self, site: _Site, output: Tensor, axis: int, transport, cache: ShapeCache) -> Tensor:
        weight = values_weight(output, axis, self.prior_values)
        if weight > 0:
            return _blend(site, output, axis, transport, cache, weight)
        return transport.match(output, axis, site.table(output.device), cache)

    def reset(self) -> None:
        """Nothing to forget: the estimate has no state."""


class PriorEstimate:
    """``prior``: ``(n·Q̂_batch + N0·Q_ref)/(n + N0)``, ``n`` the batch size and ``Q̂_batch`` the
    ``batch`` estimate's quantile function (N0 = 0: ``batch``; N0 = ∞: the identity). A channel
    without finite values keeps ``Q_ref``."""

    name = "prior"
    fallback: str | None = None

    def __init__(self, prior: float, prior_values: float | None = None):
        self.prior = prior
        self.batch = BatchEstimate(prior_values)

    def correct(self, site: _Site, output: Tensor, axis: int, transport, cache: ShapeCache) -> Tensor:
        if self.prior == 0:
            return self.batch.correct(site, output, axis, transport, cache)
        if math.isinf(self.prior):
            return output
        keep = (1 - values_weight(output, axis, self.batch.prior_values)) * (
            output.shape[0] / (self.prior + output.shape[0]))
        return _blend(site, output, axis, transport, cache, 1 - keep)

    def reset(self) -> None:
        """Nothing to forget: the estimate has no state."""


class EMAEstimate:
    """``ema``: ``Q̂ ← (1 − m)·Q̂ + m·Q_batch`` from ``Q_ref``, kept across batches until `reset`
    (m = 1: ``batch``). A channel without finite values in a batch keeps its ``Q̂``."""

    name = "ema"
    fallback: str | None = None

    def __init__(self, momentum: float, prior_values: float | None = None):
        self.momentum = momentum
        self.batch = BatchEstimate(prior_values)
        self.state: Tensor | None = None

    def correct(self, site: _Site, output: Tensor, axis: int, transport, cache: ShapeCache) -> Tensor:
        if self.momentum == 1.0:
            return self.batch.correct(site, output, axis, transport, cache)
        q_ref = site.table(output.device, levels=transport.blend_levels(site.stats.levels))
        q_batch, context = transport.batch_quantiles(output, axis, q_ref.shape[1], cache)
        weight = values_weight(output, axis, self.batch.prior_values)
        if weight > 0:  # the batch estimate's quantile function
            q_batch = torch.lerp(q_batch, q_ref, weight)
        previous = q_ref if self.state is None else self.state.to(q_ref.device)
        q_test = torch.where(q_batch.isnan(), previous, torch.lerp(previous, q_batch, self.momentum))
        self.state = _persistent(q_test.clone)
        return transport.through(output, axis, q_test, q_ref, context, cache)

    def reset(self) -> None:
        """Forget the running estimate: the next batch starts from ``Q_ref``."""
        self.state = None


class PerSampleEstimate:
    """``per-sample``: each sample's channel over its own positions, onto the per-sample reference.

    A batch with fewer than ``min_positions`` positions per sample uses ``prior`` at this site,
    for that batch only (`fallback` says why); a site without a per-sample table always does.
    """

    name = "per-sample"

    def __init__(self, min_positions: int, prior: PriorEstimate, always: str | None = None):
        self.min_positions = min_positions
        self.prior = prior
        self.always = always
        self.fallback: str | None = always

    def correct(self, site: _Site, output: Tensor, axis: int, transport, cache: ShapeCache) -> Tensor:
        positions = output.numel() // max(output.shape[0] * output.shape[axis], 1)
        if self.always is None and positions < self.min_positions:
            self.fallback = (f"prior: {positions} position(s) per sample, fewer than "
                             f"min_positions={self.min_positions}")
        else:
            self.fallback = self.always
        if self.fallback is not None:
            return self.prior.correct(site, output, axis, transport, cache)
        rows = per_sample_rows(output, axis, None)  # B·C×P, a copy unless already laid out so
        y = transport.match_rows(rows, site.table(output.device, per_sample=True))
        return y.view(output.movedim(axis, 1).shape).movedim(1, axis)

    def reset(self) -> None:
        """Forget the last batch's fallback."""
        self.fallback = self.always


def _make_estimate(name: str, site: str, options: DMCOptions, stats: ReferenceStats):
    if name == "batch":
        return BatchEstimate(options.prior_values)
    if name == "prior":
        return PriorEstimate(options.prior, options.prior_values)
    if name == "ema":
        return EMAEstimate(options.momentum, options.prior_values)
    always = None
    if site not in stats.per_sample:
        always = "prior: fewer than 2 positions per sample at fit time"
    return PerSampleEstimate(options.min_positions, PriorEstimate(options.prior, options.prior_values),
                             always)


def _as_stats(stats, model: nn.Module) -> ReferenceStats:
    if isinstance(stats, (str, os.PathLike)):
        return ReferenceStats.load(stats, model)
    if not isinstance(stats, ReferenceStats):
        raise TypeError(f"stats must be a ReferenceStats (from torch_dmc.fit or "
                        f"ReferenceStats.load) or the path of a stats file, found {type(stats).__name__}")
    return stats


class DMC(nn.Module):
    """A model whose chosen activations are corrected onto their reference distributions.

    At every site the output's channel values ``x`` (batch and spatial positions pooled) become
    ``y = x + λ·(T(x) - x)`` with ``T`` the monotone quantile-matching map to the reference
    (docs/method.md § Transport) and ``λ`` the site's strength. Hooks are registered on ``model``
    itself (no copy: deep-copy it first if you need the original untouched); `remove` takes them
    off again and returns the model, whose outputs are then bit-identical to before.

    Guarantees (docs/method.md § Bad input): the same batch gives the same output in every mode
    (``ema`` aside, whose state moves with the stream); non-finite values pass through and are
    left out of every estimate; an empty batch returns the plain model's output and changes no
    state; a forward with a site module in train mode warns once.

    Args:
        model: the trained network (left in whatever train/eval mode it is in).
        stats: `ReferenceStats` fitted on this model, or the path of a stats file (loaded with
            `ReferenceStats.load`); validated against ``model`` here.
        options: a `DMCOptions`; or give its fields as keywords instead (``mode="exact"``,
            ``strength=…``, ``sites=…``, ``knots=…``, ``grid_sample=…``, ``seed=…``,
            ``estimate=…``, ``prior=…``, ``momentum=…``, ``min_positions=…``; see `DMCOptions`).

    Raises:
        ValueError: a bad option or pattern; per-sample estimates without per-sample stats.
        TypeError: ``stats`` is neither stats nor a path.
        torch_dmc.StatsMismatchError: the stats do not fit ``model``.

    Example:
        >>> corrected = DMC(model, stats, mode="exact")              # doctest: +SKIP
        >>> logits = corrected(x)                                    # doctest: +SKIP
        >>> model = corrected.remove()                               # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, stats: ReferenceStats | str | os.PathLike,
                 options: DMCOptions | None = None, **kwargs):
        super().__init__()
        if options is not None and kwargs:
            raise ValueError("give DMC either an options object or keyword options, not both")
        options = options if options is not None else DMCOptions.from_kwargs(**kwargs)
        stats = _as_stats(stats, model)
        stats.check(model)
        chosen = options.resolve(stats.sites)
        wants_per_sample = any(o.estimate == "per-sample" for o in chosen.values())
        if wants_per_sample and not stats.per_sample:
            raise ValueError(
                "estimate 'per-sample' needs per-sample reference statistics, and these stats have "
                "none: fit them with torch_dmc.fit(..., per_sample=True)")
        self.model = model
        self.stats = stats
        self.options = options
        self.strengths = {n: o.strength for n, o in chosen.items()}
        self.estimates = {n: o.estimate for n, o in chosen.items()}
        modules = dict(model.named_modules())
        self._sites = {
            n: _Site(n, modules[n], o, _make_estimate(o.estimate, n, options, stats), stats)
            for n, o in chosen.items() if o.strength > 0
        }
        self._transport = (GridTransport(options.knots, options.grid_sample)
                           if options.mode == "grid" else ExactTransport())
        self._cache = ShapeCache(options.seed)
        self._warned_train = False
        self._handles = register_output_hooks(model, list(self._sites), self._correct)
        self._removed = False

    @property
    def mode(self) -> str:
        """``"exact"`` or ``"grid"``."""
        return self.options.mode

    @property
    def sites(self) -> list[str]:
        """Names of the corrected sites (strength > 0)."""
        return list(self._sites)

    @property
    def fallbacks(self) -> dict[str, str]:
        """Per-sample sites that used ``prior`` in the last batch (or always), with the reason."""
        return {n: s.estimate.fallback for n, s in self._sites.items() if s.estimate.fallback}

    def estimate_used(self, name: str) -> str:
        """The estimate a site used in the last batch (``per-sample`` may fall back to ``prior``)."""
        return "prior" if name in self.fallbacks else self.estimates[name]

    def cache_size(self) -> int:
        """Activation shapes whose grid-mode buffers are cached (at most `SHAPE_CACHE_SIZE`)."""
        return len(self._cache)

    def reset(self) -> None:
        """Forget all state: ``ema`` estimates, per-sample fallbacks and the per-shape cache."""
        for site in self._sites.values():
            site.estimate.reset()
        self._cache.clear()

    def _correct(self, name: str, output: Tensor) -> Tensor:
        if output.numel() == 0:
            return output
        site = self._sites[name]
        if site.module.training and not self._warned_train:
            self._warned_train = True
            warnings.warn(
                f"DMC: site {name!r} ({type(site.module).__name__}) runs in train mode, where "
                "normalization layers use batch statistics and BatchNorm updates its running "
                "statistics for good on test data; call model.eval() before correcting (warned "
                "once per DMC)", UserWarning, stacklevel=2)
        self.stats.check_output(name, output)
        axis = self.stats.channel_axes[name] % output.dim()
        y = site.estimate.correct(site, output, axis, self._transport, self._cache)
        return y if site.strength == 1.0 else torch.lerp(output, y, site.strength)

    def forward(self, *args, **kwargs):
        """Run the wrapped model with corrected sites."""
        if self._removed:
            raise RuntimeError("this DMC was removed; call the model directly or wrap it again")
        return self.model(*args, **kwargs)

    def remove(self) -> nn.Module:
        """Take the hooks off and return the original model (outputs bit-identical to before)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._removed = True
        return self.model

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, sites={len(self.sites)}"


@contextmanager
def corrected(model: nn.Module, stats: ReferenceStats, options: DMCOptions | None = None,
              **kwargs) -> Iterator[DMC]:
    """Context manager: ``model`` is corrected inside the block and restored on exit.

    Example:
        >>> with corrected(model, stats) as m:                        # doctest: +SKIP
        ...     logits = m(x)
    """
    wrapper = DMC(model, stats, options, **kwargs)
    try:
        yield wrapper
    finally:
        wrapper.remove()
