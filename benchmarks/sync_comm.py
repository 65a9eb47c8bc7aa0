"""Communication volume of synchronised correction: bytes per site per corrected forward.

`DMC(model, stats, process_group=...)` (docs/method.md § Synchronised correction) pools, at every
site, what the estimate needs from every process's slice of the batch. This script runs a shipped
model data-parallel over ``--world`` gloo processes on loopback (a batch of ``--batch`` images,
split as evenly as possible), wraps ``torch.distributed.all_gather``/``all_reduce`` to count the
bytes of the tensors each rank puts into them, and prints, per site and in total, for exact and
grid mode:

- *payload*: the bytes of the tensors this rank contributes (its ``all_gather`` input, its
  ``all_reduce`` tensor), i.e. what it has to send at least once;
- *ring wire*: what a ring algorithm sends per rank, ``(p − 1)·payload`` for ``all_gather`` and
  ``2(p − 1)/p·payload`` for ``all_reduce`` (the backend's own algorithm may differ);
- the number of collectives and the milliseconds per forward (synchronised, and the same rank
  correcting its slice alone; a loaded machine makes these noisy).

The volume depends only on shapes and options, except grid mode's knot-range refinements (one
more histogram all-reduce per round, only in batches with outliers; docs/method.md § Knot
placement). The inputs are uniform random images and the stats are fitted on other random images:
the values do not matter here. Prints, asserts nothing. Run::

    .venv/bin/python benchmarks/sync_comm.py                        # resnet, batch 200, 2 ranks
    .venv/bin/python benchmarks/sync_comm.py --model vit --batch 64 --estimate ema
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torch_dmc as dmc
from torch_dmc.models import load
from torch_dmc.stats_io import ReferenceStats

MODES = ("exact", "grid")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet", help="shipped model: resnet, resnet-gn or vit")
    p.add_argument("--batch", type=int, default=200, help="images per corrected forward, all ranks")
    p.add_argument("--world", type=int, default=2, help="gloo processes")
    p.add_argument("--estimate", default="batch", help="batch, prior, ema or per-sample")
    p.add_argument("--repeats", type=int, default=1, help="measured forwards per mode")
    p.add_argument("--fit-images", type=int, default=256, help="random images for the stats")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--timeout", type=float, default=120.0, help="process group timeout (s)")
    return p.parse_args(argv)


def _split(n: int, world: int) -> list[int]:
    return [n // world + (r < n % world) for r in range(world)]


@contextmanager
def _counting(record: dict, world: int, current: list[str]):
    """Count the bytes this rank puts into all_gather/all_reduce, by the site being corrected."""
    saved = {"all_gather": dist.all_gather, "all_reduce": dist.all_reduce}

    def all_gather(tensor_list, tensor, *args, **kwargs):
        entry = record[current[0]]
        entry["payload"] += tensor.nbytes
        entry["wire"] += (world - 1) * tensor.nbytes
        entry["calls"] += 1
        return saved["all_gather"](tensor_list, tensor, *args, **kwargs)

    def all_reduce(tensor, *args, **kwargs):
        entry = record[current[0]]
        entry["payload"] += tensor.nbytes
        entry["wire"] += 2 * (world - 1) / world * tensor.nbytes
        entry["calls"] += 1
        return saved["all_reduce"](tensor, *args, **kwargs)

    dist.all_gather, dist.all_reduce = all_gather, all_reduce
    try:
        yield
    finally:
        dist.all_gather, dist.all_reduce = saved["all_gather"], saved["all_reduce"]


def _worker(rank: int, args: argparse.Namespace, store: str, stats_path: str, out: str) -> None:
    try:
        torch.set_num_threads(args.threads)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.world,
                                timeout=timedelta(seconds=args.timeout))
        model = load(args.model)
        stats = ReferenceStats.load(stats_path, model)
        sizes = _split(args.batch, args.world)
        start = sum(sizes[:rank])
        g = torch.Generator().manual_seed(1)
        x = torch.rand(args.batch, 1, 28, 28, generator=g)[start:start + sizes[rank]]
        modules = dict(model.named_modules())
        report: dict = {"sizes": sizes, "shapes": {}, "modes": {}}
        current = ["(none)"]  # the site whose forward (and correction hook) runs
        for mode in MODES:
            hooks = [modules[n].register_forward_pre_hook(lambda _m, _i, n=n: current.__setitem__(0, n))
                     for n in stats.sites]
            shapes = [modules[n].register_forward_hook(
                lambda _m, _i, o, n=n: report["shapes"].__setitem__(n, list(o.shape))) for n in stats.sites]
            record: dict = defaultdict(lambda: {"payload": 0, "wire": 0.0, "calls": 0})
            with torch.no_grad():
                with dmc.corrected(model, stats, mode=mode, estimate=args.estimate) as alone:
                    alone(x)  # warm-up (caches)
                    t0 = time.perf_counter()
                    for _ in range(args.repeats):
                        alone(x)
                    local_ms = (time.perf_counter() - t0) / args.repeats * 1e3
                with dmc.corrected(model, stats, mode=mode, estimate=args.estimate,
                                   process_group=dist.group.WORLD) as synced:
                    synced(x)  # warm-up, not counted
                    dist.barrier()
                    with _counting(record, args.world, current):
                        t0 = time.perf_counter()
                        for _ in range(args.repeats):
                            synced(x)
                        sync_ms = (time.perf_counter() - t0) / args.repeats * 1e3
            for h in hooks + shapes:
                h.remove()
            per_forward = {site: {k: v / args.repeats for k, v in e.items()} for site, e in record.items()}
            report["modes"][mode] = {"sites": per_forward, "sync_ms": sync_ms, "local_ms": local_ms}
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()
    except BaseException:
        sys.stderr.write(f"rank {rank}:\n{traceback.format_exc()}")
        sys.exit(1)


def _size(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/sync_comm.py",
                                                 *(argv if argv is not None else sys.argv[1:])])
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = load(args.model)
        fit_data = [torch.rand(64, 1, 28, 28) for _ in range(max(1, args.fit_images // 64))]
        stats_path = Path(tmp, "stats.safetensors")
        dmc.fit(model, fit_data, per_sample=args.estimate == "per-sample", progress=False).save(stats_path)
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, args, str(Path(tmp, "store")), str(stats_path), tmp))
                 for r in range(args.world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(600)
        if any(p.exitcode != 0 for p in procs):
            for p in procs:
                if p.is_alive():
                    p.kill()
            raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        reports = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.world)]
    rep = reports[0]
    print(f"# Synchronised DMC: bytes rank 0 sends per corrected forward ({args.model}, batch {args.batch} "
          f"split {rep['sizes']} over {args.world} gloo processes, estimate {args.estimate!r})\n")
    print("| site | rank 0's output | exact: payload | exact: calls | grid: payload | grid: calls |")
    print("|---|---|---:|---:|---:|---:|")
    exact, grid = rep["modes"]["exact"]["sites"], rep["modes"]["grid"]["sites"]
    for site in [s for s in rep["shapes"] if s in exact or s in grid]:
        e, g = exact.get(site, {}), grid.get(site, {})
        print(f"| {site} | {'×'.join(map(str, rep['shapes'][site]))} | {_size(e.get('payload', 0))} | "
              f"{e.get('calls', 0):.0f} | {_size(g.get('payload', 0))} | {g.get('calls', 0):.0f} |")
    print()
    print("| mode | payload / forward | ring wire / forward | collectives | ms / forward, synced | "
          "ms / forward, slice alone |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in MODES:
        m = rep["modes"][mode]
        total = {k: sum(e[k] for e in m["sites"].values()) for k in ("payload", "wire", "calls")}
        print(f"| {mode} | {_size(total['payload'])} | {_size(total['wire'])} | {total['calls']:.0f} | "
              f"{m['sync_ms']:.1f} | {m['local_ms']:.1f} |")
    print(f"\nRerun: {command}")


if __name__ == "__main__":
    main()
