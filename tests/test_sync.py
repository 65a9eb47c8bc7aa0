"""Synchronised correction, `DMC(model, stats, process_group=...)`, over 2 gloo processes on CPU.

Specified in docs/method.md § Synchronised correction. The test spawns its own processes (spawn
context, a FileStore in ``tmp_path``) with a short group timeout, and joins them with an outer
limit: a rank that fails, raises or hangs fails the test, and never hangs it. One spawn runs every
equality check (spawning a process that imports torch costs seconds).
"""

from __future__ import annotations

import copy
import json
import re
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torch_dmc as dmc
from torch_dmc.stats_io import ReferenceStats
from torch_dmc.transport import histogram_levels, transport_exact, transport_exact_columns

WORLD = 2
GROUP_TIMEOUT_S = 30.0
"""The process group's timeout: bounds every collective, so a lost rank fails the others."""
RUN_LIMIT_S = 150.0
"""Outer limit of one spawn (start-up on a loaded machine included)."""
GRACE_S = 2.0
"""How long the other ranks may still run once one has failed, before they are killed."""
TOL = {"rtol": 1e-5, "atol": 1e-5, "equal_nan": True}
"""Synchronised versus one process on the concatenated batch: to float rounding."""
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
               "gather", "scatter", "barrier", "send", "recv", "isend", "irecv")


# -- the model and its stats (built alike in every process) ----------------------------------------
class Net(nn.Module):
    """Conv + BatchNorm2d, conv + GroupNorm, LayerNorm over (B, N, C) tokens, BatchNorm1d on (B, C)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.gn = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm(8)
        self.bn1d = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.gn(self.conv2(x)))
        tokens = self.ln(x.flatten(2).transpose(1, 2))  # (B, 16, 8)
        return self.head(torch.relu(self.bn1d(tokens.mean(dim=1))))


def build_net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def images(n: int, seed: int, shift: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return (x * 1.7 + 0.4).tanh() * 2 if shift else x


def fit_stats(path: Path) -> None:
    data = [images(32, seed=100 + i, shift=False) for i in range(4)]
    dmc.fit(build_net(), data, levels=129, per_sample=True, progress=False).save(path)


# -- helpers run inside the ranks --------------------------------------------------------------------
def _slices(sizes: tuple[int, ...]) -> tuple[int, int]:
    rank = dist.get_rank()
    return sum(sizes[:rank]), sum(sizes[:rank + 1])


@contextmanager
def _counting_collectives():
    """Count the calls of every torch.distributed collective (patched on the module)."""
    calls: list[str] = []
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return counted

    for name, fn in saved.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _same_on_every_rank(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(p.nan_to_num(), t.nan_to_num()) for p in parts)


def _check(report: dict, what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{what}: {m}")
    diff = (got - want).nan_to_num().abs().max().item() if got.numel() else 0.0
    report[what] = diff


def _check_transport_math(report: dict) -> None:
    """Pooled histogram (outliers: refined range; NaN; an empty slice) and pooled exact ranks."""
    from torch_dmc._sync import GlobalBatch, Sync

    rank = dist.get_rank()
    sync = Sync(dist.group.WORLD)
    g = torch.Generator().manual_seed(7)
    values = torch.randn(5, 400, generator=g).round(decimals=1)  # ties
    values[:, 13] *= 1e4  # an outlier: the knot range is refined (docs/method.md § Knot placement)
    values[2, 50] = float("nan")
    values[3] = float("nan")  # a channel without finite values
    for cut in (0, 170):  # rank 0 holds columns [:cut], rank 1 the rest
        mine = values[:, :cut] if rank == 0 else values[:, cut:]
        sizes = (cut, 400 - cut)
        batch = GlobalBatch(sizes, rank, (400, 5), 1)
        lo, step, level = histogram_levels(mine, 64, reduce=sync.histogram_reduce(batch))
        lo0, step0, level0 = histogram_levels(values, 64)
        assert torch.equal(lo, lo0) and torch.equal(step, step0), "pooled knot range"
        assert torch.equal(level.nan_to_num(), level0.nan_to_num()), "pooled levels"
        plain = histogram_levels(values, 64, robust=False)[1]
        assert (step0[[0, 1, 4]] < plain[[0, 1, 4]] / 10).all(), "the outlier refines the range"
        pool = sync.gather(mine, batch)
        assert torch.equal(pool.nan_to_num(), values.nan_to_num()), "gathered values, rank order"
        q_ref = torch.linspace(-2, 2, 129).expand(5, -1).contiguous()
        columns = (0, cut) if rank == 0 else (cut, 400)
        got = transport_exact_columns(pool, q_ref, *columns)
        want = transport_exact(values, q_ref)[:, slice(*columns)]
        _check(report, f"transport_exact_columns cut={cut}", got, want)


def _check_models(report: dict, stats: ReferenceStats) -> None:
    """Every estimate in both modes: each rank's rows equal one process on the concatenated batch."""
    group = dist.group.WORLD
    net = build_net()
    splits = [(5, 3), (0, 8), (4, 4), (0, 0)]  # unequal, one empty slice, equal, all empty
    for mode in dmc.MODES:
        opts = {"mode": mode, "grid_sample": 64, "knots": 64}  # grid mode samples at every site

        # batch (value prior on the (B, C) site, from the whole batch's counts), NaN and an outlier
        x = images(8, seed=1)
        x[1] *= 1e4  # rank 0's slice
        x[6, 0, 2, 3] = float("nan")  # rank 1's slice
        start, stop = _slices((5, 3))
        with dmc.corrected(copy.deepcopy(net), stats, **opts) as single, torch.no_grad():
            want = single(x)[start:stop]
        with dmc.corrected(copy.deepcopy(net), stats, process_group=group, **opts) as synced:
            with torch.no_grad():
                got = synced(x[start:stop])
        rows = torch.arange(start, stop)
        assert got[rows == 6].isnan().all() and got[rows != 6].isfinite().all()  # NaN stays put
        _check(report, f"{mode} batch", got, want)

        # prior and ema over consecutive batches, and the per-sample fallback site (bn1d: prior)
        for estimate, extra in (("prior", {"prior": 4.0}), ("ema", {"momentum": 0.5}),
                                ("per-sample", {"prior": 4.0})):
            single = dmc.DMC(copy.deepcopy(net), stats, estimate=estimate, **extra, **opts)
            synced = dmc.DMC(copy.deepcopy(net), stats, estimate=estimate, process_group=group,
                             **extra, **opts)
            for i, sizes in enumerate(splits):
                x = images(sum(sizes), seed=10 + i)
                start, stop = _slices(sizes)
                with torch.no_grad():
                    want, got = single(x)[start:stop], synced(x[start:stop])
                _check(report, f"{mode} {estimate} batch {i} split {sizes}", got, want)
            if estimate == "ema":
                for name, site in synced._sites.items():
                    state = site.estimate.state
                    assert torch.equal(state, single._sites[name].estimate.state), name
                    assert _same_on_every_rank(state), f"ema state of {name} differs across ranks"
            if estimate == "per-sample":
                assert synced.fallbacks.keys() == {"bn1d"}

        # per-sample where no site falls back: no collective at all
        x = images(8, seed=20)
        start, stop = _slices((5, 3))
        per_sample = {"estimate": "per-sample", "sites": ["bn", "gn", "ln"], **opts}
        with dmc.corrected(copy.deepcopy(net), stats, **per_sample) as single, torch.no_grad():
            want = single(x)[start:stop]
        with dmc.corrected(copy.deepcopy(net), stats, process_group=group, **per_sample) as synced:
            with torch.no_grad(), _counting_collectives() as calls:
                got = synced(x[start:stop])
            assert not synced.fallbacks
        assert calls == [], f"per-sample called collectives: {calls}"
        _check(report, f"{mode} per-sample (no fallback)", got, want)

    # slices that differ beyond the batch axis: a ValueError on every rank, and the group goes on
    side = 8 if dist.get_rank() == 0 else 6
    with dmc.corrected(copy.deepcopy(net), stats, process_group=group) as synced, torch.no_grad():
        with pytest.raises(ValueError, match="differ on the batch axis"):
            synced(images(2, seed=3)[..., :side, :side])


