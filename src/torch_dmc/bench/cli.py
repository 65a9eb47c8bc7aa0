"""The ``dmc bench`` and ``dmc tune`` sub-commands: arguments and entry points.

``torch_dmc.cli`` wires them in::

    add_bench_arguments(subparsers.add_parser("bench"))   # then run_bench(args) -> exit code
    add_tune_arguments(subparsers.add_parser("tune"))     # then run_tune(args) -> exit code

Both check every flag and input file before any heavy work; a user error is one line on stderr
and exit code 2 (see :func:`torch_dmc.cli.run_command`), and a failed run removes the output it
created. Without ``--out`` they write under ``runs/`` (ignored by git), never into ``results/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import datetime
from pathlib import Path

import torch

from .. import methods as methods_mod
from ..cli import (
    add_dist_timeout_argument,
    check_int_flags,
    check_out,
    error_message,
    new_outputs,
    require_path,
    run_command,
)
from ..data import corruptions
from ..data.specs import DataSpec
from ..methods.base import has_batchnorm
from . import provenance
from .inputs import ModelSpec, add_model_arguments
from .protocol import (
    DEFAULT_METHODS,
    QUICK_CORRUPTIONS,
    SETTINGS,
    Protocol,
    parse_int_list,
    parse_name_list,
)
from .streams import IID, parse_stream_list, stream_name

__all__ = ["add_bench_arguments", "run_bench", "add_tune_arguments", "run_tune"]

#: Where ``dmc bench`` and ``dmc tune`` write without ``--out`` (``/runs/`` is in .gitignore).
RUNS_DIR = Path("runs")

#: The least valid value of each integer flag (``--n-test`` → ``n_test``).
BENCH_MINIMUMS = {"n_test": 1, "fit_images": 1, "fit_levels": 2, "gen_seed": 0, "workers": 0,
                  "jobs": 1, "threads": 1}
TUNE_MINIMUMS = {"n_test": 1, "batch_size": 1, "seed": 0, "fit_images": 1, "fit_levels": 2,
                 "gen_seed": 0, "workers": 1, "threads": 1}

_STATS_FILE = "a .safetensors stats file written by `dmc fit` or `dmc tune`"

#: ``--quick``: what it sets (explicit flags still win).
QUICK = {
    "n_test": 1000,
    "severities": "5",
    "corruptions": ",".join(QUICK_CORRUPTIONS),
    "fit_images": 10000,
}


def _common(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--data",
        metavar="SPEC",
        default=None,
        help="test data: 'fmnist' (default), PATH.npz (x_train, y_train, x_test, y_test; "
        "corruptions generated), cifar10-c:DIR, cifar100-c:DIR, imagenet-c:DIR, "
        "tiny-imagenet-c:DIR (docs/protocol.md § Data)",
    )
    parser.add_argument(
        "--gen-seed",
        type=int,
        default=0,
        help="corruption generation seed: fixes every corrupted image (default 0)",
    )
    parser.add_argument("--workers", type=int, default=2,
                        help="processes generating corruptions or decoding image files (default 2)")
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
        "Benchmark test-time methods on corrupted test images (docs/protocol.md): every method × "
        "corruption × severity × batch size × seed × stream is one cell of results.csv. Episodic by "
        "default (a fresh method per cell)."
    )
    _common(parser)
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma list (default: {','.join(DEFAULT_METHODS)}, leaving out those that do not "
        "apply to the model, e.g. the bn family on a model without BatchNorm)",
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
    parser.add_argument("--n-test", type=int, default=None,
                        help="use the first N test images (image trees: a seeded subset of N; "
                        "default: all)")
    parser.add_argument(
        "--protocol",
        choices=SETTINGS,
        default=None,
        help="episodic (default: a fresh method per cell), continual (one stream per severity "
        "through all corruptions, without reset) or mixed (one stream per severity whose batches "
        "mix all corruptions' images, without reset)",
    )
    parser.add_argument("--continual", action="store_true", help="the same as --protocol continual")
    parser.add_argument(
        "--clean-data",
        metavar="SPEC",
        default=None,
        help="clean test set for the clean cells: cifar10:DIR, cifar100:DIR (binary version), "
        "imagefolder:DIR, PATH.npz, fmnist (default: the --data spec's own clean images, if any; "
        "else no clean cells)",
    )
    parser.add_argument(
        "--fit-data",
        metavar="SPEC",
        default=None,
        help="training images the DMC reference is fitted on: cifar10:DIR, cifar100:DIR, "
        "imagefolder:DIR, PATH.npz, fmnist (default: the --data spec's training split, if any)",
    )
    parser.add_argument(
        "--image-ids",
        metavar="FILE",
        default=None,
        help="image-tree data: use only the images listed (one id per line, relative to a "
        "corruption/severity folder, e.g. n01440764/ILSVRC2012_val_00000293.JPEG)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="results folder (default: runs/bench-<date>-<time>; a failed run that wrote no "
        "result leaves no folder)",
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
    add_dist_timeout_argument(parser)


def _set_threads(args) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))


def _timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def applicable_defaults(names: list[str], model: torch.nn.Module, flag: str) -> list[str]:
    """The default methods ``names`` that apply to ``model``; a note on stderr names the others.

    Only defaults are filtered: a method given explicitly that does not apply is refused.
    """
    kept = [n for n in names if methods_mod.METHODS[n].applies_to(model) is None]
    dropped = [n for n in names if n not in kept]
    if dropped:
        verb = "does" if len(dropped) == 1 else "do"
        print(f"note: {flag} default: leaving out {', '.join(dropped)}, which {verb} not apply to "
              f"this model ({methods_mod.METHODS[dropped[0]].applies_to(model)})", file=sys.stderr)
    return kept


def check_methods(names: list[str], flag: str) -> None:
    """Raise ``ValueError`` naming ``flag`` if a name is not a registered method."""
    known = methods_mod.available()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"{flag}: unknown method(s) {', '.join(unknown)}; expected some of: {', '.join(known)}."
        )


def check_device(name: str | None) -> None:
    """Raise ``ValueError`` if ``--device`` names no device usable here (``None``: the default)."""
    if name is None:
        return
    try:
        torch.empty(0, device=torch.device(name))
    except (RuntimeError, AssertionError) as err:  # a bad name; torch built or run without it
        raise ValueError(
            f"--device {name}: not usable here ({error_message(err)}); expected a torch device of "
            "this machine, e.g. cpu or cuda."
        ) from None


def _corruptions(spec: str, flag: str = "--corruptions") -> list[str]:
    """The corruption names of ``spec``, or ``ValueError`` naming ``flag``."""
    try:
        return corruptions.resolve_corruptions(spec)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None


def _floats(text: str, flag: str) -> list[float]:
    """The numbers of a comma list, or ``ValueError`` naming ``flag``."""
    out = []
    for token in parse_name_list(text):
        try:
            out.append(float(token))
        except ValueError:
            raise ValueError(f"{flag}: cannot read {token!r}; expected numbers, e.g. 0.5,1.0.") from None
    return out


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
    names = parse_name_list(args.methods if args.methods is not None else ",".join(DEFAULT_METHODS))
    check_methods(names, "--methods")
    protocol = Protocol(
        methods=names,
        corruptions=_corruptions(pick("corruptions", "common")),
        severities=parse_int_list(pick("severities", "1-5"), "--severities", low=1, high=5),
        batch_sizes=parse_int_list(str(args.batch_size), "--batch-size", low=1),
        seeds=parse_int_list(str(args.seeds), "--seeds", low=0),
        streams=bench_streams(args),
        all_seeds_at=None
        if args.all_seeds_at is None
        else parse_int_list(args.all_seeds_at, "--all-seeds-at", low=0, high=5),
        n_test=pick("n_test", None),
        setting=_setting(args),
        gen_seed=int(args.gen_seed),
        fit_images=pick("fit_images", None),
        fit_levels=int(args.fit_levels),
        method_options=options,
        model=ModelSpec.from_args(args).model,
        data=_spec_text(args.data, "--data"),
        clean_data=_spec_text(getattr(args, "clean_data", None), "--clean-data"),
        fit_data=_spec_text(getattr(args, "fit_data", None), "--fit-data"),
        image_ids=getattr(args, "image_ids", None),
        quick=quick,
    )
    return protocol, method_config


def _setting(args) -> str:
    """``--protocol`` (``--continual`` is the same as ``--protocol continual``)."""
    chosen = getattr(args, "protocol", None)
    if getattr(args, "continual", False):
        if chosen not in (None, "continual"):
            raise ValueError(f"--continual and --protocol {chosen} contradict each other; give one.")
        return "continual"
    return chosen or "episodic"


def _spec_text(text: str | None, flag: str) -> str | None:
    """A data spec as recorded (``None`` for the default, Fashion-MNIST); checked now."""
    if text is None:
        return None
    spec = DataSpec.parse(text, flag)
    return None if spec.kind == "fmnist" and flag == "--data" else str(spec)


def run_bench(args: argparse.Namespace, command: str = "bench") -> int:
    """``dmc bench``: run the benchmark the flags describe; returns the exit code.

    A user error is one line ``dmc <command>: error: ...`` on stderr and exit code 2 (with
    ``args.debug``: raised). A results folder that this call created is removed if the run fails
    before it holds a result.
    """
    return run_command(command, _bench, args)


def _holds_results(out: Path) -> bool:
    """Whether ``out`` has finished cells (``--resume`` continues it); ``True`` if unsure."""
    from .metrics import read_results

    try:
        return bool(read_results(out / "results.csv"))
    except Exception:  # an unreadable results.csv is kept for the user to look at
        return True


def _bench(args: argparse.Namespace) -> int:
    from . import dist

    session = dist.current()
    if session is None:
        protocol, out, extra, model = _bench_setup(args)
    else:  # under torchrun: every rank checks the flags and loads the model
        protocol, out, extra, model = session.agree("bench-setup", lambda: _bench_setup(args))
    return _bench_run(args, protocol, out, extra, model, session)


def _bench_setup(args: argparse.Namespace):
    """Check the flags, read the method configs, load the model: ``(protocol, out, extra
    config, resolved model)``."""
    from .runner import resolve_model

    check_int_flags(args, BENCH_MINIMUMS)
    protocol, method_config = bench_protocol(args)
    spec = ModelSpec.from_args(args)
    if args.resume and not args.out:
        raise ValueError("--resume needs --out DIR, the folder to continue.")
    check_device(args.device)
    if args.stats is not None:
        require_path(args.stats, "--stats", _STATS_FILE)
    if args.image_ids is not None:
        require_path(args.image_ids, "--image-ids", "a text file of image ids, one per line")
    out = check_out(args.out or RUNS_DIR / f"bench-{_timestamp()}", folder=True)
    _set_threads(args)
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
            now = {"model": protocol.model, "data": protocol.data}
            tuned_model = cfg.get("model") or {}
            if "spec" in tuned_model:  # written with the model flags
                tuned = {**tuned, "weights": tuned_model.get("weights"),
                         "preprocess": tuned_model.get("preprocess")}
                now.update(weights=spec.weights, preprocess=spec.preprocessing)
            for key, value in now.items():
                if key in tuned and tuned[key] != value:
                    print(
                        f"warning: {path} was tuned with {key}={tuned[key]!r}, this "
                        f"run uses {value!r}",
                        file=sys.stderr,
                    )
        extra = {"method_config": described[0] if len(described) == 1 else described}
    model = resolve_model(spec)
    if args.methods is None:  # defaults: only those that apply to this model
        protocol = dataclasses.replace(protocol, methods=applicable_defaults(
            protocol.methods, model.model, "--methods"))
    return protocol, out, extra, model


def _bench_run(args: argparse.Namespace, protocol: Protocol, out: Path, extra: dict | None,
               model, session) -> int:
    """Run the benchmark and print where the results are (under torchrun: rank 0 does)."""
    import contextlib

    from .dist import device_for
    from .runner import run_benchmark

    device = args.device if session is None else device_for(args.device, session.world)
    # only the writing rank removes the folder of a failed run (the others never created it)
    cleanup = (new_outputs(out, keep=lambda: _holds_results(out))
               if session is None or session.is_root else contextlib.nullcontext())
    with cleanup:
        config = run_benchmark(
            protocol,
            out,
            model=model,
            data=None,  # opened from the protocol's data specs
            resume=bool(args.resume),
            stats_path=args.stats,
            cache_dir=args.cache,
            workers=int(args.workers),
            progress=not args.no_progress,
            device=device,
            jobs=int(args.jobs),
            channels_last={"auto": None, "on": True, "off": False}[args.channels_last],
            extra_config=extra,
            session=session,
        )
    if session is not None and not session.is_root:
        return 0
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
    parser.add_argument("--fit-data", metavar="SPEC", default=None,
                        help="training images of the DMC reference: cifar10:DIR, cifar100:DIR, "
                        "imagefolder:DIR, PATH.npz, fmnist (default: the --data spec's own)")
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
        default=None,
        help="false and/or true (default false,true; false only on a model without BatchNorm)",
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
        default=None,
        help="methods also evaluated on the validation cells, for reference only (default "
        "source,bn, leaving out bn on a model without BatchNorm; '' for none)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE.json",
        default=None,
        help="where the choice goes (default: runs/dmc-tune-<date>-<time>.json; a failed run "
        "leaves neither it nor the stats it fitted)",
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
    """The :class:`TuneProtocol` and :class:`TuneGrid` the flags describe.

    Raises:
        ValueError, FileNotFoundError: a bad flag value or ``--grid`` file, naming the flag.
    """
    from .tune import TuneGrid, TuneProtocol

    protocol = TuneProtocol(
        corruptions=_corruptions(args.corruptions),
        severities=parse_int_list(args.severities, "--severities", low=1, high=5),
        n_test=int(args.n_test),
        batch_size=int(args.batch_size),
        seed=int(args.seed),
        gen_seed=int(args.gen_seed),
        fit_images=args.fit_images,
        fit_levels=int(args.fit_levels),
        model=ModelSpec.from_args(args).model,
        data=_spec_text(args.data, "--data"),
        fit_data=_spec_text(args.fit_data, "--fit-data"),
    )
    if args.grid:
        path = require_path(args.grid, "--grid", "a JSON file with the grid (see --help)")
        try:
            content = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"--grid {path}: cannot read it as JSON ({err}).") from err
        if not isinstance(content, dict):
            raise ValueError(
                f"--grid {path}: expected a JSON object such as "
                f'{{"strengths": [0.5, 1.0]}}; found {type(content).__name__}.'
            )
        try:
            grid = TuneGrid.from_dict(content)
        except ValueError as err:
            raise ValueError(f"--grid {path}: {err}") from None
    else:
        grid = TuneGrid(
            site_sets=parse_name_list(args.site_sets),
            strengths=_floats(args.strengths, "--strengths"),
            modes=parse_name_list(args.modes),
            adapt_bn=_bools(args.adapt_bn if args.adapt_bn is not None else "false,true"),
            method=args.method,
            priors=_floats(args.priors, "--priors"),
            momenta=_floats(args.momenta, "--momenta"),
        )
    return protocol, grid


def run_tune(args: argparse.Namespace, command: str = "tune") -> int:
    """``dmc tune``: evaluate the grid on validation corruptions, write the choice; exit code.

    A user error is one line ``dmc <command>: error: ...`` on stderr and exit code 2 (with
    ``args.debug``: raised). If the run fails, the choice file, the stats it fitted next to it and
    the folders this call created are removed.
    """
    return run_command(command, _tune, args)


def _tune(args: argparse.Namespace) -> int:
    from .datasets import open_bench_data
    from .runner import check_model_fits, resolve_model
    from .tune import default_stats_path, tune

    check_int_flags(args, TUNE_MINIMUMS)
    protocol, grid = tune_setup(args)
    baselines = parse_name_list(args.baselines if args.baselines is not None else "source,bn")
    check_methods(baselines, "--baselines")
    if args.stats is not None:
        check_out(args.stats, folder=False, flag="--stats")
    out = check_out(args.out or RUNS_DIR / f"dmc-tune-{_timestamp()}.json", folder=False)
    _set_threads(args)
    resolved = resolve_model(ModelSpec.from_args(args))
    if args.baselines is None:
        baselines = applicable_defaults(baselines, resolved.model, "--baselines")
    if args.adapt_bn is None and not args.grid and not has_batchnorm(resolved.model):
        grid = dataclasses.replace(grid, adapt_bn=[False])  # adapt_bn=True needs BatchNorm
    reuse = args.stats is not None and Path(args.stats).is_file()
    data = open_bench_data(data=protocol.data, fit_data=protocol.fit_data, n_test=protocol.n_test,
                           gen_seed=protocol.gen_seed, cache_dir=args.cache, workers=int(args.workers),
                           progress=not args.no_progress, need_fit=not reuse)
    data.check_corruptions(protocol.corruptions,
                           "choose --corruptions among the validation corruptions it holds.")
    check_model_fits(resolved.model, data.sample(2), num_classes=data.num_classes)
    outputs = [out] if args.stats is not None else [out, default_stats_path(out)]
    with new_outputs(*outputs):
        tune(
            protocol,
            grid,
            out,
            model=resolved.model,
            data=data,
            model_files=resolved.files,
            model_info=resolved.describe(),
            baselines=baselines,
            stats_path=args.stats,
            cache_dir=args.cache,
            workers=int(args.workers),
            progress=not args.no_progress,
        )
    return 0
