"""Streaming, mergeable per-channel quantile estimates in bounded memory.

`QuantileSketch` estimates the quantile function of every channel of a stream of ``C×N`` batches
without storing the stream. Two steps, both documented with their error:

1. **Unbiased sampling.** From a batch of ``N`` values per channel it keeps ``m`` values drawn
   uniformly *with replacement* at random positions (``m = min(N, samples_per_batch)``; with
   ``N <= m`` it keeps all of them, no sampling). Each kept value carries mass ``N / m``. Random
   positions, never strided ones: a strided subsample of a flattened ``B×H×W`` axis aliases onto
   image columns and gives a wrong reference. Over a stream of ``M`` kept values the sampling error
   of the CDF is at most ``sqrt(ln(2/δ) / (2M))`` with probability ``1 - δ`` (Dvoretzky–Kiefer–
   Wolfowitz), e.g. 0.0018 for ``M = 1.2e6`` and ``δ = 1e-3``.
2. **Merge and reduce.** Batches become weighted summaries of at most ``capacity`` points per
   channel, kept in a binary counter: two summaries of the same height merge into one of the next
   height, compressed back to ``capacity`` equal-mass points by interpolating the merged
   mass-weighted CDF. Each compression moves any rank by at most ``1/capacity``, so after ``B``
   batches the compression error is at most ``(ceil(log2 B) + 1) / capacity``. The counter has at
   most ``max_levels`` heights (default 8); once the top is full, later summaries merge into it,
   each such merge adding ``1/capacity``. Memory is at most ``max_levels · capacity · C`` points,
   whatever the number of images.

`rank_error_bound` states the sum of both terms; the tests check the estimate against
``numpy.quantile`` of the full data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .native import available_for, compress_rows, merge_rows, sort_rows
from .native import channel_extremes as kernel_channel_extremes

__all__ = ["QuantileSketch", "rank_error_bound", "sample_channel_values", "sample_positions",
           "gather_positions", "channel_extremes"]


def rank_error_bound(total_values: int, kept_values: int, batches: int, capacity: int,
                     delta: float = 1e-3) -> float:
    """Bound on the CDF (rank) error of a `QuantileSketch`, holding with probability ``1 - delta``.

    Args:
        total_values: values seen per channel.
        kept_values: values kept by sampling per channel (equal to ``total_values`` if none sampled).
        batches: number of batches (``update`` calls).
        capacity: the sketch's ``capacity``.
        delta: failure probability of the sampling term.

    Returns:
        The bound on ``sup_x |F̂(x) - F(x)|``.
    """
    sampling = 0.0 if kept_values >= total_values else math.sqrt(
        math.log(2 / delta) / (2 * kept_values))
    compression = (math.ceil(math.log2(max(batches, 1))) + 1) / capacity
    return sampling + compression


def sample_channel_values(act: Tensor, channel_axis: int, m: int,
                          generator: torch.Generator | None = None) -> Tensor:
    """Draw ``m`` values per channel at uniformly random positions, with replacement.

    The same random positions (all axes but the channel axis) are used for every channel, so
    the activation is never transposed or copied as a whole.

    Args:
        act: activation of any shape; ``act.shape[channel_axis]`` is the number of channels ``C``.
        channel_axis: the channel axis (negative allowed).
        m: number of values to draw per channel.
        generator: random source (CPU generator for CPU tensors).

    Returns:
        ``C×m`` sampled values.
    """
    index = sample_positions(act.shape, channel_axis, m, generator, act.device)
    return gather_positions(act, channel_axis, index)


def sample_positions(shape: tuple[int, ...] | torch.Size, channel_axis: int, m: int,
                     generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, *,
                     ordered: bool = False) -> tuple[Tensor, ...]:
    """``m`` uniformly random positions (with replacement) of an activation of ``shape``.

    Args:
        ordered: return the same positions sorted in row-major order of ``shape`` (the draw is
            unchanged): `gather_positions` then reads memory in ascending order, about 3× faster
            on a large CPU activation, and every order-free statistic of the sample is the same.

    Returns:
        One index tensor of length ``m`` per axis other than the channel axis (on ``device``),
        for `gather_positions`; a fixed ``generator`` state gives fixed positions.
    """
    axis = channel_axis % len(shape)
    other = tuple(shape[:axis]) + tuple(shape[axis + 1:])
    flat = torch.randint(math.prod(other), (m,), generator=generator,
                         device=generator.device if generator is not None else "cpu")
    if ordered:
        flat = flat.sort().values
    return tuple(i.to(device) for i in torch.unravel_index(flat, other))


def gather_positions(act: Tensor, channel_axis: int, index: tuple[Tensor, ...]) -> Tensor:
    """The ``C×m`` values of every channel at the positions of `sample_positions` (a copy)."""
    axis = channel_axis % act.dim()
    full = list(index)
    full.insert(axis, slice(None))
    values = act[tuple(full)]
    return values if axis == 0 else values.T  # advanced dims come first unless axis == 0


@dataclass
class _Summary:
    """Sorted per-channel points ``values`` (``C×S``) with masses ``masses`` (``C×S``)."""

    values: Tensor
    masses: Tensor

    @property
    def weight(self) -> Tensor:
        return self.masses.sum(dim=1)


def _merge(a: _Summary, b: _Summary) -> _Summary:
    if available_for(a.values, a.masses, b.values, b.masses):
        merged = merge_rows(a.values, a.masses, b.values, b.masses)
        if merged is not None:  # one pass instead of a sort: the same points, bit for bit
            return _Summary(*merged)
    values, order = torch.cat([a.values, b.values], dim=1).sort(dim=1)
    masses = torch.cat([a.masses, b.masses], dim=1).gather(1, order)
    return _Summary(values, masses)


def _midpoint_cdf(s: _Summary) -> Tensor:
    """Cumulative mass at each point's middle, normalised to ``(0, 1)``: ``C×S``."""
    cum = s.masses.cumsum(dim=1)
    return (cum - s.masses / 2) / cum[:, -1:]


