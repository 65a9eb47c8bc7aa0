"""Peak memory of streaming an ImageNet-C tree through ``ImageFiles.iter_batches``: flat in N.

Writes (into a temporary folder, or ``--dir``, reused when it already holds the same tree) an
ImageNet-C-layout tree of small random JPEGs, ``<corruption>/<severity>/<wnid>/*.JPEG`` (default 2
corruptions × 10 wnids × 1000 images of 64×64), then, for each N of ``--sizes``, streams the first
N images (corruption after corruption, as the bench does) in batches of ``--batch-size`` decoded by
``--workers`` DataLoader workers, in a fresh child process, and reports that process's peak
resident memory (``ru_maxrss``) and its workers' (``RUSAGE_CHILDREN``). The workers hold at most
``2 × workers`` batches in flight, so the peak should not grow with N::

    python benchmarks/imagenet_c_memory.py [--sizes 2000,10000,20000] [--image-size 64]
        [--batch-size 200] [--workers 2] [--severity 5] [--dir DIR] [--through-bench]

``--through-bench`` also runs ``dmc bench --data imagenet-c:DIR`` (method ``source``, a tiny
model defined here, ``--model imagenet_c_memory:tiny_model``) per N and reports the bench
process tree's peak (``tiny-imagenet-c:DIR`` at 64×64, ``imagenet-c:DIR`` at 224×224).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_MARKER = "benchmark_tree.json"


def tiny_model():
    """``--model imagenet_c_memory:tiny_model``: a small BatchNorm CNN, 3×H×W → classes
    (``$DMC_MEMORY_CLASSES``, default 10)."""
    from torch import nn

    k = int(os.environ.get("DMC_MEMORY_CLASSES", "10"))
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, k),
    )


def corruption_names(n: int) -> list[str]:
    from torch_dmc.data.corruptions import COMMON_CORRUPTIONS

    return list(COMMON_CORRUPTIONS[:n])


def make_tree(root: Path, corruptions: int, wnids: int, per_class: int, size: int, severity: int) -> float:
    """Write the tree (skipped when ``root`` already holds this one); seconds spent."""
    params = {"corruptions": corruptions, "wnids": wnids, "per_class": per_class, "size": size,
              "severity": severity}
    marker = root / _MARKER
    root.mkdir(parents=True, exist_ok=True)
    # fewer wnid folders than the data set's classes: list them (docs/protocol.md § Data specs)
    (root / "wnids.txt").write_text("".join(f"n{10000000 + w:08d}\n" for w in range(wnids)))
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return 0.0
    from PIL import Image

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    # a pool of smooth random images (JPEG-typical file sizes: noise blown up from 8×8, plus fine
    # noise), encoded once and written cyclically: encoding every file would dominate the run
    pool = []
    for _ in range(min(500, corruptions * wnids * per_class)):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = np.kron(coarse, np.ones((size // 8 + 1, size // 8 + 1, 1), np.uint8))[:size, :size]
        img = np.clip(img.astype(np.int16) + rng.integers(-20, 21, img.shape), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=85)
        pool.append(buf.getvalue())
    k = 0
    for c in corruption_names(corruptions):
        for w in range(wnids):
            folder = root / c / str(severity) / f"n{10000000 + w:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                (folder / f"ILSVRC2012_val_{w * per_class + j + 1:08d}.JPEG").write_bytes(pool[k % len(pool)])
                k += 1
    marker.write_text(json.dumps(params))
    return time.perf_counter() - t0


def _rss_mb(kb: int) -> float:
    return kb / 1024.0  # Linux: ru_maxrss in KiB


def child_stream(directory: str, n: int, size: int, batch: int, workers: int, severity: int) -> None:
    """Child process: stream the first ``n`` images; print one JSON line of measurements."""
    from torch_dmc.data.imagenet import open_imagenet_c

    data = open_imagenet_c(directory, size=size)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    left, seen, check = n, 0, 0
    files: dict[str, str] = {}
    for c in data.corruptions():
        if left <= 0:
            break
        s = data.corrupted(c, severity)
        rows = np.arange(min(left, len(s)))
        for x in s.iter_batches([rows[i : i + batch] for i in range(0, len(rows), batch)], workers):
            seen += len(x)
            check += int(x.sum(dtype=np.uint64))  # touch every byte, as a model would
        files.update(s.files())
        left -= len(rows)
        del s
    out = {
        "images": seen,
        "seconds": time.perf_counter() - t0,
        "base_mb": _rss_mb(base),
        "peak_mb": _rss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
        "worker_peak_mb": _rss_mb(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss),
        "sets": len(files),
    }
    print(json.dumps(out))


def child_bench(cmd: list[str], env: dict) -> None:
    """Child process: run ``dmc bench``; print one JSON line with the peak of its process tree."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    print(json.dumps({"rc": proc.returncode, "seconds": time.perf_counter() - t0,
                      "peak_mb": _rss_mb(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss),
                      "last_line": tail[0][:300]}))


