"""Pure tensor math of Distribution Mismatch Correction.

Every function here works on a *channel-major* matrix ``x`` of shape ``C×N``: row ``c`` holds the
``N`` values of channel ``c`` (batch and spatial positions together). A *quantile table*
``q`` of shape ``C×K`` holds each channel's quantile function at the ``K`` evenly spaced levels
``t_j = j / (K - 1)``, endpoints included, so ``q[:, 0]`` is the minimum and ``q[:, -1]`` the maximum.

The transport (docs/method.md § Transport): with ``r_i`` the rank of ``x_i`` among its channel's
values, ties given their *average* rank, and ``u_i = (r_i - 1/2) / N``, the corrected value is
``T(x_i) = Q_ref(u_i)``, ``Q_ref`` linearly interpolated between the stored levels. It is the
monotone map that minimises the 1-D Wasserstein-p distance between the batch's empirical
distribution and the reference, for every p >= 1. `transport_exact` computes it with a full sort;
grid mode (docs/method.md § Grid mode: `lut_from_sample` then `apply_lut`, or both in one call,
`grid_transport`) estimates the batch CDF from a histogram and applies the tabulated map in one
lookup, to activations of any layout (``N×C×…`` or ``N×T×C``), optionally to a per-channel affine
image ``a·x + b`` of them without computing it (a BatchNorm's output from its input:
docs/method.md § Grid mode, BatchNorm sites). `transport_quantiles` (exact) and
`lut_from_quantiles` (grid) map through an *estimated* test quantile function instead of the
batch's ranks: the ``prior`` and ``ema`` estimates blend quantile tables (`empirical_quantiles`,
or `histogram_quantiles` without a sort) and invert them with `quantile_cdf`. Rows may also be
``B·C`` (sample, channel) pairs read with their channel's table: the ``per-sample`` estimate.

Synchronised correction (docs/method.md § Synchronised correction) pools a batch split over
processes: `transport_exact_columns` maps one process's columns of the gathered batch, and
`histogram_levels` takes a `HistogramReduce` that combines ranges and counts across processes.

Non-finite values (NaN, ±Inf) are left out of every estimate of a row's distribution and pass
through every map unchanged (docs/method.md § Bad input): a row's ``N`` is its count of finite
values, and a row without any passes through whole.

Nothing here loops over channels or samples in Python.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .native import available_for, fits, grid_site, histogram_counts, sample_table_sum, table_lookup

__all__ = [
    "OUTLIER_LEVEL",
    "OUTLIER_MARGIN",
    "REFINEMENTS",
    "all_finite",
    "tie_run_bounds",
    "midranks",
    "midrank_levels",
    "interp_quantiles",
    "transport_exact",
    "transport_exact_columns",
    "wasserstein1",
    "empirical_quantiles",
    "summed_quantiles",
    "quantile_cdf",
    "transport_quantiles",
    "Lut",
    "HistogramReduce",
    "histogram_levels",
    "histogram_quantiles",
    "lut_from_sample",
    "lut_from_quantiles",
    "lut_grid",
    "needs_grid",
    "apply_lut",
    "grid_transport",
    "affine_values",
    "LOOKUP_GROUPS",
]


OUTLIER_LEVEL = 0.05
"""``p`` of grid mode's knot range: the range is refined when it is much wider than the span of the
central ``1 - 2p`` of the values (see `histogram_levels`)."""

OUTLIER_MARGIN = 2.0
"""``k`` of grid mode's knot range: a refined range keeps ``k`` times the central span on each side."""

REFINEMENTS = 4
"""At most this many refinements of grid mode's knot range (each narrows it by a factor of about
``size / 5`` around the bulk of the values)."""


def all_finite(x: Tensor) -> bool:
    """Whether every value of ``x`` is finite, from one cheap reduction.

    A sum is non-finite when any term is; when the sum of finite values overflows, the exact
    (slower) check decides.
    """
    if not x.is_floating_point():
        return True
    if math.isfinite(x.sum(dtype=torch.float32).item()):
        return True
    return bool(torch.isfinite(x).all())


