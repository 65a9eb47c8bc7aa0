"""The collectives of synchronised correction (docs/method.md § Synchronised correction).

`torch_dmc.DMC` imports this module only when it is given a ``process_group``. Every process of
the group holds a slice (on axis 0) of one batch; at each correction site they agree on the
concatenation of their slices, in group-rank order (`Sync.describe`), then pool what the estimate
needs: every value (exact mode, `Sync.gather`) or a histogram's range and counts (grid mode,
`Sync.histogram_reduce`). Every process calls the same collectives in the same order, because
every decision between two collectives is taken on pooled, identical data. A process that fails
or never arrives makes the others' collective fail after the group's timeout (the ``timeout`` of
``torch.distributed.init_process_group``/``new_group``), not hang.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["MAX_DIMS", "GlobalBatch", "Sync", "check_group"]

MAX_DIMS = 8
"""Most dimensions of a synchronised site's output (the shape header has a fixed size)."""

_COUNT_LIMIT = 2**31 - 1
"""Histogram counts travel as int32 while a channel has fewer values than this in the whole batch."""


def check_group(group: object) -> None:
    """Raise if ``group`` cannot synchronise a `DMC`: no initialised ``torch.distributed``, not a
    process group, or a group this process is not a member of."""
    if not dist.is_available():
        raise ValueError("process_group was given, but this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        raise ValueError(
            "process_group was given, but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) first (its timeout bounds every "
            "synchronised forward), or leave process_group=None for a correction per process")
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"process_group must be a torch.distributed ProcessGroup (e.g. "
                         f"torch.distributed.group.WORLD or one from new_group), found "
                         f"{type(group).__name__}; a process outside a new_group gets no group")
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of process_group")


@dataclass(frozen=True)
class GlobalBatch:
    """The batch that the group's slices of one site's output form together.

    Attributes:
        sizes: each process's batch size (axis 0), in group-rank order.
        rank: this process's rank in the group.
        shape: shape of the concatenated output (batch axis 0).
        axis: the site's channel axis (not 0).
    """

    sizes: tuple[int, ...]
    rank: int
    shape: tuple[int, ...]
    axis: int

    @property
    def samples(self) -> int:
        """Samples of the concatenated batch."""
        return self.shape[0]

    @property
    def start(self) -> int:
        """Index of this process's first sample in the concatenated batch."""
        return sum(self.sizes[:self.rank])

    @property
    def stop(self) -> int:
        """One past this process's last sample in the concatenated batch."""
        return self.start + self.sizes[self.rank]

    @property
    def positions(self) -> int:
        """Values per sample and channel (every axis but the batch and channel axes)."""
        return math.prod(s for i, s in enumerate(self.shape) if i not in (0, self.axis))

    @property
    def values(self) -> int:
        """Values per channel in the concatenated batch."""
        return self.samples * self.positions

    @property
    def numel(self) -> int:
        """Elements of the concatenated output."""
        return math.prod(self.shape)


class _Reduce:
    """`torch_dmc.transport.HistogramReduce` over a group: MIN/MAX of ranges, SUM of counts."""

    def __init__(self, group: dist.ProcessGroup, count_dtype: torch.dtype):
        self.group = group
        self.count_dtype = count_dtype

    def range(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Every process's ``lo`` and ``hi`` (``C`` each) → their elementwise min and max."""
        both = torch.cat([-lo, hi])  # one all-reduce: max(-lo) = -min(lo)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        c = lo.shape[0]
        return -both[:c], both[c:]

    def sum(self, counts: Tensor) -> Tensor:
        """Every process's ``C×B`` cell counts → their sum (exact integers)."""
        total = counts.to(self.count_dtype).contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total


class Sync:
    """The collectives of one synchronised `DMC` over ``group``.

    Args:
        group: an initialised process group this process belongs to (see `check_group`).
    """

    def __init__(self, group: dist.ProcessGroup):
        check_group(group)
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def describe(self, name: str, output: Tensor, axis: int) -> GlobalBatch:
        """Gather every process's shape of site ``name``'s output: one ``all_gather`` of
        ``MAX_DIMS + 2`` int64 (the site's name checksum, the number of dimensions, the shape).

        Raises (on every process alike):
            ValueError: a channel axis of 0 or more than `MAX_DIMS` dimensions (checked before
                any collective); the processes are at different sites, or their slices differ
                on an axis other than 0.
        """
        if axis == 0:
            raise ValueError(f"site {name!r}: synchronised correction splits the batch on axis 0, "
                             "but this site's channel axis is 0")
        if output.dim() > MAX_DIMS:
            raise ValueError(f"site {name!r}: synchronised correction handles outputs of at most "
                             f"{MAX_DIMS} dimensions, found {output.dim()}")
        header = torch.full((MAX_DIMS + 2,), -1, dtype=torch.int64)
        header[0] = zlib.crc32(name.encode())
        header[1] = output.dim()
        header[2:2 + output.dim()] = torch.tensor(output.shape, dtype=torch.int64)
        header = header.to(output.device)
        parts = [torch.empty_like(header) for _ in range(self.size)]
        dist.all_gather(parts, header, group=self.group)
        rows = torch.stack(parts).tolist()
        shapes = [tuple(row[2:2 + row[1]]) for row in rows]
        if len({row[0] for row in rows}) > 1:
            raise ValueError(f"site {name!r}: the processes of the group are correcting different "
                             "sites at once (different models, or different forward passes?)")
        if any(len(s) != len(shapes[0]) or s[1:] != shapes[0][1:] for s in shapes):
            raise ValueError(f"site {name!r}: the processes' slices must differ on the batch axis "
                             f"(0) only, found shapes {shapes} in group-rank order")
        sizes = tuple(s[0] for s in shapes)
        return GlobalBatch(sizes, self.rank, (sum(sizes), *shapes[0][1:]), axis)

    def gather(self, values: Tensor, batch: GlobalBatch) -> Tensor:
        """Every process's ``C×n`` values → the ``C×N`` values of the concatenated batch.

        One ``all_gather`` of ``C × (largest n)`` values in the values' dtype (a shorter slice is
        padded with NaN, cut off again here); columns in group-rank order, so the result is the
        channel-major matrix of the concatenated output.
        """
        c, n = values.shape
        longest = max(batch.sizes) * batch.positions
        padded = values.detach()
        if n < longest:
            padded = torch.cat([padded, padded.new_full((c, longest - n), float("nan"))], dim=1)
        padded = padded.contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:, :s * batch.positions] for p, s in zip(parts, batch.sizes, strict=True)], dim=1)

    def histogram_reduce(self, batch: GlobalBatch) -> _Reduce:
        """The `torch_dmc.transport.HistogramReduce` of grid mode for ``batch``: ranges reduced
        with MAX (``2C`` float32), counts with SUM (``C×B`` int32, int64 for a channel with more
        than 2³¹ − 1 values)."""
        dtype = torch.int32 if batch.values <= _COUNT_LIMIT else torch.int64
        return _Reduce(self.group, dtype)
