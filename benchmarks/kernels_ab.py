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
from kernels_speed import _efficientnet, _resnet  # this folder's: the same models, stats and batches

from torch_dmc import native
from torch_dmc.data.fashion_mnist import load_fashion_mnist

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
    def with_kernels(name: str):
        def run():
            native._state["ops"] = kernels[name]  # the kernels `torch_dmc.native` calls from now on
            return corrected(x)
        return run

    calls = {"plain": lambda: model(x), "base": with_kernels("base"), "new": with_kernels("new")}
    own = native._state["ops"]
    try:
        with torch.no_grad():
            same = torch.equal(calls["base"](), calls["new"]())
            times: dict[str, list[float]] = {name: [] for name in calls}
            for i in range(repeats):
                order = ["plain", "base", "new"] if i % 2 == 0 else ["plain", "new", "base"]
                for name in order:
                    t0 = time.perf_counter()
                    calls[name]()
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

    print(_compare("efficientnet-lite0 B=16", *_efficientnet(), kernels, args.repeats), flush=True)
    model, corrected, test = _resnet(load_fashion_mnist())
    print(_compare("fmnist-resnet B=16", model, corrected, test[:16], kernels, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
