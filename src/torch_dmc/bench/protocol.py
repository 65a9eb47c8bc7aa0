"""The benchmark protocol: one serialisable dataclass that fixes every cell of a run.

A *cell* is one ``(method, corruption, severity, batch_size, seed, stream)`` combination; its result
is the top-1 error of ``method`` on the first ``n_test`` test images corrupted with ``corruption`` at
``severity`` (generation seed ``gen_seed``), ``batch_size`` images at a time, in the order that
``stream`` gives with ``seed`` (:mod:`torch_dmc.bench.streams`): ``iid``, ``randperm(n_test)``
seeded with ``seed``; ``label-shift-<alpha>``, the classes in a Dirichlet(alpha) mixture over
time. The clean cells (corruption ``"clean"``, severity 0) always run.

- Episodic (default): a fresh method (built from the model, i.e. reset) for every cell.
- Continual: for every ``(method, severity, batch_size, seed, stream)`` one stream runs through
  all corruptions in the given order without reset; each corruption's images form their own
  batches (no batch spans two corruptions), ordered by ``stream`` within the segment, and each
  corruption's segment is recorded as one cell. The method is fresh at the start of every such
  stream. Clean cells stay episodic.
- Mixed (mixed domains): for every ``(method, severity, batch_size, seed, stream)`` one stream of
  the images of all corruptions together, ordered by ``stream`` with ``seed`` over the whole
  (``iid``: every batch mixes corruptions at random). Each corruption's images are one cell, their
  errors counted wherever they fell in the stream, so a corruption's cell is comparable with its
  episodic cell and the mean over corruptions is the stream's error. Clean cells stay episodic.

Example:
    >>> p = Protocol(methods=["source", "dmc"], corruptions=["fog"], severities=[5])
    >>> [(u.method, u.corruption, u.severity) for u in p.units()]
    [('source', 'clean', 0), ('dmc', 'clean', 0), ('source', 'fog', 5), ('dmc', 'fog', 5)]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .streams import IID, parse_stream_list

__all__ = [
    "CLEAN",
    "SETTINGS",
    "Cell",
    "Unit",
    "Protocol",
    "QUICK_CORRUPTIONS",
    "DEFAULT_METHODS",
    "parse_int_list",
    "parse_name_list",
]

#: The corruption name of the clean cells (severity 0).
CLEAN = "clean"

#: The values of ``--protocol`` (:attr:`Protocol.setting`).
SETTINGS: tuple[str, ...] = ("episodic", "continual", "mixed")

#: The six methods, in report order.
DEFAULT_METHODS: tuple[str, ...] = ("source", "bn", "bn-prior", "bn-ema", "tent", "dmc")

#: ``--quick``: one or two corruptions per family (noise, blur, weather, digital), cheap.
QUICK_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "motion_blur",
    "fog",
    "contrast",
    "jpeg_compression",
)


@dataclass(frozen=True, order=True)
class Cell:
    """One row of ``results.csv``: the key of one measured error."""

    method: str
    corruption: str
    severity: int
    batch_size: int
    seed: int
    stream: str = IID


@dataclass(frozen=True)
class Unit:
    """One piece of work: a fresh method run over a stream that yields one or more cells.

    Episodic units have one corruption; continual and mixed units list every corruption of their
    stream (``mixed``: the corruptions' images are shuffled together instead of following each
    other).
    """

    method: str
    corruptions: tuple[str, ...]
    severity: int
    batch_size: int
    seed: int
    stream: str = IID
    mixed: bool = False

    @property
    def corruption(self) -> str:
        """The corruption of an episodic unit (the first one of a continual or mixed unit)."""
        return self.corruptions[0]

    def cells(self) -> list[Cell]:
        """The cells this unit produces, in stream order."""
        return [
            Cell(self.method, c, self.severity, self.batch_size, self.seed, self.stream)
            for c in self.corruptions
        ]


def parse_int_list(
    text: str | int | Sequence[int], what: str, *, low: int | None = None, high: int | None = None
) -> list[int]:
    """Parse ``"1-5"``, ``"3,5"``, ``"0,2-3"`` or a list of ints into a list (order kept).

    Args:
        text: the flag's value.
        what: the flag, for messages (e.g. ``"--severities"``).
        low, high: the least and greatest valid value (``None``: no bound).

    Raises:
        ValueError: a token that is not an integer or range, or a value out of bounds, naming
            ``what`` and saying what is expected.
    """
    if isinstance(text, int):
        out = [text]
    elif not isinstance(text, str):
        out = [int(v) for v in text]
    else:
        out = []
        for token in text.split(","):
            token = token.strip()
            if not token:
                continue
            try:
                if "-" in token:
                    lo, hi = token.split("-", 1)
                    values = list(range(int(lo), int(hi) + 1))
                else:
                    values = [int(token)]
            except ValueError:
                raise ValueError(
                    f"{what}: cannot read {token!r}; expected non-negative integers or ranges like "
                    f"'1-5' or '3,5'."
                ) from None
            if not values:
                raise ValueError(f"{what}: empty range {token!r}; write it low-high, e.g. '1-5'.")
            out.extend(v for v in values if v not in out)
        if not out:
            raise ValueError(f"{what}: no value given in {text!r}; expected e.g. '1-5' or '3,5'.")
    bad = [v for v in out if (low is not None and v < low) or (high is not None and v > high)]
    if bad:
        raise ValueError(
            f"{what}: {', '.join(map(str, bad))} out of range; expected {_int_range(low, high)}."
        )
    return out


def _int_range(low: int | None, high: int | None) -> str:
    """``"integers in 1..5"``, ``"positive integers"``, ... for messages."""
    if low is not None and high is not None:
        return f"integers in {low}..{high}"
    if high is not None:
        return f"integers of at most {high}"
    return {0: "non-negative integers", 1: "positive integers"}.get(low, f"integers of at least {low}")


def parse_name_list(text: str | Sequence[str]) -> list[str]:
    """Split ``"a,b, c"`` (or a list) into names, duplicates dropped, order kept."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        item = item.strip()
        if item and item not in out:
            out.append(item)
    return out


