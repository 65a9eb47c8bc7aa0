"""Focused timing of grid mode's corrected forward against the plain forward, and its profile.

The same measurement as ``dmc perf`` (interleaved repetitions in one process, median ratio with
min–max), for the shipped Fashion-MNIST ResNet only, with the stats of
``results/fmnist-c/stats.safetensors`` (no fit), so that one change can be measured in a minute:

    python benchmarks/grid_speed.py --threads 2 --repeats 15 [--batch-sizes 200,16]
    python benchmarks/grid_speed.py --threads 2 --profile 16      # torch.profiler, top ops
    python benchmarks/grid_speed.py --threads 2 --efficientnet    # EfficientNet-Lite0, 224², B=16

At each batch size the contenders are ``bn``, the default ``dmc``, the same with BatchNorm
fusion off (``dmc unfused``: `torch_dmc.correct.FUSE_BATCHNORM` = False, every site corrected
after its BatchNorm) and ``dmc`` with ``adapt_bn``.

``--fit`` times ``fit`` (and ``fit`` with the per-sample reference) over 2,000 training images
against one plain pass over them.
``--cpu-time`` times with the process's CPU time instead of the wall clock: with ``--threads 1``
the ratios then hardly move when other processes share the cores (waiting for a core is not
counted; the caches they share still are).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import torch_dmc.bench.perf as perf
import torch_dmc.correct as correct
from torch_dmc import DMC, ReferenceStats, fit
from torch_dmc.bench.perf import time_ratios
from torch_dmc.data.arrays import to_tensor
from torch_dmc.data.fashion_mnist import load_fashion_mnist
from torch_dmc.methods import build
from torch_dmc.models import load


class _CpuClock:
    """Stands in for the ``time`` module in `torch_dmc.bench.perf`: its ``perf_counter`` is the
    process's CPU time."""

    perf_counter = staticmethod(time.process_time)


def _call(m, x):
    def f():
        with torch.no_grad():
            return m(x)
    return f


def _report(name: str, results: dict) -> None:
    plain = next(iter(results.values()))["plain_ms"]
    cells = "  ".join(f"{k}: {v['median']:.2f}× ({v['min']:.2f}–{v['max']:.2f})"
                      for k, v in results.items())
    print(f"{name}  plain {plain:.1f} ms  {cells}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch-sizes", default="200,16")
    parser.add_argument("--stats", default="results/fmnist-c/stats.safetensors")
    parser.add_argument("--profile", type=int, default=None, metavar="BATCH",
                        help="profile the default corrected forward at this batch size")
    parser.add_argument("--efficientnet", action="store_true")
    parser.add_argument("--fit", action="store_true")
    parser.add_argument("--cpu-time", action="store_true",
                        help="CPU time of this process instead of wall time (use with --threads 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cpu_time:
        perf.time = _CpuClock()
    data = load_fashion_mnist()
    model = load("resnet")
    stats = ReferenceStats.load(args.stats, model)
    test = to_tensor(data.x_test)
    if args.profile is not None:
        from torch.profiler import ProfilerActivity, profile

        m = DMC(model, stats)
        x = test[:args.profile]
        f = _call(m, x)
        for _ in range(5):
            f()
        reps = 20
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                f()
        print(f"(totals over {reps} forwards)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        m.remove()
        return 0
    if args.fit:  # the measurement of `dmc perf`, on fewer images
        _report("fit, 2000 images", perf._fit_vs_pass(None, 2000, args.repeats))
        return 0
    if args.efficientnet:
        from torch_dmc.bench.perf import _sample_photos
        from torch_dmc.models.efficientnet import load_efficientnet_lite0

        net = load_efficientnet_lite0()
        photos = _sample_photos(8 * 16)
        net_stats = fit(net, photos.split(16), progress=False)
        x = _sample_photos(16, seed=1)
        contenders = {"bn": _call(build("bn", net), x),
                      "dmc default": _call(build("dmc", net, net_stats), x)}
        _report("efficientnet-lite0 B=16", time_ratios(_call(net, x), contenders,
                                                       repeats=args.repeats))
        return 0
    for b in [int(s) for s in args.batch_sizes.split(",")]:
        x = test[:b]
        correct.FUSE_BATCHNORM = False  # read when a DMC is built: the BatchNorm-fusion ablation
        unfused = _call(build("dmc", model, stats), x)
        correct.FUSE_BATCHNORM = True
        contenders = {"bn": _call(build("bn", model), x),
                      "dmc default": _call(build("dmc", model, stats), x),
                      "dmc unfused": unfused,
                      "dmc adapt_bn": _call(build("dmc", model, stats, adapt_bn=True), x)}
        _report(f"resnet B={b}", time_ratios(_call(model, x), contenders, repeats=args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
