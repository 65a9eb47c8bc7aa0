"""Tests of the benchmark (``torch_dmc.bench``): protocol, runner, resume, report, tune, CLI.

Everything runs on a tiny random BN network and a few random 28×28 images; corruption and results
caches live in ``tmp_path``.
"""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from torch_dmc.bench import cli, runner
from torch_dmc.bench.metrics import COLUMNS, Summary, read_results
from torch_dmc.bench.protocol import CLEAN, Protocol, parse_int_list
from torch_dmc.bench.tune import TuneGrid, TuneProtocol, candidates, resolve_site_set
from torch_dmc.data import CorruptionCache, ImageData

METHODS = ["source", "bn", "bn-prior", "bn-ema", "tent", "dmc"]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    model.train()
    with torch.no_grad():  # give the BN layers non-trivial running statistics
        for _ in range(3):
            model(torch.rand(16, 1, 28, 28))
    return model.eval()


def tiny_arrays(seed: int = 0, n_train: int = 48, n_test: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.int64) % 10,
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.permutation(np.arange(n_test, dtype=np.int64) % 10),
    }


@pytest.fixture
def data() -> ImageData:
    a = tiny_arrays()
    return ImageData(a["x_train"], a["y_train"], a["x_test"], a["y_test"], name="tiny")


@pytest.fixture
def model() -> nn.Module:
    return tiny_model()


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DMC_CACHE_DIR", str(tmp_path / "cache"))


def small_protocol(**kw) -> Protocol:
    base = dict(
        methods=list(METHODS),
        corruptions=["gaussian_noise", "contrast"],
        severities=[5],
        batch_sizes=[8],
        seeds=[0],
        fit_levels=64,
    )
    base.update(kw)
    return Protocol(**base)


def run(protocol, out, model, data, tmp_path, **kw):
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("plots", False)
    return runner.run_benchmark(
        protocol, out, model=model, data=data, workers=1, progress=False, log=lambda _: None, **kw
    )


# -- protocol ---------------------------------------------------------------------------------
def test_parse_int_list():
    assert parse_int_list("1-5", "x") == [1, 2, 3, 4, 5]
    assert parse_int_list("0, 3,5,3", "x") == [0, 3, 5]
    with pytest.raises(ValueError, match="--severities"):
        parse_int_list("a", "--severities")


def test_units_clean_always_and_seeds():
    p = small_protocol(methods=["source"], severities=[3, 5], seeds=[0, 1], all_seeds_at=[0, 5])
    cells = p.cells()
    assert cells[0].corruption == CLEAN and cells[0].severity == 0
    clean_seeds = {c.seed for c in cells if c.corruption == CLEAN}
    assert clean_seeds == {0, 1}
    assert {c.seed for c in cells if c.severity == 3} == {0}
    assert {c.seed for c in cells if c.severity == 5} == {0, 1}
    assert len(cells) == len(set(cells))
    # continual: one unit per (method, severity, batch, seed), all corruptions in order
    pc = small_protocol(methods=["source"], severities=[3, 5], continual=True)
    units = [u for u in pc.units() if u.corruption != CLEAN]
    assert [u.corruptions for u in units] == [("gaussian_noise", "contrast")] * 2
    assert Protocol.from_dict(json.loads(json.dumps(pc.to_dict()))) == pc


def test_protocol_validation():
    with pytest.raises(ValueError, match="1..5"):
        small_protocol(severities=[0])
    with pytest.raises(ValueError, match="clean"):
        small_protocol(corruptions=["clean"])


