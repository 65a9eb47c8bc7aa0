"""Tests of ``dmc fit`` and ``dmc bench`` under torchrun (``torch_dmc.bench.dist``).

The multi-process tests start ``python -m torch.distributed.run --standalone --nproc-per-node 2
-m torch_dmc ...`` (gloo, on the CPU) on a tiny BN network (``--model tinynet:build``, a factory
module written into the work folder) and a tiny ``.npz``, and compare with the same command run
in this process, without torchrun. Three launches in all (fit; bench with --resume; a failing
rank), each a few seconds on an idle machine.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_dmc import ReferenceStats
from torch_dmc.bench import dist
from torch_dmc.bench.fitting import finish_reference, fit_reference, fit_reference_part
from torch_dmc.bench.metrics import read_results
from torch_dmc.bench.report import render_report
from torch_dmc.cli import main
from torch_dmc.data.arrays import to_tensor

FACTORY = '''
import os

import torch
from torch import nn


class Boom(nn.Module):
    """Raises on the rank named by TINYNET_FAIL_RANK, on batches of 8 (not on the 2-image check)."""

    def forward(self, x):
        if os.environ.get("TINYNET_FAIL_RANK", "none") == os.environ.get("RANK") and len(x) == 8:
            raise ValueError("injected failure")
        return x


def build():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), Boom(), nn.Linear(8, 10))
    with torch.no_grad():  # weights and BN statistics from a seeded generator, no forward pass
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()
'''

LAUNCH_TIMEOUT_S = 150  # a generous bound for one torchrun launch on a loaded machine
DIST_TIMEOUT_S = 60  # --dist-timeout of the launched ranks


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with tinynet.py and tiny.npz (48 training, 16 test images)."""
    folder = tmp_path_factory.mktemp("torchrun")
    (folder / "tinynet.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    np.savez(folder / "tiny.npz", x_train=rng.integers(0, 256, (48, 28, 28), dtype=np.uint8),
             y_train=np.arange(48) % 10, x_test=rng.integers(0, 256, (16, 28, 28), dtype=np.uint8),
             y_test=rng.permutation(np.arange(16) % 10))
    return folder


@pytest.fixture
def plain(work, monkeypatch):
    """This process as a plain ``dmc`` process in ``work``: no torchrun variables, 1 thread."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (OMP_NUM_THREADS=1)
    yield work
    torch.set_num_threads(threads)


def torchrun(work: Path, *argv: str, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m torch_dmc ARGV`` in ``work``."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    src = str(Path(__file__).resolve().parents[1] / "src")
    environ.update(PYTHONPATH=os.pathsep.join([str(work), src]), OMP_NUM_THREADS="1",
                   DMC_DIST_TIMEOUT=str(DIST_TIMEOUT_S), **env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "torch_dmc", *argv]
    return subprocess.run(cmd, cwd=work, env=environ, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)


def exact_values(model: torch.nn.Module, x: torch.Tensor, sites: list[str]) -> dict[str, torch.Tensor]:
    """Every site's output values, ``C×N`` per site, sorted along each row."""
    modules = dict(model.named_modules())
    outputs = {}
    handles = [modules[s].register_forward_hook(
        lambda _m, _i, out, s=s: outputs.__setitem__(s, out.detach())) for s in sites]
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    return {s: o.movedim(1, 0).reshape(o.shape[1], -1).sort(dim=1).values for s, o in outputs.items()}


def assert_within_bound(stats: ReferenceStats, values: dict[str, torch.Tensor]) -> None:
    """Every stored quantile's rank among the exact values lies within the rank-error bound of its
    level; the endpoints are the exact minimum and maximum."""
    bound = stats.info["rank_error_bound"] + 1e-6
    for site, table in stats.quantiles.items():
        v = values[site]
        n = v.shape[1]
        levels = torch.linspace(0, 1, table.shape[1], dtype=torch.float64)
        assert torch.equal(table[:, 0], v[:, 0]) and torch.equal(table[:, -1], v[:, -1])
        for c in range(table.shape[0]):
            below = torch.searchsorted(v[c], table[c], side="left").double() / n
            upto = torch.searchsorted(v[c], table[c], side="right").double() / n
            assert bool((below - bound <= levels).all()), (site, c)
            assert bool((levels <= upto + bound).all()), (site, c)


