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
    "wasserstein1",
    "Lut",
    "lut_from_sample",
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


def _bins(values: Tensor, origin: Tensor, step: Tensor, bins: int) -> Tensor:
    """Bin index (``C×M`` int64 in ``[0, bins)``) of each value on the grid ``origin + j·step``."""
    pos = ((values - origin.unsqueeze(1)) / step.unsqueeze(1)).floor_().clamp_(0, bins - 1)
    return pos.long()


def _histogram(bins: Tensor, weights: Tensor, n_bins: int) -> Tensor:
    """Per-channel weighted counts ``C×n_bins`` of bin indices ``C×M``."""
    c = bins.shape[0]
    offsets = (torch.arange(c, device=bins.device) * n_bins).unsqueeze(1)
    counts = torch.bincount((bins + offsets).flatten(), weights=weights.flatten(),
                            minlength=c * n_bins)
    return counts.view(c, n_bins)


@torch.no_grad()
def lut_from_sample(values: Tensor, q_ref: Tensor, size: int, atoms: int = 2,
                    min_atom: float = 0.005) -> Lut:
    """Grid transport ``x ↦ Q_ref(F̂(x))`` tabulated on ``size`` uniform nodes per channel.

    ``F̂`` is the piecewise-linear CDF of ``values`` through knots at the nodes, from a histogram
    with ``size - 1`` equal bins spanning the values' range: no sort. With ``b_j`` of the ``M``
    values below node ``j``, the node's level is ``b_j / M``, so that a value in the middle of its
    bin gets ``(b_j + 1/2) / M``, its level in `transport_exact`; elsewhere in the bin the level
    differs from the exact one by at most ``1 / (2M)`` plus the bin's other values' share.

    Atoms (values repeated at least ``max(5, min_atom · M)`` times; up to ``atoms`` per channel,
    heaviest first, each found as the first value of the heaviest remaining bin) get their
    average-rank level ``(below + count / 2) / M``, as in `transport_exact`. The grid is shifted by
    less than one bin so that the heaviest atom sits exactly on a node: it maps exactly, and so do
    values beside it. A lighter atom cannot also sit on a node: both nodes of its bin take its level,
    so it maps exactly while the few other values inside that one bin map to it too.

    Args:
        values: ``C×M`` values of the test batch per channel: all of them, or a random subsample
            (see `torch_dmc.sketch.sample_channel_values`; ``M`` sampled values add a rank error
            of order ``1/sqrt(M)``).
        q_ref: ``C×K`` reference quantile table.
        size: nodes ``B >= 3`` per channel.
        atoms: most atoms per channel handled exactly.
        min_atom: smallest mass (fraction of ``M``) treated as an atom.

    Returns:
        The `Lut` (``C×B`` table).
    """
    _check_matrix(values, "values")
    if size < 3:
        raise ValueError(f"a lookup table needs at least 3 nodes, found {size}")
    c, m = values.shape
    values = values.float()
    lo, hi = values.aminmax(dim=1)
    step = (hi - lo) / (size - 2)  # size - 1 bins; one spare bin for the shift below
    step = torch.where(step > 0, step, torch.ones_like(step))
    threshold = max(5.0, min_atom * m)

    # find atoms, heaviest first, on the unshifted grid
    bins = _bins(values, lo, step, size - 1)
    remaining = torch.ones_like(values)
    found = []  # (value C, count C, present C)
    for _ in range(atoms):
        top = _histogram(bins, remaining, size - 1).argmax(dim=1, keepdim=True)
        first = ((bins == top) & (remaining > 0)).to(torch.uint8).argmax(dim=1, keepdim=True)
        value = values.gather(1, first).squeeze(1)
        members = (values == value.unsqueeze(1)) & (remaining > 0)
        count = members.sum(dim=1).to(values.dtype)
        present = count >= threshold
        remaining = remaining * ~(members & present.unsqueeze(1))
        found.append((value, torch.where(present, count, torch.zeros_like(count)), present))

    # shift the grid so that the heaviest atom is a node
    value0, _, present0 = found[0]
    origin = torch.where(present0, lo + torch.remainder(value0 - lo, step) - step, lo - step / 2)
    node = torch.arange(size, device=values.device).unsqueeze(0)
    rest = _histogram(_bins(values, origin, step, size - 1), remaining, size - 1)
    below = torch.cat([torch.zeros_like(rest[:, :1]), rest.cumsum(dim=1)], dim=1)  # C×B
    atom_node = []
    for i, (value, count, present) in enumerate(found):
        pos = (value - origin) / step
        pos = pos.round() if i == 0 else pos.floor()  # the heaviest atom is a node; others in a bin
        k = torch.where(present, pos, -2).long().unsqueeze(1)
        atom_node.append(k)
        below = below + count.unsqueeze(1) * (node > k)  # an atom is below the nodes above it
    level = below  # a value mid-bin then gets (b + 1/2) / M, its level in transport_exact
    for i, (value, count, present) in enumerate(reversed(found)):  # heaviest last: it wins
        k = atom_node[len(found) - 1 - i]
        mid = (values < value.unsqueeze(1)).sum(dim=1, keepdim=True).to(values.dtype) \
            + count.unsqueeze(1) / 2
        at = (node == k) | ((node == k + 1) & (i < len(found) - 1))  # lighter atoms: both nodes
        level = torch.where(at & present.unsqueeze(1), mid, level)
    level = (level / m).clamp_(0.5 / m, 1 - 0.5 / m)
    return Lut(interp_quantiles(q_ref, level), origin, step)


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