def _finite_sorted(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sort each row with its non-finite values moved to the end.

    Returns:
        ``(sorted, order, finite, n)``: the sorted ``C×N`` keys (non-finite entries as ``+inf``),
        the sort order, the ``C×N`` finite mask of ``x`` and the ``C×1`` count of finite values.
    """
    finite = torch.isfinite(x)
    keys = x if bool(finite.all()) else x.masked_fill(~finite, float("inf"))
    sorted_x, order = keys.sort(dim=1)
    return sorted_x, order, finite, finite.sum(dim=1, keepdim=True)


def _check_matrix(x: Tensor, name: str = "x") -> None:
    if x.dim() != 2:
        raise ValueError(
            f"{name} must be a channel-major matrix C×N, found shape {tuple(x.shape)}; "
            "flatten every axis but the channel axis into the second one"
        )
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no values per channel (shape {tuple(x.shape)})")


def tie_run_bounds(sorted_x: Tensor) -> tuple[Tensor, Tensor]:
    """First and last index of the run of equal values that each sorted entry belongs to.

    Args:
        sorted_x: ``C×N``, each row sorted ascending.

    Returns:
        ``(first, last)``, both ``C×N`` int64: for entry ``i`` of a row, the 0-based positions of the
        first and the last entry equal to it. Without ties both equal ``arange(N)``.
    """
    _check_matrix(sorted_x, "sorted_x")
    n = sorted_x.shape[1]
    pos = torch.arange(n, device=sorted_x.device).expand_as(sorted_x)
    differs = sorted_x[:, 1:] != sorted_x[:, :-1]  # C×(N-1): a new run starts at i+1
    true_col = torch.ones_like(sorted_x[:, :1], dtype=torch.bool)
    starts = torch.cat([true_col, differs], dim=1)
    ends = torch.cat([differs, true_col], dim=1)
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    last_rev = torch.where(ends, pos, torch.full_like(pos, n - 1)).flip(1).cummin(dim=1).values
    return first, last_rev.flip(1)


def midranks(x: Tensor) -> Tensor:
    """Average ranks (1-based) of every value within its channel.

    Ties share the mean of the ranks they occupy, so equal inputs get equal ranks.

    Args:
        x: ``C×N`` values.

    Returns:
        ``C×N`` float ranks in ``[1, N]`` (dtype of ``x`` if floating, else float32).
    """
    _check_matrix(x)
    sorted_x, order = x.sort(dim=1)
    first, last = tie_run_bounds(sorted_x)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    rank_sorted = (first + last).to(dtype) / 2 + 1
    return torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)


def midrank_levels(x: Tensor) -> Tensor:
    """Levels ``u_i = (r_i - 1/2) / N`` of every value, ``r_i`` its average rank (see `midranks`).

    Args:
        x: ``C×N`` values.

    Returns:
        ``C×N`` levels in ``(0, 1)``.
    """
    return (midranks(x) - 0.5) / x.shape[1]


def interp_quantiles(q: Tensor, u: Tensor) -> Tensor:
    """Evaluate quantile tables at arbitrary levels, interpolating linearly between stored levels.

    Args:
        q: ``C×K`` quantile table at levels ``j / (K - 1)`` (``K >= 2``), each row non-decreasing.
        u: ``C×M`` levels; values outside ``[0, 1]`` are clamped. Per-sample use: ``B·C`` rows
            ordered (sample, channel), row ``b·C + c`` read with table row ``c``.

    Returns:
        ``C×M`` (or ``B·C×M``) values ``Q(u)`` in the dtype of ``q``.
    """
    _check_matrix(q, "q")
    k = q.shape[1]
    if k < 2:
        raise ValueError(f"a quantile table needs at least 2 levels, found {k}")
    c = q.shape[0]
    if u.dim() != 2 or u.shape[0] % c != 0:
        raise ValueError(
            f"levels must be C×M with C={c} rows like the table (or B·C rows, sample-major), "
            f"found {tuple(u.shape)}"
        )
    if u.shape[0] != c:  # B·C rows ordered (sample, channel): channel c uses row c of q
        b, m = u.shape[0] // c, u.shape[1]
        flat = u.view(b, c, m).transpose(0, 1).reshape(c, b * m)
        return interp_quantiles(q, flat).view(c, b, m).transpose(0, 1).reshape(b * c, m)
    return _lerp_at(q, u.to(q.dtype).clamp(0, 1).mul_(k - 1))


def _lerp_at(q: Tensor, pos: Tensor, out: Tensor | None = None) -> Tensor:
    """``C×K`` tables ``q`` read at fractional positions ``pos`` in ``[0, K - 1]`` (``C×M``,
    overwritten), linearly interpolated; into ``out`` if given."""
    node = pos.floor().clamp_(max=q.shape[1] - 2)
    frac = pos - node
    node = node.long()
    return torch.lerp(q.gather(1, node), q[:, 1:].gather(1, node), frac, out=out)


def transport_exact(x: Tensor, q_ref: Tensor) -> Tensor:
    """Exact DMC transport: ``T(x_i) = Q_ref((r_i - 1/2) / N)`` with average ranks for ties.

    This is the reference implementation, ``O(N log N)`` per channel (one full sort).

    Args:
        x: ``C×N`` values of one batch, channel-major; or ``B·C×N`` rows ordered (sample,
            channel), each row transported on its own with the table of its channel (per-sample
            correction).
        q_ref: ``C×K`` reference quantile table (levels ``j / (K - 1)``).

    Returns:
        Corrected values, shape and dtype of ``x``; non-finite values pass through and are left
        out of the ranks of the others.
    """
    _check_matrix(x)
    if x.shape[0] % q_ref.shape[0] != 0:
        raise ValueError(f"x has {x.shape[0]} rows but the reference has {q_ref.shape[0]} channels")
    sorted_x, order, finite, n = _finite_sorted(x)
    first, last = tie_run_bounds(sorted_x)
    # ((first + last) / 2 + 1 - 1/2) / N, N the row's finite values (the rest sort last, u > 1)
    u_sorted = (first + last + 1).to(q_ref.dtype) / (2 * n.clamp_min(1))
    y_sorted = interp_quantiles(q_ref, u_sorted)
    y = torch.empty_like(y_sorted).scatter_(1, order, y_sorted).to(x.dtype)
    return y if n.min() == x.shape[1] else torch.where(finite, y, x)


def transport_exact_columns(pool: Tensor, q_ref: Tensor, start: int, stop: int) -> Tensor:
    """``transport_exact(pool, q_ref)[:, start:stop]``, without mapping the other columns.

    The values of columns ``start:stop`` ranked among all of ``pool``'s (one sort of ``pool``,
    the same arithmetic as `transport_exact`, so the same result bit for bit). Synchronised exact
    mode (docs/method.md § Synchronised correction) passes every process's values, concatenated
    in rank order, as ``pool`` and this process's columns as ``start:stop``.

    Args:
        pool: ``C×N`` values (``N >= 1``), channel-major; non-finite ones are left out of the ranks.
        q_ref: ``C×K`` reference quantile table.
        start, stop: the columns to map, ``0 <= start <= stop <= N``.

    Returns:
        ``C×(stop - start)`` corrected values in the dtype of ``pool``; non-finite values pass
        through.
    """
    _check_matrix(pool, "pool")
    if pool.shape[0] != q_ref.shape[0]:
        raise ValueError(f"pool has {pool.shape[0]} rows but the reference has {q_ref.shape[0]} channels")
    if not 0 <= start <= stop <= pool.shape[1]:
        raise ValueError(f"columns {start}:{stop} are not within the pool's {pool.shape[1]}")
    sorted_x, order, finite, n = _finite_sorted(pool)
    first, last = tie_run_bounds(sorted_x)
    u_sorted = (first + last + 1).to(q_ref.dtype) / (2 * n.clamp_min(1))  # as in transport_exact
    u = torch.empty_like(u_sorted).scatter_(1, order, u_sorted)[:, start:stop]
    x = pool[:, start:stop]
    y = interp_quantiles(q_ref, u).to(pool.dtype)
    kept = finite[:, start:stop]
    return y if bool(kept.all()) else torch.where(kept, y, x)


def wasserstein1(x: Tensor, q_ref: Tensor) -> Tensor:
    """Per-channel 1-D Wasserstein-1 distance between the values ``x`` and a quantile table.

    ``W1 = ∫_0^1 |Q_x(u) - Q_ref(u)| du``, evaluated with the midpoint rule on the ``N`` levels
    ``(i - 1/2) / N`` of the sorted values (exact for the empirical side).

    Args:
        x: ``C×N`` values.
        q_ref: ``C×K`` reference quantile table.

    Returns:
        ``C`` distances, in the dtype of ``q_ref``, over each row's finite values (NaN for a row
        without any).
    """
    _check_matrix(x)
    sorted_x, _, _, n = _finite_sorted(x)
    i = torch.arange(x.shape[1], device=x.device, dtype=q_ref.dtype).expand(x.shape[0], -1)
    u = (i + 0.5) / n.clamp_min(1)
    inside = i < n
    gap = (sorted_x.to(q_ref.dtype) - interp_quantiles(q_ref, u.clamp(0, 1))).abs()
    return torch.where(inside, gap, 0).sum(dim=1) / n.squeeze(1)


def empirical_quantiles(x: Tensor, levels: int) -> Tensor:
    """Quantile table of each row's values at ``levels`` evenly spaced levels, endpoints included.

    The same convention as the reference tables (`torch_dmc.sketch.QuantileSketch.quantiles`):
    level 0 is the minimum, level 1 the maximum, and in between the sorted values sit at their
    midpoint levels ``(i + 1/2) / N``, interpolated linearly. One sort per row.

    Args:
        x: ``R×N`` values (``N >= 1``).
        levels: ``K >= 2``.

    Returns:
        ``R×K`` float32 table, non-decreasing along each row, of each row's finite values (a row
        without any is NaN).
    """
    _check_matrix(x)
    if levels < 2:
        raise ValueError(f"levels must be at least 2 (both endpoints), found {levels}")
    v, _, _, n = _finite_sorted(x.float())
    # every row has all N values: the read positions are the same for every row, so compute them
    # once (1×K, the same arithmetic as for R×K) and read the rows with index_select
    shared = x.shape[0] > 1 and x.shape[1] > 0 and bool(n.min() == x.shape[1])
    if shared:
        lo, hi, frac = _read_positions(n[:1], levels)
        return torch.lerp(v.index_select(1, lo[0]), v.index_select(1, hi[0]), frac)
    lo, hi, frac = _read_positions(n, levels)
    q = torch.lerp(v.gather(1, lo), v.gather(1, hi), frac)
    return q if n.min() > 0 else q.masked_fill(n == 0, float("nan"))


def _read_positions(n: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Where `empirical_quantiles` reads rows of ``n`` sorted values (``R×1`` int64): the ``R×K``
    indices below and above each level's position among the midpoints, and the fraction between."""
    t = torch.linspace(0, 1, levels, device=n.device)
    top = (n - 1).clamp_min(0)
    pos = torch.minimum((t * n - 0.5).clamp_min(0), top)  # index of level t among the midpoints
    lo = torch.minimum(pos.floor().long(), (n - 2).clamp_min(0))
    hi = torch.minimum(lo + 1, top)
    return lo, hi, (pos - lo).clamp(0, 1)