def _compress(s: _Summary, capacity: int) -> _Summary:
    """Replace ``s`` by ``capacity`` equal-mass points at the midpoint-CDF levels."""
    if s.values.shape[1] <= capacity:
        return s
    c = s.values.shape[0]
    levels = (torch.arange(capacity, dtype=s.masses.dtype, device=s.values.device) + 0.5) / capacity
    if available_for(s.values, s.masses, levels):
        values = compress_rows(s.values, s.masses, levels)  # the same values, one pass
    else:
        values = _interp_rows(_midpoint_cdf(s), s.values, levels.expand(c, -1))
    masses = (s.weight / capacity).unsqueeze(1).expand(c, capacity).contiguous()
    return _Summary(values, masses)


def _interp_rows(xp: Tensor, fp: Tensor, x: Tensor) -> Tensor:
    """Row-wise ``numpy.interp``: ``xp``, ``fp`` are ``C×S`` (``xp`` increasing), ``x`` is ``C×M``."""
    s = xp.shape[1]
    hi = torch.searchsorted(xp.contiguous(), x.contiguous()).clamp_(1, s - 1)
    lo = hi - 1
    x0, x1 = xp.gather(1, lo), xp.gather(1, hi)
    f0, f1 = fp.gather(1, lo), fp.gather(1, hi)
    frac = ((x - x0) / (x1 - x0).clamp_min(1e-12)).clamp_(0, 1)
    return torch.lerp(f0, f1, frac)


