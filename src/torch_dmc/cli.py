"""The ``dmc`` command: ``demo``, ``train``, ``fit``, ``bench``, ``tune``, ``perf``.

Each sub-command is a thin shell over a library function; run ``dmc <command> --help``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main", "DEMO_CORRUPTIONS"]

DEMO_CORRUPTIONS = ("gaussian_noise", "impulse_noise", "defocus_blur", "fog", "contrast")
"""The five corruptions of ``dmc demo`` (severity 5)."""


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
    code = run_bench(parser.parse_args(bench_argv))
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
    from .models.training import train_main

    kwargs = {"seed": args.seed}
    if args.epochs is not None:
        kwargs["epochs"] = args.epochs
    train_main(args.data, args.out, **kwargs)
    return 0


def _add_fit(sub) -> None:
    p = sub.add_parser("fit", help="fit DMC reference stats of a model on its training images",
                       description="Fit the reference quantiles of every normalization layer's "
                       "output on training images and save them as a safetensors file.")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="model folder (default: the shipped Fashion-MNIST model)")
    p.add_argument("--data", default=None, metavar="PATH.npz", help="default: Fashion-MNIST")
    p.add_argument("--out", required=True, metavar="FILE", help="stats file to write")
    p.add_argument("--images", type=int, default=None, help="training images (default: all)")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--levels", type=int, default=1024)
    p.add_argument("--sites", default="norm", help="'norm' or comma-separated name patterns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-sample", action="store_true",
                   help="also fit the reference of the per-sample estimate (dmc-per-sample); "
                   "doubles the fit's cost and the file's size")


def _run_fit(args) -> int:
    import torch

    from . import fit
    from .bench.runner import resolve_data, resolve_model
    from .data.arrays import batches, to_tensor

    model = resolve_model(args.model).model
    data = resolve_data(args.data)
    x = data.x_train
    if args.images is not None and args.images < len(x):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
        x = x[idx[: args.images].sort().values.numpy()]
    sites = "norm" if args.sites == "norm" else args.sites.split(",")
    stats = fit(model, batches(to_tensor(x), None, args.batch_size), sites=sites,
                levels=args.levels, seed=args.seed, per_sample=args.per_sample)
    stats.save(args.out)
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
        print(f"dmc report: {folder} has no {' or '.join(missing)}; pass a folder written by "
              "`dmc bench --out`", file=sys.stderr)
        return 2
    finish(folder, plots=not args.no_plots)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dmc`` console script."""
    parser = argparse.ArgumentParser(
        prog="dmc", description="Distribution Mismatch Correction for trained PyTorch classifiers.")
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
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