def summed_quantiles(rows: Tensor, samples: int, levels: int) -> Tensor:
    """The sum over samples of their `empirical_quantiles` tables, in float64: the per-sample
    reference's running sum (docs/method.md § Per-sample reference).

    A compiled kernel sorts and reads each row and sums the tables in one pass where it can show
    the sum is exact (then it is torch's sum, bit for bit; `torch_dmc.native.sample_table_sum`).

    Args:
        rows: ``(samples·C)×P`` values, ordered (sample, channel), all finite.
        samples: ``B``, the number of tables.
        levels: ``K >= 2``.

    Returns:
        ``C×K`` float64.
    """
    _check_matrix(rows, "rows")
    if available_for(rows) and fits(rows.shape[0], values=rows.shape[1]):
        lo, hi, frac = _read_positions(torch.tensor([[rows.shape[1]]]), levels)
        total = sample_table_sum(rows, samples, lo[0], hi[0], frac[0])
        if total is not None:
            return total
    table = empirical_quantiles(rows, levels).view(samples, -1, levels)
    return table.sum(dim=0, dtype=torch.float64)


def quantile_cdf(q: Tensor, x: Tensor) -> Tensor:
    """The levels ``F(x)`` of values under a quantile table: the inverse of `interp_quantiles`.

    ``F`` is the inverse of the piecewise-linear quantile function through ``q``. A value on a
    flat run of the table (an atom: several levels with the same value) gets the middle of that
    run's levels, so equal inputs get equal levels, as average ranks do. Values below ``q[:, 0]``
    get 0 and above ``q[:, -1]`` get 1.

    Args:
        q: ``C×K`` quantile table, rows non-decreasing.
        x: ``C×N`` values.

    Returns:
        ``C×N`` levels in ``[0, 1]`` (float32).
    """
    _check_matrix(q, "q")
    _check_matrix(x)
    if x.shape[0] != q.shape[0]:
        raise ValueError(f"x has {x.shape[0]} channels but the table has {q.shape[0]}")
    k = q.shape[1]
    q = q.float().contiguous()
    xf = x.float().contiguous()

    def side(right: bool) -> Tensor:
        hi = torch.searchsorted(q, xf, right=right).clamp_(1, k - 1)
        lo = hi - 1
        q0, q1 = q.gather(1, lo), q.gather(1, hi)
        frac = ((xf - q0) / (q1 - q0)).nan_to_num_(0.5).clamp_(0, 1)
        return (lo + frac) / (k - 1)

    level = (side(False) + side(True)) / 2
    level = torch.where(xf < q[:, :1], 0.0, level)
    return torch.where(xf > q[:, -1:], 1.0, level)


