"""The ``dmc`` command: ``demo``, ``train``, ``fit``, ``sites``, ``bench``, ``tune``, ``report``, ``perf``.

Each sub-command is a thin shell over a library function; run ``dmc <command> --help``.

A user error (a missing file, a bad flag value, data of the wrong shape or dtype, an unknown name)
ends the command with one line on stderr, ``dmc <command>: error: <what is wrong; what is
expected>``, and exit status 2; ``dmc --debug <command> ...`` raises it instead, with its
traceback. Flags and input files are checked before any heavy work, and a failed command leaves no
output of its own behind (see :func:`new_outputs`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from ._files import atomic_path
from ._version import __version__

__all__ = [
    "main",
    "DEMO_CORRUPTIONS",
    "USER_ERRORS",
    "error_message",
    "fail",
    "run_command",
    "check_int_flags",
    "require_path",
    "check_out",
    "new_outputs",
    "atomic_path",
    "add_dist_timeout_argument",
]

DEMO_CORRUPTIONS = ("gaussian_noise", "impulse_noise", "defocus_blur", "fog", "contrast")
"""The five corruptions of ``dmc demo`` (severity 5)."""

#: The exceptions that report a user error: a bad value or name (``ValueError``, which includes
#: ``torch_dmc.StatsMismatchError``), a wrong type or dtype (``TypeError``), a missing array of an
#: ``.npz`` (``KeyError``), a missing, existing or unreadable file (``OSError``: ``FileNotFoundError``,
#: ``FileExistsError``, ``PermissionError``, ...). Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, OSError)

_MODEL_DIR = "a model folder written by `dmc train`"


# -- user errors -------------------------------------------------------------------------------
def error_message(err: BaseException) -> str:
    """The message of ``err`` on one line (a ``KeyError`` without the quotes ``str`` adds)."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    else:
        text = str(err)
    return " ".join(text.split()) or type(err).__name__


