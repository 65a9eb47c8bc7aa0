"""Results as tidy rows: the ``results.csv`` schema, appending, reading, and the summary means.

``results.csv`` has one row per cell, columns :data:`COLUMNS`:
``method, corruption, severity, batch_size, seed, stream`` (the cell), ``n`` (images), ``n_wrong``
(top-1 mistakes) and ``error`` (``100 * n_wrong / n``, %, 4 decimals). Rows are a pure function of
the protocol, so two runs of one protocol give identical files (up to row order under ``--resume``).
Timings go to ``timings.csv`` (same key columns plus ``seconds``), which is not deterministic.

Files written before the ``stream`` column existed hold ``iid`` cells only: :func:`read_results`
reads them as such, and :class:`ResultsWriter` adds the column (value ``iid``) before appending,
so ``--resume`` continues such a folder.

Aggregation (every mean is unweighted): seeds are averaged first, within a cell key
``(method, corruption, severity, batch_size, stream)``; then corruptions; then severities. So a
severity run with more seeds does not weigh more, and every corruption counts equally. Streams are
never mixed: every mean is of one stream.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .protocol import CLEAN, Cell
from .streams import IID

__all__ = [
    "KEY_COLUMNS",
    "COLUMNS",
    "TIMING_COLUMNS",
    "ResultsWriter",
    "read_results",
    "done_cells",
    "seed_means",
    "Summary",
]

#: The key of a row: the fields of :class:`~torch_dmc.bench.protocol.Cell`, in order.
KEY_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Cell))
COLUMNS: tuple[str, ...] = (*KEY_COLUMNS, "n", "n_wrong", "error")
TIMING_COLUMNS: tuple[str, ...] = (*KEY_COLUMNS, "seconds")

_INT = ("severity", "batch_size", "seed", "n", "n_wrong")


def error_percent(n_wrong: int, n: int) -> float:
    """Top-1 error in %, rounded to 4 decimals (the value written to the CSV)."""
    return round(100.0 * n_wrong / n, 4)


def _drop_partial_line(path: Path) -> None:
    """Cut a last line without its newline (a write interrupted by a crash) off the file."""
    with open(path, "rb+") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 1))
        if size == 0 or fh.read(1) == b"\n":
            return
        fh.seek(0)
        data = fh.read()
        fh.truncate(data.rfind(b"\n") + 1)


def _add_stream_column(path: Path, columns: Sequence[str]) -> None:
    """Rewrite a file whose header is ``columns`` without ``stream`` with that column set to ``iid``.

    Such a file was written before streams existed, when every cell was iid. Any other file is left
    as it is. The rewrite is atomic (temporary file, then rename).
    """
    if "stream" not in columns:
        return
    legacy = [c for c in columns if c != "stream"]
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or rows[0] != legacy:
        return
    at = list(columns).index("stream")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(columns)
            for row in rows[1:]:
                if len(row) == len(legacy):
                    writer.writerow([*row[:at], IID, *row[at:]])
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class ResultsWriter:
    """Appends rows to a CSV file, writing the header when the file is new; flushes every row.

    A last line cut off by a crash (no final newline) is removed before appending. A file written
    before the ``stream`` column existed gets it (every row ``iid``) before appending.

    Args:
        path: the CSV file.
        columns: the header.
    """

    def __init__(self, path: str | Path, columns: Sequence[str] = COLUMNS) -> None:
        self.path = Path(path)
        self.columns = tuple(columns)
        if self.path.is_file():
            _drop_partial_line(self.path)
            _add_stream_column(self.path, self.columns)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        if not new:
            with open(self.path, newline="") as fh:
                header = next(csv.reader(fh), None)
            if tuple(header or ()) != self.columns:
                raise ValueError(
                    f"{self.path} has columns {header}; expected {list(self.columns)}. It was "
                    f"written by another version or tool: use a new --out folder."
                )
        self._fh = open(self.path, "a", newline="")  # noqa: SIM115 - closed in close()
        self._writer = csv.writer(self._fh, lineterminator="\n")
        if new:
            self._writer.writerow(self.columns)
            self._flush()

    def _flush(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def write(self, row: dict) -> None:
        """Append one row (a dict with every column) and flush it to disk."""
        self._writer.writerow([row[c] for c in self.columns])
        self._flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_results(path: str | Path) -> list[dict]:
    """Read ``results.csv`` into dicts with typed values; a missing file gives ``[]``.

    A last line cut off by an interrupted write is ignored. A file without the ``stream`` column
    (written before streams existed) reads as ``iid`` rows.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        missing = [c for c in COLUMNS if c not in fields and c != "stream"]
        if missing:
            raise ValueError(
                f"{path} lacks column(s) {missing}; expected {list(COLUMNS)}: not a torch-dmc results file?"
            )
        legacy = "stream" not in fields
        for raw in reader:
            if legacy:
                raw["stream"] = IID
            try:
                row = {c: raw[c] for c in COLUMNS}
                for c in _INT:
                    row[c] = int(row[c])
                row["error"] = float(row["error"])
            except (TypeError, ValueError):
                continue  # a partial last line
            rows.append(row)
    return rows


def row_cell(row: dict) -> Cell:
    """The cell key of a row (a row without ``stream`` is ``iid``)."""
    key = (row["method"], row["corruption"], row["severity"], row["batch_size"], row["seed"])
    return Cell(*key, row.get("stream", IID))


