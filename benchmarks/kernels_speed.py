"""What the compiled kernels buy: the default corrected forward with and without them, side by side.

The `dmc` method with default options (grid mode) on the shipped Fashion-MNIST ResNet (stats of
2,000 training images; batches of the first 200 and 16 clean test images) and on
EfficientNet-Lite0 at 224² (batch 16 of sample-photo crops, as `dmc perf`), each against the plain
forward, interleaved in one process (`torch_dmc.bench.perf.time_ratios`): with the kernels
(`torch_dmc.native`) and inside `native.disabled()` (PyTorch operators). Also checks that both give
the same logits, bit for bit. With ``--fit-images N``, also `fit` and `fit(per_sample=True)` over
the first N training images (batches of 200) against one plain pass over them, with and without
the kernels, and whether both write the same statistics. Runs against whichever ``torch_dmc`` is
importable, so the same script measures older commits (``PYTHONPATH=<checkout>/src``).

    python benchmarks/kernels_speed.py --threads 2 [--repeats 9] [--skip-efficientnet]
                                       [--fit-images 4000] [--skip-forward]
    python benchmarks/kernels_speed.py --threads 2 --profile-fit 4000   # where fit's time goes
    python benchmarks/kernels_speed.py --threads 2 --profile-sites      # EfficientNet's sites

``--profile-fit N`` prints `torch.profiler`'s operators by their own CPU time over one `fit` of the
first N training images (with the kernels, after one warm-up fit) and nothing else.
``--profile-sites`` prints, for EfficientNet-Lite0's default corrected forward at batch 16, the
time of the site kernel (``torch_dmc::grid_site``) and of the sample (``torch_dmc::take``) per
activation shape, and of the whole forward's operators, over 5 forwards (after 3 warm-up ones).
"""

from __future__ import annotations

import argparse

import torch

from torch_dmc import fit, native
from torch_dmc.bench.perf import _load_model, _sample_photos, time_ratios
from torch_dmc.data.arrays import batches, to_tensor
from torch_dmc.data.fashion_mnist import load_fashion_mnist
from torch_dmc.methods import build


def _line(name: str, model: torch.nn.Module, corrected: torch.nn.Module, x: torch.Tensor,
          repeats: int) -> str:
    def plain():
        with torch.no_grad():
            return model(x)

    def with_kernels():
        with torch.no_grad():
            return corrected(x)

    def without_kernels():
        with torch.no_grad(), native.disabled():
            return corrected(x)

    same = torch.equal(with_kernels(), without_kernels())
    r = time_ratios(plain, {"kernels": with_kernels, "no kernels": without_kernels}, repeats=repeats)
    cells = "  ".join(f"{k} {v['median']:.2f}× ({v['min']:.2f}–{v['max']:.2f})" for k, v in r.items())
    return f"{name:<28} plain {r['kernels']['plain_ms']:7.1f} ms  {cells}  same logits: {same}"


def _fit_lines(x: torch.Tensor, repeats: int) -> list[str]:
    model = _load_model(None)

    def plain():
        with torch.inference_mode():
            for b in batches(x, None, 200):
                model(b)

    def fitting(per_sample: bool, kernels: bool):
        def run():
            if kernels:
                return fit(model, batches(x, None, 200), progress=False, per_sample=per_sample)
            with native.disabled():
                return fit(model, batches(x, None, 200), progress=False, per_sample=per_sample)
        return run

    lines = []
    for per_sample in (False, True):
        a, b = fitting(per_sample, True)(), fitting(per_sample, False)()
        same = all(torch.equal(a.quantiles[n], b.quantiles[n]) for n in a.sites) and all(
            torch.equal(a.per_sample[n], b.per_sample[n]) for n in a.per_sample)
        r = time_ratios(plain, {"kernels": fitting(per_sample, True),
                                "no kernels": fitting(per_sample, False)},
                        repeats=repeats, warmup=1)
        cells = "  ".join(f"{k} {v['median']:.2f}× ({v['min']:.2f}–{v['max']:.2f})"
                          for k, v in r.items())
        name = f"fit{' per-sample' if per_sample else ''}, {len(x)} images"
        lines.append(f"{name:<28} plain {r['kernels']['plain_ms']:7.1f} ms  {cells}  "
                     f"same statistics: {same}")
    return lines


def _machine() -> str:
    return (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), compiled kernels "
            f"{'in use' if native.kernels() is not None else 'NOT in use'}")


def _efficientnet() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """EfficientNet-Lite0, its default corrected forward (stats of 8 batches of 16 sample-photo
    crops, as `dmc perf`) and a batch of 16 other crops."""
    from torch_dmc.models.efficientnet import load_efficientnet_lite0

    model = load_efficientnet_lite0()
    stats = fit(model, _sample_photos(8 * 16).split(16), progress=False)
    return model, build("dmc", model, stats), _sample_photos(16, seed=1)


def _resnet(data) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """The shipped Fashion-MNIST ResNet, its default corrected forward (stats of the first 2,000
    training images) and the clean test images."""
    model = _load_model(None)
    stats = fit(model, batches(to_tensor(data.x_train[:2000]), None, 200), progress=False)
    return model, build("dmc", model, stats), to_tensor(data.x_test)


def _profile_fit(x: torch.Tensor) -> int:
    from torch.profiler import ProfilerActivity, profile

    model = _load_model(None)
    fit(model, batches(x, None, 200), progress=False)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fit(model, batches(x, None, 200), progress=False)
    print(f"{_machine()}; fit of {len(x)} images")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


def _profile_sites(forwards: int = 5) -> int:
    from torch.profiler import ProfilerActivity, profile

    _, corrected, x = _efficientnet()
    with torch.no_grad():
        for _ in range(3):
            corrected(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(forwards):
                corrected(x)
    print(f"{_machine()}; EfficientNet-Lite0, batch 16, ms per forward (over {forwards})")
    rows = [(e.self_cpu_time_total / forwards / 1e3, e.key, e.input_shapes[0], e.count // forwards)
            for e in prof.key_averages(group_by_input_shape=True)
            if e.key in ("torch_dmc::grid_site", "torch_dmc::take")]
    for ms, key, shape, calls in sorted(rows, reverse=True):
        print(f"{key:<22} {str(shape):<20} {calls:3d} per forward  {ms:7.1f} ms")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--skip-efficientnet", action="store_true")
    parser.add_argument("--skip-forward", action="store_true", help="time only the fits")
    parser.add_argument("--fit-images", type=int, default=0,
                        help="also time fit over this many training images (0: no)")
    parser.add_argument("--profile-sites", action="store_true",
                        help="only profile EfficientNet-Lite0's sites at batch 16 (torch.profiler)")
    parser.add_argument("--profile-fit", type=int, default=0, metavar="N",
                        help="only profile one fit over N training images (torch.profiler)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.profile_sites:
        return _profile_sites()
    if args.profile_fit:
        return _profile_fit(to_tensor(load_fashion_mnist().x_train[:args.profile_fit]))
    print(_machine(), flush=True)
    data = load_fashion_mnist()
    if args.fit_images:
        for line in _fit_lines(to_tensor(data.x_train[:args.fit_images]), args.repeats):
            print(line, flush=True)
    if args.skip_forward:
        return 0
    model, corrected, test = _resnet(data)
    for b in (200, 16):
        print(_line(f"fmnist-resnet B={b}", model, corrected, test[:b], args.repeats), flush=True)
    if not args.skip_efficientnet:
        print(_line("efficientnet-lite0 B=16", *_efficientnet(), args.repeats), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