def _failing_forward(rank: int, stats_path: str, stall: bool) -> None:
    """Rank 1 raises (or, ``stall``, stays alive without joining) before a synchronised forward;
    rank 0's forward must then fail on its own, within the group's timeout, not hang."""
    synced = dmc.DMC(build_net(), ReferenceStats.load(stats_path), process_group=_GROUP)
    if rank == 1:
        if stall:
            time.sleep(10 * GROUP_TIMEOUT_S)  # the harness kills it
        raise RuntimeError("rank 1 fails before the forward")
    started = time.monotonic()
    try:
        with torch.no_grad():
            synced(images(4, seed=1))
    except Exception as error:  # the collective failed: say how fast, then fail this rank too
        raise RuntimeError(f"rank 0's forward failed after {time.monotonic() - started:.1f} s") from error
    raise AssertionError("rank 0's forward returned although rank 1 never joined")


def _equal_then_raise(rank: int, stats_path: str, out: str) -> None:
    """The equality checks (report written), then the failing-rank check: one spawn for both."""
    report: dict = {}
    _check_transport_math(report)
    _check_models(report, ReferenceStats.load(stats_path))
    Path(out, f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    _failing_forward(rank, stats_path, stall=False)


def _stall(rank: int, stats_path: str, out: str) -> None:
    _failing_forward(rank, stats_path, stall=True)


_GROUP = None
"""In a rank: the group of every rank with the scenario's timeout (`_worker`)."""

SCENARIOS = {"equal-then-raise": _equal_then_raise, "stall": _stall}


def _worker(rank: int, scenario: str, store: str, stats_path: str, out: str, timeout_s: float) -> None:
    """One rank: init gloo, run a scenario (it writes ``rank{r}.json``); on an error write
    ``rank{r}.err`` and exit 1."""
    try:
        torch.set_num_threads(1)
        # start-up may take long on a loaded machine: the scenario's short timeout is that of a
        # group made once every rank is in
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=max(timeout_s, GROUP_TIMEOUT_S)))
        global _GROUP
        _GROUP = dist.new_group(timeout=timedelta(seconds=timeout_s))
        SCENARIOS[scenario](rank, stats_path, out)
        dist.destroy_process_group()
    except BaseException:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        sys.stderr.write(traceback.format_exc())
        sys.exit(1)