@dataclass
class Protocol:
    """Everything that decides which cells a benchmark run measures and how.

    Attributes:
        methods: method names (``torch_dmc.methods.available()``), in report order.
        corruptions: corruption names (resolved, e.g. the 15 ``common`` ones), in stream order.
        severities: severities 1..5 to run (clean, severity 0, always runs).
        batch_sizes: test batch sizes; each is a separate cell.
        seeds: stream seeds: each permutes the test images' order; images themselves are fixed by
            ``gen_seed``.
        all_seeds_at: severities (0 = clean) that get every seed; the others get ``seeds[0]`` only.
            ``None``: every severity gets every seed.
        streams: test-stream orders (:mod:`torch_dmc.bench.streams`): ``iid`` and/or
            ``label-shift-<alpha>``; each is a separate cell. Names are stored canonical
            (``label-shift-0.10`` → ``label-shift-0.1``). A ``config.json`` from before streams
            existed has none: it loads as ``["iid"]``, which is what it ran.
        n_test: use the first ``n_test`` test images (``None``: all); for image-tree data, a seeded
            subset (``torch_dmc.data.sources.TestData.select``).
        setting: ``--protocol``: ``"episodic"``, ``"continual"`` or ``"mixed"`` (see module doc).
            A ``config.json`` from before it existed has ``continual`` (a bool) instead; it loads
            as ``"continual"`` or ``"episodic"``.
        gen_seed: the corruption generation seed.
        fit_images: training images used to fit the DMC reference statistics (``None``: all); a
            random subset (seed ``fit_seed``) when fewer.
        fit_levels: quantile levels K stored per channel.
        fit_seed: seed of the fit's subset and sampling.
        method_options: method name → options passed to ``methods.build`` (e.g. from ``dmc tune``).
        model: the model spec (``None``: the shipped default model).
        data: the test data spec (``torch_dmc.data.specs``; ``None``: Fashion-MNIST).
        clean_data: the clean test set's spec (``None``: the test spec's own clean images when it
            has them — Fashion-MNIST, ``.npz`` — else no clean cells).
        fit_data: the spec of the training images the reference is fitted on (``None``: the test
            spec's training split when it has one).
        image_ids: a file of image ids selecting the test images (image-tree data).
        clean: whether clean cells run (decided from the data: off when there is no clean set).
        quick: whether ``--quick`` chose the defaults.
    """

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    corruptions: list[str] = field(default_factory=list)
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    batch_sizes: list[int] = field(default_factory=lambda: [200])
    seeds: list[int] = field(default_factory=lambda: [0])
    all_seeds_at: list[int] | None = None
    streams: list[str] = field(default_factory=lambda: [IID])
    n_test: int | None = None
    setting: str = "episodic"
    gen_seed: int = 0
    fit_images: int | None = None
    fit_levels: int = 1024
    fit_seed: int = 0
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: str | None = None
    data: str | None = None
    clean_data: str | None = None
    fit_data: str | None = None
    image_ids: str | None = None
    clean: bool = True
    quick: bool = False

    def __post_init__(self) -> None:
        self.streams = parse_stream_list(self.streams)  # canonical names; ValueError on a bad one
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        if not self.methods:
            raise ValueError("no method given; expected e.g. --methods source,dmc.")
        if self.setting not in SETTINGS:
            raise ValueError(f"--protocol must be one of {', '.join(SETTINGS)}; found {self.setting!r}.")
        if CLEAN in self.corruptions:
            raise ValueError(f"'{CLEAN}' is not a corruption here: clean cells always run.")
        bad = [s for s in self.severities if not 1 <= s <= 5]
        if bad:
            raise ValueError(f"severities must lie in 1..5 (clean is always run); found {bad}.")
        bad = [b for b in self.batch_sizes if b < 1]
        if not self.batch_sizes or bad:
            raise ValueError(f"batch sizes must be positive integers; found {self.batch_sizes}.")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be non-negative integers; found {self.seeds}.")
        if not self.streams or len(set(self.streams)) != len(self.streams):
            raise ValueError(f"streams must be distinct names, at least one; found {self.streams}.")
        parse_stream_list(self.streams)  # a bad name raises, saying what is expected
        if self.all_seeds_at is not None:
            bad = [s for s in self.all_seeds_at if not 0 <= s <= 5]
            if bad:
                raise ValueError(f"--all-seeds-at takes severities 0..5 (0 = clean); found {bad}.")
        if self.n_test is not None and self.n_test < 1:
            raise ValueError(f"n_test must be a positive integer; found {self.n_test}.")
        if self.fit_images is not None and self.fit_images < 1:
            raise ValueError(f"fit_images must be a positive integer; found {self.fit_images}.")
        if self.fit_levels < 2:
            raise ValueError(f"fit_levels must be at least 2; found {self.fit_levels}.")
        if self.gen_seed < 0:
            raise ValueError(f"gen_seed must be a non-negative integer; found {self.gen_seed}.")

    # -- cells ------------------------------------------------------------------------------------
    def seeds_for(self, severity: int) -> list[int]:
        """The stream seeds of a severity (0 = clean)."""
        if self.all_seeds_at is None or severity in self.all_seeds_at:
            return list(self.seeds)
        return [self.seeds[0]]

    def units(self) -> list[Unit]:
        """The work of the run, in execution order: clean first, then by corruption and severity.

        Episodic: one unit per cell. Continual and mixed: one unit per ``(method, severity, batch,
        seed, stream)``. Within a data set (corruption, severity) the order is stream, seed, batch size,
        method, so every corrupted set is loaded once.
        """
        out: list[Unit] = []

        def add(corruptions: tuple[str, ...], severity: int, mixed: bool = False) -> None:
            for stream in self.streams:
                for seed in self.seeds_for(severity):
                    for bs in self.batch_sizes:
                        for m in self.methods:
                            out.append(Unit(m, corruptions, severity, bs, seed, stream, mixed))

        if self.clean:
            add((CLEAN,), 0)
        if self.setting != "episodic":
            for s in self.severities:
                add(tuple(self.corruptions), s, mixed=self.setting == "mixed")
        else:
            for c in self.corruptions:
                for s in self.severities:
                    add((c,), s)
        return out

    def cells(self) -> list[Cell]:
        """Every cell of the run, in execution order."""
        return [cell for unit in self.units() for cell in unit.cells()]

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``from_dict`` inverts it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Protocol:
        """Rebuild from :meth:`to_dict`; unknown keys raise ``ValueError``; missing ones take defaults.

        A dict written before a field existed loads with that field's default (``streams``:
        ``["iid"]``, the order those runs used); the old ``continual`` bool becomes ``setting``.
        """
        data = dict(data)
        if "continual" in data and "setting" not in data:
            data["setting"] = "continual" if data.pop("continual") else "episodic"
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown protocol field(s) {unknown}; expected {sorted(names)}.")
        return cls(**data)

    def result_identity(self) -> dict[str, Any]:
        """The fields that change the value of a cell (not which cells run).

        Two runs may share a results folder (``--resume``) only if these agree. ``streams`` is not
        one: the stream is part of every cell's key, so adding one adds cells.
        """
        ident = {
            "model": self.model,
            "data": self.data,
            "clean_data": self.clean_data,
            "fit_data": self.fit_data,
            "image_ids": self.image_ids,
            "n_test": self.n_test,
            "setting": self.setting,
            "gen_seed": self.gen_seed,
            "fit_images": self.fit_images,
            "fit_levels": self.fit_levels,
            "fit_seed": self.fit_seed,
            "method_options": self.method_options,
        }
        if self.setting != "episodic":  # a cell depends on the other corruptions of its stream
            ident["corruptions"] = list(self.corruptions)
        return ident

    def command_args(self) -> list[str]:
        """The ``dmc bench`` flags that reproduce this protocol explicitly (no ``--quick``)."""
        args = [
            "--methods", ",".join(self.methods),
            "--corruptions", ",".join(self.corruptions),
            "--severities", ",".join(map(str, self.severities)),
            "--batch-size", ",".join(map(str, self.batch_sizes)),
            "--seeds", ",".join(map(str, self.seeds)),
            "--gen-seed", str(self.gen_seed),
            "--fit-levels", str(self.fit_levels),
        ]  # fmt: skip
        if self.streams != [IID]:
            args += ["--streams", ",".join(self.streams)]
        if self.all_seeds_at is not None:
            args += ["--all-seeds-at", ",".join(map(str, self.all_seeds_at))]
        if self.n_test is not None:
            args += ["--n-test", str(self.n_test)]
        if self.fit_images is not None:
            args += ["--fit-images", str(self.fit_images)]
        if self.setting != "episodic":
            args += ["--protocol", self.setting]
        if self.model is not None:
            args += ["--model", self.model]
        for flag, value in (("--data", self.data), ("--clean-data", self.clean_data),
                            ("--fit-data", self.fit_data), ("--image-ids", self.image_ids)):
            if value is not None:
                args += [flag, value]
        return args


def pending(units: Iterable[Unit], done: set[Cell]) -> list[Unit]:
    """The units with at least one cell not in ``done``."""
    return [u for u in units if any(c not in done for c in u.cells())]
