"""Run a :class:`~torch_dmc.bench.protocol.Protocol`: open the data, get the stats, run every
pending unit, write the results folder.

The results folder:

- ``results.csv``: one row per finished cell, appended and flushed as soon as the cell is done
  (schema in :mod:`torch_dmc.bench.metrics`); ``--resume`` skips the cells it already holds;
- ``timings.csv``: seconds per cell (not deterministic, hence apart);
- ``config.json``: the protocol, the methods' definitions and resolved options, data (specs and
  checksums of the files read), model and stats checksums, package versions, git commit, machine
  and wall time of every session (:mod:`torch_dmc.bench.config`);
- ``stats.safetensors``: the DMC reference statistics (reused by ``--resume``);
- ``report.md`` and the PNG plots, written by :func:`finish` from ``results.csv``.

The pieces: :mod:`~torch_dmc.bench.inputs` (the model), :mod:`~torch_dmc.bench.datasets` (the
data), :mod:`~torch_dmc.bench.fitting` (the reference), :mod:`~torch_dmc.bench.evaluate` (one
unit), :mod:`~torch_dmc.bench.pool` (``--jobs``), :mod:`~torch_dmc.bench.config`. Every method is
built afresh from the model for every unit of work, which is a reset (and also restarts the
random generator of DMC's grid mode, so a cell's value does not depend on which cells ran before
it in the process: a resumed run gives the same rows as an uninterrupted one).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import methods as methods_mod
from ..data import arrays, corruptions
from ..sites import model_device as _model_device
from . import dist, provenance
from .config import PROTOCOL_NOTES, check_same_model, check_same_stats, now, read_previous, write_json
from .datasets import BenchData, bench_data_from_arrays, open_bench_data
from .evaluate import OpenSets, evaluate_unit, stream_errors
from .fitting import check_per_sample, fit_subset, obtain_stats
from .inputs import ResolvedModel, check_model_fits, resolve_data, resolve_model
from .metrics import COLUMNS, TIMING_COLUMNS, ResultsWriter, done_cells, error_percent, read_results
from .protocol import CLEAN, Protocol, Unit, pending
from .streams import IID

__all__ = [
    "PROTOCOL_NOTES",
    "ResolvedModel",
    "resolve_model",
    "resolve_data",
    "check_model_fits",
    "check_per_sample",
    "obtain_stats",
    "fit_subset",
    "stream_errors",
    "run_benchmark",
    "write_json",
    "channels_last_unsafe",
    "check_methods_apply",
]


def _array_digest(*xs: np.ndarray) -> str:
    h = hashlib.sha256()
    for x in xs:
        h.update(f"{x.dtype.str}{tuple(x.shape)}".encode())
        h.update(np.ascontiguousarray(x).data)
    return h.hexdigest()


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
def _as_bench_data(data: BenchData | arrays.ImageData | None, protocol: Protocol, *,
                   cache_dir, workers: int, progress: bool, need_fit: bool) -> tuple[BenchData, dict | None]:
    """The run's data, and (when opened from the protocol's specs) how to open it again."""
    if isinstance(data, BenchData):
        return data, None
    if isinstance(data, arrays.ImageData):
        return bench_data_from_arrays(data, spec=protocol.data, n_test=protocol.n_test,
                                      gen_seed=protocol.gen_seed, cache_dir=cache_dir,
                                      workers=workers, progress=progress), None
    args = {"data": protocol.data, "clean_data": protocol.clean_data, "fit_data": protocol.fit_data,
            "image_ids": protocol.image_ids, "n_test": protocol.n_test, "gen_seed": protocol.gen_seed,
            "cache_dir": cache_dir, "workers": workers}
    return open_bench_data(**args, progress=progress, need_fit=need_fit), args


def _data_config(bench: BenchData, data: arrays.ImageData | None, protocol: Protocol) -> dict:
    """``config.json``'s ``data`` entry."""
    entry = bench.describe()
    test = bench.test
    if hasattr(test, "x"):  # generated: the arrays themselves are fingerprinted
        name = data.name if data is not None else getattr(test.data, "name", None)
        entry.update({
            "name": name,
            "path": protocol.data,
            "file_sha256": provenance.sha256_file(protocol.data) if protocol.data else None,
            "n_train": len(test.data.x_train),
            "n_test": len(test.x),
            "image_shape": list(test.x.shape[1:]),
            "test_sha256": _array_digest(test.x, test.y),
        })
    entry["files_sha256"] = {}
    return entry


