"""``dmc tune``: choose DMC's options on the validation corruptions only.

A small, explicit grid (:class:`TuneGrid`) over which sites are corrected, the strength λ, the mode
and ``adapt_bn`` is evaluated episodically (a fresh method per cell, stream seed ``seed``) on the
first ``n_test`` test images under the 4 validation corruptions (speckle_noise, gaussian_blur,
spatter, saturate) at the given severities. The candidate with the lowest mean error over those
cells wins (ties: the earlier candidate in grid order). The 15 test corruptions are refused
(:class:`TuneProtocol` raises), so test data cannot leak into the choice.

The output JSON holds ``{"methods": {"dmc": <chosen options>}}``, which
``dmc bench --method-config`` reads, plus every candidate's errors, the grid, the protocol and
the provenance.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import methods as methods_mod
from ..data import arrays, corruptions
from ..options import DMCOptions
from . import provenance
from .config import write_json
from .datasets import BenchData, bench_data_from_arrays, open_bench_data
from .evaluate import OpenSets, stream_errors
from .fitting import obtain_stats
from .protocol import Protocol

__all__ = [
    "TuneGrid",
    "TuneProtocol",
    "resolve_site_set",
    "candidates",
    "default_stats_path",
    "tune",
    "load_method_config",
]

#: The methods ``dmc tune`` can tune.
TUNABLE: tuple[str, ...] = ("dmc", "dmc-prior", "dmc-ema", "dmc-per-sample")

#: Site-set tokens: ``all``, ``all-but-last``, ``first-half``, ``first:K``, ``last:K``,
#: ``pattern:<fnmatch>``.
SITE_SET_HELP = (
    "all | all-but-last | first-half | first:K | last:K | pattern:<fnmatch pattern over site names>"
)


@dataclass
class TuneGrid:
    """The candidates: the product of these lists, in this order (site set varies slowest).

    The default has 8 candidates. With the default :class:`TuneProtocol` (8 validation cells of
    2000 images) and the 60k-image fit, one run took 24 min on 2 CPU cores shared with other jobs
    (load 3–5): fit 3.3 min, baselines 1.8 min, about 2.3 min per candidate (grid mode). A larger
    search, e.g. ``site_sets=["all", "all-but-last", "first-half"], strengths=[0.5, 0.75, 1.0],
    modes=["grid", "exact"]`` (36 candidates), takes several times longer.

    Attributes:
        site_sets: which sites are corrected (see :func:`resolve_site_set`).
        strengths: λ values in [0, 1].
        modes: ``"grid"`` and/or ``"exact"``.
        adapt_bn: whether BatchNorm layers first use batch statistics (``bn``), then DMC.
        method: the DMC method tuned (:data:`TUNABLE`); its options go under this name.
        priors: N0 values of ``dmc-prior`` (ignored by the other methods).
        momenta: m values of ``dmc-ema`` (ignored by the other methods).
    """

    site_sets: list[str] = field(default_factory=lambda: ["all", "all-but-last"])
    strengths: list[float] = field(default_factory=lambda: [0.5, 1.0])
    modes: list[str] = field(default_factory=lambda: ["grid"])
    adapt_bn: list[bool] = field(default_factory=lambda: [False, True])
    method: str = "dmc"
    priors: list[float] = field(default_factory=lambda: [16.0])
    momenta: list[float] = field(default_factory=lambda: [0.1])

    def __post_init__(self) -> None:
        if self.method not in TUNABLE:
            raise ValueError(f"tune grid: method must be one of {', '.join(TUNABLE)}; found {self.method!r}.")
        for name in ("site_sets", "strengths", "modes", "adapt_bn", "priors", "momenta"):
            if not getattr(self, name):
                raise ValueError(f"tune grid: '{name}' is empty; give at least one value.")
        # every value is validated by the one options object that DMC itself uses
        checks = ([("priors", v, {"prior": v}) for v in self.priors]
                  + [("momenta", v, {"momentum": v}) for v in self.momenta]
                  + [("strengths", v, {"strength": v}) for v in self.strengths]
                  + [("modes", v, {"mode": v}) for v in self.modes])
        for name, value, option in checks:
            try:
                DMCOptions(**option)
            except ValueError as err:
                raise ValueError(f"tune grid: {name} value {value!r} is invalid: {err}.") from None
        bad = [b for b in self.adapt_bn if not isinstance(b, bool)]
        if bad:
            raise ValueError(f"tune grid: adapt_bn values must be true/false; found {bad}.")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuneGrid:
        names = {"site_sets", "strengths", "modes", "adapt_bn", "method", "priors", "momenta"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"tune grid: unknown key(s) {unknown}; expected {sorted(names)}.")
        return cls(**data)

    def size(self) -> int:
        return len(self.site_sets) * len(self.strengths) * len(self.modes) * len(self.adapt_bn) * len(
            self.extra_options()
        )

    def extra_options(self) -> list[dict[str, float]]:
        """The method-specific options to cross with the others."""
        if self.method == "dmc-prior":
            return [{"prior": float(v)} for v in self.priors]
        if self.method == "dmc-ema":
            return [{"momentum": float(v)} for v in self.momenta]
        return [{}]


@dataclass
class TuneProtocol:
    """Where candidates are evaluated. Only validation corruptions are accepted.

    Attributes:
        corruptions: validation corruption names (default: all 4).
        severities: severities 1..5 (default 3 and 5).
        n_test: first test images used (default 2000).
        batch_size: test batch size (default 200).
        seed: stream seed (the order of the images).
        gen_seed: corruption generation seed.
        fit_images, fit_levels, fit_seed: the DMC reference fit (as in ``dmc bench``).
        model: the model spec (``None``: the shipped default).
        data: the test data spec (``None``: Fashion-MNIST; ``cifar10-c:DIR`` etc. hold the
            validation corruptions as files: docs/protocol.md § Data specs).
        fit_data: the spec of the reference's training images (``None``: the data's own).
    """

    corruptions: list[str] = field(default_factory=lambda: list(corruptions.VALIDATION_CORRUPTIONS))
    severities: list[int] = field(default_factory=lambda: [3, 5])
    n_test: int = 2000
    batch_size: int = 200
    seed: int = 0
    gen_seed: int = 0
    fit_images: int | None = None
    fit_levels: int = 1024
    fit_seed: int = 0
    model: str | None = None
    data: str | None = None
    fit_data: str | None = None

    def __post_init__(self) -> None:
        names = corruptions.resolve_corruptions(self.corruptions)
        test = [c for c in names if c not in corruptions.VALIDATION_CORRUPTIONS]
        if test:
            raise ValueError(
                f"dmc tune refuses the test corruption(s) {test}: hyper-parameters may be tuned "
                f"only on the validation corruptions "
                f"{', '.join(corruptions.VALIDATION_CORRUPTIONS)}, "
                f"never on the {len(corruptions.COMMON_CORRUPTIONS)} used for evaluation."
            )
        self.corruptions = names
        bad = [s for s in self.severities if not 1 <= s <= 5]
        if not self.severities or bad:
            raise ValueError(f"tune severities must lie in 1..5; found {self.severities}.")
        if self.n_test < 1 or self.batch_size < 1:
            raise ValueError(
                f"n_test and batch_size must be positive; found {self.n_test}, {self.batch_size}."
            )

    def as_bench(self) -> Protocol:
        """The same images and fit as a bench protocol (used for data handling and the fit)."""
        return Protocol(
            methods=["dmc"],
            corruptions=list(self.corruptions),
            severities=list(self.severities),
            batch_sizes=[self.batch_size],
            seeds=[self.seed],
            n_test=self.n_test,
            gen_seed=self.gen_seed,
            fit_images=self.fit_images,
            fit_levels=self.fit_levels,
            fit_seed=self.fit_seed,
            model=self.model,
            data=self.data,
            fit_data=self.fit_data,
        )


def resolve_site_set(token: str, sites: Sequence[str]) -> list[str] | None:
    """The site names a site-set token selects; ``None`` means all (DMC's default).

    Args:
        token: ``all``, ``all-but-last``, ``first-half`` (the first ⌈n/2⌉), ``first:K``, ``last:K``
            or ``pattern:<fnmatch>``.
        sites: the stats' sites in model order.

    Raises:
        ValueError: an unknown token, or one that selects no site.
    """
    t = token.strip()
    n = len(sites)
    if t == "all":
        return None
    if t == "all-but-last":
        chosen = list(sites[:-1])
    elif t == "first-half":
        chosen = list(sites[: math.ceil(n / 2)])
    elif t.startswith(("first:", "last:")):
        kind, _, k = t.partition(":")
        try:
            k = int(k)
        except ValueError:
            raise ValueError(f"site set {token!r}: expected {kind}:K with an integer K.") from None
        chosen = list(sites[:k]) if kind == "first" else list(sites[max(0, n - k) :])
    elif t.startswith("pattern:"):
        pat = t.partition(":")[2]
        chosen = [s for s in sites if fnmatch.fnmatchcase(s, pat)]
    else:
        raise ValueError(f"unknown site set {token!r}; expected one of: {SITE_SET_HELP}.")
    if not chosen:
        raise ValueError(f"site set {token!r} selects none of the {n} sites ({', '.join(sites)}).")
    return chosen


def candidates(grid: TuneGrid, sites: Sequence[str]) -> list[dict[str, Any]]:
    """Every candidate: ``{"site_set": token, "options": {...}}`` (options for ``methods.build``).

    Site sets that select the same sites are evaluated once (the first token is kept).
    """
    out, seen = [], set()
    for token, lam, mode, adapt, extra in itertools.product(
        grid.site_sets, grid.strengths, grid.modes, grid.adapt_bn, grid.extra_options()
    ):
        chosen = resolve_site_set(token, sites)
        if chosen is not None and list(chosen) == list(sites):
            chosen = None
        options: dict[str, Any] = {"mode": mode, "strength": float(lam), "adapt_bn": bool(adapt), **extra}
        if chosen is not None:
            options["sites"] = chosen
        key = (tuple(chosen) if chosen is not None else None, float(lam), mode, bool(adapt),
               tuple(extra.items()))
        if key in seen:
            continue
        seen.add(key)
        out.append({"site_set": token, "options": options})
    return out


def default_stats_path(out: str | Path) -> Path:
    """Where :func:`tune` saves the stats it fits when given no ``stats_path``: next to ``out``,
    ``<out without .json>.stats.safetensors``."""
    out = Path(out)
    return out.with_name(out.stem + ".stats.safetensors")


def tune(
    protocol: TuneProtocol,
    grid: TuneGrid,
    out: str | Path,
    *,
    model: nn.Module,
    data: arrays.ImageData | BenchData | None = None,
    model_files: dict[str, str] | None = None,
    model_info: dict[str, Any] | None = None,
    stats_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    workers: int = 2,
    progress: bool = True,
    command: str | None = None,
    baselines: Sequence[str] = ("source", "bn"),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate the grid on the validation cells and write the choice to ``out`` (JSON).

    Args:
        protocol: the validation cells (only validation corruptions).
        grid: the candidates.
        out: the JSON file to write.
        model: the classifier.
        data: the images: an in-memory data set (corruptions generated), a
            :class:`~torch_dmc.bench.datasets.BenchData`, or ``None``: opened from the protocol's
            ``data`` and ``fit_data`` specs.
        model_files: file name → SHA-256 of the model's files (provenance).
        model_info: the ``model`` entry to record (spec, weights, preprocessing, checksums; see
            ``torch_dmc.bench.inputs.ResolvedModel.describe``); default: ``model_files`` alone.
        stats_path: reference statistics to load if the file exists; otherwise they are fitted and
            saved there. Default: :func:`default_stats_path` (always refitted).
        cache_dir, workers, progress: as for ``dmc bench``.
        command: the command line to record.
        baselines: methods also evaluated on the same cells, for reference (not candidates).
        log: one-line messages.

    Returns:
        The JSON content written.
    """
    from tqdm.auto import tqdm

    unknown = [b for b in baselines if b not in methods_mod.available()]
    if unknown:
        raise ValueError(f"unknown baseline method(s) {unknown}; expected some of {methods_mod.available()}.")
    t0 = time.perf_counter()
    out = Path(out)
    bench_protocol = protocol.as_bench()
    model.eval()
    spath = Path(stats_path) if stats_path is not None else default_stats_path(out)
    if isinstance(data, BenchData):
        bench_data = data
    elif data is not None:
        bench_data = bench_data_from_arrays(data, spec=protocol.data, n_test=protocol.n_test,
                                            gen_seed=bench_protocol.gen_seed, cache_dir=cache_dir,
                                            workers=workers, progress=progress)
    else:
        reuse = stats_path is not None and Path(stats_path).is_file()
        bench_data = open_bench_data(data=protocol.data, fit_data=protocol.fit_data,
                                     n_test=protocol.n_test, gen_seed=protocol.gen_seed,
                                     cache_dir=cache_dir, workers=workers, progress=progress,
                                     need_fit=not reuse)
    stats = obtain_stats(
        model, bench_data.fit, spath, fit_images=bench_protocol.fit_images,
        fit_seed=bench_protocol.fit_seed, fit_levels=bench_protocol.fit_levels,
        reuse=stats_path is not None, progress=progress, log=log,
        per_sample=any(methods_mod.needs_per_sample(m) for m in (grid.method, *baselines)),
    )
    fit_s = time.perf_counter() - t0
    cands = candidates(grid, stats.sites)
    images = OpenSets(bench_data)
    n_test = len(images.segments((protocol.corruptions[0],), protocol.severities[0])[0])
    cells = [(c, s) for c in protocol.corruptions for s in protocol.severities]
    log(f"tuning {grid.method}: {len(cands)} candidates × {len(cells)} validation cells × {n_test} images")
    runs = [("baseline", name, {}) for name in baselines] + [
        ("candidate", grid.method, cand["options"]) for cand in cands
    ]
    errors: list[dict[str, float]] = [{} for _ in runs]
    seconds = [0.0 for _ in runs]
    bar = tqdm(total=len(runs) * len(cells), desc="tune", unit="cell", disable=not progress)
    try:
        for corruption, severity in cells:
            segment = images.segments((corruption,), severity)
            for k, (_, name, options) in enumerate(runs):
                torch.manual_seed(0)
                method = methods_mod.build(name, model, stats=stats, **options)
                ((n, wrong, sec),) = stream_errors(method, segment, protocol.batch_size, protocol.seed)
                seconds[k] += sec
                errors[k][f"{corruption}-{severity}"] = round(100.0 * wrong / n, 4)
                bar.update(1)
    finally:
        bar.close()

    def mean(d: dict[str, float]) -> float:
        return round(sum(d.values()) / len(d), 4)

    table = []
    for (kind, name, options), errs, sec in zip(runs, errors, seconds, strict=True):
        entry = {
            "kind": kind,
            "method": name,
            "options": options,
            "errors": errs,
            "mean": mean(errs),
            "seconds": round(sec, 2),
        }
        table.append(entry)
    for entry, cand in zip(table[len(baselines) :], cands, strict=False):
        entry["site_set"] = cand["site_set"]
    cand_rows = [e for e in table if e["kind"] == "candidate"]
    best_k = min(range(len(cand_rows)), key=lambda k: (cand_rows[k]["mean"], k))
    best = cand_rows[best_k]
    result = {
        "tool": "dmc tune",
        "methods": {grid.method: best["options"]},
        "selection": {
            "criterion": "lowest mean top-1 error (%) over the validation cells; ties: earlier "
            "candidate in grid order",
            "candidate": best_k,
            "site_set": best["site_set"],
            "mean_error": best["mean"],
        },
        "protocol": asdict(protocol),
        "grid": asdict(grid),
        "stats": {
            "path": str(spath),
            "checksum": stats.checksum(),
            "levels": stats.levels,
            "sites": stats.sites,
        },
        "model": model_info if model_info is not None else {"files_sha256": model_files or {}},
        "table": table,
        "command": command if command is not None else provenance.command_line(),
        "versions": provenance.package_versions(),
        "git": provenance.git_commit(),
        "machine": provenance.machine(),
        "fit_s": round(fit_s, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    write_json(out, result)
    log(
        f"chose {best['site_set']} {best['options']} (mean validation error {best['mean']:.2f}%); wrote {out}"
    )
    return result


def load_method_config(path: str | Path) -> dict[str, Any]:
    """Read a ``--method-config`` file: ``{"methods": {name: {option: value}}, ...}``.

    ``dmc tune`` writes such files; a hand-written one needs only the ``methods`` key.

    Returns:
        The whole JSON object (``["methods"]`` validated as a dict of dicts).

    Raises:
        ValueError: not JSON, or no ``methods`` mapping.
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--method-config {path}: no such file; write one with `dmc tune`.")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--method-config {path}: not valid JSON ({err}).") from err
    methods = content.get("methods") if isinstance(content, dict) else None
    if not isinstance(methods, dict) or not all(isinstance(v, dict) for v in methods.values()):
        raise ValueError(
            f"--method-config {path}: expected an object with a 'methods' key mapping method names "
            f'to option objects, e.g. {{"methods": {{"dmc": {{"strength": 0.75}}}}}}; '
            f"found {sorted(content) if isinstance(content, dict) else type(content).__name__}."
        )
    return content
