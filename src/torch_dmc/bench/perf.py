"""``dmc perf`` / ``benchmarks/perf.py``: speed and memory of correction, as ratios.

How and what it measures: docs/protocol.md § Speed and memory.

Every ratio is measured side by side in one process: each method's forward timed right beside a
plain forward of the same model on the same batch, in interleaved repetitions; the median ratio is
reported with its min–max over repetitions. Memory is the peak RSS of separate child processes (a
plain pass and a fit over the same images, and a fit over 4× the images) and the bytes of the
statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = ["add_perf_arguments", "run_perf", "time_ratios", "machine_info"]

#: Contenders of the forward ratios: ``dmc unfused`` is the default with the BatchNorm fusion off
#: (`torch_dmc.correct.FUSE_BATCHNORM`: every BatchNorm site corrected after its module);
#: ``dmc no kernels`` the default with the compiled kernels off (`torch_dmc.native.disabled`:
#: the same outputs, PyTorch operators only).
METHODS = ("bn", "tent", "dmc exact", "dmc unfused", "dmc no kernels", "dmc default")


def machine_info() -> dict:
    """CPU, threads and library versions of this process."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch_dmc
    from torch_dmc import native

    return {"cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "torch_dmc": torch_dmc.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "compiled_kernels": native.kernels() is not None}


def time_ratios(plain: Callable[[], object], contenders: dict[str, Callable[[], object]],
                repeats: int = 7, warmup: int = 2) -> dict[str, dict[str, float]]:
    """Median (min, max) of ``time(contender) / time(plain)`` over repetitions, each ratio taken
    from a pair of adjacent calls.

    Each repetition times every contender right beside a plain call of its own: the plain call
    first in even repetitions, second in odd ones. A shared machine's drift over a repetition (which
    can last seconds when a contender is slow), and what the previous call left in the caches, then
    hit both sides of each ratio alike.

    Returns:
        ``{name: {"median": r, "min": r, "max": r, "plain_ms": t}}``, ``t`` the median time of
        every timed plain call.
    """
    def timed(f: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    for _ in range(warmup):
        plain()
        for f in contenders.values():
            f()
    ratios: dict[str, list[float]] = {k: [] for k in contenders}
    plain_times = []
    for i in range(repeats):
        for name, f in contenders.items():
            if i % 2 == 0:
                base = timed(plain)
                took = timed(f)
            else:
                took = timed(f)
                base = timed(plain)
            plain_times.append(base)
            ratios[name].append(took / base)
    plain_ms = statistics.median(plain_times) * 1000
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "plain_ms": plain_ms}
            for k, v in ratios.items()}


def _methods(model: nn.Module, stats) -> dict[str, nn.Module]:
    from .. import correct
    from ..methods import build

    fuse = correct.FUSE_BATCHNORM
    correct.FUSE_BATCHNORM = False  # read when a DMC is built
    try:
        unfused = build("dmc", model, stats)
    finally:
        correct.FUSE_BATCHNORM = fuse
    return {
        "bn": build("bn", model),
        "tent": build("tent", model),
        "dmc exact": build("dmc", model, stats, mode="exact"),
        "dmc unfused": unfused,
        "dmc default": build("dmc", model, stats),
    }


def _forward_ratios(model: nn.Module, stats, x: torch.Tensor, repeats: int) -> dict:
    from .. import native

    methods = _methods(model, stats)

    def call(m):
        def f():
            with torch.no_grad():
                return m(x)
        return f

    contenders = {name: call(m) for name, m in methods.items()}
    contenders["tent"] = lambda: methods["tent"](x)  # tent needs gradients
    default = contenders["dmc default"]

    def without_kernels():
        with native.disabled():
            return default()

    contenders["dmc no kernels"] = without_kernels
    contenders = {name: contenders[name] for name in METHODS}  # the table's column order
    return time_ratios(call(model), contenders, repeats=repeats)


def _load_model(directory: str | None) -> nn.Module:
    from .runner import resolve_model

    return resolve_model(directory).model


