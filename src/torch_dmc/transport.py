"""Pure tensor math of Distribution Mismatch Correction.

Every function here works on a *channel-major* matrix ``x`` of shape ``C×N``: row ``c`` holds the
``N`` values of channel ``c`` (batch and spatial positions together). A *quantile table*
``q`` of shape ``C×K`` holds each channel's quantile function at the ``K`` evenly spaced levels
``t_j = j / (K - 1)``, endpoints included, so ``q[:, 0]`` is the minimum and ``q[:, -1]`` the maximum.

The transport (DESIGN §1): with ``r_i`` the rank of ``x_i`` among its channel's values, ties given
their *average* rank, and ``u_i = (r_i - 1/2) / N``, the corrected value is ``T(x_i) = Q_ref(u_i)``,
``Q_ref`` linearly interpolated between the stored levels. It is the monotone map that minimises
the 1-D Wasserstein-p distance between the batch's empirical distribution and the reference, for
every p >= 1.

Nothing here loops over channels or samples in Python.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "tie_run_bounds",
    "midranks",
    "midrank_levels",
    "interp_quantiles",
    "transport_exact",
    "knot_ranks",
    "Knots",
    "grid_knots",
    "transport_grid",
    "wasserstein1",
    "Lut",
    "lut_from_knots",
    "apply_lut",
]


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
        u: ``C×M`` levels; values outside ``[0, 1]`` are clamped.

    Returns:
        ``C×M`` values ``Q(u)`` in the dtype of ``q``.
    """
    _check_matrix(q, "q")
    k = q.shape[1]
    if k < 2:
        raise ValueError(f"a quantile table needs at least 2 levels, found {k}")
    if u.dim() != 2 or u.shape[0] != q.shape[0]:
        raise ValueError(
            f"levels must be C×M with C={q.shape[0]} rows like the table, found {tuple(u.shape)}"
        )
    pos = u.to(q.dtype).clamp(0, 1) * (k - 1)
    lo = pos.floor().clamp_(max=k - 2)
    frac = pos - lo
    lo = lo.long()
    q_lo = q.gather(1, lo)
    q_hi = q.gather(1, lo + 1)
    return torch.lerp(q_lo, q_hi, frac)


def transport_exact(x: Tensor, q_ref: Tensor) -> Tensor:
    """Exact DMC transport: ``T(x_i) = Q_ref((r_i - 1/2) / N)`` with average ranks for ties.

    This is the reference implementation, ``O(N log N)`` per channel (one full sort).

    Args:
        x: ``C×N`` values of one batch, channel-major.
        q_ref: ``C×K`` reference quantile table (levels ``j / (K - 1)``).

    Returns:
        ``C×N`` corrected values, in the dtype of ``x``.
    """
    _check_matrix(x)
    if q_ref.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} channels but the reference has {q_ref.shape[0]}")
    n = x.shape[1]
    sorted_x, order = x.sort(dim=1)
    first, last = tie_run_bounds(sorted_x)
    u_sorted = (first + last + 1).to(q_ref.dtype) / (2 * n)  # ((first+last)/2 + 1 - 1/2) / N
    y_sorted = interp_quantiles(q_ref, u_sorted)
    return torch.empty_like(y_sorted).scatter_(1, order, y_sorted).to(x.dtype)


def knot_ranks(n: int, knots: int) -> Tensor:
    """0-based ranks of the knots among ``n`` sorted values: ``knots`` evenly spaced ranks, the
    first and last included, plus geometrically spaced ranks ``1, 2, 4, …`` from each end inside
    the first and last gap, where extreme values would otherwise be interpolated over a long gap.

    Returns:
        Sorted unique int64 ranks (at most ``knots + 2·log2(n / knots)`` of them).
    """
    even = torch.linspace(0, n - 1, knots).round().long()
    gap = int(even[1]) if knots > 1 and n > 1 else 0
    steps = [1 << j for j in range(max(gap, 1).bit_length()) if (1 << j) < gap]
    tails = torch.tensor(steps + [n - 1 - s for s in steps], dtype=torch.long)
    return torch.unique(torch.cat([even, tails]).clamp_(0, n - 1))


class Knots(NamedTuple):
    """A test distribution summarised at ``K'`` knots per channel (all fields ``C×K'``).

    ``values`` are order statistics (non-decreasing per row). ``lower`` and ``upper`` are the
    levels ``(rank + 1/2) / M`` of the first and last of the values equal to the knot, among the
    ``M`` values the knots were taken from: equal for a value that occurs once, the two ends of an
    atom otherwise; their mean is the atom's average-rank level.
    """

    values: Tensor
    lower: Tensor
    upper: Tensor