class QuantileSketch:
    """Streaming per-channel quantile estimate (see the module docstring for the error bound).

    Args:
        channels: number of channels ``C``.
        capacity: points per channel kept by each summary (``S``); the compression error is
            ``(ceil(log2 B) + 1) / capacity`` after ``B`` batches.
        samples_per_batch: values drawn per channel from each batch (``m``); ``None`` keeps all.
        generator: random source for the sampling (seed it for reproducible statistics).
        max_levels: heights of the binary counter; once the top one is full, later summaries are
            merged into it. Memory is then at most ``max_levels · capacity`` points per channel
            whatever the data size, and each such merge adds ``1/capacity`` to the error bound.

    Example:
        >>> sketch = QuantileSketch(channels=3, capacity=256)
        >>> for _ in range(4):
        ...     sketch.update(torch.randn(3, 1000))
        >>> sketch.quantiles(5).shape
        torch.Size([3, 5])
    """

    def __init__(self, channels: int, *, capacity: int = 4096, samples_per_batch: int | None = 4096,
                 generator: torch.Generator | None = None, max_levels: int = 8):
        if capacity < 2:
            raise ValueError(f"capacity must be at least 2, found {capacity}")
        if samples_per_batch is not None and samples_per_batch < 1:
            raise ValueError(f"samples_per_batch must be positive or None, found {samples_per_batch}")
        self.channels = channels
        self.capacity = capacity
        self.samples_per_batch = samples_per_batch
        self.generator = generator
        if max_levels < 1:
            raise ValueError(f"max_levels must be at least 1, found {max_levels}")
        self.max_levels = max_levels
        self.top_merges = 0  # merges into the full top level (each adds 1/capacity of rank error)
        self.total_values = 0  # values seen per channel
        self.kept_values = 0  # values kept per channel
        self.batches = 0
        self._counter: list[_Summary | None] = []
        self._buffer: list[tuple[Tensor, float]] = []  # unsorted values and their mass each
        self._buffered = 0
        self._min: Tensor | None = None
        self._max: Tensor | None = None

    def update(self, x: Tensor) -> None:
        """Add a batch of ``C×N`` channel-major values (see `update_activation` for raw outputs)."""
        if x.dim() != 2 or x.shape[0] != self.channels:
            raise ValueError(f"expected C×N values with C={self.channels}, found {tuple(x.shape)}")
        self._add(x, x.shape[1], x.amin(dim=1), x.amax(dim=1), sample=True, owned=False)

    def update_activation(self, act: Tensor, channel_axis: int, *,
                          extremes: tuple[Tensor, Tensor] | None = None) -> None:
        """Add a raw activation (any shape, channels on ``channel_axis``) without transposing it.

        ``extremes``: its `channel_extremes`, where the caller has them already (not recomputed).
        """
        c = act.shape[channel_axis]
        if c != self.channels:
            raise ValueError(
                f"expected {self.channels} channels on axis {channel_axis}, found shape "
                f"{tuple(act.shape)}")
        n = act.numel() // c
        act = act.detach()
        lo, hi = extremes if extremes is not None else channel_extremes(act, channel_axis)
        m = n if self.samples_per_batch is None else min(n, self.samples_per_batch)
        if m < n:
            values, owned = sample_channel_values(act, channel_axis, m, self.generator), True
        else:  # possibly a view of the activation, which a later in-place op may rewrite
            values, owned = act.movedim(channel_axis, 0).reshape(c, n), False
        self._add(values, n, lo, hi, sample=False, owned=owned)

    def _add(self, x: Tensor, n: int, lo: Tensor, hi: Tensor, sample: bool, owned: bool) -> None:
        """Buffer ``C×m`` values; ``owned``: ``x`` is a fresh tensor, else it is copied first."""
        x = x.detach()
        if sample and self.samples_per_batch is not None and n > self.samples_per_batch:
            idx = torch.randint(n, (self.samples_per_batch,), generator=self.generator)
            x, owned = x[:, idx.to(x.device)], True
        # what is kept must be a copy: the caller's tensor may be changed in place afterwards
        x = x.float() if owned else x.to(torch.float32, copy=True)
        m = x.shape[1]
        # buffer unsorted values; sort once per `capacity` of them (fewer, larger sorts)
        self._buffer.append((x, n / m))
        self._buffered += m
        if self._buffered >= self.capacity:
            self._flush()
        self._min = lo.float() if self._min is None else torch.minimum(self._min, lo.float())
        self._max = hi.float() if self._max is None else torch.maximum(self._max, hi.float())
        self.total_values += n
        self.kept_values += m
        self.batches += 1

    def _flush(self) -> None:
        """Turn the buffered values into one summary at height 0."""
        if not self._buffer:
            return
        values = torch.cat([v for v, _ in self._buffer], dim=1)
        summary = None
        mass = self._buffer[0][1]
        if all(w == mass for _, w in self._buffer) and available_for(values):
            # one mass for all: the masses' order does not matter, only the sorted values do
            ordered = sort_rows(values)
            if ordered is not None:
                summary = _Summary(ordered, torch.full_like(ordered, mass))
        if summary is None:
            masses = torch.cat([torch.full_like(v, w) for v, w in self._buffer], dim=1)
            values, order = values.sort(dim=1)
            summary = _Summary(values, masses.gather(1, order))
        self._buffer, self._buffered = [], 0
        self._insert(_compress(summary, self.capacity), height=0)

    def _insert(self, s: _Summary, height: int) -> None:
        while True:
            if height == len(self._counter):
                self._counter.append(None)
            other = self._counter[height]
            if other is None:
                self._counter[height] = s
                return
            merged = _compress(_merge(other, s), self.capacity)
            if height == self.max_levels - 1:  # the top absorbs it: memory stays bounded
                self._counter[height] = merged
                self.top_merges += 1
                return
            self._counter[height] = None
            s = merged
            height += 1

    def merge(self, other: QuantileSketch) -> QuantileSketch:
        """Absorb another sketch of the same channels (e.g. from another worker); returns ``self``."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge a sketch of {other.channels} channels into one of "
                             f"{self.channels}")
        self._flush()
        other._flush()
        for height, s in enumerate(other._counter):
            if s is not None:
                self._insert(s, height)
        if other._min is not None:
            self._min = other._min if self._min is None else torch.minimum(self._min, other._min)
            self._max = other._max if self._max is None else torch.maximum(self._max, other._max)
        self.total_values += other.total_values
        self.kept_values += other.kept_values
        self.batches += other.batches
        self.top_merges += other.top_merges
        return self

    def rank_error_bound(self, delta: float = 1e-3) -> float:
        """The documented bound on this sketch's CDF error (see `rank_error_bound`)."""
        return rank_error_bound(self.total_values, self.kept_values, self.batches, self.capacity,
                                delta) + self.top_merges / self.capacity

    def quantiles(self, levels: int) -> Tensor:
        """The estimated quantile function at ``levels`` evenly spaced levels, endpoints included.

        Level 0 is the exact minimum and level 1 the exact maximum of all values seen; in between,
        the merged summary's mass-weighted midpoint CDF is interpolated linearly.

        Returns:
            ``C×levels`` float32 table, non-decreasing along each row.
        """
        if levels < 2:
            raise ValueError(f"levels must be at least 2 (both endpoints), found {levels}")
        self._flush()
        parts = [s for s in self._counter if s is not None]
        if not parts:
            raise RuntimeError("the sketch has seen no data: call update() first")
        merged = parts[0]
        for s in parts[1:]:
            merged = _merge(merged, s)
        c = self.channels
        device = merged.values.device
        zeros = torch.zeros(c, 1, device=device)
        xp = torch.cat([zeros, _midpoint_cdf(merged), zeros + 1], dim=1)
        fp = torch.cat([self._min.unsqueeze(1), merged.values, self._max.unsqueeze(1)], dim=1)
        t = torch.linspace(0, 1, levels, device=device).expand(c, -1)
        q = _interp_rows(xp, fp, t)
        return q.cummax(dim=1).values  # guard against rounding: a quantile table never decreases


