"""``dmc fit`` throughput with 1 process and under torchrun with P processes, on the same images.

Runs, alternately and ``--repeats`` times each, in fresh processes, the equivalent of::

    OMP_NUM_THREADS=T    dmc fit --images N ...                                      (1 process)
    OMP_NUM_THREADS=T/P  torchrun --standalone --nproc-per-node P -m torch_dmc fit --images N ...

so both use the same ``T`` cores (default: all of this machine's CPUs). The commands run through
this script (``--worker``), which calls ``torch_dmc.cli.main`` as ``-m torch_dmc`` does and times
it on rank 0 from after the imports to its end: loading the model and the data, the fit, the
merge and saving the file (rank 0 finishes last). The whole command's wall time, with the
interpreter and torchrun start-up, is reported too. The ratio ``P processes / 1 process`` of the
images per second is the scaling (1.0: no gain; P: perfect)::

    python benchmarks/fit_scaling.py [--images 10000] [--processes 2] [--threads T]
        [--repeats 1] [--model default] [--data fmnist] [--out results.json]

The defaults fit the shipped Fashion-MNIST model on 10,000 of its training images.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def fit_argv(images: int, out: Path, model: str, data: str) -> list[str]:
    """The ``dmc fit`` arguments."""
    return ["fit", "--model", model, "--data", data, "--images", str(images), "--out", str(out)]


def launch(processes: int, argv: list[str], times: Path) -> list[str]:
    """The command that runs ``dmc ARGV`` through this script's ``--worker``."""
    worker = [str(Path(__file__).resolve()), "--worker", str(times), *argv]
    if processes == 1:
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(processes), *worker]


def shown(processes: int, argv: list[str], threads: int) -> str:
    """The same command as a user types it."""
    head = "dmc" if processes == 1 else (f"torchrun --standalone --nproc-per-node {processes} "
                                         "-m torch_dmc")
    return f"OMP_NUM_THREADS={threads} {head} {shlex.join(argv)}"


def timed(cmd: list[str], threads: int, times: Path) -> tuple[float, float]:
    """``(whole command, rank 0's dmc main)`` seconds (the command must succeed)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    times.unlink(missing_ok=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    whole = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {shlex.join(cmd)}\n{done.stderr[-3000:]}")
    return whole, json.loads(times.read_text())["seconds"]


def worker(times: str, argv: list[str]) -> int:
    """``--worker``: ``dmc ARGV`` as ``python -m torch_dmc`` runs it, timed; rank 0 writes the time."""
    from torch_dmc.cli import main as dmc_main

    t0 = time.perf_counter()
    code = dmc_main(argv)
    if os.environ.get("RANK", "0") == "0":
        Path(times).write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    return code


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000, help="training images (default 10000)")
    parser.add_argument("--processes", type=int, default=2, help="torchrun processes (default 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="cores in all: the single process's threads; each of the P processes "
                        "gets threads/P (default: this machine's CPUs)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each command (default 1)")
    parser.add_argument("--model", default="default", help="--model of dmc fit (default: shipped)")
    parser.add_argument("--data", default="fmnist", help="--data of dmc fit (default fmnist)")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="also write the numbers")
    args = parser.parse_args()
    p = args.processes
    if p < 2 or args.images < 1 or args.threads < p or args.repeats < 1:
        sys.exit("expected --processes >= 2, --images >= 1, --threads >= --processes, --repeats >= 1")
    configs = {1: args.threads, p: max(1, args.threads // p)}  # processes → threads per process
    runs: dict[int, list[tuple[float, float]]] = {procs: [] for procs in configs}
    with tempfile.TemporaryDirectory() as tmp:
        times = Path(tmp) / "times.json"
        for repeat in range(args.repeats):
            for procs, threads in configs.items():  # alternate: a drifting load hits both alike
                argv = fit_argv(args.images, Path(tmp) / f"{procs}.safetensors", args.model,
                                args.data)
                if repeat == 0:
                    print(shown(procs, argv, threads), flush=True)
                runs[procs].append(timed(launch(procs, argv, times), threads, times))
    rows = {}
    for procs, measured in runs.items():
        whole, inner = min(w for w, _ in measured), min(i for _, i in measured)
        rows[procs] = {"threads_per_process": configs[procs], "command_s": round(whole, 2),
                       "dmc_main_s": round(inner, 2),
                       "images_per_s": round(args.images / inner, 1),
                       "images_per_s_command": round(args.images / whole, 1)}
    ratio = rows[p]["images_per_s"] / rows[1]["images_per_s"]
    ratio_command = rows[p]["images_per_s_command"] / rows[1]["images_per_s_command"]
    print(f"\n{args.images} images, {args.threads} threads in all, best of {args.repeats}:")
    print("processes  threads/process  dmc main (s)  images/s  whole command (s)  images/s")
    for procs, r in rows.items():
        print(f"{procs:9d}  {r['threads_per_process']:15d}  {r['dmc_main_s']:12.2f}  "
              f"{r['images_per_s']:8.1f}  {r['command_s']:17.2f}  {r['images_per_s_command']:8.1f}")
    print(f"ratio {p} processes / 1 process: {ratio:.2f} (dmc main), {ratio_command:.2f} (whole "
          "command, with interpreter and torchrun start-up)")
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"images": args.images, "processes": p, "threads": args.threads,
             "repeats": args.repeats, "model": args.model, "data": args.data, "rows": rows,
             "runs": {str(k): v for k, v in runs.items()}, "ratio": round(ratio, 3),
             "ratio_command": round(ratio_command, 3)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
