"""The ``dmc`` command: ``demo``, ``train``, ``fit``, ``bench``, ``tune``, ``report``, ``perf``.

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
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path``, renamed to ``path`` when the block succeeds.

    A failed or interrupted write leaves neither a partial ``path`` nor the temporary file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    p = sub.add_parser("train", help="train the default architecture (seeded)",
                       description="Train the default small ResNet on Fashion-MNIST or on an .npz "
                       "(x_train, y_train, x_test, y_test) and save it as a model folder.")
    p.add_argument("--data", default=None, metavar="PATH.npz", help="default: Fashion-MNIST")
    p.add_argument("--out", required=True, metavar="DIR", help="model folder to write")
    p.add_argument("--epochs", type=int, default=None, help="default: the shipped model's")
    p.add_argument("--seed", type=int, default=0)


def _run_train(args) -> int:
    from .data.arrays import NPZ_EXPECTED
    from .models.training import train_main

    check_int_flags(args, {"epochs": 1, "seed": 0})
    if args.data is not None:
        require_path(args.data, "--data", NPZ_EXPECTED)
    check_out(args.out, folder=True)
    kwargs = {"seed": args.seed}
    if args.epochs is not None:
        kwargs["epochs"] = args.epochs
    train_main(args.data, args.out, **kwargs)
    return 0


def _add_fit(sub) -> None:
    p = sub.add_parser("fit", help="fit DMC reference stats of a model on its training images",
                       description="Fit the reference quantiles of every normalization layer's "
                       "output on training images and save them as a safetensors file "
                       "(docs/method.md).")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="model folder (default: the shipped Fashion-MNIST model)")
    p.add_argument("--data", default=None, metavar="PATH.npz",
                   help=".npz with x_train (uint8 images N×H×W or N×H×W×C; other arrays are not "
                   "needed); default: Fashion-MNIST")
    p.add_argument("--out", required=True, metavar="FILE", help="stats file to write")
    p.add_argument("--images", type=int, default=None, help="training images (default: all)")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--levels", type=int, default=1024)
    p.add_argument("--sites", default="norm", help="'norm' or comma-separated name patterns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="leave samples with a NaN/Inf activation out of a site's reference (counted "
                   "per site in the stats' info) instead of refusing them")
    p.add_argument("--per-sample", action="store_true",
                   help="also fit the reference of the per-sample estimate (dmc-per-sample); "
                   "doubles the fit's cost and the file's size")


def _fit_images(path: str | None):
    """The training images of ``dmc fit``: ``x_train`` of the ``.npz``, or Fashion-MNIST's."""
    if path is None:
        from .data.fashion_mnist import load_fashion_mnist

        return load_fashion_mnist().x_train
    from .data.arrays import load_npz_images

    return load_npz_images(path, "x_train")


def _run_fit(args) -> int:
    import torch

    from . import fit
    from .bench.runner import check_model_fits, resolve_model
    from .data.arrays import batches, to_tensor

    check_int_flags(args, {"images": 1, "batch_size": 1, "levels": 2, "seed": 0})
    if args.data is not None:
        require_path(args.data, "--data", "an .npz with array x_train (uint8 images)")
    out = check_out(args.out, folder=False)
    model = resolve_model(args.model).model  # a missing --model folder is reported here
    x = _fit_images(args.data)
    check_model_fits(model, x)
    if args.images is not None and args.images < len(x):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
        x = x[idx[: args.images].sort().values.numpy()]
    sites = "norm" if args.sites == "norm" else args.sites.split(",")
    stats = fit(model, batches(to_tensor(x), None, args.batch_size), sites=sites,
                levels=args.levels, seed=args.seed, per_sample=args.per_sample,
                skip_nonfinite=args.skip_nonfinite)
    with new_outputs(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            stats.save(tmp)
    print(f"{len(stats.sites)} sites, {stats.nbytes() / 1e6:.2f} MB of tables, rank-error bound "
          f"{stats.info['rank_error_bound']:.4f}: {args.out}")
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
    from .bench.cli import add_bench_arguments, add_tune_arguments, run_bench, run_tune

    add_bench_arguments(sub.add_parser("bench", help="benchmark methods on corrupted data"))
    add_tune_arguments(sub.add_parser("tune", help="choose DMC options on validation corruptions"))
    _add_report(sub)
    _add_perf(sub)
    runners = {"demo": _run_demo, "train": _run_train, "fit": _run_fit, "bench": run_bench,
               "tune": run_tune, "report": _run_report, "perf": _run_perf}
    args = parser.parse_args(argv)
    return run_command(args.command, runners[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
