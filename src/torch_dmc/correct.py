"""Correct a model's activations: `DMC` = hooks × one estimate per site × one transport.

At every site the output's channel values ``x`` become ``y = x + λ·(T(x) - x)`` with ``T`` the
monotone quantile-matching map onto the reference (docs/method.md § Transport, § Strength).
Two seams, each a small object:

- a *transport* computes maps: `ExactTransport` (full sort) or `GridTransport` (histogram of a
  fixed random sample of positions, table lookup; docs/method.md § Exact mode, § Grid mode);
  in grid mode a BatchNorm site whose correction is the plain map is corrected from the
  BatchNorm's input, skipping its pass (docs/method.md § Grid mode, BatchNorm sites);
- an *estimate* decides which test distribution is matched and owns its state and fallback:
  `BatchEstimate`, `PriorEstimate`, `EMAEstimate`, `PerSampleEstimate` (docs/method.md
  § Estimates).

With a ``process_group`` (docs/method.md § Synchronised correction) each site estimates its
channels' test distribution on the union of the group's slices of the batch:
`SyncExactTransport` and `SyncGridTransport` pool what the estimate needs through the
collectives of `torch_dmc._sync`, so every process's output equals what one process computes on
the concatenated batch.

Modules and hooks here only route tensors to the math in `torch_dmc.transport`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .fit import per_sample_rows
from .native import available_for, take
from .options import AUTO_PRIOR_VALUES, DMCOptions, SiteOptions
from .sites import register_output_hooks
from .sketch import gather_positions, sample_positions
from .stats_io import ReferenceStats
from .transport import (
    affine_values,
    all_finite,
    apply_lut,
    empirical_quantiles,
    grid_transport,
    histogram_levels,
    histogram_quantiles,
    interp_quantiles,
    lut_from_quantiles,
    lut_from_sample,
    lut_grid,
    needs_grid,
    transport_exact,
    transport_exact_columns,
    transport_quantiles,
)

if TYPE_CHECKING:  # torch.distributed is touched only when a process group is given
    from torch.distributed import ProcessGroup

    from ._sync import GlobalBatch, Sync

__all__ = [
    "AFFINE_FORWARD",
    "FUSE_BATCHNORM",
    "BLEND_LEVELS",
    "SHAPE_CACHE_SIZE",
    "MAX_OFFSETS",
    "DMC",
    "corrected",
    "ShapeCache",
    "ExactTransport",
    "GridTransport",
    "SyncExactTransport",
    "SyncGridTransport",
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

MAX_OFFSETS = 1 << 22
"""Most sampled values (``C·m``) whose storage offsets grid mode caches per activation shape
(16 MB as int32); a site with more gathers them from the cached positions instead (slower)."""


def _persistent(make):
    """Run ``make()`` outside inference mode: a cached tensor must stay usable in every mode."""
    with torch.inference_mode(False), torch.no_grad():
        return make()


class ShapeCache:
    """Grid mode's per-shape buffers, least recently used first out, at most ``size`` of them.

    Sample positions are a fixed function of ``(seed, shape, channel axis, m)``: a fresh generator
    seeded with ``seed`` draws them (kept sorted, see `torch_dmc.sketch.sample_positions`), so the
    same batch always gives the same output. Also kept: their storage offsets per strides
    (`sample`) and the lookup's coordinate buffer per shape (`grid`).
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
            return sample_positions(shape, axis, m, generator, device, ordered=True)
        return self._get(("positions", tuple(shape), axis, m, device), make)

    def slice_positions(self, shape: tuple[int, ...], axis: int, m: int, device: torch.device,
                        start: int, stop: int) -> tuple[Tensor, ...]:
        """The positions of `positions` for the concatenated ``shape`` that fall in samples
        ``start:stop`` (batch axis 0), as positions of that slice: a process's share of the
        sample one process draws on the whole batch (docs/method.md § Synchronised correction)."""
        def make():
            generator = torch.Generator().manual_seed(self.seed)
            index = sample_positions(shape, axis, m, generator, "cpu", ordered=True)  # as `positions`
            keep = (index[0] >= start) & (index[0] < stop)
            local = [i[keep] for i in index]
            local[0] = local[0] - start
            return tuple(i.to(device) for i in local)
        return self._get(("slice", tuple(shape), axis, m, device, start, stop), make)

    def sample(self, output: Tensor, axis: int, m: int) -> Tensor:
        """The ``C×m`` values of `positions` in ``output``, contiguous: one ``index_select`` at
        cached storage offsets (kept per shape and strides while there are at most
        `MAX_OFFSETS` of them; beyond, `torch_dmc.sketch.gather_positions`)."""
        c = output.shape[axis]
        if c * m > MAX_OFFSETS:
            return gather_positions(output, axis, self.positions(output.shape, axis, m, output.device))

        def make():
            index = self.positions(output.shape, axis, m, output.device)
            strides = [s for i, s in enumerate(output.stride()) if i != axis]
            base = sum(i * s for i, s in zip(index, strides, strict=True))
            offsets = base + torch.arange(c, device=output.device).unsqueeze(1) * output.stride(axis)
            span = 1 + sum((n - 1) * s for n, s in zip(output.shape, output.stride(), strict=True))
            return offsets.to(torch.int32 if span < 2**31 else torch.int64).view(-1), span
        key = ("offsets", tuple(output.shape), output.stride(), axis, m, output.device)
        offsets, span = self._get(key, make)
        flat = output.detach().as_strided((span,), (1,))  # every entry of output, and no other, is read
        if available_for(flat):  # the same values, the scattered reads overlapped
            return take(flat, offsets).view(c, m)
        return flat.index_select(0, offsets).view(c, m)

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