def channel_extremes(act: Tensor, channel_axis: int) -> tuple[Tensor, Tensor]:
    """Per-channel minimum and maximum of an activation (``C`` each; NaN where a channel has one).

    A compiled kernel reads a contiguous CPU float32 activation once for both (`torch_dmc.native`;
    the same values). Otherwise reduced in two steps over a view where the memory order allows
    (``N×C×…`` contiguous: ``N×C×P`` over ``P`` then ``N``; channels last in memory: ``R×C`` over
    ``R``), which CPU kernels do many times faster than one reduction over all the other axes;
    the same values.
    """
    axis = channel_axis % act.dim()
    if available_for(act):
        if act.is_contiguous():
            extremes = kernel_channel_extremes(act, axis)
        elif act.dim() == 4 and axis == 1 and act.permute(0, 2, 3, 1).is_contiguous():
            extremes = kernel_channel_extremes(act.permute(0, 2, 3, 1), 3)  # channels last
        else:
            extremes = None
        if extremes is not None:
            return extremes
    c = act.shape[axis]
    if act.dim() > 2 and axis == 1 and act.is_contiguous():
        view = act.view(act.shape[0], c, -1)
        return view.amin(dim=2).amin(dim=0), view.amax(dim=2).amax(dim=0)
    last = act if axis == act.dim() - 1 else (
        act.permute(0, 2, 3, 1) if act.dim() == 4 and axis == 1 else None)
    if last is not None and last.is_contiguous():
        view = last.view(-1, c)
        return view.amin(dim=0), view.amax(dim=0)
    other = [d for d in range(act.dim()) if d != axis]
    return act.amin(dim=other), act.amax(dim=other)
