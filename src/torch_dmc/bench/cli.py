"""The ``dmc bench`` and ``dmc tune`` sub-commands: arguments and entry points.

``torch_dmc.cli`` wires them in::

    add_bench_arguments(subparsers.add_parser("bench"))   # then run_bench(args) -> exit code
    add_tune_arguments(subparsers.add_parser("tune"))     # then run_tune(args) -> exit code
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

import torch

from ..data import corruptions
from . import provenance
from .protocol import DEFAULT_METHODS, QUICK_CORRUPTIONS, Protocol, parse_int_list, parse_name_list
from .streams import IID, parse_stream_list, stream_name

__all__ = ["add_bench_arguments", "run_bench", "add_tune_arguments", "run_tune"]

#: ``--quick``: what it sets (explicit flags still win).
QUICK = {
    "n_test": 1000,
    "severities": "5",
    "corruptions": ",".join(QUICK_CORRUPTIONS),
    "fit_images": 10000,
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="DIR",
        default=None,
        help="model folder written by `dmc train` (default: the shipped Fashion-MNIST model)",
    )
    parser.add_argument(
        "--data",
        metavar="PATH.npz",
        default=None,
        help=".npz with x_train, y_train, x_test, y_test (uint8 images N×H×W or "
        "N×H×W×C, integer labels); default: Fashion-MNIST",
    )
    parser.add_argument(
        "--gen-seed",
        type=int,
        default=0,
        help="corruption generation seed: fixes every corrupted image (default 0)",
    )
    parser.add_argument("--workers", type=int, default=2, help="processes generating corruptions (default 2)")
    parser.add_argument(
        "--cache",
        metavar="DIR",
        default=None,
        help="corruption cache (default: $DMC_CACHE_DIR or ~/.cache/torch_dmc/corruptions)",
    )
    parser.add_argument(
        "--fit-levels",
        type=int,
        default=1024,
        help="quantile levels K per channel of the DMC stats (default 1024)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``dmc bench`` flags to ``parser``."""
    parser.description = (
        "Benchmark test-time methods on corrupted test images (DESIGN §3): every method × "
        "corruption × severity × batch size × seed × stream is one cell of results.csv. Episodic by "
        "default (a fresh method per cell)."
    )
    _common(parser)
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma list (default: {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--corruptions",
        default=None,
        help="names, 'common' (the 15 test corruptions), 'validation' (the 4), "
        "'all', or a comma list (default: common)",
    )
    parser.add_argument(
        "--severities",
        default=None,
        help="e.g. 1-5 or 3,5 (default 1-5); clean (severity 0) always runs",
    )
    parser.add_argument("--batch-size", default="200", help="one batch size or a comma list (default 200)")
    parser.add_argument(
        "--seeds",
        default="0",
        help="stream seeds: each gives another order of the test images (default 0)",
    )
    parser.add_argument(
        "--streams",
        default=IID,
        help="test-stream orders, a comma list of 'iid' (a seeded shuffle) and "
        "'label-shift-<alpha>' (the same images with the classes in a Dirichlet(alpha) mixture over "
        "time: small alpha, long runs of one class); each stream is a separate cell, column "
        "'stream' of results.csv (default iid)",
    )
    parser.add_argument(
        "--label-shift",
        type=float,
        action="append",
        default=None,
        metavar="ALPHA",
        help="add the stream label-shift-ALPHA to --streams (repeatable); as --streams defaults to "
        "iid, `--label-shift 0.1` alone runs both iid and label-shift-0.1, and the report compares "
        "them",
    )
    parser.add_argument(
        "--all-seeds-at",
        default=None,
        metavar="SEVERITIES",
        help="severities (0 = clean) that get every seed; the others get the first seed only (default: all)",
    )
    parser.add_argument("--n-test", type=int, default=None, help="use the first N test images (default: all)")
    parser.add_argument(
        "--continual",
        action="store_true",
        help="one stream per severity through all corruptions, without reset",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="results folder (default: results/bench-<date>-<time>)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a few-minute subset: {QUICK['n_test']} images, severity 5, "
        f"corruptions {QUICK['corruptions']}, stats on {QUICK['fit_images']} "
        "training images (explicit flags win)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue --out: skip finished cells, reuse its stats.safetensors",
    )
    parser.add_argument(
        "--method-config",
        metavar="FILE.json",
        default=None,
        help='method options, {"methods": {name: {...}}}, e.g. written by `dmc tune`; a comma '
        "list of such files is merged (each method in one file only)",
    )
    parser.add_argument(
        "--fit-images",
        type=int,
        default=None,
        help="training images for the DMC stats (default: all; a seeded random subset when fewer)",
    )
    parser.add_argument("--device", default=None, help="torch device for the model, e.g. cuda (default: cpu)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="CPU processes running cells at once, each with threads/jobs torch threads; results "
        "do not depend on it (default 1; on a 2-core CPU, 2 is faster)",
    )
    parser.add_argument(
        "--channels-last",
        choices=("auto", "on", "off"),
        default="auto",
        help="run the model in channels-last memory layout: same values up to rounding, faster "
        "CPU convolutions (default auto: on for a CPU)",
    )
    parser.add_argument(
        "--stats",
        metavar="FILE",
        default=None,
        help="use these DMC stats (a .safetensors written by ReferenceStats.save, "
        "e.g. by `dmc tune`) instead of fitting",
    )


def _set_threads(args) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def bench_streams(args) -> list[str]:
    """The streams that ``--streams`` and ``--label-shift`` give (canonical names, in order).

    Raises:
        ValueError: a bad stream name or alpha, saying what is expected.
    """
    try:
        streams = parse_stream_list(getattr(args, "streams", None) or IID)
    except ValueError as err:
        raise ValueError(f"--streams: {err}") from None
    for alpha in getattr(args, "label_shift", None) or []:
        try:
            name = stream_name(alpha)
        except ValueError as err:
            raise ValueError(f"--label-shift: {err}") from None
        if name not in streams:
            streams.append(name)
    return streams


def bench_protocol(args) -> tuple[Protocol, dict | None]:
    """The protocol the flags describe, and the ``--method-config`` files (or ``None``).

    The second value is ``{"methods": merged options, "files": [each file's content], "paths":
    [each file's path]}``.
    """
    from .tune import load_method_config

    quick = bool(getattr(args, "quick", False))

    def pick(name: str, full):
        value = getattr(args, name, None)
        if value is not None:
            return value
        return QUICK[name] if quick and name in QUICK else full

    method_config = None
    options: dict = {}
    if getattr(args, "method_config", None):
        files = parse_name_list(args.method_config)
        configs = [load_method_config(f) for f in files]
        for path, cfg in zip(files, configs, strict=True):
            twice = sorted(set(options) & set(cfg["methods"]))
            if twice:
                raise ValueError(
                    f"--method-config: {path} sets options of {twice} again; give each method's "
                    "options in one file only."
                )
            options.update(cfg["methods"])
        method_config = {"methods": options, "files": configs, "paths": files}
    protocol = Protocol(
        methods=parse_name_list(args.methods),
        corruptions=corruptions.resolve_corruptions(pick("corruptions", "common")),
        severities=parse_int_list(pick("severities", "1-5"), "--severities"),
        batch_sizes=parse_int_list(str(args.batch_size), "--batch-size"),
        seeds=parse_int_list(str(args.seeds), "--seeds"),
        streams=bench_streams(args),
        all_seeds_at=None
        if args.all_seeds_at is None
        else parse_int_list(args.all_seeds_at, "--all-seeds-at"),
        n_test=pick("n_test", None),
        continual=bool(args.continual),
        gen_seed=int(args.gen_seed),
        fit_images=pick("fit_images", None),
        fit_levels=int(args.fit_levels),
        method_options=options,
        model=None if args.model is None else str(args.model),
        data=None if args.data is None else str(args.data),
        quick=quick,
    )
    return protocol, method_config


def run_bench(args) -> int:
    """``dmc bench``: run the benchmark the flags describe; returns the exit code."""
    from .runner import resolve_data, resolve_model, run_benchmark

    _set_threads(args)
    try:
        protocol, method_config = bench_protocol(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        return _fail(str(err))
    if args.resume and not args.out:
        return _fail("--resume needs --out DIR, the folder to continue.")
    out = Path(args.out) if args.out else Path("results") / datetime.now().strftime("bench-%Y%m%d-%H%M%S")
    extra = None
    if method_config is not None:
        described = []
        for path, cfg in zip(method_config["paths"], method_config["files"], strict=True):
            described.append(
                {
                    "path": str(path),
                    "sha256": provenance.sha256_file(path),
                    "tool": cfg.get("tool"),
                    "methods": sorted(cfg["methods"]),
                    "selection": cfg.get("selection"),
                    "stats_checksum": (cfg.get("stats") or {}).get("checksum"),
                }
            )
            tuned = cfg.get("protocol") or {}
            for key in ("model", "data"):
                if key in tuned and tuned[key] != getattr(protocol, key):
                    print(
                        f"warning: {path} was tuned with {key}={tuned[key]!r}, this "
                        f"run uses {getattr(protocol, key)!r}",
                        file=sys.stderr,
                    )
        extra = {"method_config": described[0] if len(described) == 1 else described}
    try:
        data = resolve_data(protocol.data)
        model = resolve_model(protocol.model)
        config = run_benchmark(
            protocol,
            out,
            model=model,
            data=data,
            resume=bool(args.resume),
            stats_path=args.stats,
            cache_dir=args.cache,
            workers=int(args.workers),
            progress=not args.no_progress,
            device=args.device,
            jobs=int(args.jobs),
            channels_last={"auto": None, "on": True, "off": False}[args.channels_last],
            extra_config=extra,
        )
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, KeyError) as err:
        return _fail(str(err).strip("'\""))
    described = config.get("method_config") or []
    for entry in described if isinstance(described, list) else [described]:
        tuned_sum = entry.get("stats_checksum")
        if not (tuned_sum and config.get("stats") and tuned_sum != config["stats"]["checksum"]):
            continue
        print(
            f"warning: the DMC options were tuned with other stats (checksum {tuned_sum[:12]}…) "
            f"than this run's ({config['stats']['checksum'][:12]}…); pass --stats with the tune's "
            "stats file to use the same",
            file=sys.stderr,
        )
    print(f"results in {out} ({config.get('wall_s')} s)")
    return 0


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``dmc tune`` flags to ``parser``."""
    from .tune import SITE_SET_HELP, TuneGrid

    g = TuneGrid()
    parser.description = (
        "Choose DMC options on the 4 validation corruptions only (speckle_noise, gaussian_blur, "
        "spatter, saturate; test corruptions are refused) and write them to a JSON file that "
        "`dmc bench --method-config` reads."
    )
    _common(parser)
    parser.add_argument(
        "--corruptions",
        default="validation",
        help="validation corruptions to tune on (default: all 4)",
    )
    parser.add_argument("--severities", default="3,5", help="default 3,5")
    parser.add_argument("--n-test", type=int, default=2000, help="first N test images (default 2000)")
    parser.add_argument("--batch-size", type=int, default=200, help="default 200")
    parser.add_argument("--seed", type=int, default=0, help="stream seed (default 0)")
    parser.add_argument(
        "--site-sets",
        default=",".join(g.site_sets),
        help=f"comma list of: {SITE_SET_HELP} (default {','.join(g.site_sets)})",
    )
    parser.add_argument(
        "--strengths",
        default=",".join(map(str, g.strengths)),
        help=f"λ values (default {','.join(map(str, g.strengths))})",
    )
    parser.add_argument(
        "--modes",
        default=",".join(g.modes),
        help=f"grid and/or exact (default {','.join(g.modes)})",
    )
    parser.add_argument(
        "--adapt-bn",
        default=",".join(str(b).lower() for b in g.adapt_bn),
        help="false and/or true (default false,true)",
    )
    parser.add_argument(
        "--method",
        default=g.method,
        help="the DMC method to tune: dmc, dmc-prior, dmc-ema or dmc-per-sample; the choice is "
        "written under this name (default dmc)",
    )
    parser.add_argument(
        "--priors",
        default=",".join(map(str, g.priors)),
        help="N0 values, for --method dmc-prior (default 16)",
    )
    parser.add_argument(
        "--momenta",
        default=",".join(map(str, g.momenta)),
        help="m values, for --method dmc-ema (default 0.1)",
    )
    parser.add_argument(
        "--grid",
        metavar="FILE.json",
        default=None,
        help='the grid as JSON {"site_sets": [...], "strengths": [...], "modes": [...], '
        '"adapt_bn": [...], "method": ..., "priors": [...], "momenta": [...]}; replaces the flags '
        "above",
    )
    parser.add_argument(
        "--fit-images",
        type=int,
        default=None,
        help="training images for the DMC stats (default: all)",
    )
    parser.add_argument(
        "--stats",
        metavar="FILE",
        default=None,
        help="load the DMC stats from FILE if it exists, else fit and save there "
        "(default: fit, save next to --out)",
    )
    parser.add_argument(
        "--baselines",
        default="source,bn",
        help="methods also evaluated on the validation cells, for reference only (default "
        "source,bn; '' for none)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE.json",
        default="results/dmc-tune.json",
        help="where the choice goes (default results/dmc-tune.json)",
    )


def _bools(text: str) -> list[bool]:
    out = []
    for tok in parse_name_list(text):
        low = tok.lower()
        if low not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"--adapt-bn: expected true/false values, found {tok!r}.")
        out.append(low in ("true", "1", "yes"))
    return out


def tune_setup(args):
    """The :class:`TuneProtocol` and :class:`TuneGrid` the flags describe."""
    from .tune import TuneGrid, TuneProtocol

    protocol = TuneProtocol(
        corruptions=corruptions.resolve_corruptions(args.corruptions),
        severities=parse_int_list(args.severities, "--severities"),
        n_test=int(args.n_test),
        batch_size=int(args.batch_size),
        seed=int(args.seed),
        gen_seed=int(args.gen_seed),
        fit_images=args.fit_images,
        fit_levels=int(args.fit_levels),
        model=None if args.model is None else str(args.model),
        data=None if args.data is None else str(args.data),
    )
    if args.grid:
        try:
            grid = TuneGrid.from_dict(json.loads(Path(args.grid).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--grid {args.grid}: cannot read it as JSON ({err}).") from err
    else:
        grid = TuneGrid(
            site_sets=parse_name_list(args.site_sets),
            strengths=[float(v) for v in parse_name_list(args.strengths)],
            modes=parse_name_list(args.modes),
            adapt_bn=_bools(args.adapt_bn),
            method=args.method,
            priors=[float(v) for v in parse_name_list(args.priors)],
            momenta=[float(v) for v in parse_name_list(args.momenta)],
        )
    return protocol, grid


def run_tune(args) -> int:
    """``dmc tune``: evaluate the grid on validation corruptions, write the choice; exit code."""
    from .runner import check_model_fits, resolve_data, resolve_model
    from .tune import tune

    _set_threads(args)
    try:
        protocol, grid = tune_setup(args)
        data = resolve_data(protocol.data)
        resolved = resolve_model(protocol.model)
        check_model_fits(resolved.model, data)
        tune(
            protocol,
            grid,
            args.out,
            model=resolved.model,
            data=data,
            model_files=resolved.files,
            baselines=parse_name_list(args.baselines),
            stats_path=args.stats,
            cache_dir=args.cache,
            workers=int(args.workers),
            progress=not args.no_progress,
        )
    except (ValueError, TypeError, FileNotFoundError, KeyError) as err:
        return _fail(str(err).strip("'\""))
    return 0