def _channel_major(output: Tensor, axis: int) -> Tensor:
    """The ``C×N`` matrix of an output's values (a view where the layout allows; ``N`` may be 0)."""
    c = output.shape[axis]
    return output.movedim(axis, 0).reshape(c, output.numel() // c)


def _is_channels_last(output: Tensor, axis: int) -> bool:
    """Whether a 4-D ``N×C×H×W`` output (channels on axis 1) is stored channels-last (NHWC)."""
    return (output.dim() == 4 and axis == 1 and not output.is_contiguous()
            and output.is_contiguous(memory_format=torch.channels_last))


FUSE_BATCHNORM = True
"""Whether a `DMC` built from now on corrects eligible BatchNorm sites from their input, skipping
the BatchNorm's own pass (docs/method.md § Grid mode, BatchNorm sites); ``False`` runs every site
as a hook on its output (for comparisons)."""

AFFINE_FORWARD = "dmc_affine_forward"
"""Attribute that a BatchNorm module's replaced instance ``forward`` may carry, set to ``True``, to
promise that it maps its input by a per-channel affine map whose slope has the sign of the
module's weight (any statistics: e.g. the batch's), with no side effect. `DMC` may then skip that
forward where the site's correction does not depend on such a map (docs/method.md § Grid mode,
BatchNorm sites); `torch_dmc.methods` marks the batch-statistics forward of ``adapt_bn``."""


def _bn_affine(module: nn.Module, forward, x: Tensor, memo: dict) -> tuple[Tensor, Tensor] | None:
    """``(a, b)`` with ``module(x) = a·x + b`` per channel (axis 1), for a BatchNorm in eval mode
    with running statistics and its class's forward (``forward`` None); ``(sign of the weight,
    0)`` for an instance ``forward`` marked `AFFINE_FORWARD`; ``None`` otherwise (the output is not
    known to be affine). ``memo`` keeps the last ``(a, b)`` while the module's tensors, their
    in-place versions and the device stay the same."""
    marked = forward is not None
    if marked and getattr(forward, AFFINE_FORWARD, False) is not True:
        return None
    if not marked and (module.training or module.running_mean is None or module.running_var is None):
        return None
    tensors = (module.weight, module.bias) + (() if marked else (module.running_mean, module.running_var))
    key = (marked, x.device, module.eps, x.shape[1],
           tuple(None if t is None else (id(t), t._version) for t in tensors))
    if memo.get("key") != key:
        memo["key"], memo["affine"] = key, _persistent(lambda: _affine_of(module, marked, x))
    return memo["affine"]


def _affine_of(module: nn.Module, marked: bool, x: Tensor) -> tuple[Tensor, Tensor]:
    """`_bn_affine`'s computation."""
    weight, bias = module.weight, module.bias
    if marked:
        c = x.shape[1]
        a = torch.ones(c, device=x.device) if weight is None else weight.detach().float().sign()
        return a, torch.zeros(c, device=x.device)
    # the arithmetic of BatchNorm's CPU inference kernel: a = (1 / sqrt(var + eps))·weight,
    # b = bias - mean·a, output x·a + b
    a = 1 / torch.sqrt(module.running_var.detach().float() + module.eps)
    if weight is not None:
        a = a * weight.detach().float()
    mean_a = module.running_mean.detach().float() * a
    b = -mean_a if bias is None else bias.detach().float() - mean_a
    return a, b


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
        self.affine_memo: dict = {}  # a fused BatchNorm site's last (a, b), see _bn_affine

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

    def extent(self, output: Tensor, axis: int) -> tuple[int, int]:
        """``(samples, values per channel)`` of the batch that the estimate describes: here the
        output's own (a synchronised transport answers for the whole group's batch)."""
        return output.shape[0], output.numel() // output.shape[axis]

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

    extent = ExactTransport.extent

    def _size(self, m: int) -> int:
        """Table nodes for ``m`` values per channel."""
        return min(self.knots, max(32, m // 4))

    def _samples(self, n: int) -> bool:
        """Whether a site with ``n`` values per channel is sampled (else all values are used)."""
        return self.grid_sample is not None and self.grid_sample < n

    def _values(self, output: Tensor, axis: int, cache: ShapeCache) -> Tensor:
        """``C×M`` values: the fixed sample of positions, or all values when there are few."""
        c = output.shape[axis]
        n = output.numel() // c
        if self._samples(n):
            return cache.sample(output, axis, self.grid_sample)
        return output.detach().movedim(axis, 0).reshape(c, n)

    @staticmethod
    def _in_layout(output: Tensor, axis: int, cache: ShapeCache, lookup) -> Tensor:
        """``lookup(x, axis, grid)`` on the output in its own memory layout: a channels-last
        output as its NHWC view (no layout change, and the result stays channels-last)."""
        def grid(x: Tensor, ax: int) -> Tensor | None:
            return cache.grid(x.shape, ax, x.device) if needs_grid(x) else None

        if _is_channels_last(output, axis):
            view = output.permute(0, 2, 3, 1)
            return lookup(view, 3, grid(view, 3)).permute(0, 3, 1, 2)
        return lookup(output, axis, grid(output, axis))

    def _apply(self, output: Tensor, axis: int, lut, cache: ShapeCache,
               affine: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """`apply_lut` in the output's own memory layout (a channels-last output stays so)."""
        return self._in_layout(output, axis, cache,
                               lambda x, ax, grid: apply_lut(x, lut, ax, grid, affine=affine))

    def match(self, output: Tensor, axis: int, q_ref: Tensor, cache: ShapeCache,
              affine: tuple[Tensor, Tensor] | None = None, finite: bool | None = None) -> Tensor:
        """The batch's values of every channel matched to ``q_ref`` through the tabulated map
        (`torch_dmc.transport.grid_transport`); with ``affine = (a, b)``, the values
        ``a·output + b`` (a BatchNorm's output, given its input: docs/method.md § Grid mode,
        BatchNorm sites). ``finite``: whether every value is finite, if known."""
        c = output.shape[axis]
        n = output.numel() // c
        if not self._samples(n):  # all values: none copied here
            values, size = None, self._size(n)
        else:
            values = self._values(output, axis, cache)
            size = self._size(values.shape[1])
        return self._in_layout(output, axis, cache, lambda x, ax, grid: grid_transport(
            x, values, q_ref, size, ax, grid, affine=affine, finite=finite))

    def match_rows(self, rows: Tensor, q_ref: Tensor) -> Tensor:
        """Every ``B·C`` (sample, channel) row matched on its own, all its positions used."""
        return apply_lut(rows, lut_from_sample(rows, q_ref, self._size(rows.shape[1])), channel_axis=0)

    def batch_quantiles(self, output: Tensor, axis: int, levels: int, cache: ShapeCache):
        """The batch's quantile table from the histogram (no sort), and its knots as context."""
        values = self._values(output, axis, cache)
        size = self._size(values.shape[1])
        lo, step, level = histogram_levels(values, size)
        return histogram_quantiles(lo, step, level, levels), (lo, step, size)

    def through(self, output: Tensor, axis: int, q_test: Tensor, q_ref: Tensor, context,
                cache: ShapeCache) -> Tensor:
        """``x ↦ Q_ref(F_test(x))`` tabulated at the batch's knots and looked up."""
        lo, step, size = context
        return self._apply(output, axis, lut_from_quantiles(q_test, q_ref, lo, step, size), cache)


class SyncExactTransport(ExactTransport):
    """`ExactTransport` on the union of a process group's slices of the batch.

    Made per site and forward for one `torch_dmc._sync.GlobalBatch`; every process of the group
    must call the same methods. Each estimate needs every value of the concatenated batch: one
    ``all_gather`` per call of `match` or `batch_quantiles` (docs/method.md § Synchronised
    correction), after which each process sorts the whole batch and maps its own slice's values
    (their columns of the pool). ``through`` and ``match_rows`` are local.

    Args:
        sync: the group's collectives.
        batch: the site's concatenated batch (`torch_dmc._sync.Sync.describe`).
    """

    def __init__(self, sync: Sync, batch: GlobalBatch):
        self.sync = sync
        self.batch = batch

    def extent(self, output: Tensor, axis: int) -> tuple[int, int]:
        """``(samples, values per channel)`` of the concatenated batch."""
        return self.batch.samples, self.batch.values

    def _pool(self, output: Tensor, axis: int) -> Tensor:
        return self.sync.gather(_channel_major(output.detach(), axis), self.batch)

    def match(self, output: Tensor, axis: int, q_ref: Tensor, cache: ShapeCache) -> Tensor:
        """This slice's values matched to ``q_ref`` with their average ranks in the whole batch."""
        pool = self._pool(output, axis)
        if output.numel() == 0:
            return output
        b = self.batch
        columns = (b.start * b.positions, b.stop * b.positions)  # this slice's values in the pool
        y = transport_exact_columns(pool, q_ref, *columns)  # C×n, the slice's channel-major order
        return y.reshape(output.movedim(axis, 0).shape).movedim(0, axis).contiguous()

    def batch_quantiles(self, output: Tensor, axis: int, levels: int, cache: ShapeCache):
        """The whole batch's ``C×levels`` quantile table (the same on every process)."""
        return empirical_quantiles(self._pool(output, axis), levels), None

    def through(self, output: Tensor, axis: int, q_test: Tensor, q_ref: Tensor, context,
                cache: ShapeCache) -> Tensor:
        """``x ↦ Q_ref(F_test(x))`` on this slice (local: ``q_test`` is already pooled)."""
        if output.numel() == 0:
            return output
        return super().through(output, axis, q_test, q_ref, context, cache)


class SyncGridTransport(GridTransport):
    """`GridTransport` on the union of a process group's slices of the batch.

    The sample is the one a single process draws on the concatenated batch (fixed positions per
    concatenated shape); each process histograms the sampled positions in its slice, and the
    knot range (``all_reduce`` MIN/MAX), the cell counts (``all_reduce`` SUM) and every outlier
    refinement of the range (docs/method.md § Knot placement) are pooled, so the table, and each
    process's output, is what one process computes on the concatenated batch (docs/method.md
    § Synchronised correction). ``through``, the lookup and ``match_rows`` are local.

    Args:
        knots, grid_sample: as for `GridTransport`.
        sync: the group's collectives.
        batch: the site's concatenated batch (`torch_dmc._sync.Sync.describe`).
    """

    def __init__(self, knots: int, grid_sample: int | None, sync: Sync, batch: GlobalBatch):
        super().__init__(knots, grid_sample)
        self.sync = sync
        self.batch = batch

    def extent(self, output: Tensor, axis: int) -> tuple[int, int]:
        """``(samples, values per channel)`` of the concatenated batch."""
        return self.batch.samples, self.batch.values

    def _sampled(self) -> bool:
        return self._samples(self.batch.values)

    def _values(self, output: Tensor, axis: int, cache: ShapeCache) -> Tensor:
        """``C×m`` values: this slice's share of the concatenated batch's sample (``m >= 0``)."""
        if self._sampled():
            b = self.batch
            index = cache.slice_positions(b.shape, axis, self.grid_sample, output.device, b.start, b.stop)
            return gather_positions(output.detach(), axis, index)
        return _channel_major(output.detach(), axis)

    def _global_size(self) -> int:
        """`GridTransport`'s knots for the concatenated batch's ``M`` values per channel."""
        return self._size(self.grid_sample if self._sampled() else self.batch.values)

    def match(self, output: Tensor, axis: int, q_ref: Tensor, cache: ShapeCache,
              affine: tuple[Tensor, Tensor] | None = None, finite: bool | None = None) -> Tensor:
        """This slice matched to ``q_ref`` through the table of the whole batch's histogram
        (``affine``: of ``a·output + b``, as in `GridTransport.match`)."""
        values = self._values(output, axis, cache)
        if affine is not None:
            values = affine_values(values, affine)
        lut = lut_from_sample(values, q_ref, self._global_size(),
                              reduce=self.sync.histogram_reduce(self.batch))
        return output if output.numel() == 0 else self._apply(output, axis, lut, cache, affine)

    def batch_quantiles(self, output: Tensor, axis: int, levels: int, cache: ShapeCache):
        """The whole batch's quantile table from the pooled histogram, and its knots."""
        values = self._values(output, axis, cache)
        size = self._global_size()
        lo, step, level = histogram_levels(values, size, reduce=self.sync.histogram_reduce(self.batch))
        return histogram_quantiles(lo, step, level, levels), (lo, step, size)

    def through(self, output: Tensor, axis: int, q_test: Tensor, q_ref: Tensor, context,
                cache: ShapeCache) -> Tensor:
        """``x ↦ Q_ref(F_test(x))`` at the pooled knots, looked up on this slice."""
        if output.numel() == 0:
            return output
        return super().through(output, axis, q_test, q_ref, context, cache)


MIN_BLEND_WEIGHT = 1e-3
"""Below this weight of the reference, ``prior_values`` is skipped (the batch path is used)."""


def _blend(site: _Site, output: Tensor, axis: int, transport, cache: ShapeCache, weight: float) -> Tensor:
    """Map through ``(1 − w)·Q_batch + w·Q_ref`` (a channel without finite values keeps ``Q_ref``)."""
    q_ref = site.table(output.device, levels=transport.blend_levels(site.stats.levels))
    q_batch, context = transport.batch_quantiles(output, axis, q_ref.shape[1], cache)
    q_test = torch.where(q_batch.isnan(), q_ref, torch.lerp(q_batch, q_ref, weight))
    return transport.through(output, axis, q_test, q_ref, context, cache)


def values_weight(output: Tensor, axis: int, prior_values: float | None,
                  extent: tuple[int, int] | None = None) -> float:
    """The reference's weight ``V0/(n + V0)`` in the batch's quantile function, ``n`` the batch's
    values per channel (``None``: `AUTO_PRIOR_VALUES` where each image has one value per channel,
    else 0); 0 below `MIN_BLEND_WEIGHT`. ``extent``: ``(samples, values per channel)`` of the
    batch when it is not ``output``'s own (a synchronised group's, see ``transport.extent``)."""
    samples, values = extent if extent is not None else (output.shape[0], output.numel() / output.shape[axis])
    v0 = prior_values
    if v0 is None:
        v0 = AUTO_PRIOR_VALUES if values == samples else 0.0
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
        """The site's corrected output (``λ = 1``) under this estimate."""
        weight = values_weight(output, axis, self.prior_values, transport.extent(output, axis))
        if weight > 0:
            return _blend(site, output, axis, transport, cache, weight)
        return transport.match(output, axis, site.table(output.device), cache)

    reduces_to_batch = True
    """Whether `correct` may be the plain ``transport.match`` (see `plain_match`)."""

    def plain_match(self, output: Tensor, axis: int, extent: tuple[int, int]) -> bool:
        """Whether `correct` is ``transport.match`` onto the site's table for this output (of a
        batch of ``extent``, see ``transport.extent``), with no state to update: no value prior
        weighs in."""
        return values_weight(output, axis, self.prior_values, extent) == 0

    def communicates(self, output: Tensor, axis: int) -> bool:
        """Whether a synchronised forward pools this site's batch: always."""
        return True

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
        """The site's corrected output (``λ = 1``) under this estimate."""
        if self.prior == 0:
            return self.batch.correct(site, output, axis, transport, cache)
        if math.isinf(self.prior):
            return output
        extent = transport.extent(output, axis)
        samples = extent[0]
        keep = (1 - values_weight(output, axis, self.batch.prior_values, extent)) * (
            samples / (self.prior + samples))
        return _blend(site, output, axis, transport, cache, 1 - keep)

    @property
    def reduces_to_batch(self) -> bool:
        """``N0 = 0``: `correct` is the ``batch`` estimate's."""
        return self.prior == 0

    def plain_match(self, output: Tensor, axis: int, extent: tuple[int, int]) -> bool:
        """Whether `correct` is the ``batch`` estimate's plain match (``N0 = 0``, no value prior)."""
        return self.prior == 0 and self.batch.plain_match(output, axis, extent)

    def communicates(self, output: Tensor, axis: int) -> bool:
        """Whether a synchronised forward pools this site's batch: unless ``N0 = ∞`` (identity)."""
        return not math.isinf(self.prior)

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
        """The site's corrected output (``λ = 1``); moves the running estimate."""
        if self.momentum == 1.0:
            return self.batch.correct(site, output, axis, transport, cache)
        q_ref = site.table(output.device, levels=transport.blend_levels(site.stats.levels))
        q_batch, context = transport.batch_quantiles(output, axis, q_ref.shape[1], cache)
        weight = values_weight(output, axis, self.batch.prior_values, transport.extent(output, axis))
        if weight > 0:  # the batch estimate's quantile function
            q_batch = torch.lerp(q_batch, q_ref, weight)
        previous = q_ref if self.state is None else self.state.to(q_ref.device)
        q_test = torch.where(q_batch.isnan(), previous, torch.lerp(previous, q_batch, self.momentum))
        self.state = _persistent(q_test.clone)
        return transport.through(output, axis, q_test, q_ref, context, cache)

    @property
    def reduces_to_batch(self) -> bool:
        """``m = 1``: `correct` is the ``batch`` estimate's."""
        return self.momentum == 1.0

    def plain_match(self, output: Tensor, axis: int, extent: tuple[int, int]) -> bool:
        """Whether `correct` is the ``batch`` estimate's plain match (``m = 1``, no value prior)."""
        return self.momentum == 1.0 and self.batch.plain_match(output, axis, extent)

    def communicates(self, output: Tensor, axis: int) -> bool:
        """Whether a synchronised forward pools this site's batch: always."""
        return True

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

    def _fallback(self, output: Tensor, axis: int) -> str | None:
        """Why this batch uses ``prior`` at the site (``None``: it does not). Decided from the
        positions per sample only, so every process of a synchronised group decides alike."""
        positions = math.prod(s for i, s in enumerate(output.shape) if i not in (0, axis))
        if self.always is None and positions < self.min_positions:
            return (f"prior: {positions} position(s) per sample, fewer than "
                    f"min_positions={self.min_positions}")
        return self.always

    def communicates(self, output: Tensor, axis: int) -> bool:
        """Whether a synchronised forward pools this site's batch: only when it falls back to
        ``prior`` (each sample's own map needs nothing from the other processes)."""
        return self._fallback(output, axis) is not None and self.prior.communicates(output, axis)

    def correct(self, site: _Site, output: Tensor, axis: int, transport, cache: ShapeCache) -> Tensor:
        """The site's corrected output (``λ = 1``); records the fallback."""
        self.fallback = self._fallback(output, axis)
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

    In grid mode a BatchNorm site in eval mode whose correction is the plain batch map is
    computed from the BatchNorm's input, and the BatchNorm's own pass is skipped (its ``forward``
    is replaced until `remove`): the same result but for rounding (docs/method.md § Grid mode,
    BatchNorm sites).

    Guarantees (docs/method.md § Bad input): the same batch gives the same output in every mode
    (``ema`` aside, whose state moves with the stream); non-finite values pass through and are
    left out of every estimate; an empty batch returns the plain model's output and changes no
    state; a forward with a site module in train mode warns once.

    Synchronised (docs/method.md § Synchronised correction): with ``process_group``, every process
    of the group runs the wrapped model on its slice of one batch (the slices may differ in size,
    an empty one included, but not on other axes), and every site estimates its channels' test
    distribution on the concatenation of the slices in group-rank order: each process's output
    is its rows of what one process computes on the concatenated batch (to float rounding, in
    both modes). ``prior`` and ``ema`` count the whole batch and their state evolves alike on
    every process; ``per-sample`` sites communicate only when they fall back to ``prior``. Every
    process must call the wrapped model together (like ``SyncBatchNorm``); a process that fails
    makes the others fail after the group's timeout instead of hanging.

    Args:
        model: the trained network (left in whatever train/eval mode it is in).
        stats: `ReferenceStats` fitted on this model, or the path of a stats file (loaded with
            `ReferenceStats.load`); validated against ``model`` here.
        options: a `DMCOptions`; or give its fields as keywords instead (``mode="exact"``,
            ``strength=…``, ``sites=…``, ``knots=…``, ``grid_sample=…``, ``seed=…``,
            ``estimate=…``, ``prior=…``, ``momentum=…``, ``min_positions=…``; see `DMCOptions`).
        process_group: a ``torch.distributed`` process group (e.g. ``torch.distributed.group.WORLD``
            once ``init_process_group`` has run) whose processes correct one batch together;
            ``None`` (the default): each call corrects its own batch, no communication.

    Raises:
        ValueError: a bad option or pattern; per-sample estimates without per-sample stats;
            ``process_group`` given but ``torch.distributed`` not initialised, or not a group
            this process belongs to. At a forward with ``process_group``: the processes' slices
            differ beyond axis 0, or a site's channel axis is 0 (the batch axis).
        TypeError: ``stats`` is neither stats nor a path.
        torch_dmc.StatsMismatchError: the stats do not fit ``model``.

    Example:
        >>> corrected = DMC(model, stats, mode="exact")              # doctest: +SKIP
        >>> logits = corrected(x)                                    # doctest: +SKIP
        >>> model = corrected.remove()                               # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, stats: ReferenceStats | str | os.PathLike,
                 options: DMCOptions | None = None, *, process_group: ProcessGroup | None = None,
                 **kwargs):
        super().__init__()
        sync = None
        if process_group is not None:
            from ._sync import Sync  # torch.distributed only when asked for

            sync = Sync(process_group)
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
        self._sync = sync
        self._warned_train = False
        fused = [n for n, site in self._sites.items() if FUSE_BATCHNORM and self._fusable(site)]
        self._handles = register_output_hooks(model, [n for n in self._sites if n not in fused],
                                              self._correct)
        self._patched = {n: self._patch_forward(n) for n in fused}
        self._removed = False

    def _fusable(self, site: _Site) -> bool:
        """Whether a site may be corrected from its module's input (a BatchNorm whose output is
        an affine map of it; docs/method.md § Grid mode, BatchNorm sites): grid mode, full
        strength, an estimate that may be the plain match (``batch``, and ``prior``/``ema`` at
        their ``batch`` limits), channels on axis 1."""
        return (isinstance(self._transport, GridTransport)
                and isinstance(site.module, _BatchNorm) and site.strength == 1.0
                and getattr(site.estimate, "reduces_to_batch", False)
                and self.stats.channel_axes[site.name] == 1)

    def _patch_forward(self, name: str):
        """Replace a fusable site's ``forward`` by `_fused_forward`; returns what to restore."""
        module = self._sites[name].module
        previous = module.__dict__.get("forward")  # an instance forward (e.g. adapt_bn's), or None
        unfused = previous if previous is not None else module.forward

        def forward(x, *args, **kwargs):
            return self._fused_forward(name, previous, unfused, x, *args, **kwargs)

        module.forward = forward
        return previous, forward

    def _fused_forward(self, name: str, previous, unfused, x, *args, **kwargs):
        """A fusable BatchNorm site's forward: its corrected output from its input in one lookup
        when the module is an affine map and the estimate the plain match, else the module's
        forward and then `_correct`. Synchronised: one ``describe`` per site either way, and the
        same collectives after it on either path (each process may decide on its own)."""
        site = self._sites[name]
        affine = None
        if not args and not kwargs and isinstance(x, Tensor) and x.dim() >= 2 and x.is_floating_point():
            affine = _bn_affine(site.module, previous, x, site.affine_memo)
        if affine is None or affine[0].shape[0] != x.shape[1]:
            return self._correct(name, unfused(x, *args, **kwargs))
        transport = self._transport
        if self._sync is not None:  # every process joins, an empty slice too (as in _correct)
            self.stats.check_output(name, x)
            transport = self._synchronised(name, x, 1)
            if transport is None:
                return unfused(x)
        elif x.numel() == 0:
            return unfused(x)
        finite = None
        if previous is not None:
            # a marked forward normalises with its own statistics, which a non-finite value
            # spoils for the whole channel: then run it, to keep its output (BatchNorm's own
            # forward is elementwise, and a·x + b passes non-finite values through alike)
            finite = all_finite(x)
        if finite is False or not site.estimate.plain_match(x, 1, transport.extent(x, 1)):
            return self._correct(name, unfused(x), transport)
        self.stats.check_output(name, x)
        return transport.match(x, 1, site.table(x.device), self._cache, affine, finite=finite)

    @property
    def mode(self) -> str:
        """``"exact"`` or ``"grid"``."""
        return self.options.mode

    @property
    def process_group(self) -> ProcessGroup | None:
        """The process group the correction is synchronised over (``None``: none)."""
        return None if self._sync is None else self._sync.group

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

    def _synchronised(self, name: str, output: Tensor, axis: int) -> ExactTransport | GridTransport | None:
        """The transport of a synchronised forward at a site (`None`: nothing to correct)."""
        batch = self._sync.describe(name, output, axis)
        if batch.numel == 0:  # the whole group's batch is empty: no state changes anywhere
            return None
        if isinstance(self._transport, GridTransport):
            return SyncGridTransport(self.options.knots, self.options.grid_sample, self._sync, batch)
        return SyncExactTransport(self._sync, batch)

    def _correct(self, name: str, output: Tensor, transport=None) -> Tensor:
        """A site's corrected output (``transport``: the synchronised one, already made)."""
        site = self._sites[name]
        if self._sync is None and output.numel() == 0:
            return output
        self.stats.check_output(name, output)
        axis = self.stats.channel_axes[name] % output.dim()
        if transport is not None:
            if output.numel() == 0:
                return output
        elif self._sync is not None and site.estimate.communicates(output, axis):
            # every process joins, an empty slice too (docs/method.md § Synchronised correction)
            transport = self._synchronised(name, output, axis)
            if transport is None:
                return output
        elif output.numel() == 0:
            return output
        else:
            transport = self._transport
        if site.module.training and not self._warned_train and output.numel() > 0:
            self._warned_train = True
            warnings.warn(
                f"DMC: site {name!r} ({type(site.module).__name__}) runs in train mode, where "
                "normalization layers use batch statistics and BatchNorm updates its running "
                "statistics for good on test data; call model.eval() before correcting (warned "
                "once per DMC)", UserWarning, stacklevel=2)
        y = site.estimate.correct(site, output, axis, transport, self._cache)
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
        for name, (previous, patched) in self._patched.items():
            module = self._sites[name].module
            if module.__dict__.get("forward") is patched:  # not replaced again since
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous
        self._patched = {}
        self._removed = True
        return self.model

    def extra_repr(self) -> str:
        synced = "" if self._sync is None else f", synchronised over {self._sync.size} processes"
        return f"mode={self.mode!r}, sites={len(self.sites)}{synced}"


@contextmanager
def corrected(model: nn.Module, stats: ReferenceStats, options: DMCOptions | None = None,
              **kwargs) -> Iterator[DMC]:
    """Context manager: ``model`` is corrected inside the block and restored on exit.

    Takes `DMC`'s arguments (``process_group=…`` included).

    Example:
        >>> with corrected(model, stats) as m:                        # doctest: +SKIP
        ...     logits = m(x)
    """
    wrapper = DMC(model, stats, options, **kwargs)
    try:
        yield wrapper
    finally:
        wrapper.remove()
