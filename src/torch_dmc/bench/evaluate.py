"""Evaluate one unit of work: a freshly built method over one stream of test images.

A stream is a list of *segments* (image sets): one for an episodic cell, one per corruption for a
continual stream (segments follow each other, each ordered by the stream), and for a mixed stream
the segments' images shuffled together by the stream, each segment's errors counted apart. The
sets of the current severity are kept open by :class:`OpenSets` so that every method and seed
reads the same images without opening or generating them again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .. import methods as methods_mod
from ..data import arrays
from ..data.sources import ConcatSet, ImageSet
from ..sites import model_device
from .datasets import BenchData
from .protocol import CLEAN, Protocol, Unit
from .streams import IID, stream_order

__all__ = ["stream_errors", "OpenSets", "evaluate_unit"]

Segment = ImageSet | tuple[torch.Tensor, torch.Tensor]


def _labels(segment: Segment) -> torch.Tensor:
    if isinstance(segment, ImageSet):
        return torch.from_numpy(np.ascontiguousarray(segment.labels))
    return segment[1]


def _batches(segment: Segment, order: list[torch.Tensor], workers: int) -> Iterator[torch.Tensor]:
    """The float images of each index batch of ``order``, in order."""
    if isinstance(segment, ImageSet):
        rows = [b.numpy() for b in order]
        return (arrays.to_tensor(x) for x in segment.iter_batches(rows, workers))
    x = segment[0]
    return (x[b] for b in order)


def stream_errors(
    method: nn.Module,
    segments: Iterable[Segment],
    batch_size: int,
    seed: int,
    *,
    stream: str = IID,
    channels_last: bool = False,
    mixed: bool = False,
    workers: int = 0,
) -> list[tuple[int, int, float]]:
    """Run ``method`` over the segments of one stream, without reset.

    Args:
        method: a built method (``forward`` adapts and predicts).
        segments: image sets (:class:`~torch_dmc.data.sources.ImageSet`), or ``(x, y)`` tensors
            (``x`` float ``N×C×H×W``, ``y`` int64 ``N``).
        batch_size: images per batch. Continual (``mixed=False``): batches never span two
            segments, and each segment is ordered by the stream. Mixed: the segments' images are
            ordered together by the stream, so a batch mixes them.
        seed: the stream order's seed.
        stream: ``iid`` (``torch.randperm`` seeded with ``seed``) or ``label-shift-<alpha>``
            (:func:`~torch_dmc.bench.streams.label_shift_order` of the labels).
        channels_last: pass the batches in channels-last memory layout.
        mixed: shuffle the segments together (the mixed-domain protocol).
        workers: processes that decode image files ahead (image-tree data).

    Returns:
        ``(n, n_wrong, seconds)`` per segment. Mixed: each segment's images and errors wherever
        they fell; the stream's time is shared out in proportion to the images.
    """
    segments = list(segments)
    if mixed:
        return _mixed_errors(method, segments, batch_size, seed, stream, channels_last, workers)
    out = []
    for segment in segments:
        y = _labels(segment)
        t0 = time.perf_counter()
        order = list(stream_order(stream, y, seed).split(batch_size))
        wrong = _run(method, _batches(segment, order, workers), order, y, channels_last)
        out.append((len(y), int(wrong.sum()), time.perf_counter() - t0))
    return out


def _run(method: nn.Module, xs: Iterator[torch.Tensor], order: list[torch.Tensor], y: torch.Tensor,
         channels_last: bool) -> torch.Tensor:
    """Per-image mistakes (``bool``, shape ``N``, in ``y``'s rows) of the method over the batches."""
    needs_grad = getattr(method, "optimizer", None) is not None
    device = model_device(method)
    wrong = torch.zeros(len(y), dtype=torch.bool)
    ctx = contextlib.nullcontext() if needs_grad else torch.inference_mode()
    with ctx:
        for rows, xb in zip(order, xs, strict=True):
            xb = xb.to(device)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            pred = method(xb).detach().argmax(1).cpu()
            wrong[rows] = pred != y[rows]
    return wrong


def _mixed_errors(method, segments: Sequence[Segment], batch_size: int, seed: int, stream: str,
                  channels_last: bool, workers: int) -> list[tuple[int, int, float]]:
    sizes = [len(_labels(s)) for s in segments]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    whole: Segment
    if all(isinstance(s, ImageSet) for s in segments):
        whole = ConcatSet(segments)
    elif not any(isinstance(s, ImageSet) for s in segments):
        whole = (torch.cat([s[0] for s in segments]), torch.cat([s[1] for s in segments]))
    else:
        raise TypeError("stream_errors: give all segments as image sets or all as (x, y) tensors.")
    y = _labels(whole)
    t0 = time.perf_counter()
    order = list(stream_order(stream, y, seed).split(batch_size))
    wrong = _run(method, _batches(whole, order, workers), order, y, channels_last)
    seconds = time.perf_counter() - t0
    return [(n, int(wrong[starts[i] : starts[i + 1]].sum()), seconds * n / max(1, len(y)))
            for i, n in enumerate(sizes)]


class OpenSets:
    """The image sets of the current severity, kept open while units need them.

    Opening a generated set may compute it (then it is cached on disk); opening another severity
    closes the sets of the previous one, so at most one severity's sets are held.
    """

    def __init__(self, data: BenchData) -> None:
        self.data = data
        self._open: dict[tuple[str, int], ImageSet] = {}

    def get(self, corruption: str, severity: int) -> ImageSet:
        """One set: the clean set, or a corrupted one (restricted to the run's rows)."""
        if corruption == CLEAN:
            if self.data.clean is None:
                raise ValueError("no clean test set: pass --clean-data SPEC for clean cells.")
            return self.data.clean
        key = (corruption, severity)
        if key not in self._open:
            self._open[key] = self.data.corrupted(corruption, severity)
        return self._open[key]

    def segments(self, corruptions: Sequence[str], severity: int) -> list[ImageSet]:
        """The sets of a unit, in stream order; sets of other keys are closed."""
        keys = {(c, severity) for c in corruptions}
        for k in list(self._open):
            if k not in keys:
                del self._open[k]
        return [self.get(c, severity) for c in corruptions]

    def files(self) -> dict[str, str]:
        """What the open sets read from disk (name → SHA-256)."""
        out: dict[str, str] = {}
        for s in ([self.data.clean] if self.data.clean is not None else []) + list(self._open.values()):
            out.update(s.files())
        return out


def evaluate_unit(unit: Unit, protocol: Protocol, net: nn.Module, stats, sets: OpenSets,
                  channels_last: bool, workers: int = 0) -> list[tuple[int, int, float]]:
    """Run one unit with a freshly built method: ``(n, n_wrong, seconds)`` per cell."""
    segments = sets.segments(unit.corruptions, unit.severity)
    torch.manual_seed(0)
    method = methods_mod.build(unit.method, net, stats=stats, **protocol.method_options.get(unit.method, {}))
    return stream_errors(method, segments, unit.batch_size, unit.seed, stream=unit.stream,
                         channels_last=channels_last, mixed=unit.mixed, workers=workers)