class RankFailure(AssertionError):
    """A rank failed, or the run passed its outer limit (ranks killed); with what each rank left."""

    def __init__(self, message: str, exitcodes: list, errors: dict[int, str], killed: list[int],
                 reports: dict[int, dict]):
        super().__init__(message)
        self.exitcodes, self.errors, self.killed, self.reports = exitcodes, errors, killed, reports


def run_ranks(scenario: str, tmp_path: Path, stats_path: Path, *, timeout_s: float = GROUP_TIMEOUT_S,
              limit_s: float = RUN_LIMIT_S) -> dict[int, dict]:
    """Spawn `WORLD` ranks running ``scenario``; their reports, or `RankFailure` (never a hang)."""
    out = tmp_path / f"out-{scenario}"
    out.mkdir()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, scenario, str(tmp_path / f"store-{scenario}"), str(stats_path),
                               str(out), timeout_s)) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline, failed_at = time.monotonic() + limit_s, None
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() > failed_at + GRACE_S:
            break
        time.sleep(0.05)
    killed = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in killed:
        procs[r].kill()
    for p in procs:
        p.join(10)
    errors = {r: (out / f"rank{r}.err").read_text() for r in range(WORLD) if (out / f"rank{r}.err").exists()}
    reports = {r: json.loads((out / f"rank{r}.json").read_text())
               for r in range(WORLD) if (out / f"rank{r}.json").exists()}
    exitcodes = [p.exitcode for p in procs]
    if killed or errors or any(code != 0 for code in exitcodes):
        detail = "\n".join(f"--- rank {r} ---\n{text}" for r, text in errors.items())
        raise RankFailure(f"{scenario}: exit codes {exitcodes}, killed {killed}\n{detail}",
                          exitcodes, errors, killed, reports)
    return reports


@pytest.fixture(scope="module")
def stats_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sync") / "stats.safetensors"
    fit_stats(path)
    return path


@pytest.fixture(scope="module")
def equal_then_raise(tmp_path_factory, stats_path) -> RankFailure:
    """One spawn: every equality check, then rank 1 raises before a forward (so the run fails)."""
    with pytest.raises(RankFailure) as failure:
        run_ranks("equal-then-raise", tmp_path_factory.mktemp("run"), stats_path)
    return failure.value


def _rank0_failed_by_itself(failure: RankFailure, timeout_s: float) -> None:
    error = failure.errors.get(0, "")
    found = re.search(r"rank 0's forward failed after ([0-9.]+) s", error)
    assert found, failure  # rank 0 failed on its own: it was not killed by the harness
    assert float(found.group(1)) <= timeout_s + 5, error  # within the group's timeout


# -- tests ---------------------------------------------------------------------------------------------
def test_synchronised_dmc_equals_one_process_on_the_concatenated_batch(equal_then_raise):
    reports = equal_then_raise.reports
    assert sorted(reports) == list(range(WORLD)), equal_then_raise  # every rank passed its checks
    for rank, report in reports.items():
        assert {k.split(" ")[0] for k in report} >= {"grid", "exact", "transport_exact_columns"}
        worst = max(report.values())
        assert worst <= 1e-4, f"rank {rank}: {worst}"


def test_a_rank_that_raises_fails_the_run_instead_of_hanging(equal_then_raise):
    assert "rank 1 fails before the forward" in equal_then_raise.errors.get(1, ""), equal_then_raise
    _rank0_failed_by_itself(equal_then_raise, GROUP_TIMEOUT_S)


def test_a_rank_that_stalls_fails_the_run_after_the_group_timeout(tmp_path, stats_path):
    timeout_s = 3.0
    started = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        run_ranks("stall", tmp_path, stats_path, timeout_s=timeout_s)
    assert time.monotonic() - started < RUN_LIMIT_S
    _rank0_failed_by_itself(failure.value, timeout_s)
    assert failure.value.killed == [1]  # the stalled rank, killed by the harness, not waited for


def test_process_group_needs_initialised_distributed():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("this process has a default group")
    with pytest.raises(ValueError, match="not initialised"):
        dmc.DMC(build_net(), _tiny_stats(), process_group=object())


def test_without_process_group_nothing_is_synchronised():
    net = build_net()
    with dmc.corrected(net, _tiny_stats()) as m, _counting_collectives() as calls, torch.no_grad():
        m(images(4, seed=3))
        assert m.process_group is None and "synchronised" not in repr(m)
    assert calls == []


def _tiny_stats() -> ReferenceStats:
    return dmc.fit(build_net(), [images(16, seed=5, shift=False)], levels=17, progress=False)