def fail(command: str, message: str) -> int:
    """Print ``dmc <command>: error: <message>`` as one line on stderr; return the exit status 2."""
    print(f"dmc {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def run_command(command: str, runner: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``runner(args)``, with a user error (:data:`USER_ERRORS`) reported by :func:`fail`.

    With ``args.debug`` the error is raised instead, so that its traceback shows.
    """
    if getattr(args, "debug", False):
        return runner(args)
    try:
        return runner(args)
    except USER_ERRORS as err:
        return fail(command, error_message(err))


# -- checks of flags and paths -----------------------------------------------------------------
def check_int_flags(args: argparse.Namespace, minimums: Mapping[str, int]) -> None:
    """Check integer flags against their least valid value, before any work.

    Args:
        args: the parsed flags.
        minimums: attribute name → least valid value, e.g. ``{"n_test": 1, "seed": 0}``; a flag
            that is absent or ``None`` (not given) passes.

    Raises:
        ValueError: ``--n-test: expected a positive integer; found 0.`` for the first bad flag.
    """
    for name, least in minimums.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            expected = {0: "a non-negative integer", 1: "a positive integer"}.get(
                least, f"an integer of at least {least}"
            )
            raise ValueError(f"--{name.replace('_', '-')}: expected {expected}; found {value}.")


def require_path(path: str | os.PathLike, flag: str, expected: str, *, folder: bool = False) -> Path:
    """``Path(path)`` if it exists as a file (``folder``: a folder).

    Raises:
        FileNotFoundError: ``<flag> <path>: no such file; expected <expected>.``
    """
    p = Path(path)
    if not (p.is_dir() if folder else p.is_file()):
        kind = "folder" if folder else "file"
        what = f"a {'file' if folder else 'folder'}, not a {kind}" if p.exists() else f"no such {kind}"
        raise FileNotFoundError(f"{flag} {p}: {what}; expected {expected}.")
    return p


def check_out(path: str | os.PathLike, *, folder: bool, flag: str = "--out") -> Path:
    """``Path(path)`` for an output that may exist or not, but not as the other kind.

    Raises:
        FileExistsError: a file where a folder is to be written, or a folder where a file is.
    """
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise FileExistsError(f"{flag} {p}: is a file; expected a folder (new, or one to continue).")
    if not folder and p.is_dir():
        raise FileExistsError(f"{flag} {p}: is a folder; expected a file name.")
    return p


@contextlib.contextmanager
def new_outputs(*paths: str | os.PathLike, keep: Callable[[], bool] | None = None) -> Iterator[None]:
    """Remove, if the block fails, the outputs that the block created.

    Each path that did not exist on entry is removed on failure (a folder with its content), and
    so are the folders above it that did not exist on entry, if they are left empty. Nothing that
    existed on entry is touched.

    Args:
        *paths: the files and folders the block may create.
        keep: called on failure; ``True`` leaves everything (e.g. a results folder that already
            holds results, which ``--resume`` continues).
    """
    fresh = [Path(p) for p in paths if not os.path.lexists(p)]
    parents: list[Path] = []  # the folders above them that do not exist yet, deepest first
    for p in fresh:
        for parent in p.absolute().parents:
            if os.path.lexists(parent):
                break
            if parent not in parents:
                parents.append(parent)
    parents.sort(key=lambda d: len(d.parts), reverse=True)
    try:
        yield
    except BaseException:
        if keep is None or not keep():
            for p in fresh:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                elif os.path.lexists(p):
                    p.unlink()
            for d in parents:
                with contextlib.suppress(OSError):  # not empty: something else is in it now
                    d.rmdir()
        raise


# -- sub-commands ------------------------------------------------------------------------------
def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="fit, corrupt and compare source / BN-adapt / DMC on Fashion-MNIST (a few minutes)",
        description="Load the shipped Fashion-MNIST model, fit DMC stats on training images, "
        f"corrupt the first test images with {', '.join(DEMO_CORRUPTIONS)} at severity 5, and "
        "print and save the top-1 error of source, BN-adapt and DMC. It runs `dmc bench` with "
        "these settings: the folder it writes is a bench results folder.",
    )
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--n-test", type=int, default=2000, help="test images (default 2000)")
    p.add_argument("--fit-images", type=int, default=20000,
                   help="training images for the DMC stats (default 20000)")
    p.add_argument("--workers", type=int, default=2, help="corruption processes (default 2)")
    p.add_argument("--cache", default=None, help="corruption cache folder")


def _run_demo(args) -> int:
    from .bench.cli import add_bench_arguments, run_bench

    check_int_flags(args, {"n_test": 1, "fit_images": 1, "workers": 1})
    parser = argparse.ArgumentParser(prog="dmc bench")
    add_bench_arguments(parser)
    bench_argv = [
        "--methods", "source,bn,dmc",
        "--corruptions", ",".join(DEMO_CORRUPTIONS),
        "--severities", "5",
        "--n-test", str(args.n_test),
        "--fit-images", str(args.fit_images),
        "--workers", str(args.workers),
        "--out", args.out,
    ]
    if args.cache:
        bench_argv += ["--cache", args.cache]
    out = Path(args.out)
    if (out / "results.csv").exists():
        bench_argv.append("--resume")  # a finished demo is shown again, not recomputed
    print("dmc demo = dmc bench " + " ".join(bench_argv), flush=True)
    bench_args = parser.parse_args(bench_argv)
    bench_args.debug = getattr(args, "debug", False)
    code = run_bench(bench_args, command="demo")
    if code == 0:
        report = out / "report.md"
        if report.exists():
            print(report.read_text())
    return code


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train one of the shipped architectures (seeded)",
                       description="Train a small classifier (--arch: resnet, the BatchNorm ResNet; "
                       "resnet-gn, the same with GroupNorm; vit, a small ViT with LayerNorm) on "
                       "Fashion-MNIST or on an .npz (x_train, y_train, x_test, y_test) and save it "
                       "as a model folder.")
    p.add_argument("--arch", default="resnet", choices=("resnet", "resnet-gn", "vit"),
                   help="architecture (default resnet); its training recipe is "
                   "torch_dmc.models.training.ARCH_DEFAULTS")
    p.add_argument("--data", default=None, metavar="PATH.npz", help="default: Fashion-MNIST")
    p.add_argument("--out", required=True, metavar="DIR", help="model folder to write")
    p.add_argument("--epochs", type=int, default=None, help="default: the architecture's recipe")
    p.add_argument("--seed", type=int, default=0)


def _run_train(args) -> int:
    from .data.arrays import NPZ_EXPECTED
    from .models.training import train_main

    check_int_flags(args, {"epochs": 1, "seed": 0})
    if args.data is not None:
        require_path(args.data, "--data", NPZ_EXPECTED)
    check_out(args.out, folder=True)
    kwargs = {"seed": args.seed, "arch": args.arch}
    if args.epochs is not None:
        kwargs["epochs"] = args.epochs
    train_main(args.data, args.out, **kwargs)
    return 0


def _add_fit(sub) -> None:
    p = sub.add_parser("fit", help="fit DMC reference stats of a model on its training images",
                       description="Fit the reference quantiles of every normalization layer's "
                       "output on training images and save them as a safetensors file "
                       "(docs/method.md).")
    from .bench.inputs import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="training images: 'fmnist' (default), PATH.npz with x_train (uint8 images "
                   "N×H×W or N×H×W×C; other arrays are not needed), cifar10:DIR, cifar100:DIR "
                   "(binary version), imagefolder:DIR")
    p.add_argument("--out", required=True, metavar="FILE", help="stats file to write")
    p.add_argument("--images", type=int, default=None,
                   help="training images (default: all; fewer: the seeded random subset that "
                   "`dmc bench --fit-images N --fit-seed SEED` uses too)")
    p.add_argument("--batch-size", type=int, default=500,
                   help="images per batch (default 500, as dmc bench; another value gives other stats)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes decoding image files ahead (imagefolder; default 0)")
    p.add_argument("--levels", type=int, default=1024)
    p.add_argument("--sites", default="norm", help="'norm' or comma-separated name patterns")
    p.add_argument("--channel-axes", default=None, metavar="AXIS|PATTERN=AXIS,...",
                   help="channel axis of every site (an int), or per site pattern, e.g. "
                   "'stages.*.norm=1,head.norm=-1' (default: decided per site; see `dmc sites`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="leave samples with a NaN/Inf activation out of a site's reference (counted "
                   "per site in the stats' info) instead of refusing them")
    p.add_argument("--per-sample", action="store_true",
                   help="also fit the reference of the per-sample estimate (dmc-per-sample); "
                   "doubles the fit's cost and the file's size")
    add_dist_timeout_argument(p)


def add_dist_timeout_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--dist-timeout`` (used only under torchrun; docs/distributed.md)."""
    parser.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                        help="under torchrun: how long a process waits for a sign of life of "
                        "another one, or for a collective, before the command fails (default: "
                        "$DMC_DIST_TIMEOUT, else 600)")


