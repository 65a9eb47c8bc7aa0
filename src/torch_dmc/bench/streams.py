"""Test-stream orders: ``iid`` (a seeded random permutation) and label-shifted streams.

A *stream* only decides the order in which a cell's test images arrive; the images are the same.
Stream names are strings so they can be a column of ``results.csv``:

- ``iid``: ``torch.randperm(N)`` from a ``torch.Generator`` seeded with the stream seed (the
  order every result before streams existed used);
- ``label-shift-<alpha>``: :func:`label_shift_order` with that Dirichlet concentration, e.g.
  ``label-shift-0.1`` (``alpha`` written with ``:g``; small ``alpha``: long runs of one class).

Example:
    >>> parse_stream("label-shift-0.1"), stream_name(0.1), parse_stream("iid")
    (0.1, 'label-shift-0.1', None)
    >>> order = label_shift_order(np.arange(20) % 2, alpha=0.01, seed=0)
    >>> sorted(order.tolist()) == list(range(20))
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..data.arrays import shuffled_order

__all__ = [
    "IID",
    "LABEL_SHIFT_PREFIX",
    "label_shift_order",
    "parse_stream",
    "stream_name",
    "canonical_stream",
    "parse_stream_list",
    "stream_order",
]

#: The name of the plain shuffled stream.
IID = "iid"

#: Label-shifted streams are named ``label-shift-<alpha>``.
LABEL_SHIFT_PREFIX = "label-shift-"

_EXPECTED = "expected 'iid' or 'label-shift-<alpha>' with alpha > 0, e.g. 'label-shift-0.1'"


def label_shift_order(
    labels: np.ndarray | torch.Tensor, alpha: float, seed: int, slots: int | None = None
) -> torch.Tensor:
    """A label-shifted order of a test set: the classes arrive in a Dirichlet(α) mixture over time.

    The temporally correlated test stream of the continual test-time adaptation literature (NOTE,
    Gong et al., 2022; RoTTA, Yuan et al., 2023). With ``rng = numpy.random.default_rng(seed)``
    and ``slots`` time slots (default: as many as classes, as there):

    1. for every class ``c`` in increasing label order: ``idx_c = rng.permutation(where(labels ==
       c))`` (its indices, shuffled), then proportions ``p_c = rng.dirichlet([alpha] * slots)``
       over the time slots; ``idx_c`` is split into ``slots`` consecutive pieces at the positions
       ``floor(cumsum(p_c)[:-1] * len(idx_c))``, piece ``s`` going to slot ``s``;
    2. for every slot ``s = 0 .. slots-1`` in time order: the non-empty class pieces of slot ``s``
       follow each other in an order drawn with ``rng.permutation``, each piece kept contiguous;
       the stream is the concatenation of the slots.

    Small ``alpha`` puts each class's mass on one or a few slots: long runs of one class. Every
    image appears exactly once; the order depends on ``labels``, ``alpha``, ``seed`` and ``slots``
    only. On 10 balanced classes and 10,000 images the mean share of the most frequent class in a
    batch of 200 is about 0.95 for ``alpha = 0.01``, 0.86 for 0.1 and 0.65 for 1 (0.13 for an iid
    shuffle); even a large ``alpha`` keeps class blocks contiguous, so it never becomes iid.

    Args:
        labels: integer class labels, shape ``(N,)`` (numpy array or tensor).
        alpha: Dirichlet concentration, ``> 0`` (0.01: strong shift; 0.1: the usual setting).
        seed: the seed of every random choice (non-negative).
        slots: number of time slots (``None``: the number of classes present).

    Returns:
        ``int64`` tensor of shape ``(N,)``: a permutation of ``range(N)``, the stream order.

    Raises:
        ValueError: ``labels`` not 1-D, ``alpha`` not a positive finite number, ``slots < 1``.

    Example:
        >>> y = np.repeat(np.arange(4), 50)                 # 4 classes, 50 images each
        >>> order = label_shift_order(y, alpha=0.01, seed=0)
        >>> sorted(order.tolist()) == list(range(200))      # the same images, another order
        True
    """
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (N,); found shape {tuple(y.shape)}.")
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        a = float("nan")
    if not (math.isfinite(a) and a > 0):
        raise ValueError(f"alpha must be a positive finite number; found {alpha!r}.")
    classes = np.unique(y)
    if slots is None:
        slots = max(len(classes), 1)
    if not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots must be a positive integer; found {slots!r}.")
    rng = np.random.default_rng(int(seed))
    pieces: list[list[np.ndarray]] = [[] for _ in range(slots)]
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(np.full(slots, a))
        cuts = np.floor(np.clip(np.cumsum(p)[:-1], 0.0, 1.0) * len(idx)).astype(np.int64)
        for s, part in enumerate(np.split(idx, cuts)):
            if len(part):
                pieces[s].append(part)
    out = [ps[k] for ps in pieces for k in rng.permutation(len(ps))]
    order = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(order.astype(np.int64))


def parse_stream(name: str) -> float | None:
    """The Dirichlet ``alpha`` of a stream name, ``None`` for ``iid``.

    Raises:
        ValueError: not ``iid`` or ``label-shift-<alpha>`` with a positive finite ``alpha``.
    """
    if not isinstance(name, str):
        raise ValueError(f"stream names are strings; found {name!r} ({_EXPECTED}).")
    text = name.strip()
    if text == IID:
        return None
    if text.startswith(LABEL_SHIFT_PREFIX):
        try:
            alpha = float(text[len(LABEL_SHIFT_PREFIX) :])
        except ValueError:
            alpha = float("nan")
        if math.isfinite(alpha) and alpha > 0:
            return alpha
        raise ValueError(f"stream {name!r}: alpha must be a positive number; {_EXPECTED}.")
    raise ValueError(f"unknown stream {name!r}; {_EXPECTED}.")


def stream_name(alpha: float | None) -> str:
    """``iid`` for ``None``, else ``label-shift-<alpha>`` with ``alpha`` written ``:g`` (``0.1``).

    Raises:
        ValueError: ``alpha`` not a positive finite number.
    """
    if alpha is None:
        return IID
    alpha = float(alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"label-shift alpha must be a positive number; found {alpha!r}.")
    return f"{LABEL_SHIFT_PREFIX}{alpha:g}"


def canonical_stream(name: str) -> str:
    """The canonical spelling of a stream name (``label-shift-0.10`` → ``label-shift-0.1``).

    Note that ``:g`` keeps 6 significant digits: the stream's ``alpha`` is the one its name shows.
    """
    return stream_name(parse_stream(name))


def parse_stream_list(text: str | Sequence[str]) -> list[str]:
    """``"iid,label-shift-0.1"`` (or a list) → canonical names, duplicates dropped, order kept.

    Raises:
        ValueError: a bad name (see :func:`parse_stream`), or no name at all.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        name = canonical_stream(item)
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"no stream given in {text!r}; {_EXPECTED}.")
    return out


def stream_order(stream: str, labels: np.ndarray | torch.Tensor, seed: int) -> torch.Tensor:
    """The order of a test set in ``stream``: ``int64`` permutation of ``range(N)``.

    ``iid``: ``torch.randperm(N)`` from a ``torch.Generator`` seeded with ``seed`` (the same order
    as ``torch_dmc.data.arrays.batches(..., shuffle=True, seed=seed)``). ``label-shift-<alpha>``:
    :func:`label_shift_order` with that ``alpha`` and ``seed`` (one slot per class).
    """
    alpha = parse_stream(stream)
    if alpha is None:
        return shuffled_order(len(labels), seed)
    return label_shift_order(labels, alpha, seed)