# -- in this process ---------------------------------------------------------------------------
def test_world_split_shard_and_timeout():
    assert dist.world({}) == dist.World()  # outside torchrun: rank 0 of 1, not launched
    assert dist.world({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == dist.World(1, 2, 1, True)
    for bad in ({"RANK": "0"}, {"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "a", "WORLD_SIZE": "2"}):
        with pytest.raises(ValueError, match="RANK|WORLD_SIZE"):
            dist.world(bad)
    items = list(range(11))
    for n in (1, 2, 3, 20):
        shares = [dist.shard(items, r, n) for r in range(n)]
        assert sorted(sum(shares, [])) == items
        blocks = dist.split([1, 5, 1, 1, 0, 2, 3, 1, 1, 4, 1], n)
        assert [i for b in blocks for i in b] == items and len(blocks) == n  # contiguous, in order
    assert [len(b) for b in dist.split([1] * 6, 2)] == [3, 3]
    assert [len(b) for b in dist.split([4, 1, 1, 1, 1], 2)] == [1, 4]  # by weight
    assert dist.timeout_seconds(None, {}) == dist.DEFAULT_TIMEOUT_S
    assert dist.timeout_seconds(None, {dist.TIMEOUT_ENV: "30"}) == 30
    assert dist.timeout_seconds(5, {dist.TIMEOUT_ENV: "30"}) == 5
    with pytest.raises(ValueError, match="--dist-timeout"):
        dist.timeout_seconds(0)
    assert dist.device_for("cuda", dist.World(1, 2, 1, True)) == "cuda:1"
    assert dist.device_for("cpu", dist.World(1, 2, 1, True)) == "cpu"


def test_session_messages_agreement_failures_and_liveness():
    # two ranks' sessions in this process on one in-memory store (no process group)
    import threading

    from torch.distributed import HashStore, PrefixStore

    store = PrefixStore("test/", HashStore())
    s0, s1 = (dist.Session(dist.World(r, 2, r, True), 0.3, None, "gloo", None, store, store)
              for r in (0, 1))
    try:
        s1.send(("a", 1))
        s1.send(("b", 2))
        assert list(s0.receive({1: 2}, wait=True)) == [(1, ("a", 1)), (1, ("b", 2))]  # in order
        outcome = {}

        def agree(session, fn):
            try:
                outcome[session.rank] = session.agree("setup", fn)
            except Exception as err:  # noqa: BLE001
                outcome[session.rank] = err

        def bad():
            raise ValueError("bad flag")

        threads = [threading.Thread(target=agree, args=(s0, lambda: 1)),
                   threading.Thread(target=agree, args=(s1, bad))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert isinstance(outcome[1], ValueError)  # the failing rank raises its own error
        assert isinstance(outcome[0], dist.PeerFailed) and outcome[0].rank == 1
        assert outcome[0].exit_code == 2 and "bad flag" in str(outcome[0])
        with pytest.raises(dist.PeerFailed):  # recorded: every later check fails too
            s0.check()
    finally:
        s0.close()
        s1.close()
    # a rank whose heartbeat stops (a dead process) fails the wait after the timeout
    lone = dist.Session(dist.World(0, 2, 0, True), 0.3, None, "gloo", None,
                        PrefixStore("lone/", HashStore()), PrefixStore("lone/", HashStore()))
    try:
        with pytest.raises(TimeoutError, match="rank 1 gave no sign of life"):
            for _ in range(100):
                lone.check([1])
                time.sleep(0.02)
    finally:
        lone.close()


def test_merged_shards_agree_with_one_fit_within_the_bound(plain):
    import tinynet

    model = tinynet.build()
    images = np.load(plain / "tiny.npz")["x_train"]
    options = dict(levels=64, batch_size=8, per_sample=True)
    whole = fit_reference(model, images, progress=False, **options)
    parts = [fit_reference_part(model, images, rank=r, world_size=3, progress=False, **options)
             for r in range(3)]
    merged = parts[0].portable()
    for p in parts[1:]:
        merged.merge(dist.loads(dist.dumps(p.portable())))  # as sent between processes
    stats = finish_reference(merged, model, images=48, batch_size=8, world_size=3)
    assert stats.info["images"] == whole.info["images"] == 48
    assert stats.info["batches"] == 6 and stats.info["world_size"] == 3
    assert stats.info["per_sample_samples"] == whole.info["per_sample_samples"]
    values = exact_values(model, to_tensor(images), stats.sites)
    assert_within_bound(whole, values)
    assert_within_bound(stats, values)
    # one share: the single-process fit exactly
    one = fit_reference_part(model, images, rank=0, world_size=1, progress=False, **options)
    alone = finish_reference(dist.loads(dist.dumps(one.portable())), model, images=48, batch_size=8)
    assert alone.checksum() == whole.checksum()


def test_other_commands_are_refused_under_torchrun(plain, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sites", "--model", "tinynet:build"]) == 2
    assert "only `dmc fit` and `dmc bench` run" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


# -- under torchrun ----------------------------------------------------------------------------
def test_fit_under_torchrun_agrees_with_one_process(plain):
    argv = ["fit", "--model", "tinynet:build", "--data", "tiny.npz", "--batch-size", "8",
            "--levels", "64"]
    assert main([*argv, "--out", "one.safetensors"]) == 0
    assert not torch.distributed.is_initialized() and dist.current() is None
    done = torchrun(plain, *argv, "--out", "two.safetensors")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank-error bound" in done.stdout and done.stdout.count("sites,") == 1  # rank 0 only
    one, two = ReferenceStats.load(plain / "one.safetensors"), ReferenceStats.load(plain / "two.safetensors")
    assert two.info["world_size"] == 2 and "world_size" not in one.info
    assert two.info["images"] == one.info["images"] == 48 and two.info["batches"] == 6
    assert two.sites == one.sites and two.checksum() != one.checksum()  # other random draws
    import tinynet

    x = to_tensor(np.load(plain / "tiny.npz")["x_train"])
    values = exact_values(tinynet.build(), x, one.sites)
    assert_within_bound(one, values)
    assert_within_bound(two, values)


def bench_argv(out: str, methods: str) -> list[str]:
    return ["bench", "--model", "tinynet:build", "--data", "tiny.npz", "--methods", methods,
            "--corruptions", "gaussian_noise,contrast", "--severities", "5", "--batch-size", "8",
            "--fit-levels", "64", "--workers", "1", "--cache", "cache", "--no-progress",
            "--out", out]


def sorted_rows(folder: Path) -> list[tuple]:
    return sorted(tuple(r.values()) for r in read_results(folder / "results.csv"))


def test_bench_under_torchrun_gives_the_same_rows_and_resumes_across_world_sizes(plain):
    methods = "source,bn,tent,dmc"
    assert main(bench_argv("one", methods)) == 0  # one process, every cell
    assert not torch.distributed.is_initialized() and dist.current() is None
    assert main(bench_argv("both", "source,bn")) == 0  # one process, some cells ...
    done = torchrun(plain, *bench_argv("both", methods), "--resume")  # ... the rest with two
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("results in both") == 1  # rank 0 prints
    rows = sorted_rows(plain / "both")
    assert rows == sorted_rows(plain / "one") and len(rows) == 4 * 3
    config = json.loads((plain / "both" / "config.json").read_text())
    assert config["execution"]["world_size"] == 2 and len(config["sessions"]) == 2
    assert config["sessions"][1]["world_size"] == 2 and "world_size" not in config["sessions"][0]
    assert config["sessions"][1]["cells_computed"] == 2 * 3
    assert config["stats"]["checksum"] == json.loads((plain / "one" / "config.json").read_text())[
        "stats"]["checksum"]  # rank 0 fits the stats alone: the same file as one process
    # the report does not depend on the order of the rows (they arrive in any order)
    rows = read_results(plain / "both" / "results.csv")
    shuffled = random.Random(0).sample(rows, len(rows))
    assert render_report(shuffled, config) == render_report(rows, config)


def test_a_failing_rank_fails_the_command_without_a_hang(plain):
    start = time.monotonic()
    done = torchrun(plain, *bench_argv("failed", "source,dmc"), TINYNET_FAIL_RANK="1")
    assert done.returncode != 0
    assert time.monotonic() - start < DIST_TIMEOUT_S + 30
    assert "rank 1: injected failure" in done.stderr