def done_cells(rows: Iterable[dict]) -> set[Cell]:
    """The cells that have a row."""
    return {row_cell(r) for r in rows}


def seed_means(rows: Iterable[dict]) -> dict[tuple[str, str, int, int, str], float]:
    """Mean error over seeds per ``(method, corruption, severity, batch_size, stream)``.

    A row without ``stream`` counts as ``iid``.
    """
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        key = (r["method"], r["corruption"], r["severity"], r["batch_size"], r.get("stream", IID))
        acc[key].append(r["error"])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


class Summary:
    """The means a report shows, computed from results rows; every mean is of one stream.

    Args:
        rows: rows of ``results.csv`` (:func:`read_results`; a row without ``stream`` is ``iid``).
        methods: method order (default: order of first appearance).
        corruptions: corruption order (default: order of first appearance).
        streams: stream order (default: order of first appearance); the first one present is the
            *primary* stream, which every method uses when not given a ``stream``.

    Attributes:
        methods, corruptions, severities, batch_sizes, streams: what the rows hold, in order.
        stream: the primary stream (``iid`` when there are no rows).
        cell: ``(method, corruption, severity, batch_size, stream)`` → mean error over seeds.
        seeds: the stream seeds present, sorted.
    """

    def __init__(
        self,
        rows: Sequence[dict],
        methods: Sequence[str] | None = None,
        corruptions: Sequence[str] | None = None,
        streams: Sequence[str] | None = None,
    ) -> None:
        def order(get: Callable[[dict], object], given: Sequence | None) -> list:
            seen = list(dict.fromkeys(get(r) for r in rows))
            if given is None:
                return seen
            return [g for g in given if g in seen] + [s for s in seen if s not in given]

        self.methods: list[str] = order(lambda r: r["method"], methods)
        self.corruptions: list[str] = [c for c in order(lambda r: r["corruption"], corruptions) if c != CLEAN]
        self.streams: list[str] = order(lambda r: r.get("stream", IID), streams)
        self.stream: str = self.streams[0] if self.streams else IID
        self.severities: list[int] = sorted({r["severity"] for r in rows if r["severity"] > 0})
        self.batch_sizes: list[int] = sorted({r["batch_size"] for r in rows})
        self.cell = seed_means(rows)
        self.seeds: list[int] = sorted({r["seed"] for r in rows})
        self._by_seed: dict[tuple, float] = {
            (r["method"], r["corruption"], r["severity"], r["batch_size"], r.get("stream", IID), r["seed"]):
            r["error"] for r in rows
        }

    @property
    def top_severity(self) -> int | None:
        """The highest corrupted severity present (5 in a full run)."""
        return self.severities[-1] if self.severities else None

    def batch_sizes_of(self, stream: str | None = None) -> list[int]:
        """The batch sizes that have results in ``stream`` (default: the primary one)."""
        stream = self.stream if stream is None else stream
        return sorted({k[3] for k in self.cell if k[4] == stream})

    def error(
        self, method: str, corruption: str, severity: int, batch_size: int, stream: str | None = None
    ) -> float | None:
        """Mean over seeds of one cell, or ``None`` if it did not run (``stream``: primary)."""
        stream = self.stream if stream is None else stream
        return self.cell.get((method, corruption, severity, batch_size, stream))

    def clean(self, method: str, batch_size: int, stream: str | None = None) -> float | None:
        """Clean error (mean over seeds)."""
        return self.error(method, CLEAN, 0, batch_size, stream)

    def severity_mean(
        self, method: str, severity: int, batch_size: int, stream: str | None = None
    ) -> float | None:
        """Mean over corruptions at one severity (only over corruptions present)."""
        vals = [self.error(method, c, severity, batch_size, stream) for c in self.corruptions]
        return _mean([v for v in vals if v is not None])

    def overall_mean(self, method: str, batch_size: int, stream: str | None = None) -> float | None:
        """Mean over severities of the per-severity means (all corrupted cells, clean excluded)."""
        vals = [self.severity_mean(method, s, batch_size, stream) for s in self.severities]
        return _mean([v for v in vals if v is not None])

    def seed_range(
        self, method: str, severity: int, batch_size: int, stream: str | None = None
    ) -> tuple[float, float] | None:
        """Lowest and highest, over stream seeds, of one seed's mean over corruptions at ``severity``.

        Only seeds with every corruption present count; ``None`` with fewer than two such seeds.
        """
        stream = self.stream if stream is None else stream
        means = []
        for seed in self.seeds:
            vals = [self._by_seed.get((method, c, severity, batch_size, stream, seed))
                    for c in self.corruptions]
            if vals and all(v is not None for v in vals):
                means.append(sum(vals) / len(vals))
        return (min(means), max(means)) if len(means) > 1 else None

    def relative(
        self, method: str, batch_size: int, baseline: str = "source", stream: str | None = None
    ) -> float | None:
        """``overall_mean(method) / overall_mean(baseline)`` in % (100: as good as it)."""
        a = self.overall_mean(method, batch_size, stream)
        b = self.overall_mean(baseline, batch_size, stream)
        if a is None or b is None or b == 0:
            return None
        return 100.0 * a / b
