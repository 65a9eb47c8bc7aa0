"""Run a :class:`~torch_dmc.bench.protocol.Protocol`: fit stats, stream every cell, write.

The results folder:

- ``results.csv``: one row per finished cell, appended and flushed as soon as the cell is done
  (schema in :mod:`torch_dmc.bench.metrics`); ``--resume`` skips the cells it already holds;
- ``timings.csv``: seconds per cell (not deterministic, hence apart);
- ``config.json``: the protocol, the methods' definitions and resolved options, data, model and
  stats checksums, package versions, git commit, machine and wall time of every session;
- ``stats.safetensors``: the DMC reference statistics (reused by ``--resume``);
- ``report.md`` and the PNG plots, written by :func:`finish` from ``results.csv``.

Every method is built afresh from the model for every unit of work, which is a reset (and also
restarts the random generator of DMC's grid mode, so a cell's value does not depend on which cells
ran before it in the process: a resumed run gives the same rows as an uninterrupted one).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import shlex
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import methods as methods_mod
from ..data import arrays, corruptions
from ..sites import model_device as _model_device
from . import provenance
from .inputs import ResolvedModel, check_model_fits, resolve_data, resolve_model
from .metrics import COLUMNS, TIMING_COLUMNS, ResultsWriter, done_cells, error_percent, read_results
from .protocol import CLEAN, Protocol, Unit, pending
from .streams import IID, stream_order

__all__ = [
    "PROTOCOL_NOTES",
    "ResolvedModel",
    "resolve_model",
    "resolve_data",
    "check_model_fits",
    "fit_stats",
    "check_per_sample",
    "obtain_stats",
    "stream_errors",
    "run_benchmark",
    "write_json",
]

#: How to read the numbers; copied into ``config.json``.
PROTOCOL_NOTES: dict[str, str] = {
    "error": "top-1 error in % of the cell's n images (argmax of the logits vs the label)",
    "images": "the first n_test test images; a corrupted image is a pure function of "
    "(gen_seed, corruption, severity, index), so every method and seed sees the same images",
    "stream": "the order of the images; batches are consecutive slices of it, the last one "
    "smaller. 'iid': a seed permutes the images (torch.randperm with a torch.Generator seeded with "
    "the seed). 'label-shift-<alpha>': the same images with the classes in a Dirichlet(alpha) "
    "mixture over time (NOTE, RoTTA): with numpy.random.default_rng(seed), every class's shuffled "
    "images are split over as many time slots as classes by proportions drawn from "
    "Dirichlet(alpha * 1), and the slots follow each other in time, the class pieces of a slot in "
    "a random order, each piece contiguous (torch_dmc.bench.streams.label_shift_order); small "
    "alpha: long runs of one class. The stream is part of every cell's key; means never mix streams",
    "episodic": "a fresh method (the model reset) for every (method, corruption, severity, "
    "batch_size, seed, stream) cell",
    "continual": "for every (method, severity, batch_size, seed, stream): one stream through all "
    "corruptions in the listed order without reset; a corruption's images form their own batches, "
    "ordered by the stream within the segment, and its segment of the stream is one cell; clean "
    "cells stay episodic",
    "clean": "corruption 'clean', severity 0: the test images unchanged; always run",
    "means": "seeds averaged first per cell, then corruptions, then severities (all unweighted)",
    "fit": "DMC reference statistics fitted with torch_dmc.fit(sites='norm') on fit_images "
    "training images (all, or a random subset drawn with fit_seed), batches of 500",
    "inference": "every method runs under torch.inference_mode except those with an optimizer "
    "(tent), which compute gradients themselves",
}


def _array_digest(*xs: np.ndarray) -> str:
    h = hashlib.sha256()
    for x in xs:
        h.update(f"{x.dtype.str}{tuple(x.shape)}".encode())
        h.update(np.ascontiguousarray(x).data)
    return h.hexdigest()


# -- stats --
def fit_subset(n_train: int, fit_images: int | None, seed: int) -> np.ndarray:
    """Indices of the training images used for the fit (sorted; all when ``fit_images`` is None)."""
    if fit_images is None or fit_images >= n_train:
        return np.arange(n_train)
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n_train)[:fit_images])


def fit_stats(model: nn.Module, data: arrays.ImageData, protocol: Protocol, *, progress: bool = True,
              per_sample: bool = False):
    """Fit DMC reference statistics on the protocol's training images (``per_sample``: also the
    per-sample reference, see ``torch_dmc.fit``)."""
    from .. import fit

    idx = fit_subset(len(data.x_train), protocol.fit_images, protocol.fit_seed)
    chunks = [idx[s : s + 500] for s in range(0, len(idx), 500)]
    # a list of lazily converted batches: float tensors one chunk at a time, and a length for
    # fit's progress bar
    stream = _Lazy(lambda rows: arrays.to_tensor(data.x_train[rows]), chunks)
    return fit(model, stream, levels=protocol.fit_levels, progress=progress, seed=protocol.fit_seed,
               per_sample=per_sample)


class _Lazy:
    """``fn(item)`` for each item, computed when iterated; ``len`` is the number of items."""

    def __init__(self, fn: Callable, items: list) -> None:
        self.fn, self.items = fn, items

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return (self.fn(item) for item in self.items)


def check_per_sample(stats, where: str, needed: bool) -> None:
    """Raise if ``needed`` and ``stats`` (read from ``where``) hold no per-sample reference."""
    if needed and not stats.per_sample:
        raise ValueError(
            f"the stats in {where} have no per-sample reference, which the per-sample estimate "
            "(dmc-per-sample) needs; fit a file with it (`dmc fit --per-sample --out FILE`, or "
            "torch_dmc.fit(..., per_sample=True)) and pass it with --stats, or delete the file "
            "so that it is fitted again"
        )


def obtain_stats(
    model: nn.Module,
    data: arrays.ImageData,
    protocol: Protocol,
    path: Path,
    *,
    reuse: bool,
    progress: bool = True,
    log: Callable[[str], None] = print,
    per_sample: bool = False,
):
    """Load ``path`` if ``reuse`` and it exists (checked against the model); else fit, save.

    ``per_sample``: the stats must hold the per-sample reference (fitted if so; a reused file
    without it raises ``ValueError``).
    """
    from .. import ReferenceStats

    if reuse and path.is_file():
        stats = ReferenceStats.load(path, model=model)
        check_per_sample(stats, str(path), per_sample)
        log(f"reusing DMC stats {path} ({len(stats.sites)} sites, K={stats.levels})")
        return stats
    n = len(fit_subset(len(data.x_train), protocol.fit_images, protocol.fit_seed))
    what = " with the per-sample reference" if per_sample else ""
    log(f"fitting DMC stats{what} on {n} training images (K={protocol.fit_levels}) -> {path}")
    stats = fit_stats(model, data, protocol, progress=progress, per_sample=per_sample)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    return stats


# -- evaluation --
def stream_errors(
    method: nn.Module,
    segments: Iterable[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    seed: int,
    *,
    stream: str = IID,
    channels_last: bool = False,
) -> list[tuple[int, int, float]]:
    """Run ``method`` over consecutive segments of one stream, without reset.

    Args:
        method: a built method (``forward`` adapts and predicts).
        segments: ``(x, y)`` per segment: ``x`` float ``N×C×H×W``, ``y`` int64 ``N``.
        batch_size: images per batch; batches never span two segments.
        seed: the stream order's seed (each segment is ordered with it).
        stream: ``iid`` (each segment permuted by ``torch.randperm`` seeded with ``seed``) or
            ``label-shift-<alpha>`` (each segment ordered by
            :func:`~torch_dmc.bench.streams.label_shift_order` of its labels).
        channels_last: pass the batches in channels-last memory layout (for a model converted
            with ``.to(memory_format=torch.channels_last)``; same values, faster CPU convolutions).

    Returns:
        ``(n, n_wrong, seconds)`` per segment.
    """
    needs_grad = getattr(method, "optimizer", None) is not None
    device = _model_device(method)
    out = []
    for x, y in segments:
        t0 = time.perf_counter()
        wrong = torch.zeros((), dtype=torch.int64, device=device)
        ctx = contextlib.nullcontext() if needs_grad else torch.inference_mode()
        with ctx:
            for xb, yb in _stream_batches(x, y, batch_size, seed, stream):
                xb, yb = xb.to(device), yb.to(device)
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                logits = method(xb)
                wrong += (logits.detach().argmax(1) != yb).sum()
        out.append((len(y), int(wrong), time.perf_counter() - t0))
    return out


def _stream_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, stream: str):
    """``(x, y)`` batches of one segment in the order of ``stream`` (iid: the order of
    ``arrays.batches(..., shuffle=True, seed=seed)``, as every result before streams existed)."""
    order = stream_order(stream, y, seed)
    return ((x[b], y[b]) for b in order.split(batch_size))


class _Images:
    """The test images of each (corruption, severity), as ``uint8`` arrays kept while needed."""

    def __init__(
        self, x: np.ndarray, y: np.ndarray, protocol: Protocol, cache, workers: int, progress: bool
    ) -> None:
        self.x, self.y = x, torch.from_numpy(np.ascontiguousarray(y))
        self.protocol, self.cache = protocol, cache
        self.workers, self.progress = workers, progress
        self._memo: dict[tuple[str, int], np.ndarray] = {}

    def load(self, corruption: str, severity: int) -> np.ndarray:
        """The ``uint8`` images of one set: the clean ones, or the corrupted ones (cached on disk)."""
        if corruption == CLEAN:
            return self.x
        return self.cache.get(
            self.x,
            corruption,
            severity,
            seed=self.protocol.gen_seed,
            workers=self.workers,
            progress=self.progress,
        )

    def segments(self, corruptions: tuple[str, ...], severity: int):
        """``(x, y)`` float tensors per corruption, lazily; drops every other memoised set."""
        keys = [(c, severity) for c in corruptions]
        for k in list(self._memo):
            if k not in keys:
                del self._memo[k]
        for key in keys:
            if key not in self._memo:
                self._memo[key] = self.load(*key)
        # float tensors one segment at a time (a continual stream holds 15 sets)
        return ((arrays.to_tensor(self._memo[k]), self.y) for k in keys)


# -- config.json --
def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def channels_last_unsafe(model: nn.Module) -> bool:
    """Whether the model has a GroupNorm layer: torch 2.13's CPU GroupNorm backward crashes
    (segmentation fault) on a channels-last input that does not require gradients — tent's case —
    so ``--channels-last auto`` keeps such models in their own layout."""
    return any(isinstance(m, nn.GroupNorm) for m in model.modules())


def check_methods_apply(protocol: Protocol, model: nn.Module) -> None:
    """Refuse, before any fit or cell, a method that does not apply to ``model``.

    Asks each method's class (``Method.applies_to``, with the protocol's options for it): e.g.
    ``bn``, ``bn-prior`` and ``bn-ema`` on a model with no BatchNorm layer. Unknown names are left
    to :func:`_method_info`.

    Raises:
        ValueError: one line, the first refused method's reason, naming any others refused.
    """
    refused = []
    for name in protocol.methods:
        cls = methods_mod.METHODS.get(name)
        reason = cls.applies_to(model, protocol.method_options.get(name)) if cls else None
        if reason is not None:
            refused.append((name, reason))
    if refused:
        others = [n for n, _ in refused[1:]]
        also = f" Also not applicable: {', '.join(others)}." if others else ""
        them = "them" if others else "it"
        raise ValueError(f"{refused[0][1]}{also} Leave {them} out of the methods to run.")


def _method_info(protocol: Protocol, model: nn.Module, stats) -> dict[str, dict]:
    """Build every method once (fails fast on bad options); its definition and resolved options."""
    known = methods_mod.available()
    unknown = [m for m in protocol.methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; expected some of: {', '.join(known)}.")
    info = {}
    for name in protocol.methods:
        method = methods_mod.build(name, model, stats=stats, **protocol.method_options.get(name, {}))
        info[name] = {
            "definition": type(method).definition,
            "options": method.options(),
            "class": f"{type(method).__module__}.{type(method).__qualname__}",
        }
        del method
    return info


def _needs_stats(protocol: Protocol) -> bool:
    return any(getattr(methods_mod.METHODS.get(m), "needs_stats", False) for m in protocol.methods)


def _needs_per_sample(protocol: Protocol) -> bool:
    return any(methods_mod.needs_per_sample(m, protocol.method_options.get(m))
               for m in protocol.methods)


# -- the run --
def run_benchmark(
    protocol: Protocol,
    out: str | os.PathLike,
    *,
    model: ResolvedModel | nn.Module,
    data: arrays.ImageData,
    resume: bool = False,
    stats_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 2,
    progress: bool = True,
    device: str | torch.device | None = None,
    jobs: int = 1,
    channels_last: bool | None = None,
    command: str | None = None,
    extra_config: dict | None = None,
    plots: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every pending cell of ``protocol`` and write the results folder ``out``.

    Args:
        protocol: what to run.
        out: the results folder (created).
        model: the classifier (a :class:`ResolvedModel` carries its file checksums).
        data: the data set; test cells use its first ``protocol.n_test`` test images.
        resume: continue a folder: skip cells already in ``results.csv`` and reuse
            ``stats.safetensors``. Refused if the folder's protocol would give other values.
            Without it, a folder that already holds results is refused.
        stats_path: use these reference statistics (a file written by ``ReferenceStats.save``)
            instead of fitting; default: fit, save as ``out/stats.safetensors``.
        cache_dir: corruption cache (default: ``DMC_CACHE_DIR`` or ``~/.cache/torch_dmc``).
        workers: processes generating corruptions.
        progress: progress bars.
        device: where the model runs (default: where it is); results do not depend on it beyond
            floating-point rounding.
        jobs: cells run in this many CPU processes at once, each with ``torch.get_num_threads()
            // jobs`` threads (small models use two 1-thread processes better than one 2-thread
            process). The corrupted sets are generated first. Results do not depend on it; rows
            are appended in the order cells finish.
        channels_last: run a copy of the model in channels-last memory layout (faster CPU
            convolutions, same values up to rounding). Default: on a CPU, for 4-D image inputs.
        command: the command line recorded at the top of the report.
        extra_config: more entries for ``config.json`` (e.g. the method config file used).
        plots: write the PNG plots (``report.md`` is always written).
        log: where to print one-line messages.

    Returns:
        The ``config.json`` content.
    """
    from .report import finish

    t_start = time.perf_counter()
    started = _now()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path, config_path = out / "results.csv", out / "config.json"
    if isinstance(model, ResolvedModel):
        resolved = model
    else:
        resolved = ResolvedModel(model, "object", {})
    net = resolved.model
    net.eval()
    check_model_fits(net, data)
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, found {jobs}")
    if device is not None:
        net.to(device)
    on_cpu = _model_device(net).type == "cpu"
    if jobs > 1 and not on_cpu:
        raise ValueError(
            f"jobs={jobs} runs cells in parallel CPU processes, but the model is on "
            f"{_model_device(net)}; use one job on an accelerator."
        )
    if channels_last is None:
        channels_last = on_cpu and data.x_test.ndim in (3, 4) and not channels_last_unsafe(net)
    elif channels_last and channels_last_unsafe(net):
        raise ValueError(
            "--channels-last on: the model has GroupNorm layers, and torch's CPU GroupNorm backward "
            "crashes (segmentation fault) on channels-last inputs, which a method with gradients "
            "(tent) runs; use --channels-last off or auto")
    if channels_last:  # a copy: the caller's model keeps its layout
        net = copy.deepcopy(net).to(memory_format=torch.channels_last)

    previous = None
    if results_path.is_file() and read_results(results_path):
        if not resume:
            raise FileExistsError(
                f"{out} already holds results; pass --resume to continue it, or choose another --out."
            )
    if resume and config_path.is_file():
        previous = json.loads(config_path.read_text())
        old = Protocol.from_dict(previous["protocol"]).result_identity()
        new = protocol.result_identity()
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            details = "; ".join(f"{k}: folder has {old.get(k)!r}, now {new.get(k)!r}" for k in diff)
            raise ValueError(
                f"--resume {out}: the folder's protocol differs in what changes results "
                f"({details}). "
                f"Use another --out, or the same options."
            )
    model_info = resolved.describe()
    if previous and "spec" in previous.get("model", {}):
        _check_same_model(out, previous["model"], model_info)

    check_methods_apply(protocol, net)  # before any fit: e.g. bn on a model with no BatchNorm
    # statistics (only for methods that need them)
    stats, stats_info = None, None
    if _needs_stats(protocol):
        if stats_path is not None:
            from .. import ReferenceStats

            stats = ReferenceStats.load(stats_path, model=net)
            where = str(stats_path)
            check_per_sample(stats, where, _needs_per_sample(protocol))
        else:
            where = str(out / "stats.safetensors")
            stats = obtain_stats(
                net,
                data,
                protocol,
                out / "stats.safetensors",
                reuse=resume,
                progress=progress,
                log=log,
                per_sample=_needs_per_sample(protocol),
            )
        stats_info = {
            "path": where,
            "checksum": stats.checksum(),
            "levels": stats.levels,
            "sites": stats.sites,
            "fit_info": stats.info,
        }
        if previous and previous.get("stats") and previous["stats"]["checksum"] != stats_info["checksum"]:
            raise ValueError(
                f"--resume {out}: the stats now used ({where}) differ from the ones the folder's "
                f"results were computed with; use the same stats or another --out."
            )

    method_info = _method_info(protocol, net, stats)
    n_test = len(data.x_test) if protocol.n_test is None else min(protocol.n_test, len(data.x_test))
    x_test, y_test = data.x_test[:n_test], data.y_test[:n_test]
    config: dict[str, Any] = {
        "tool": "dmc bench",
        "command": command if command is not None else provenance.command_line(),
        "explicit_command": "dmc bench " + shlex.join(
            protocol.command_args() + (resolved.spec.extra_flags() if resolved.spec else [])
        ),
        "protocol": protocol.to_dict(),
        "protocol_notes": PROTOCOL_NOTES,
        "data": {
            "name": data.name,
            "path": protocol.data,
            "file_sha256": provenance.sha256_file(protocol.data) if protocol.data else None,
            "n_train": len(data.x_train),
            "n_test": n_test,
            "image_shape": list(data.x_test.shape[1:]),
            "num_classes": data.num_classes,
            "test_sha256": _array_digest(x_test, y_test),
        },
        "corruptions": corruptions.protocol_info(),
        "model": model_info,
        "stats": stats_info,
        "methods": method_info,
        "versions": provenance.package_versions(),
        "git": provenance.git_commit(),
        "machine": provenance.machine(),
        "sessions": list(previous.get("sessions", [])) if previous else [],
        "execution": {"jobs": jobs, "channels_last": bool(channels_last), "device": str(_model_device(net))},
    }
    if extra_config:
        config.update(extra_config)
    session = {
        "started": started,
        "finished": None,
        "wall_s": None,
        "cells_computed": 0,
        "command": config["command"],
    }
    config["sessions"].append(session)
    write_json(config_path, config)

    # the work
    done = done_cells(read_results(results_path))
    units = pending(protocol.units(), done)
    total_cells = sum(sum(c not in done for c in u.cells()) for u in units)
    skipped = len(protocol.cells()) - total_cells
    if skipped:
        log(f"resuming: {skipped} cell(s) already in {results_path}, {total_cells} to run")
    images = _Images(x_test, y_test, protocol, corruptions.CorruptionCache(cache_dir), workers, progress)
    from tqdm.auto import tqdm

    if jobs > 1:
        _generate_all(units, images, log)
    bar = tqdm(total=total_cells, desc="bench", unit="cell", disable=not progress)
    try:
        with (
            ResultsWriter(results_path, COLUMNS) as writer,
            ResultsWriter(out / "timings.csv", TIMING_COLUMNS) as timer,
        ):
            def record(unit: Unit, results) -> None:
                session["cells_computed"] += _write_unit(unit, results, done, writer, timer, bar)

            if jobs == 1:
                for unit in units:
                    _show(bar, unit)
                    record(unit, _evaluate_unit(unit, protocol, net, stats, images, channels_last))
            else:
                state = {"protocol": protocol, "net": net, "stats": stats, "x": x_test, "y": y_test,
                         "cache_dir": cache_dir, "channels_last": channels_last}
                threads = max(1, torch.get_num_threads() // jobs)
                _run_parallel(units, state, jobs, threads, record)
    finally:
        bar.close()
        session["finished"] = _now()
        session["wall_s"] = round(time.perf_counter() - t_start, 2)
        config["wall_s"] = round(sum(s.get("wall_s") or 0 for s in config["sessions"]), 2)
        write_json(config_path, config)
    finish(out, config, plots=plots, log=log)
    return config


def _check_same_model(out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse to resume ``out`` with another model: spec, weights, preprocessing or files."""
    keys = ("spec", "weights", "preprocess", "files_sha256")
    diff = [k for k in keys if old.get(k) != new.get(k)]
    if diff:
        details = "; ".join(f"{k}: folder has {old.get(k)!r}, now {new.get(k)!r}" for k in diff)
        raise ValueError(f"--resume {out}: the folder's results are of another model ({details}). "
                         "Use another --out, or the same model flags.")


def _show(bar, unit: Unit) -> None:
    bar.set_postfix_str(
        f"{unit.method} {unit.corruption}-{unit.severity} b{unit.batch_size} s{unit.seed}"
        + ("" if unit.stream == IID else f" {unit.stream}"),
        refresh=False,
    )


def _evaluate_unit(
    unit: Unit, protocol: Protocol, net: nn.Module, stats, images: _Images, channels_last: bool
) -> list[tuple[int, int, float]]:
    """Run one unit with a freshly built method: ``(n, n_wrong, seconds)`` per cell."""
    segments = images.segments(unit.corruptions, unit.severity)
    torch.manual_seed(0)
    method = methods_mod.build(unit.method, net, stats=stats, **protocol.method_options.get(unit.method, {}))
    return stream_errors(
        method, segments, unit.batch_size, unit.seed, stream=unit.stream, channels_last=channels_last
    )


def _write_unit(
    unit: Unit, results, done: set, writer: ResultsWriter, timer: ResultsWriter, bar
) -> int:
    """Write a unit's cells that are not done yet; return how many."""
    written = 0
    for cell, (n, wrong, seconds) in zip(unit.cells(), results, strict=False):
        if cell in done:
            continue
        key = dataclasses.asdict(cell)
        writer.write({**key, "n": n, "n_wrong": wrong, "error": f"{error_percent(wrong, n):.4f}"})
        timer.write({**key, "seconds": f"{seconds:.3f}"})
        done.add(cell)
        written += 1
        bar.update(1)
    return written


def _generate_all(units: list[Unit], images: _Images, log: Callable[[str], None]) -> None:
    """Generate (or find cached) every corrupted set the units need, before the parallel run."""
    keys = sorted({(c, u.severity) for u in units for c in u.corruptions if c != CLEAN})
    if keys:
        log(f"making sure {len(keys)} corrupted set(s) are cached")
    for corruption, severity in keys:
        images.load(corruption, severity)


_WORKER: dict[str, Any] = {}


def _init_worker(state: dict[str, Any], threads: int) -> None:
    """Set up a ``--jobs`` process: its threads, the model, stats and (cached) test images."""
    torch.set_num_threads(threads)
    _WORKER.update(state)
    cache = corruptions.CorruptionCache(state["cache_dir"])
    _WORKER["images"] = _Images(state["x"], state["y"], state["protocol"], cache, 1, False)


def _worker_unit(unit: Unit) -> list[tuple[int, int, float]]:
    w = _WORKER
    return _evaluate_unit(unit, w["protocol"], w["net"], w["stats"], w["images"], w["channels_last"])


def _run_parallel(
    units: list[Unit], state: dict[str, Any], jobs: int, threads: int, record: Callable
) -> None:
    """Evaluate units in ``jobs`` spawned processes; ``record(unit, results)`` as each finishes."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pool = ProcessPoolExecutor(
        jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(state, threads)
    )
    try:
        pending_futures = {pool.submit(_worker_unit, unit): unit for unit in units}
        while pending_futures:
            finished, _ = wait(pending_futures, return_when=FIRST_COMPLETED)
            for future in finished:
                record(pending_futures.pop(future), future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