def transport_quantiles(x: Tensor, q_test: Tensor, q_ref: Tensor) -> Tensor:
    """Transport with an estimated test quantile function: ``T(x) = Q_ref(F_test(x))``.

    The exact map of the ``prior`` and ``ema`` estimates (docs/method.md § Estimates): ``F_test``
    is the inverse of the table ``q_test`` (see `quantile_cdf`), e.g. a blend of the batch's and
    the reference's quantile functions. Monotone, and equal inputs give equal outputs.

    Args:
        x: ``C×N`` values.
        q_test: ``C×K'`` estimated test quantile table.
        q_ref: ``C×K`` reference quantile table.

    Returns:
        ``C×N`` corrected values, in the dtype of ``x``; non-finite values pass through.
    """
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return interp_quantiles(q_ref, quantile_cdf(q_test, x)).to(x.dtype)
    y = interp_quantiles(q_ref, quantile_cdf(q_test, x.masked_fill(~finite, 0))).to(x.dtype)
    return torch.where(finite, y, x)


class Lut(NamedTuple):
    """A per-channel monotone map tabulated on a uniform grid of ``B`` nodes (fields on ``x``'s device).

    Node ``j`` of channel ``c`` sits at ``origin[c] + j · step[c]`` and holds ``table[c, j]``;
    between nodes the map is linear, outside the first and last node it is constant.
    """

    table: Tensor  # C×B
    origin: Tensor  # C
    step: Tensor  # C