# -- runner ------------------------------------------------------------------------------------
def test_every_method_runs_schema_report_plots(model, data, tmp_path):
    p = small_protocol(corruptions=["contrast"], batch_sizes=[8, 16])
    out = tmp_path / "run"
    config = run(p, out, model, data, tmp_path, command="dmc bench --test", plots=True)
    with open(out / "results.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert tuple(header) == COLUMNS
    rows = read_results(out / "results.csv")
    assert len(rows) == len(p.cells()) == 6 * 2 * 2
    assert {r["method"] for r in rows} == set(METHODS)
    for r in rows:
        assert r["n"] == 16
        assert r["error"] == pytest.approx(100 * r["n_wrong"] / r["n"], abs=1e-4)
    # config: protocol, definitions, checksums, versions, machine, wall time
    saved = json.loads((out / "config.json").read_text())
    assert saved["protocol"] == p.to_dict()
    assert set(saved["methods"]) == set(METHODS)
    assert all(saved["methods"][m]["definition"] for m in METHODS)
    assert saved["methods"]["bn-prior"]["options"] == {"prior": 16.0}
    assert len(saved["stats"]["checksum"]) == 64
    assert saved["versions"]["torch"] and saved["versions"]["numpy"]
    assert "torch_threads" in saved["machine"] and saved["wall_s"] >= 0
    assert config["stats"]["checksum"] == saved["stats"]["checksum"]
    report = (out / "report.md").read_text()
    assert "```\ndmc bench --test\n```" in report
    assert "Severity 5, per corruption" in report and "rel. to source" in report
    for png in ("heatmap.png", "severity_top.png", "batch_size.png"):
        assert (out / png).stat().st_size > 1000
    assert (out / "stats.safetensors").is_file() and (out / "timings.csv").is_file()


def test_deterministic(model, data, tmp_path):
    # same generation seed -> identical corrupted bytes, even from two separate caches
    a = CorruptionCache(tmp_path / "c1").get(data.x_test, "gaussian_noise", 3, progress=False)
    b = CorruptionCache(tmp_path / "c2").get(data.x_test, "gaussian_noise", 3, progress=False)
    assert a.tobytes() == b.tobytes()
    p = small_protocol(methods=["source", "bn-ema", "dmc"], corruptions=["contrast"], seeds=[0, 1])
    run(p, tmp_path / "r1", model, data, tmp_path, cache_dir=tmp_path / "c1")
    run(p, tmp_path / "r2", model, data, tmp_path, cache_dir=tmp_path / "c2")
    first = (tmp_path / "r1" / "results.csv").read_bytes()
    assert first == (tmp_path / "r2" / "results.csv").read_bytes()
    # another stream seed permutes the order only: source (no adaptation) is unchanged
    rows = read_results(tmp_path / "r1" / "results.csv")
    src = {(r["corruption"], r["seed"]): r["n_wrong"] for r in rows if r["method"] == "source"}
    assert src[("contrast", 0)] == src[("contrast", 1)]


def test_jobs_and_memory_layout_do_not_change_results(model, data, tmp_path):
    p = small_protocol(seeds=[0, 1])
    run(p, tmp_path / "one", model, data, tmp_path, channels_last=False)
    config = run(p, tmp_path / "two", model, data, tmp_path, jobs=2, channels_last=True)
    assert config["execution"] == {"jobs": 2, "channels_last": True, "device": "cpu"}

    def cells(folder):
        rows = read_results(folder / "results.csv")
        return {tuple(r[k] for k in ("method", "corruption", "severity", "seed")): r["n_wrong"] for r in rows}

    one, two = cells(tmp_path / "one"), cells(tmp_path / "two")
    assert len(one) == len(p.cells()) and one == two
    assert model.state_dict()["0.weight"].is_contiguous()  # the caller's model keeps its layout
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        run(p, tmp_path / "bad", model, data, tmp_path, jobs=0)


def test_resume_skips_finished_cells(model, data, tmp_path, monkeypatch):
    p = small_protocol(methods=["source", "bn", "dmc"])
    out = tmp_path / "run"
    run(p, out, model, data, tmp_path)
    full = (out / "results.csv").read_text().splitlines()
    calls = []
    real = runner.stream_errors
    monkeypatch.setattr(runner, "stream_errors", lambda *a, **k: calls.append(1) or real(*a, **k))
    run(p, out, model, data, tmp_path, resume=True)
    assert calls == []
    assert (out / "results.csv").read_text().splitlines() == full
    # an interrupted run: the last 4 cells are missing; resume computes exactly those
    (out / "results.csv").write_text("\n".join(full[:-4]) + "\n" + full[-4][:9])  # cut mid-line
    config = run(p, out, model, data, tmp_path, resume=True)
    assert len(calls) == 4
    assert sorted((out / "results.csv").read_text().splitlines()) == sorted(full)
    assert len(config["sessions"]) == 3 and config["sessions"][-1]["cells_computed"] == 4
    # without --resume an existing folder is refused; with it, another protocol is refused
    with pytest.raises(FileExistsError, match="--resume"):
        run(p, out, model, data, tmp_path)
    with pytest.raises(ValueError, match="gen_seed"):
        run(
            small_protocol(methods=["source", "bn", "dmc"], gen_seed=1),
            out,
            model,
            data,
            tmp_path,
            resume=True,
        )


def test_continual(model, data, tmp_path):
    p = small_protocol(methods=["source", "bn-ema"], continual=True)
    run(p, tmp_path / "cont", model, data, tmp_path)
    run(small_protocol(methods=["source", "bn-ema"]), tmp_path / "epi", model, data, tmp_path)
    cont = {
        (r["method"], r["corruption"]): r["n_wrong"] for r in read_results(tmp_path / "cont" / "results.csv")
    }
    epi = {
        (r["method"], r["corruption"]): r["n_wrong"] for r in read_results(tmp_path / "epi" / "results.csv")
    }
    assert set(cont) == set(epi)
    for c in (CLEAN, "gaussian_noise", "contrast"):  # source has no state
        assert cont[("source", c)] == epi[("source", c)]
    assert cont[("bn-ema", "gaussian_noise")] == epi[("bn-ema", "gaussian_noise")]  # first segment


def test_summary_means_seeds_first():
    rows = [
        {
            "method": "m",
            "corruption": "a",
            "severity": 5,
            "batch_size": 8,
            "seed": 0,
            "n": 10,
            "n_wrong": 1,
            "error": 10.0,
        },
        {
            "method": "m",
            "corruption": "a",
            "severity": 5,
            "batch_size": 8,
            "seed": 1,
            "n": 10,
            "n_wrong": 3,
            "error": 30.0,
        },
        {
            "method": "m",
            "corruption": "b",
            "severity": 5,
            "batch_size": 8,
            "seed": 0,
            "n": 10,
            "n_wrong": 6,
            "error": 60.0,
        },
    ]
    s = Summary(rows)
    assert s.error("m", "a", 5, 8) == 20.0
    assert s.severity_mean("m", 5, 8) == 40.0


# -- CLI ---------------------------------------------------------------------------------------
def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_bench_arguments(parser)
    return parser.parse_args(list(argv))


def tune_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_tune_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def fake_models(monkeypatch, model):
    resolved = runner.ResolvedModel(model, "tiny", {})
    monkeypatch.setattr(runner, "resolve_model", lambda path: resolved)
    return resolved


def test_cli_npz_and_bad_files(tmp_path, fake_models, capsys):
    good = tmp_path / "tiny.npz"
    np.savez(good, **tiny_arrays())
    out = tmp_path / "out"
    rc = cli.run_bench(
        bench_args(
            "--data",
            str(good),
            "--methods",
            "source,bn",
            "--corruptions",
            "contrast",
            "--severities",
            "2",
            "--batch-size",
            "8",
            "--out",
            str(out),
            "--workers",
            "1",
            "--fit-levels",
            "64",
            "--cache",
            str(tmp_path / "cache"),
            "--no-progress",
        )
    )
    assert rc == 0
    rows = read_results(out / "results.csv")
    assert {(r["method"], r["corruption"], r["severity"]) for r in rows} == {
        (m, c, s) for m in ("source", "bn") for c, s in ((CLEAN, 0), ("contrast", 2))
    }
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["name"] == "tiny" and len(config["data"]["file_sha256"]) == 64
    assert config["stats"] is None  # no method needs stats
    # a file that is not an .npz
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file at all")
    rc = cli.run_bench(bench_args("--data", str(bad), "--out", str(tmp_path / "o2"), "--no-progress"))
    assert rc == 2
    assert "bad.npz" in capsys.readouterr().err
    # an .npz that lacks arrays
    partial = tmp_path / "partial.npz"
    np.savez(partial, x_train=tiny_arrays()["x_train"])
    rc = cli.run_bench(bench_args("--data", str(partial), "--out", str(tmp_path / "o3"), "--no-progress"))
    assert rc == 2
    assert "y_train" in capsys.readouterr().err


def test_cli_quick_defaults_and_flags_win():
    p, _ = cli.bench_protocol(bench_args("--quick", "--severities", "3"))
    assert p.quick and p.n_test == 1000 and p.severities == [3] and p.fit_images == 10000
    p, _ = cli.bench_protocol(bench_args())
    assert p.severities == [1, 2, 3, 4, 5] and len(p.corruptions) == 15 and p.n_test is None


def test_tune_refuses_test_corruptions(tmp_path, fake_models, capsys):
    with pytest.raises(ValueError, match="validation"):
        TuneProtocol(corruptions=["speckle_noise", "fog"])
    with pytest.raises(ValueError, match="refuses"):
        TuneProtocol(corruptions=["common"])
    rc = cli.run_tune(tune_args("--corruptions", "gaussian_noise", "--out", str(tmp_path / "t.json")))
    assert rc == 2
    assert "refuses" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_site_sets():
    sites = ["a", "b", "c"]
    assert resolve_site_set("all", sites) is None
    assert resolve_site_set("all-but-last", sites) == ["a", "b"]
    assert resolve_site_set("first-half", sites) == ["a", "b"]
    assert resolve_site_set("first:1", sites) == ["a"]
    assert resolve_site_set("last:1", sites) == ["c"]
    with pytest.raises(ValueError, match="unknown site set"):
        resolve_site_set("some", sites)
    grid = TuneGrid(site_sets=["all", "first:3"], strengths=[1.0], modes=["grid"], adapt_bn=[False])
    assert len(candidates(grid, sites)) == 1  # first:3 selects all sites: a duplicate


def test_tune_writes_config_that_bench_reads(tmp_path, fake_models, data, monkeypatch):
    npz = tmp_path / "tiny.npz"
    np.savez(npz, **tiny_arrays())
    out = tmp_path / "tune.json"
    rc = cli.run_tune(
        tune_args(
            "--data",
            str(npz),
            "--corruptions",
            "speckle_noise",
            "--severities",
            "3",
            "--n-test",
            "16",
            "--batch-size",
            "8",
            "--site-sets",
            "all,first:1",
            "--strengths",
            "0.5,1.0",
            "--modes",
            "grid",
            "--adapt-bn",
            "false",
            "--fit-levels",
            "64",
            "--workers",
            "1",
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(out),
            "--no-progress",
        )
    )
    assert rc == 0
    chosen = json.loads(out.read_text())
    assert len([e for e in chosen["table"] if e["kind"] == "candidate"]) == 4
    assert {e["method"] for e in chosen["table"] if e["kind"] == "baseline"} == {"source", "bn"}
    options = chosen["methods"]["dmc"]
    assert options["mode"] == "grid" and options["strength"] in (0.5, 1.0)
    bench_out = tmp_path / "bench"
    rc = cli.run_bench(
        bench_args(
            "--data",
            str(npz),
            "--methods",
            "dmc",
            "--corruptions",
            "contrast",
            "--severities",
            "5",
            "--batch-size",
            "8",
            "--method-config",
            str(out),
            "--stats",
            chosen["stats"]["path"],
            "--out",
            str(bench_out),
            "--workers",
            "1",
            "--fit-levels",
            "64",
            "--cache",
            str(tmp_path / "cache"),
            "--no-progress",
        )
    )
    assert rc == 0
    config = json.loads((bench_out / "config.json").read_text())
    resolved = config["methods"]["dmc"]["options"]
    assert {k: resolved[k] for k in options} == options
    assert config["stats"]["checksum"] == chosen["stats"]["checksum"]
    assert config["method_config"]["selection"] == chosen["selection"]


def test_cli_model_folder(tmp_path):
    from torch_dmc.bench.provenance import sha256_file
    from torch_dmc.models import build_default, save_model

    torch.manual_seed(0)
    folder = save_model(build_default(1, 10).eval(), tmp_path / "model")
    npz = tmp_path / "tiny.npz"
    np.savez(npz, **tiny_arrays())
    out = tmp_path / "out"
    argv = [
        "--model", str(folder), "--data", str(npz), "--methods", "source,dmc",
        "--corruptions", "contrast", "--severities", "5", "--batch-size", "8",
        "--fit-levels", "64", "--workers", "1", "--cache", str(tmp_path / "cache"),
        "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert cli.run_bench(bench_args(*argv)) == 0
    config = json.loads((out / "config.json").read_text())
    files = config["model"]["files_sha256"]
    assert files["model.safetensors"] == sha256_file(folder / "model.safetensors")
    assert config["model"]["class"] == "SmallResNet"
    assert len(read_results(out / "results.csv")) == 4
    # --resume on the finished folder computes nothing and keeps the rows
    before = (out / "results.csv").read_text()
    assert cli.run_bench(bench_args(*argv, "--resume")) == 0
    assert (out / "results.csv").read_text() == before
    assert len(json.loads((out / "config.json").read_text())["sessions"]) == 2