def _run_fit(args) -> int:
    from .bench import dist
    from .bench.datasets import open_fit_images
    from .bench.fitting import finish_reference, fit_reference, fit_reference_part, fit_subset
    from .bench.inputs import ModelSpec, check_model_fits, resolve_model

    def setup():
        check_int_flags(args, {"images": 1, "batch_size": 1, "levels": 2, "seed": 0, "workers": 0})
        out = check_out(args.out, folder=False)
        model = resolve_model(ModelSpec.from_args(args)).model  # a bad --model is reported here
        _, images = open_fit_images(args.data, "--data")
        check_model_fits(model, images.read([0, 1][: len(images)]))
        options = dict(n=args.images, seed=args.seed, levels=args.levels,
                       batch_size=args.batch_size, workers=args.workers,
                       sites=site_patterns(args.sites), per_sample=args.per_sample,
                       skip_nonfinite=args.skip_nonfinite,
                       channel_axes=parse_channel_axes(args.channel_axes))
        return out, model, images, options

    session = dist.current()
    if session is None:
        out, model, images, options = setup()
        stats = fit_reference(model, images, **options)
    else:  # under torchrun: each rank fits its share of the batches, rank 0 merges and writes
        out, model, images, options = session.agree("fit-setup", setup)
        part = fit_reference_part(model, images, rank=session.rank,
                                  world_size=session.world_size, progress=session.is_root,
                                  **options)
        parts = session.gather("fit", part.portable())
        if parts is None:
            return 0
        merged = parts[0]
        for other in parts[1:]:
            merged.merge(other)
        n_rows = len(fit_subset(len(images), args.images, args.seed))
        stats = finish_reference(merged, model, images=n_rows, batch_size=args.batch_size,
                                 world_size=session.world_size)
    with new_outputs(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            stats.save(tmp)
    print(f"{len(stats.sites)} sites, {stats.nbytes() / 1e6:.2f} MB of tables, rank-error bound "
          f"{stats.info['rank_error_bound']:.4f}: {args.out}")
    return 0


def parse_channel_axes(text: str | None) -> int | dict[str, int] | None:
    """``--channel-axes``: ``None``, one int for every site, or ``PATTERN=AXIS`` pairs."""
    if text is None:
        return None
    expected = "expected an int or comma-separated PATTERN=AXIS pairs, e.g. 'stages.*.norm=1'"
    try:
        return int(text)
    except ValueError:
        pass
    out = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        pattern, sep, axis = item.rpartition("=")
        try:
            out[pattern.strip()] = int(axis)
        except ValueError:
            raise ValueError(f"--channel-axes {text!r}: {item!r} is not PATTERN=AXIS; {expected}.") from None
        if not sep or not pattern.strip():
            raise ValueError(f"--channel-axes {text!r}: {item!r} is not PATTERN=AXIS; {expected}.")
    if not out:
        raise ValueError(f"--channel-axes {text!r}: {expected}.")
    return out


def site_patterns(text: str) -> str | list[str]:
    """``--sites``: ``"norm"``, or the list of its comma-separated entries (``norm`` among them)."""
    entries = [t.strip() for t in text.split(",") if t.strip()]
    if not entries:
        raise ValueError(f"--sites {text!r}: expected 'norm' or comma-separated name patterns.")
    return "norm" if entries == ["norm"] else entries


def _add_sites(sub) -> None:
    p = sub.add_parser(
        "sites", help="list a model's candidate correction sites: name, type, channel axis, channels",
        description="Run one dummy batch of 2 images through the model and print every candidate "
        "site: its name (for `dmc fit --sites` and DMC(sites=..., strength={pattern: λ})), module "
        "type, channel axis (as torch_dmc.sites.channel_axis_for decides it from the output), "
        "channels, and values per channel per image.")
    from .bench.inputs import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--sites", default="norm",
                   help="'norm' (every normalization layer; default) or comma-separated name "
                   "patterns, e.g. 'layer*.bn2,head.norm'")
    p.add_argument("--data", default=None, metavar="PATH.npz",
                   help="run 2 images of x_train of this .npz (default: random images of the "
                   "model's input, 1×28×28 as Fashion-MNIST unless the model is known to take "
                   "others)")
    p.add_argument("--channels", type=int, default=None,
                   help="channels of the random images (default 1, or the model's)")