def grid_knots(x: Tensor, knots: int) -> Knots:
    """Summarise each channel's distribution at ``knots`` order statistics (grid mode's first step).

    The knots sit at the ranks of `knot_ranks` (evenly spaced, denser at both ends) among the
    ``M`` given values, which may be all of a batch's values or a random subsample of them (see
    `torch_dmc.sketch.sample_channel_values`; a subsample of ``M`` values adds a rank error of
    order ``1/sqrt(M)``). Tie runs are measured among all ``M`` values, so atoms get their exact
    average rank.

    Args:
        x: ``C×M`` values.
        knots: number of evenly spaced knots ``K' >= 2`` (tail knots come on top).

    Returns:
        `Knots`, each field ``C×K'`` (``K'`` including the tail knots).
    """
    _check_matrix(x)
    if knots < 2:
        raise ValueError(f"grid mode needs at least 2 knots, found {knots}")
    n = x.shape[1]
    sorted_x = x.sort(dim=1).values
    first, last = tie_run_bounds(sorted_x)
    ranks = knot_ranks(n, knots).to(x.device)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    lower = (first.index_select(1, ranks).to(dtype) + 0.5) / n
    upper = (last.index_select(1, ranks).to(dtype) + 0.5) / n
    return Knots(sorted_x.index_select(1, ranks), lower, upper)


def transport_grid(x: Tensor, q_ref: Tensor, knots: Knots) -> Tensor:
    """Grid DMC transport: ``T(x) = Q_ref(F̂(x))``, ``F̂`` piecewise linear through the knots.

    ``F̂(x)`` is the level: a value equal to a knot gets the knot's average-rank level (so atoms
    agree with `transport_exact` and equal inputs give equal outputs); between two neighbouring
    distinct knots it rises linearly in ``x`` from the left knot's upper level to the right knot's
    lower level; below the first or above the last knot it is that knot's level. ``Q_ref`` is then
    interpolated between its stored levels, as in `transport_exact`.
    Cost ``O(N log K')`` per channel.

    Args:
        x: ``C×N`` values.
        q_ref: ``C×K`` reference quantile table.
        knots: the test distribution's `Knots` (see `grid_knots`), ``C×K'``.

    Returns:
        ``C×N`` corrected values, dtype of ``x``.
    """
    _check_matrix(x)
    kv = knots.values.to(x.dtype).contiguous()
    kk = kv.shape[1]
    x = x.contiguous()
    hi = torch.searchsorted(kv, x, right=True)  # first knot > x
    lo = (hi - 1).clamp_(0, kk - 1)  # last knot <= x (the first knot when x is below all)
    hi = hi.clamp_(max=kk - 1)
    x_lo = kv.gather(1, lo)
    span = kv.gather(1, hi) - x_lo
    frac = torch.where(span > 0, (x - x_lo) / span.clamp_min(torch.finfo(x.dtype).tiny), 0)
    upper = knots.upper.to(x.dtype)
    u = torch.lerp(upper.gather(1, lo), knots.lower.to(x.dtype).gather(1, hi), frac.clamp_(0, 1))
    mid = (knots.lower.to(x.dtype) + upper) / 2
    u = torch.where(x == x_lo, mid.gather(1, lo), u)  # on a knot (an atom): its average rank
    return interp_quantiles(q_ref, u).to(x.dtype)


def wasserstein1(x: Tensor, q_ref: Tensor) -> Tensor:
    """Per-channel 1-D Wasserstein-1 distance between the values ``x`` and a quantile table.

    ``W1 = ∫_0^1 |Q_x(u) - Q_ref(u)| du``, evaluated with the midpoint rule on the ``N`` levels
    ``(i - 1/2) / N`` of the sorted values (exact for the empirical side).

    Args:
        x: ``C×N`` values.
        q_ref: ``C×K`` reference quantile table.

    Returns:
        ``C`` distances, in the dtype of ``q_ref``.
    """
    _check_matrix(x)
    n = x.shape[1]
    sorted_x = x.sort(dim=1).values.to(q_ref.dtype)
    u = ((torch.arange(n, device=x.device, dtype=q_ref.dtype) + 0.5) / n).expand(x.shape[0], -1)
    return (sorted_x - interp_quantiles(q_ref, u)).abs().mean(dim=1)


class Lut(NamedTuple):
    """A per-channel monotone map tabulated on a uniform grid of ``B`` nodes (fields on ``x``'s device).

    Node ``j`` of channel ``c`` sits at ``origin[c] + j · step[c]`` and holds ``table[c, j]``;
    between nodes the map is linear, outside the first and last node it is constant.
    """

    table: Tensor  # C×B
    origin: Tensor  # C
    step: Tensor  # C


