"""One change to the compiled kernels, measured: the working tree's kernels against a commit's.

Builds ``src/torch_dmc/_native/kernels.cpp`` as it is at ``--base`` (``git show``) under another
operator namespace, with the flags of this machine's build (`torch_dmc.native.compile_flags`), and
times the default corrected forward (grid mode) with the base kernels and with the working tree's,
alternately in one process (which one goes first alternates between repetitions), with a plain
forward in each repetition: EfficientNet-Lite0 at 224², batch 16 (stats and batch as in `dmc perf`)
and the shipped Fashion-MNIST ResNet at batch 16 (stats of 2,000 training images). Everything but
the kernels is the working tree's code, so only the kernels' difference is timed. It checks that
both give the same logits, bit for bit, and prints per model the median (min–max) over
repetitions of ``new / base`` and each one's median ratio to the plain forward.

    python benchmarks/kernels_ab.py --base <commit> [--threads 2] [--repeats 9]

The base's kernels must take the arguments the working tree's ``torch_dmc.native`` passes (the
same operator schemas); a call that fails says so. The build (about 20 s) is cached under
``TORCH_EXTENSIONS_DIR`` like the kernels' own.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

from torch_dmc import fit, native
from torch_dmc.bench.perf import _load_model, _sample_photos
from torch_dmc.data.arrays import batches, to_tensor
from torch_dmc.data.fashion_mnist import load_fashion_mnist
from torch_dmc.methods import build

NAMESPACE = "torch_dmc_base"


def _base_kernels(rev: str):
    """The kernels of commit ``rev``, compiled and loaded as ``torch.ops.torch_dmc_base``."""
    from torch.utils.cpp_extension import get_default_build_root, load

    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:src/torch_dmc/_native/kernels.cpp"], cwd=root,
                            check=True, capture_output=True, text=True).stdout
    renamed, n = re.subn(r"TORCH_LIBRARY(_IMPL)?\(torch_dmc,", rf"TORCH_LIBRARY\1({NAMESPACE},", source)
    if n == 0:
        raise SystemExit(f"{rev}'s kernels.cpp registers no torch_dmc operators")
    flags = native.compile_flags()
    name = "torch_dmc_base_" + hashlib.sha256((renamed + " ".join(flags)).encode()).hexdigest()[:12]
    directory = Path(get_default_build_root()) / name
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "kernels_base.cpp"
    path.write_text(renamed)
    load(name=name, sources=[str(path)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
         build_directory=str(directory), is_python_module=False, verbose=False)
    return getattr(torch.ops, NAMESPACE)


def _compare(label: str, model: torch.nn.Module, corrected: torch.nn.Module, x: torch.Tensor,
             kernels: dict, repeats: int) -> str:
    def forward(ops=None):
        if ops is not None:
            native._state["ops"] = ops  # the kernels `torch_dmc.native` calls from now on
        with torch.no_grad():
            return corrected(x) if ops is not None else model(x)

    own = native._state["ops"]
    try:
        same = torch.equal(forward(kernels["base"]), forward(kernels["new"]))
        times: dict[str, list[float]] = {"plain": [], "base": [], "new": []}
        for i in range(repeats):
            order = ["plain", "base", "new"] if i % 2 == 0 else ["plain", "new", "base"]
            for name in order:
                t0 = time.perf_counter()
                forward(kernels.get(name))
                times[name].append(time.perf_counter() - t0)
    finally:
        native._state["ops"] = own
    ratio = [n / b for n, b in zip(times["new"], times["base"], strict=True)]
    plain = statistics.median(times["plain"])
    return (f"{label:<26} new/base {statistics.median(ratio):.3f} ({min(ratio):.3f}–{max(ratio):.3f})  "
            f"base {statistics.median(times['base']) / plain:.2f}×, new "
            f"{statistics.median(times['new']) / plain:.2f}× the plain forward "
            f"({plain * 1e3:.1f} ms)  same logits: {same}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="commit whose kernels are the baseline")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    new = native.kernels()
    if new is None:
        raise SystemExit("the compiled kernels are not in use here: nothing to compare")
    kernels = {"base": _base_kernels(args.base), "new": new}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); kernels of the "
          f"working tree against {args.base}'s")

    from torch_dmc.models.efficientnet import load_efficientnet_lite0

    net = load_efficientnet_lite0()
    stats = fit(net, _sample_photos(8 * 16).split(16), progress=False)
    print(_compare("efficientnet-lite0 B=16", net, build("dmc", net, stats),
                   _sample_photos(16, seed=1), kernels, args.repeats), flush=True)

    data = load_fashion_mnist()
    resnet = _load_model(None)
    stats = fit(resnet, batches(to_tensor(data.x_train[:2000]), None, 200), progress=False)
    print(_compare("fmnist-resnet B=16", resnet, build("dmc", resnet, stats),
                   to_tensor(data.x_test[:16]), kernels, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