def _dummy_batch(args, input_shape: tuple[int, int, int] | None):
    """The 2 images ``dmc sites`` runs: from ``--data``, or random at the model's input shape."""
    import torch

    from .data.arrays import load_npz_images, to_tensor

    if args.data is not None:
        if args.channels is not None:
            raise ValueError("--channels: the images come from --data; give one of the two.")
        return to_tensor(load_npz_images(args.data, "x_train")[:2])
    c, h, w = input_shape or (1, 28, 28)  # Fashion-MNIST, the default data
    return torch.rand(2, args.channels or c, h, w, generator=torch.Generator().manual_seed(0))


def site_table(model, x, sites: str | list[str] = "norm") -> list[dict[str, object]]:
    """The candidate sites of ``model``, one row each, from one forward pass of ``x``.

    Args:
        model: the network.
        x: a batch of inputs (its first axis is the batch).
        sites: as ``torch_dmc.sites.select_sites`` (``"norm"`` or name patterns).

    Returns:
        Per site in model order: ``site`` (the name), ``type`` (the module's class), ``axis`` (the
        channel axis ``channel_axis_for`` gives; a reason instead where it has none), ``channels``,
        ``values`` (per channel per image) and ``output`` (the output's shape).

    Raises:
        ValueError: no module matches ``sites``, or the model fails on ``x`` (one line).
    """
    import math

    import torch

    from .sites import channel_axis_for, select_sites

    names = select_sites(model, sites)
    modules = dict(model.named_modules())
    outputs: dict[str, object] = {}

    def record(name: str):
        return lambda _module, _inputs, output: outputs.setdefault(name, output)

    handles = [modules[n].register_forward_hook(record(n)) for n in names]
    try:
        with torch.inference_mode():
            model(x)
    except Exception as err:  # the model's own code, on the dummy batch
        raise ValueError(f"the model cannot take a batch of shape {tuple(x.shape)}: "
                         f"{type(err).__name__}: {err}; give its input with --input-size H,W and "
                         "--channels C, or --data") from err
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name in names:
        out = outputs.get(name)
        row: dict[str, object] = {"site": name, "type": type(modules[name]).__name__, "axis": "",
                                  "channels": "", "values": "", "output": ""}
        rows.append(row)
        if out is None:
            row["axis"] = "not called"
            continue
        if not isinstance(out, torch.Tensor):
            row["axis"] = f"output is a {type(out).__name__}, not a tensor"
            continue
        row["output"] = "×".join(map(str, out.shape))
        try:
            axis = channel_axis_for(modules[name], tuple(out.shape), name=name)
            channels = out.shape[axis]
        except (ValueError, IndexError):
            row["axis"] = "ambiguous: set channel_axes"
            continue
        row.update(axis=axis, channels=channels,
                   values=math.prod(out.shape) // max(1, x.shape[0] * channels))
    return rows


def format_site_table(rows: list[dict[str, object]]) -> str:
    """The rows of :func:`site_table` as an aligned text table (numbers right-aligned)."""
    columns = [("site", "site"), ("type", "type"), ("axis", "channel axis"),
               ("channels", "channels"), ("values", "values/channel/image"), ("output", "output")]
    cells = [[str(r[k]) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    right = {2, 3, 4}

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if i in right and v.lstrip("-").isdigit() else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=True))).rstrip()

    return "\n".join([line([h for _, h in columns])] + [line(c) for c in cells])