def _fmnist_case(model_dir: str | None, batch_sizes: list[int], fit_images: int,
                 repeats: int) -> dict:
    from .. import fit
    from ..data.arrays import batches, to_tensor
    from ..data.fashion_mnist import load_fashion_mnist

    data = load_fashion_mnist()
    model = _load_model(model_dir)
    train = to_tensor(data.x_train[:fit_images])
    stats = fit(model, batches(train, None, 200), progress=False)
    out = {"stats_bytes": stats.nbytes(), "sites": len(stats.sites), "levels": stats.levels}
    test = to_tensor(data.x_test)
    for b in batch_sizes:
        out[f"batch {b}"] = _forward_ratios(model, stats, test[:b], repeats)
    return out


def _sample_photos(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``n`` random ``size×size`` crops of scikit-image's sample photos, in ``[0, 1]``."""
    import skimage.data as sk

    photos = [sk.astronaut(), sk.coffee(), sk.chelsea(), sk.rocket(), sk.immunohistochemistry()]
    g = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(n):
        img = torch.from_numpy(photos[i % len(photos)].copy()).permute(2, 0, 1).float() / 255
        h, w = img.shape[1:]
        s = int(torch.randint(min(h, w) // 2, min(h, w) + 1, (1,), generator=g))
        top = int(torch.randint(0, h - s + 1, (1,), generator=g))
        left = int(torch.randint(0, w - s + 1, (1,), generator=g))
        crop = img[:, top:top + s, left:left + s].unsqueeze(0)
        crops.append(nn.functional.interpolate(crop, size=(size, size), mode="bilinear",
                                               align_corners=False))
    return torch.cat(crops)


def _efficientnet_case(batch: int, repeats: int) -> dict:
    from .. import fit
    from ..models.efficientnet import load_efficientnet_lite0

    model = load_efficientnet_lite0()
    photos = _sample_photos(8 * batch)
    stats = fit(model, photos.split(batch), progress=False)
    x = _sample_photos(batch, seed=1)
    out = {"stats_bytes": stats.nbytes(), "sites": len(stats.sites), "levels": stats.levels}
    out[f"batch {batch}"] = _forward_ratios(model, stats, x, repeats)
    return out


def _fit_vs_pass(model_dir: str | None, images: int, repeats: int) -> dict[str, dict[str, float]]:
    """Time of ``fit`` over ``images`` training images against one plain pass over them, and of
    ``fit(..., per_sample=True)`` (the per-sample reference, opt-in): ``{"fit": ratios,
    "fit per-sample": ratios}`` as `time_ratios` gives them."""
    from .. import fit
    from ..data.arrays import batches, to_tensor
    from ..data.fashion_mnist import load_fashion_mnist

    model = _load_model(model_dir)
    x = to_tensor(load_fashion_mnist().x_train[:images])

    def plain():
        with torch.inference_mode():
            for b in batches(x, None, 200):
                model(b)

    def fitting():
        fit(model, batches(x, None, 200), progress=False)

    def fitting_per_sample():
        fit(model, batches(x, None, 200), progress=False, per_sample=True)

    return time_ratios(plain, {"fit": fitting, "fit per-sample": fitting_per_sample},
                       repeats=repeats, warmup=1)


def _child_peak_rss(model_dir: str | None, task: str, images: int) -> float:
    """Peak RSS (MB) of a fresh process running ``task`` over ``images`` training images.

    Read from ``/proc/self/status`` (``VmHWM``): ``ru_maxrss`` would include the parent's peak,
    which Linux carries across ``fork``/``exec``.
    """
    code = (
        "import resource, torch\n"
        "from torch_dmc import fit\n"
        "from torch_dmc.data.arrays import batches, to_tensor\n"
        "from torch_dmc.data.fashion_mnist import load_fashion_mnist\n"
        "from torch_dmc.bench.runner import resolve_model\n"
        f"model = resolve_model({model_dir!r}).model\n"
        "raw = load_fashion_mnist().x_train\n"
        f"n = {images}\n"
        "def chunks():\n"
        "    for i in range(0, n, 200):\n"
        "        yield to_tensor(raw[i % len(raw):i % len(raw) + 200])\n"
        f"if {task!r} == 'fit':\n"
        "    fit(model, chunks(), progress=False)\n"
        "else:\n"
        "    with torch.inference_mode():\n"
        "        for b in chunks(): model(b)\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
        "print(int(hwm[0].split()[1]) / 1024 if hwm else "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _fmt(r: dict) -> str:
    return f"{r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f})"


def render(results: dict) -> str:
    """The results as Markdown tables."""
    machine = results["machine"]
    lines = [f"Machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch "
             f"{machine['torch']}."]
    if "compiled_kernels" in machine:
        state = "in use." if machine["compiled_kernels"] else "not in use (build failed or turned off)."
        lines.append(f"Compiled kernels (`torch_dmc.native`): {state}")
    lines.append("")
    cases = [(k, v) for k, v in results["forward"].items()]
    header = "| model | batch | plain (ms) | " + " | ".join(METHODS) + " |"
    lines += ["Forward time relative to the plain forward (median, min–max over interleaved "
              "repetitions, each call timed beside a plain forward of its own):", "", header,
              "|---|---:|---:|" + "---:|" * len(METHODS)]
    for model_name, case in cases:
        for key, ratios in case.items():
            if not key.startswith("batch "):
                continue
            plain_ms = next(iter(ratios.values()))["plain_ms"]
            cells = " | ".join(_fmt(ratios[m]) if m in ratios else "–" for m in METHODS)
            lines.append(f"| {model_name} | {key[6:]} | {plain_ms:.1f} | {cells} |")
    f = results["fit"]
    lines += ["", f"`fit` over {f['images']} training images: {_fmt(f['ratio'])} the time of one "
              "plain inference pass over them."]
    if "per_sample_ratio" in f:
        lines.append(f"`fit` with the per-sample reference (`per_sample=True`): "
                     f"{_fmt(f['per_sample_ratio'])}.")
    lines += ["",
              "| peak RSS of a process (MB) | value |", "|---|---:|"]
    for k, v in results["memory"].items():
        lines.append(f"| {k} | {v:.0f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines)


def add_perf_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``dmc perf`` flags to ``parser``."""
    parser.add_argument("--out", default="results/perf", help="folder for perf.json and perf.md")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="Fashion-MNIST model folder (default: the shipped model)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--fit-images", type=int, default=10000,
                        help="training images for fit timing and the stats")
    parser.add_argument("--skip-efficientnet", action="store_true",
                        help="only the Fashion-MNIST model")


def run_perf(args) -> int:
    """Run every measurement, print the tables, write ``perf.json`` and ``perf.md``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is not None:
        args.model = str(Path(args.model).resolve())  # child processes may run elsewhere
    results: dict = {"machine": machine_info(), "command": " ".join(sys.argv), "forward": {}}
    print("Fashion-MNIST SmallResNet …", flush=True)
    results["forward"]["fmnist-resnet"] = _fmnist_case(args.model, [200, 16], args.fit_images,
                                                     args.repeats)
    if not args.skip_efficientnet:
        print("EfficientNet-Lite0 …", flush=True)
        results["forward"]["efficientnet-lite0 224²"] = _efficientnet_case(16, args.repeats)
    print("fit vs plain pass …", flush=True)
    fit_ratios = _fit_vs_pass(args.model, args.fit_images, max(3, args.repeats // 2))
    results["fit"] = {"images": args.fit_images, "ratio": fit_ratios["fit"],
                      "per_sample_ratio": fit_ratios["fit per-sample"]}
    n = args.fit_images
    results["memory"] = {
        f"plain pass, {n} images": _child_peak_rss(args.model, "plain", n),
        f"fit, {n} images": _child_peak_rss(args.model, "fit", n),
        f"fit, {4 * n} images": _child_peak_rss(args.model, "fit", 4 * n),
        "stats bytes (Fashion-MNIST model)": results["forward"]["fmnist-resnet"]["stats_bytes"],
    }
    if not args.skip_efficientnet:
        results["memory"]["stats bytes (EfficientNet-Lite0)"] = \
            results["forward"]["efficientnet-lite0 224²"]["stats_bytes"]
    results["this_process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = render(results)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf.json").write_text(json.dumps(results, indent=2))
    (out / "perf.md").write_text(f"Command: `{results['command']}`\n\n{text}\n")
    return 0