class HistogramReduce(Protocol):
    """How `histogram_levels` combines its per-row range and counts with other processes'.

    Synchronised correction (docs/method.md § Synchronised correction) passes one whose methods
    are collectives over a process group, so every process gets the histogram of the union of
    their values; ``None`` (the default everywhere else) keeps everything local.
    """

    def range(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """The elementwise minimum of ``lo`` and maximum of ``hi`` (both ``C``) over processes."""

    def sum(self, counts: Tensor) -> Tensor:
        """The elementwise sum over processes of ``C×B`` integer cell counts."""


def _flat(t: Tensor) -> Tensor:
    """All entries of a 2-D tensor as a 1-D view, in memory order (a copy only when neither ``t``
    nor its transpose is contiguous)."""
    return t.reshape(-1) if t.is_contiguous() or not t.T.is_contiguous() else t.T.reshape(-1)


def _histogram(values: Tensor, finite: Tensor | None, count: Tensor | int, lo: Tensor, hi: Tensor,
               size: int, reduce: HistogramReduce | None = None) -> tuple[Tensor, Tensor]:
    """Node spacing and average-rank node levels of finite ``values`` on ``size`` nodes over
    ``[lo, hi]`` (values outside fall in the end nodes' cells); see `histogram_levels`.
    ``finite``: the finite mask of ``values`` (``None``: all finite, ``count`` the row length).
    With ``reduce`` the counts are summed over processes and ``count`` is their row sum."""
    c = values.shape[0]
    step = (hi - lo) / (size - 1)
    # an all-equal channel gets step 1; a subnormal step would make 1/step overflow
    step = step.masked_fill_(step == 0, 1.0).clamp_min_(torch.finfo(torch.float32).tiny)
    inv = step.reciprocal().unsqueeze(1)
    shift = -lo.unsqueeze(1) * inv
    if fits(c, size, values.shape[1]) and available_for(values):  # the same counts in one pass
        counts = histogram_counts(values, shift.squeeze(1), inv.squeeze(1), size)
    else:
        cell = torch.addcmul(shift, values, inv).round_().clamp_(0, size - 1)
        width = size if finite is None else size + 1  # non-finite values: a discarded extra cell
        if finite is not None:
            cell = cell.masked_fill_(~finite, size)
        # row offsets added in float: exact, every cell index is an integer below 2^24
        offsets = torch.arange(0, c * width, width, device=values.device, dtype=torch.float32)
        counts = torch.bincount(_flat(cell.add_(offsets.unsqueeze(1))).int(), minlength=c * width)
        counts = counts.view(c, width)[:, :size]
    if reduce is not None:
        counts = reduce.sum(counts)
        count = counts.sum(dim=1)
    counts = counts.to(torch.float32)
    # a tensor divisor either way: the same rounding as a per-row count (a Python number would be
    # applied as a reciprocal)
    total = (count.unsqueeze(1) if isinstance(count, Tensor)
             else torch.full((c, 1), count, dtype=torch.float32, device=values.device))
    level = counts.cumsum(dim=1).sub_(counts, alpha=0.5).div_(total)  # (b_j + n_j / 2) / M
    return step, level


def _surely_wide(level: Tensor, size: int) -> bool:
    """Whether no row's knot range can narrow (`histogram_levels`' refinement), read off the node
    levels with one search: a sufficient test, cheaper than the quantiles the refinement needs.

    The refinement's ``q_p`` lies in the cell right below node ``j_p`` (the first node whose
    level reaches ``p``, clamped to ``[1, B - 1]``), so ``w = q_{1-p} - q_p`` is at least
    ``d·step`` with ``d = j_{1-p} - j_p - 1``; the candidate range is at least
    ``(1 + k)·w + step`` wide, so a row with ``2·((1 + k)·d + 1) >= (B - 1)`` (a 1 % margin
    against rounding) never narrows.
    """
    t = torch.tensor([[OUTLIER_LEVEL, 1 - OUTLIER_LEVEL]], device=level.device)
    j = torch.searchsorted(level.contiguous(), t.expand(level.shape[0], 2).contiguous())
    j = j.clamp_(1, size - 1)
    d = int((j[:, 1] - j[:, 0]).min()) - 1
    return 2 * ((1 + OUTLIER_MARGIN) * max(d, 0) + 1) >= 1.01 * (size - 1)


def _finite_range(v: Tensor, finite: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's finite minimum and maximum (``+inf`` and ``-inf`` for a row without any)."""
    if v.shape[1] > 0 and bool(count.min() == v.shape[1]):
        return v.amin(dim=1), v.amax(dim=1)  # (aminmax is several times slower on CPU)
    if v.shape[1] == 0:
        return (torch.full(v.shape[:1], float("inf"), device=v.device),
                torch.full(v.shape[:1], float("-inf"), device=v.device))
    return (v.masked_fill(~finite, float("inf")).amin(dim=1),
            v.masked_fill(~finite, float("-inf")).amax(dim=1))


@torch.no_grad()
def histogram_levels(values: Tensor, size: int, *, robust: bool = True,
                     reduce: HistogramReduce | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The average-rank level of each of ``size`` uniform nodes over the values' range: no sort.

    The nodes ``lo + j·step`` span each row's range ``[lo, hi]``. Every value belongs to its
    nearest node's cell (values outside the range to the end nodes'); with ``b_j`` of the ``M``
    finite values in cells below node ``j`` and ``n_j`` in its own, the node's level is
    ``(b_j + n_j / 2) / M``: exactly `transport_exact`'s level for a cell that holds one value or
    one atom (equal values). One histogram per row; non-finite values are left out.

    Knot range (docs/method.md § Grid mode, knot placement): the range starts as the finite
    minimum and maximum. With ``robust``, a row whose range is more than twice as wide as
    ``[q_p - k·w - step, q_{1-p} + k·w + step]`` (``q`` the histogram's quantiles at levels ``p``
    = `OUTLIER_LEVEL` and ``1 - p``, ``w = q_{1-p} - q_p``, ``k`` = `OUTLIER_MARGIN`) is narrowed
    to that interval and histogrammed again, at most `REFINEMENTS` times. Values outside the final
    range (at most a share ``p`` on each side) share their end node's level. Without outliers the
    range never narrows (a Gaussian sample would need a value beyond 8 standard deviations), so
    the result is the plain min–max histogram; one sample scaled by 10⁴ in a batch no longer
    squeezes every other sample into one cell.

    Args:
        values: ``C×M`` values per channel (all of a batch's, or a random subsample).
        size: nodes ``B >= 2`` per channel.
        robust: narrow the range around the bulk of the values as above.
        reduce: combine range and counts with other processes' (`HistogramReduce`): the result
            is then the histogram of the union of every process's ``values`` (each process may
            hold any number of columns, none included), the same on every process, and every
            process must call with the same ``C``, ``size`` and ``robust``.

    Returns:
        ``(lo, step, level)``: ``C``, ``C`` and ``C×B`` float32; an all-equal row gets step 1, and
        a row without a finite value gets ``lo = 0`` and NaN levels.
    """
    if reduce is None or values.dim() != 2:
        _check_matrix(values, "values")
    if size < 2:
        raise ValueError(f"a lookup table needs at least 2 nodes, found {size}")
    v = values.float()
    if reduce is None and v.shape[1] > 0:  # fast path: every value finite (no masks, one sync)
        lo, hi = v.amin(dim=1), v.amax(dim=1)  # (aminmax is several times slower on CPU)
        if bool(torch.isfinite(hi - lo).all()):
            return _finite_levels(v, lo, hi, size, robust)
    finite = torch.isfinite(v)
    count = finite.sum(dim=1)
    lo, hi = _finite_range(v, finite, count)
    if reduce is not None:
        lo, hi = reduce.range(lo, hi)
    empty = lo > hi  # no finite value (in any process)
    if bool(empty.any()):
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    step, level = _histogram(v, finite, count, lo, hi, size, reduce)
    if not robust:
        return lo, step, level
    return _refine(v, finite, count, lo, hi, step, level, size, reduce)


def _finite_levels(v: Tensor, lo: Tensor, hi: Tensor, size: int,
                   robust: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """`histogram_levels` of rows whose values are all finite, given their minima and maxima:
    no masks, and the knot range refined only if `_surely_wide` cannot rule it out."""
    step, level = _histogram(v, None, v.shape[1], lo, hi, size)
    if not robust or _surely_wide(level, size):
        return lo, step, level
    return _refine(v, None, v.shape[1], lo, hi, step, level, size, None)


def _refine(v: Tensor, finite: Tensor | None, count: Tensor | int, lo: Tensor, hi: Tensor,
            step: Tensor, level: Tensor, size: int,
            reduce: HistogramReduce | None) -> tuple[Tensor, Tensor, Tensor]:
    """`histogram_levels`' knot-range refinement (docs/method.md § Knot placement)."""
    for _ in range(REFINEMENTS):
        t = torch.tensor([OUTLIER_LEVEL, 1 - OUTLIER_LEVEL], device=v.device).expand(v.shape[0], 2)
        q = _invert_levels(lo, step, level.nan_to_num(0.0), t)
        margin = OUTLIER_MARGIN * (q[:, 1] - q[:, 0]) + step
        new_lo = torch.maximum(lo, q[:, 0] - margin)
        new_hi = torch.minimum(hi, q[:, 1] + margin)
        narrow = (new_hi - new_lo) * 2 < hi - lo
        if not bool(narrow.any()):
            break
        lo, hi = torch.where(narrow, new_lo, lo), torch.where(narrow, new_hi, hi)
        step, level = _histogram(v, finite, count, lo, hi, size, reduce)
    return lo, step, level


def _invert_levels(lo: Tensor, step: Tensor, level: Tensor, t: Tensor) -> Tensor:
    """Values at levels ``t`` (``C×L``) of the piecewise-linear CDF through ``(lo + j·step, level_j)``."""
    b = level.shape[1]
    hi = torch.searchsorted(level.contiguous(), t.contiguous()).clamp_(1, b - 1)
    lo_idx = hi - 1
    l0, l1 = level.gather(1, lo_idx), level.gather(1, hi)
    frac = ((t - l0) / (l1 - l0).clamp_min(1e-12)).clamp_(0, 1)
    return lo.unsqueeze(1) + (lo_idx + frac) * step.unsqueeze(1)


def lut_from_sample(values: Tensor, q_ref: Tensor, size: int, *,
                    reduce: HistogramReduce | None = None) -> Lut:
    """Grid transport ``x ↦ Q_ref(F̂(x))`` tabulated on ``size`` uniform nodes per channel.

    ``F̂`` is the histogram CDF of `histogram_levels` (average-rank levels, no sort). A value's
    level thus differs from its exact one by at most half its cell's share of the values;
    `apply_lut` looks values up at their nearest node, so equal inputs give equal outputs and the
    map is monotone. `grid_transport` does both steps in one call.

    Args:
        values: ``C×M`` values of the test batch per channel: all of them, or a random subsample
            (see `torch_dmc.sketch.sample_channel_values`; ``M`` sampled values add a rank error
            of order ``1/sqrt(M)``). Per-sample use: ``B·C`` rows ordered (sample, channel).
        q_ref: ``C×K`` reference quantile table.
        size: nodes ``B >= 2`` per channel.
        reduce: pool the histogram over processes (see `histogram_levels`).

    Returns:
        The `Lut` (``C×B`` table, or ``B·C`` rows).
    """
    lo, step, level = histogram_levels(values, size, reduce=reduce)
    # a row without finite values has NaN levels; its table is never read (all pass through)
    return Lut(interp_quantiles(q_ref, level.nan_to_num(0.5)), lo, step)


def histogram_quantiles(lo: Tensor, step: Tensor, level: Tensor, levels: int) -> Tensor:
    """Quantile table of the piecewise-linear CDF through the nodes ``(lo + j·step, level_j)``.

    The inverse of `histogram_levels`' CDF, for blending with other quantile functions without a
    sort; levels below the first node's map to ``lo`` and above the last node's to the maximum.

    Args:
        lo, step: ``C`` node origins and spacings.
        level: ``C×B`` non-decreasing node levels.
        levels: ``K >= 2`` evenly spaced output levels, endpoints included.

    Returns:
        ``C×K`` float32 table, non-decreasing along each row (NaN for a row whose levels are NaN:
        no finite value).
    """
    t = torch.linspace(0, 1, levels, device=level.device).expand(level.shape[0], -1)
    q = _invert_levels(lo, step, level.nan_to_num(0.0), t)
    return q.masked_fill(level[:, :1].isnan(), float("nan"))


def lut_from_quantiles(q_test: Tensor, q_ref: Tensor, lo: Tensor, step: Tensor, size: int) -> Lut:
    """Grid transport ``x ↦ Q_ref(F_test(x))`` for an estimated test quantile table, tabulated.

    The fast path of the ``prior`` and ``ema`` estimates: the map of `transport_quantiles`
    evaluated at ``size`` uniform nodes ``lo + j·step`` (usually the batch's range), for
    `apply_lut`.

    Args:
        q_test: ``C×K'`` estimated test quantile table.
        q_ref: ``C×K`` reference quantile table.
        lo, step: ``C`` node origins and spacings.
        size: nodes ``B >= 2`` per channel.

    Returns:
        The `Lut` (``C×B`` table).
    """
    j = torch.arange(size, device=lo.device, dtype=torch.float32)
    nodes = lo.unsqueeze(1) + j * step.unsqueeze(1)
    return Lut(transport_quantiles(nodes, q_test, q_ref).float(), lo, step)


def _table_rows(channels: int) -> int:
    """Rows of the table image: ``2^k + 1 >= C``, so that every row's coordinate is exact in float."""
    return 1 if channels == 1 else 1 + (1 << (channels - 1).bit_length())


def lut_grid(shape: tuple[int, ...] | torch.Size, channel_axis: int = 1,
             device: torch.device | str | None = None) -> Tensor:
    """A coordinate buffer for `apply_lut` on activations of ``shape``: ``2 × shape`` float32.

    Two planes: plane 1, each value's table row (its channel), is filled here; `apply_lut` writes
    each value's position in its table into plane 0. The planes are handed to ``grid_sample`` as
    one grid whose coordinate stride is a whole plane, so plane 0 is written contiguously.
    Reusing one buffer across calls of the same shape saves filling plane 1 again.
    """
    axis = channel_axis % len(shape)
    c = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = c
    rows = _table_rows(c)
    row = torch.arange(c, device=device, dtype=torch.float32) * (2 / max(rows - 1, 1)) - 1
    planes = torch.empty(2, *shape, device=device, dtype=torch.float32)
    planes[1] = row.view(bshape)
    return planes


LOOKUP_GROUPS = 64
"""At most this many groups the lookup's values are split into: ``grid_sample`` runs its batch
axis in parallel, and one group would keep it on one thread."""


def apply_lut(x: Tensor, lut: Lut, channel_axis: int = 1, grid: Tensor | None = None, *,
              affine: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Apply a tabulated per-channel map to an activation of any layout, in one fused kernel.

    Each value takes the table entry of its nearest node (values outside the table's range take
    the end nodes'). The table is read with ``torch.nn.functional.grid_sample`` (nearest, border
    padding): the value's position in its channel's table is the horizontal coordinate and the
    channel's row the vertical one, at an exact row coordinate. The activation is never
    transposed: one pass writes the positions (in ``x``'s shape, contiguous), one reads them and
    writes the output. The map is piecewise constant: its gradient with respect to ``x`` is zero,
    as for `transport_exact`.

    Args:
        x: activation with ``C`` channels on ``channel_axis`` (e.g. ``N×C×H×W`` or ``N×T×C``).
        lut: the `Lut` (``C×B`` table).
        channel_axis: the channel axis of ``x``.
        grid: optional buffer from `lut_grid` for this shape and axis, reused across calls.
        affine: optional per-channel ``(a, b)`` (each ``C``): map ``a·x + b`` instead of ``x``,
            without computing it (any sign of ``a``, zero included). Where ``x`` is not finite
            the output is ``a·x + b`` (the map's input, passed through).

    Returns:
        The mapped activation, shape and dtype of ``x``; non-finite values pass through.
    """
    return _lookup(x, lut, channel_axis, grid, affine, None)


def _native_lookup(x: Tensor) -> bool:
    """Whether `_lookup` runs the compiled kernel on ``x`` (`torch_dmc.native`: CPU float32,
    contiguous), which needs neither a coordinate buffer nor a finiteness check."""
    return x.dim() > 0 and x.is_contiguous() and available_for(x.detach())


def needs_grid(x: Tensor) -> bool:
    """Whether `apply_lut` on ``x`` reads a `lut_grid` coordinate buffer: not where the compiled
    lookup of `torch_dmc.native` runs (CPU float32, contiguous), so keep none for it."""
    return not _native_lookup(x)


def _lookup(x: Tensor, lut: Lut, channel_axis: int, grid: Tensor | None,
            affine: tuple[Tensor, Tensor] | None, nonfinite: bool | None,
            image: Tensor | None = None) -> Tensor:
    """`apply_lut`, told whether ``x`` has a non-finite value (``None``: not known, checked if
    needed); ``image``: the table already padded to `_table_rows` rows (``lut.table`` its first
    ``C`` rows)."""
    axis = channel_axis % x.dim()
    c, b = lut.table.shape
    if x.shape[axis] != c:
        raise ValueError(f"x has {x.shape[axis]} channels on axis {axis}, the table has {c}")
    n = x.numel()
    if n == 0:
        return x.detach().clone()
    table = _float(lut.table) if image is None else image
    bshape = [1] * x.dim()
    bshape[axis] = c
    # the grid coordinate of x: -1 at the first node, +1 at the last
    scale = 2 / ((b - 1) * _float(lut.step))
    shift = -_float(lut.origin) * scale - 1
    if affine is not None:
        a, offset = (_float(t) for t in affine)
        scale, shift = a * scale, torch.addcmul(shift, offset, scale)
    if grid is not None and grid.shape != (2, *x.shape):
        raise ValueError(f"grid buffer has shape {tuple(grid.shape)}, expected {(2, *x.shape)}: "
                         "make it with lut_grid(x.shape, channel_axis)")
    if fits(c, b) and _native_lookup(x):
        # the same values in one pass, non-finite ones passed through alike
        return table_lookup(x.detach(), table, scale, shift, axis,
                            None if affine is None else (a, offset))
    rows = _table_rows(c)
    if table.shape[0] < rows:  # rows >= C are never read (row coordinates are exact)
        table = torch.cat([table, table[-1:].expand(rows - c, b)])
    if nonfinite is None:
        nonfinite = not all_finite(x.detach())
    if grid is None:
        grid = lut_grid(x.shape, axis, x.device)
    groups = math.gcd(n, LOOKUP_GROUPS)
    with torch.no_grad():
        coord = grid[0]
        torch.addcmul(shift.view(bshape), x.detach(), scale.view(bshape), out=coord)
        if nonfinite:
            coord.nan_to_num_(0.0, 0.0, 0.0)
        out = torch.nn.functional.grid_sample(
            table.view(1, 1, rows, b).expand(groups, 1, rows, b),
            grid.view(2, groups, 1, n // groups).permute(1, 2, 3, 0), mode="nearest",
            padding_mode="border", align_corners=True).view(x.shape)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
    if not nonfinite:
        return out
    through = x if affine is None else x * a.view(bshape) + offset.view(bshape)
    return torch.where(torch.isfinite(x), out, through.to(out.dtype))


def affine_values(values: Tensor, affine: tuple[Tensor, Tensor]) -> Tensor:
    """``a·values + b`` per row for ``C×M`` ``values`` and ``affine = (a, b)`` (each ``C``):
    multiplied, then added, as BatchNorm's kernel computes its output from its input."""
    return values * affine[0].unsqueeze(1) + affine[1].unsqueeze(1)


def _float(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _site_kernel(x: Tensor, v: Tensor | None, q_ref: Tensor, size: int, channel_axis: int,
                 affine: tuple[Tensor, Tensor] | None) -> Tensor | None:
    """`grid_transport` in one compiled call (`torch_dmc.native.grid_site`: the same result) when
    the inputs are well formed and the kernel runs on them; ``None`` otherwise, or when the
    kernel declines (a sampled value, or a row's range, not finite). ``v``: ``None`` for every
    value of ``x``."""
    if not -x.dim() <= channel_axis < x.dim():
        return None
    axis = channel_axis % x.dim()
    c = x.shape[axis]
    m = x.numel() // max(c, 1) if v is None else (v.shape[1] if v.dim() == 2 else 0)
    if not ((v is None or (v.dim() == 2 and v.shape[0] == c)) and fits(c, size, m)
            and q_ref.dim() == 2 and q_ref.shape[0] == c and q_ref.shape[1] >= 2):
        return None
    q = _float(q_ref)
    ab = () if affine is None else (_float(affine[0]), _float(affine[1]))
    if any(t.shape != (c,) for t in ab) or not (
            _native_lookup(x) and available_for(q, *ab, *(() if v is None else (v,)))):
        return None
    return grid_site(x.detach(), v, q, size, axis, ab or None, OUTLIER_LEVEL, OUTLIER_MARGIN,
                     REFINEMENTS)


def grid_transport(x: Tensor, values: Tensor | None, q_ref: Tensor, size: int, channel_axis: int = 1,
                   grid: Tensor | None = None, *, affine: tuple[Tensor, Tensor] | None = None,
                   finite: bool | None = None) -> Tensor:
    """Grid transport of ``x`` through the histogram of its sampled ``values``, in one call.

    The same result as ``apply_lut(x, lut_from_sample(values, q_ref, size), channel_axis, grid,
    affine=affine)`` (``values`` then taken of ``a·x + b``), in fewer steps: when every value of
    ``x`` is finite (checked once) the histogram skips its masks and the lookup its check, and
    the knot range is refined only when a cheap count says it might narrow. On a CPU (float32, a
    contiguous ``x``) it is one call of the compiled site kernel (`torch_dmc.native.grid_site`,
    the same result bit for bit) unless a sampled value is not finite.

    Args:
        x: activation with ``C`` channels on ``channel_axis``.
        values: ``C×M`` values of ``x`` per channel (all of them or a sample; see
            `lut_from_sample`), in ``x``'s units; ``None``: all of them (read in place by the
            compiled kernel, copied channel-major otherwise).
        q_ref: ``C×K`` reference quantile table.
        size: nodes ``B >= 2`` per channel.
        channel_axis, grid: as for `apply_lut`.
        affine: map ``a·x + b`` instead of ``x`` (per-channel ``(a, b)``, see `apply_lut`): the
            knots span the range of ``a·values + b``.
        finite: whether every value of ``x`` is finite, if the caller knows (``None``: checked).

    Returns:
        The mapped activation, shape and dtype of ``x``; non-finite values pass through.
    """
    v = None if values is None else _float(values)
    if finite is not False:
        out = _site_kernel(x, v, q_ref, size, channel_axis, affine)
        if out is not None:
            return out
    if v is None:
        axis = channel_axis % x.dim()
        v = _float(x.detach().movedim(axis, 0).reshape(x.shape[axis], -1))
    if affine is not None:
        v = affine_values(v, (_float(affine[0]), _float(affine[1])))
    if finite is None and not _native_lookup(x):
        finite = all_finite(x.detach())  # (the compiled lookup passes non-finite values itself)
    if finite is False or v.shape[1] == 0:
        return _lookup(x, lut_from_sample(v, q_ref, size), channel_axis, grid, affine, True)
    if size < 2:
        raise ValueError(f"a lookup table needs at least 2 nodes, found {size}")
    _check_matrix(v, "values")
    c, k = q_ref.shape
    lo, hi = v.amin(dim=1), v.amax(dim=1)
    if finite is None and not bool(torch.isfinite(hi - lo).all()):  # x unchecked, values not finite
        return _lookup(x, lut_from_sample(v, q_ref, size), channel_axis, grid, affine, None)
    # every value finite: no masks, and the knot range refined only if it may narrow
    lo, step, level = _finite_levels(v, lo, hi, size)
    # Q_ref at the node levels (levels lie in [0, 1]), straight into the table image
    image = torch.empty(_table_rows(c), size, device=v.device)
    _lerp_at(_float(q_ref), level.mul_(k - 1), out=image[:c])
    return _lookup(x, Lut(image[:c], lo, step), channel_axis, grid, affine,
                   None if finite is None else False, image)