@torch.no_grad()
def lut_from_knots(q_ref: Tensor, knots: Knots, size: int) -> Lut:
    """Tabulate the grid transport ``x ↦ Q_ref(F̂(x))`` on ``size`` uniform nodes per channel.

    The nodes span the knots' range. If a channel has atoms (knots with ``lower < upper``), the
    grid is shifted by less than one step so that its heaviest atom falls exactly on a node: that
    value then maps exactly to the atom's average-rank image, as in `transport_exact`. Values
    within one step of an atom, or between nodes elsewhere, are interpolated linearly, which adds
    an error bounded by the map's change over one step.

    Args:
        q_ref: ``C×K`` reference quantile table.
        knots: the test distribution's `Knots` (``C×K'``).
        size: nodes ``B >= 2`` per channel.

    Returns:
        The `Lut`.
    """
    if size < 2:
        raise ValueError(f"a lookup table needs at least 2 nodes, found {size}")
    values = knots.values
    lo, hi = values[:, 0], values[:, -1]
    step = (hi - lo) / (size - 2)  # one spare step for the shift below
    step = torch.where(step > 0, step, torch.ones_like(step))
    mass = knots.upper - knots.lower
    heaviest = mass.argmax(dim=1, keepdim=True)
    atom = values.gather(1, heaviest).squeeze(1)
    shift = torch.where(mass.gather(1, heaviest).squeeze(1) > 0,
                        torch.remainder(atom - lo, step), torch.zeros_like(lo))
    origin = lo + shift - step  # node (atom - origin) / step is an integer
    nodes = origin.unsqueeze(1) + step.unsqueeze(1) * torch.arange(size, device=values.device,
                                                                   dtype=values.dtype)
    atom_node = torch.where(shift > 0, ((atom - origin) / step).round().long(), -1)
    nodes = torch.where(torch.arange(size, device=values.device) == atom_node.unsqueeze(1),
                        atom.unsqueeze(1), nodes)  # exactly the atom, whatever the rounding
    return Lut(transport_grid(nodes, q_ref, knots), origin, step)


def apply_lut(x: Tensor, lut: Lut, channel_axis: int = 1) -> Tensor:
    """Apply a tabulated per-channel map to an activation of any layout, in one fused kernel.

    The table is read with ``torch.nn.functional.grid_sample`` (bilinear, border padding): the
    value's position in its channel's table is the horizontal coordinate and the channel's row
    the vertical one, at an exact integer row so that no neighbouring channel leaks in. The
    activation is never transposed.

    Args:
        x: activation with ``C`` channels on ``channel_axis`` (e.g. ``N×C×H×W`` or ``N×T×C``).
        lut: the `Lut` (``C×B`` table).
        channel_axis: the channel axis of ``x``.

    Returns:
        The mapped activation, shape and dtype of ``x``.
    """
    axis = channel_axis % x.dim()
    c, b = lut.table.shape
    if x.shape[axis] != c:
        raise ValueError(f"x has {x.shape[axis]} channels on axis {axis}, the table has {c}")
    rows = 1 if c == 1 else 1 + (1 << (c - 1).bit_length())  # 2^k + 1 rows: exact coordinates
    table = lut.table.to(torch.float32)
    if rows > c:
        table = torch.cat([table, table[-1:].expand(rows - c, b)])
    bshape = [1] * x.dim()
    bshape[axis] = c
    scale = (2 / ((b - 1) * lut.step)).to(torch.float32)
    shift = -lut.origin.to(torch.float32) * scale - 1
    row = torch.arange(c, device=x.device, dtype=torch.float32) * (2 / max(rows - 1, 1)) - 1
    if torch.is_grad_enabled() and x.requires_grad:  # differentiable: d/dx is the table's slope
        grid = torch.stack([torch.addcmul(shift.view(bshape), x.float(), scale.view(bshape)),
                            row.view(bshape).expand(x.shape)], dim=-1)
    else:  # fast: write both coordinates in place, no intermediate tensors
        grid = torch.empty(*x.shape, 2, device=x.device, dtype=torch.float32)
        torch.addcmul(shift.view(bshape), x, scale.view(bshape), out=grid[..., 0])
        grid[..., 1] = row.view(bshape)
    width = x.shape[-1]
    out = torch.nn.functional.grid_sample(
        table.view(1, 1, rows, b), grid.view(1, -1, width, 2), mode="bilinear",
        padding_mode="border", align_corners=True)
    return out.view(x.shape).to(x.dtype)