def run_child(args: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2000,10000,20000", help="images streamed, comma list")
    p.add_argument("--image-size", type=int, default=64, help="side of the JPEGs (default 64)")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--corruptions", type=int, default=2, help="corruption folders (default 2)")
    p.add_argument("--wnids", type=int, default=10, help="class folders (default 10)")
    p.add_argument("--dir", default=None, help="where to write (and reuse) the tree (default: a temp folder)")
    p.add_argument("--through-bench", action="store_true",
                   help="also run `dmc bench --data imagenet-c:DIR` per N")
    p.add_argument("--severity", type=int, default=5, help="the one severity folder (default 5)")
    p.add_argument("--child", nargs=6, metavar=("DIR", "N", "SIZE", "BATCH", "WORKERS", "SEVERITY"),
                   help=argparse.SUPPRESS)
    p.add_argument("--child-bench", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        d, n, size, batch, workers, severity = a.child
        child_stream(d, int(n), int(size), int(batch), int(workers), int(severity))
        return 0
    if a.child_bench:
        child_bench(json.loads(a.child_bench), dict(os.environ))
        return 0

    print("rerun: python " + " ".join(shlex.quote(x) for x in [__file__, *(argv or sys.argv[1:])]))
    sizes = sorted(int(x) for x in a.sizes.split(","))
    per_class = -(-max(sizes) // (a.corruptions * a.wnids))
    tmp = None
    if a.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="imagenet-c-memory-")
        root = Path(tmp.name)
    else:
        root = Path(a.dir)
        root.mkdir(parents=True, exist_ok=True)
    try:
        spent = make_tree(root, a.corruptions, a.wnids, per_class, a.image_size, a.severity)
        how = f"written in {spent:.1f} s" if spent else "reused"
        total = a.corruptions * a.wnids * per_class
        print(f"tree: {root} ({a.corruptions} corruptions × {a.wnids} wnids × {per_class} images of "
              f"{a.image_size}×{a.image_size}, {total} JPEGs; "
              f"{how})")
        print(f"streaming: batch {a.batch_size}, workers {a.workers}; each N in a fresh process; "
              "RSS = ru_maxrss (peak resident set)")
        rows = []
        for n in sizes:
            rows.append(run_child(["--child", str(root), str(n), str(a.image_size), str(a.batch_size),
                                   str(a.workers), str(a.severity)]))
        first = rows[0]
        print(f"{'images':>8} {'peak RSS MB':>12} {'ratio':>6} {'after open MB':>14} "
              f"{'worker peak MB':>15} {'w. ratio':>8} {'seconds':>8} {'img/s':>7}")
        for r in rows:
            print(f"{r['images']:>8} {r['peak_mb']:>12.1f} {r['peak_mb'] / first['peak_mb']:>6.3f} "
                  f"{r['base_mb']:>14.1f} {r['worker_peak_mb']:>15.1f} "
                  f"{r['worker_peak_mb'] / first['worker_peak_mb']:>8.3f} {r['seconds']:>8.1f} "
                  f"{r['images'] / r['seconds']:>7.0f}")
        if a.through_bench:
            _through_bench(root, sizes, a)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


def _through_bench(root: Path, sizes: list[int], a) -> None:
    """``dmc bench --data imagenet-c:DIR`` per N (N / corruptions test images per set, a seeded
    subset: ``--n-test``)."""
    kinds = {64: "tiny-imagenet-c", 224: "imagenet-c"}
    if a.image_size not in kinds:
        print(f"--through-bench: needs --image-size 64 (tiny-imagenet-c) or 224 (imagenet-c); "
              f"found {a.image_size}.")
        return
    kind = kinds[a.image_size]
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["DMC_MEMORY_CLASSES"] = str(a.wnids)
    print(f"through `dmc bench --data {kind}:DIR`:")
    print(f"{'images':>8} {'peak RSS MB':>12} {'ratio':>6} {'seconds':>8}  result")
    first = None
    with tempfile.TemporaryDirectory(prefix="imagenet-c-bench-") as out:
        for n in sizes:
            cmd = [sys.executable, "-m", "torch_dmc", "bench", "--data", f"{kind}:{root}",
                   "--model", "imagenet_c_memory:tiny_model", "--methods", "source",
                   "--corruptions", ",".join(corruption_names(a.corruptions)),
                   "--severities", str(a.severity), "--n-test", str(max(1, n // a.corruptions)),
                   "--batch-size", str(a.batch_size), "--workers", str(a.workers),
                   "--out", os.path.join(out, f"n{n}"), "--no-progress"]
            if n == sizes[0]:
                print("  command: PYTHONPATH=" + here + " " + " ".join(shlex.quote(x) for x in cmd))
            r = run_child(["--child-bench", json.dumps(cmd)], env)
            first = first or r["peak_mb"]
            status = "ok" if r["rc"] == 0 else f"rc {r['rc']}: {r['last_line']}"
            print(f"{n:>8} {r['peak_mb']:>12.1f} {r['peak_mb'] / first:>6.3f} {r['seconds']:>8.1f}  {status}")


if __name__ == "__main__":
    sys.exit(main())