def run_benchmark(
    protocol: Protocol,
    out: str | os.PathLike,
    *,
    model: ResolvedModel | nn.Module,
    data: BenchData | arrays.ImageData | None = None,
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
    session: dist.Session | None = None,
) -> dict[str, Any]:
    """Run every pending cell of ``protocol`` and write the results folder ``out``.

    Args:
        protocol: what to run.
        out: the results folder (created).
        model: the classifier (a :class:`ResolvedModel` carries its file checksums).
        data: the images: a :class:`~torch_dmc.bench.datasets.BenchData`, an in-memory
            :class:`~torch_dmc.data.ImageData` (corruptions generated from its first
            ``protocol.n_test`` test images), or ``None``: opened from the protocol's data specs
            (``data``, ``clean_data``, ``fit_data``, ``image_ids``).
        resume: continue a folder: skip cells already in ``results.csv`` and reuse
            ``stats.safetensors``. Refused if the folder's protocol would give other values.
            Without it, a folder that already holds results is refused.
        stats_path: use these reference statistics (a file written by ``ReferenceStats.save``)
            instead of fitting; default: fit, save as ``out/stats.safetensors``.
        cache_dir: corruption cache of generated data (default: ``DMC_CACHE_DIR`` or
            ``~/.cache/torch_dmc``).
        workers: processes generating corruptions, or decoding image files ahead.
        progress: progress bars.
        device: where the model runs (default: where it is); results do not depend on it beyond
            floating-point rounding.
        jobs: units run in this many CPU processes at once, each with ``torch.get_num_threads()
            // jobs`` threads. Generated corrupted sets are made first. Results do not depend on
            it; rows are appended in the order cells finish.
        channels_last: run a copy of the model in channels-last memory layout (faster CPU
            convolutions, same values up to rounding). Default: on a CPU, for image inputs,
            unless the model has GroupNorm layers (:func:`channels_last_unsafe`).
        command: the command line recorded at the top of the report.
        extra_config: more entries for ``config.json`` (e.g. the method config file used).
        plots: write the PNG plots (``report.md`` is always written).
        log: where to print one-line messages.
        session: run as one rank of a torchrun job (:mod:`torch_dmc.bench.dist`; every rank
            calls this with the same arguments): rank 0 opens the folder, gets the stats and
            writes everything; the pending units are shared out in contiguous blocks
            (:func:`~torch_dmc.bench.dist.split`), each rank runs its block and sends its
            results to rank 0 as they finish. ``jobs`` must be 1. The rows do not depend on the
            number of ranks (docs/distributed.md).

    Returns:
        The ``config.json`` content (on ranks other than 0: ``{}``).
    """
    from .report import finish

    t_start = time.perf_counter()
    started = now()
    out = Path(out)
    root = session is None or session.is_root
    if not root:
        progress, log = False, _no_log
    results_path, config_path = out / "results.csv", out / "config.json"
    resolved = model if isinstance(model, ResolvedModel) else ResolvedModel(model, "object", {})
    net = resolved.model
    net.eval()
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, found {jobs}")
    if jobs > 1 and session is not None:
        raise ValueError(f"--jobs {jobs}: under torchrun every process runs its share of the cells "
                         "already; use --jobs 1 and more processes (torchrun --nproc-per-node).")
    need_stats = _needs_stats(protocol)

    def prepare() -> _Prepared:  # every rank: the data and the model as the units need them
        if root:
            out.mkdir(parents=True, exist_ok=True)
        reuse_stats = resume and (out / "stats.safetensors").is_file()
        need_fit = root and need_stats and stats_path is None and not reuse_stats
        bench, data_args = _as_bench_data(data, protocol, cache_dir=cache_dir, workers=workers,
                                          progress=progress, need_fit=need_fit)
        prot = protocol
        if bench.clean is None and prot.clean:
            prot = dataclasses.replace(prot, clean=False)
            log("no clean test set (pass --clean-data SPEC for clean cells): running corrupted cells only")
        bench.check_corruptions(prot.corruptions,
                                "choose --corruptions among those, or add the missing files.")
        check_model_fits(net, bench.sample(2), num_classes=bench.num_classes)
        if device is not None:
            net.to(device)
        on_cpu = _model_device(net).type == "cpu"
        if jobs > 1 and not on_cpu:
            raise ValueError(
                f"jobs={jobs} runs cells in parallel CPU processes, but the model is on "
                f"{_model_device(net)}; use one job on an accelerator."
            )
        layout = channels_last
        if layout is None:
            layout = on_cpu and not channels_last_unsafe(net)
        elif layout and channels_last_unsafe(net):
            raise ValueError(
                "--channels-last on: the model has GroupNorm layers, and torch's CPU GroupNorm "
                "backward crashes (segmentation fault) on channels-last inputs, which a method with "
                "gradients (tent) runs; use --channels-last off or auto")
        # the reference is fitted on the model as given (the same stats as `dmc fit`); the
        # units run a channels-last copy (the caller's model keeps its layout)
        run_net = copy.deepcopy(net).to(memory_format=torch.channels_last) if layout else net
        return _Prepared(prot, bench, data_args, net, run_net, bool(layout))

    prep = prepare() if session is None else session.agree("bench-data", prepare)
    protocol, bench, net = prep.protocol, prep.bench, prep.run_net
    state: dict[str, Any] = {}

    def setup() -> dict[str, Any]:  # rank 0: the folder, the stats, config.json, the pending units
        previous = read_previous(out, protocol, resume=resume,
                                 has_results=results_path.is_file() and bool(read_results(results_path)))
        model_info = resolved.describe()
        if previous:
            check_same_model(out, previous.get("model", {}), model_info)
        check_methods_apply(protocol, net)  # before any fit: e.g. bn on a model with no BatchNorm
        stats, stats_info = None, None
        if need_stats:
            if stats_path is not None:
                from .. import ReferenceStats

                stats = ReferenceStats.load(stats_path, model=net)
                where = str(stats_path)
                check_per_sample(stats, where, _needs_per_sample(protocol))
            else:
                where = str(out / "stats.safetensors")
                stats = obtain_stats(prep.fit_net, bench.fit, out / "stats.safetensors",
                                     fit_images=protocol.fit_images, fit_seed=protocol.fit_seed,
                                     fit_levels=protocol.fit_levels,
                                     reuse=resume, progress=progress, log=log,
                                     per_sample=_needs_per_sample(protocol), workers=workers)
            stats_info = {"path": where, "checksum": stats.checksum(), "levels": stats.levels,
                          "sites": stats.sites, "fit_info": stats.info}
            check_same_stats(out, previous, stats_info)

        method_info = _method_info(protocol, net, stats)
        ran = command
        if ran is None:
            ran = provenance.command_line() if session is None else _torchrun_command(session)
        config: dict[str, Any] = {
            "tool": "dmc bench",
            "command": ran,
            "explicit_command": "dmc bench " + shlex.join(
                protocol.command_args() + (resolved.spec.extra_flags() if resolved.spec else [])
            ),
            "protocol": protocol.to_dict(),
            "protocol_notes": PROTOCOL_NOTES,
            "data": _data_config(bench, data if isinstance(data, arrays.ImageData) else None, protocol),
            "corruptions": corruptions.protocol_info() if bench.specs.get("data") is None
            or bench.specs["data"].generated else None,
            "model": model_info,
            "stats": stats_info,
            "methods": method_info,
            "versions": provenance.package_versions(),
            "git": provenance.git_commit(),
            "machine": provenance.machine(),
            "sessions": list(previous.get("sessions", [])) if previous else [],
            "execution": {"jobs": jobs, "channels_last": prep.channels_last,
                          "device": str(_model_device(net)), "workers": workers},
        }
        if session is not None:
            config["execution"]["world_size"] = session.world_size
        if previous:
            config["data"]["files_sha256"] = dict(previous.get("data", {}).get("files_sha256") or {})
        if stats is not None and stats_path is None and bench.fit is not None:
            config["data"]["fit_files_sha256"] = bench.fit.files()
        if extra_config:
            config.update(extra_config)
        entry = {"started": started, "finished": None, "wall_s": None, "cells_computed": 0,
                 "command": config["command"]}
        if session is not None:
            entry["world_size"] = session.world_size
        config["sessions"].append(entry)
        write_json(config_path, config)

        done = done_cells(read_results(results_path))
        units = pending(protocol.units(), done)
        weights = [sum(c not in done for c in u.cells()) for u in units]
        skipped = len(protocol.cells()) - sum(weights)
        if skipped:
            log(f"resuming: {skipped} cell(s) already in {results_path}, {sum(weights)} to run")
        blocks = dist.split(weights, session.world_size) if session is not None else None
        state.update(config=config, entry=entry, done=done, stats=stats, total=sum(weights))
        return {"stats": stats, "units": units, "blocks": blocks}

    shared = setup() if session is None else session.from_root("bench-setup", setup)
    units: list[Unit] = shared["units"]
    stats = state["stats"] if root else shared["stats"]
    sets = OpenSets(bench)
    if session is not None and not root:  # run this rank's block, send each unit's results to rank 0
        for index in shared["blocks"][session.rank]:
            session.check([0])
            results = evaluate_unit(units[index], protocol, net, stats, sets, prep.channels_last,
                                    workers=workers)
            session.send((index, results, sets.files()))
        return {}

    config, entry, done = state["config"], state["entry"], state["done"]
    from tqdm.auto import tqdm

    if jobs > 1:
        _open_all(units, sets, log)
    bar = tqdm(total=state["total"], desc="bench", unit="cell", disable=not progress)
    try:
        with (
            ResultsWriter(results_path, COLUMNS) as writer,
            ResultsWriter(out / "timings.csv", TIMING_COLUMNS) as timer,
        ):
            def record(unit: Unit, results, files: dict[str, str] | None = None) -> None:
                entry["cells_computed"] += _write_unit(unit, results, done, writer, timer, bar)
                config["data"]["files_sha256"].update(sets.files() if files is None else files)

            if session is not None:
                _run_root_block(session, shared["blocks"], units, record, lambda unit: evaluate_unit(
                    unit, protocol, net, stats, sets, prep.channels_last, workers=workers), bar)
            elif jobs == 1:
                for unit in units:
                    _show(bar, unit)
                    record(unit, evaluate_unit(unit, protocol, net, stats, sets, prep.channels_last,
                                               workers=workers))
            else:
                from .pool import run_parallel

                pool_state = {"protocol": protocol, "net": net, "stats": stats,
                              "channels_last": prep.channels_last,
                              "data": bench if prep.data_args is None else None,
                              "data_args": prep.data_args}
                threads = max(1, torch.get_num_threads() // jobs)
                run_parallel(units, pool_state, jobs, threads, record)
    finally:
        bar.close()
        entry["finished"] = now()
        entry["wall_s"] = round(time.perf_counter() - t_start, 2)
        config["wall_s"] = round(sum(s.get("wall_s") or 0 for s in config["sessions"]), 2)
        write_json(config_path, config)
    finish(out, config, plots=plots, log=log)
    return config


@dataclasses.dataclass
class _Prepared:
    """What every rank needs to run units: the protocol (``clean`` decided by the data), the
    data, the model as given (``fit_net``, the reference is fitted on it) and as run."""

    protocol: Protocol
    bench: BenchData
    data_args: dict | None
    fit_net: nn.Module
    run_net: nn.Module
    channels_last: bool


def _no_log(_message: str) -> None:
    """The ``log`` of the ranks other than 0: they print nothing."""


def _torchrun_command(session: dist.Session) -> str:
    """The command line recorded under torchrun (the launcher's own flags are not visible)."""
    import sys

    return f"torchrun [WORLD_SIZE={session.world_size}] -m torch_dmc {shlex.join(sys.argv[1:])}"


def _run_root_block(session: dist.Session, blocks: list[range], units: list[Unit],
                    record: Callable[..., None], evaluate: Callable[[Unit], list], bar) -> None:
    """Rank 0 under torchrun: run its block, writing the other ranks' results as they arrive
    (between its units), then wait for the rest."""
    expected = {r: len(blocks[r]) for r in range(1, session.world_size)}

    def take(wait: bool) -> None:
        for _rank, (index, results, files) in session.receive(expected, wait=wait):
            record(units[index], results, files)

    for index in blocks[0]:
        _show(bar, units[index])
        record(units[index], evaluate(units[index]))
        take(wait=False)
    bar.set_postfix_str("waiting for the other ranks", refresh=True)
    take(wait=True)


def _show(bar, unit: Unit) -> None:
    bar.set_postfix_str(
        f"{unit.method} {unit.corruption}-{unit.severity} b{unit.batch_size} s{unit.seed}"
        + ("" if unit.stream == IID else f" {unit.stream}"),
        refresh=False,
    )


def _write_unit(
    unit: Unit, results, done: set, writer: ResultsWriter, timer: ResultsWriter, bar
) -> int:
    """Write a unit's cells that are not done yet; return how many."""
    written = 0
    for cell, (n, wrong, seconds) in zip(unit.cells(), results, strict=True):
        if cell in done:
            continue
        key = dataclasses.asdict(cell)
        writer.write({**key, "n": n, "n_wrong": wrong, "error": f"{error_percent(wrong, n):.4f}"})
        timer.write({**key, "seconds": f"{seconds:.3f}"})
        done.add(cell)
        written += 1
        bar.update(1)
    return written


def _open_all(units: list[Unit], sets: OpenSets, log: Callable[[str], None]) -> None:
    """Generate (or find cached) every generated corrupted set the units need, before a parallel
    run (data on disk needs nothing)."""
    spec = sets.data.specs.get("data")
    if spec is not None and not spec.generated:
        return
    keys = sorted({(c, u.severity) for u in units for c in u.corruptions if c != CLEAN})
    if keys:
        log(f"making sure {len(keys)} corrupted set(s) are cached")
    for corruption, severity in keys:
        sets.segments([corruption], severity)