def _run_sites(args) -> int:
    from .bench.inputs import ModelSpec, resolve_model, unwrap

    check_int_flags(args, {"channels": 1})
    spec = ModelSpec.from_args(args)
    if args.data is not None:
        require_path(args.data, "--data", "an .npz with array x_train (uint8 images)")
    sites = site_patterns(args.sites)
    resolved = resolve_model(spec)
    x = _dummy_batch(args, resolved.input_shape)
    rows = site_table(resolved.model, x, sites)
    pre = resolved.model.settings() if resolved.model is not unwrap(resolved.model) else None
    pre_text = "" if pre is None else ", preprocessed: " + ", ".join(
        f"{k} {','.join(f'{v:g}' for v in vals)}" for k, vals in pre.items() if vals)
    print(f"{resolved.source} ({type(unwrap(resolved.model)).__name__}{pre_text}), a batch "
          f"{'×'.join(map(str, x.shape))}: {len(rows)} site(s) matching --sites {args.sites}")
    print(format_site_table(rows))
    print("Choose by name: `dmc fit --sites 'PATTERN,...'`, or in Python DMC(model, stats, "
          "sites=[...], strength={'PATTERN': λ}).")
    return 0


def _add_perf(sub) -> None:
    p = sub.add_parser("perf", help="speed and memory of the corrected forward (ratios)",
                       description="Time the corrected forward against the plain forward, "
                       "interleaved in one process; see benchmarks/perf.py.")
    from .bench.perf import add_perf_arguments

    add_perf_arguments(p)


def _run_perf(args) -> int:
    from .bench.perf import run_perf

    check_int_flags(args, {"repeats": 1, "threads": 1, "fit_images": 1})
    if args.model is not None:
        require_path(args.model, "--model", _MODEL_DIR, folder=True)
    check_out(args.out, folder=True)
    return run_perf(args)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="rewrite report.md and the plots of a results folder",
                       description="Recompute report.md and the PNG plots of a `dmc bench` folder "
                       "from its results.csv and config.json, without running anything.")
    p.add_argument("folder", metavar="DIR", help="a folder written by `dmc bench`")
    p.add_argument("--no-plots", action="store_true", help="only report.md")


def _run_report(args) -> int:
    from .bench.report import finish

    folder = Path(args.folder)
    missing = [n for n in ("results.csv", "config.json") if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} has no {' or '.join(missing)}; pass a folder written by `dmc bench --out`."
        )
    finish(folder, plots=not args.no_plots)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dmc`` console script: run one sub-command, return its exit status.

    A user error gives one line on stderr and status 2 (``--debug``: the traceback instead).
    Under torchrun (``RANK`` and ``WORLD_SIZE`` set) the process runs as one rank of the job,
    through `torch_dmc.bench.dist.run` (docs/distributed.md); otherwise nothing of
    ``torch.distributed`` is initialised.
    """
    parser = argparse.ArgumentParser(
        prog="dmc", description="Distribution Mismatch Correction for trained PyTorch classifiers.")
    parser.add_argument("--version", action="version", version=f"dmc {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, raise it with its traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_train(sub)
    _add_fit(sub)
    _add_sites(sub)
    from .bench.cli import add_bench_arguments, add_tune_arguments, run_bench, run_tune

    add_bench_arguments(sub.add_parser("bench", help="benchmark methods on corrupted data"))
    add_tune_arguments(sub.add_parser("tune", help="choose DMC options on validation corruptions"))
    _add_report(sub)
    _add_perf(sub)
    runners = {"demo": _run_demo, "train": _run_train, "fit": _run_fit, "sites": _run_sites,
               "bench": run_bench, "tune": run_tune, "report": _run_report, "perf": _run_perf}
    args = parser.parse_args(argv)
    from .bench import dist

    try:
        launched = dist.world().launched
    except ValueError as err:
        return fail(args.command, error_message(err))
    if launched:  # under torchrun (RANK and WORLD_SIZE set): docs/distributed.md
        return dist.run(args.command, runners[args.command], args)
    return run_command(args.command, runners[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
