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

from torch_dmc import ReferenceStats
from torch_dmc.bench import cli, evaluate, runner
from torch_dmc.bench.metrics import COLUMNS, TIMING_COLUMNS, Summary, done_cells, read_results
from torch_dmc.bench.protocol import CLEAN, Cell, Protocol, parse_int_list
from torch_dmc.bench.report import render_report
from torch_dmc.bench.streams import (
    canonical_stream,
    label_shift_order,
    parse_stream,
    parse_stream_list,
    stream_name,
    stream_order,
)
from torch_dmc.bench.tune import TuneGrid, TuneProtocol, candidates, resolve_site_set
from torch_dmc.data import CorruptionCache, ImageData, batches

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
    pc = small_protocol(methods=["source"], severities=[3, 5], setting="continual")
    units = [u for u in pc.units() if u.corruption != CLEAN]
    assert [u.corruptions for u in units] == [("gaussian_noise", "contrast")] * 2
    assert Protocol.from_dict(json.loads(json.dumps(pc.to_dict()))) == pc


def test_protocol_validation():
    with pytest.raises(ValueError, match="1..5"):
        small_protocol(severities=[0])
    with pytest.raises(ValueError, match="clean"):
        small_protocol(corruptions=["clean"])


# -- streams -----------------------------------------------------------------------------------
def balanced_labels(n: int = 2000, classes: int = 10) -> np.ndarray:
    return np.random.default_rng(0).permutation(np.arange(n) % classes)


def mean_run_length(labels: np.ndarray) -> float:
    """Mean length of the runs of equal consecutive labels."""
    return len(labels) / (1 + int((np.diff(labels) != 0).sum()))


def majority_share(labels: np.ndarray, batch: int = 100) -> float:
    """Mean over batches of the share of the batch's most frequent class."""
    return float(
        np.mean([np.bincount(labels[i : i + batch]).max() / batch for i in range(0, len(labels), batch)])
    )


@pytest.mark.parametrize("alpha", [0.01, 0.1, 1.0, 100.0])
def test_label_shift_order_is_a_seeded_permutation(alpha):
    y = balanced_labels()
    order = label_shift_order(y, alpha, seed=3)
    assert order.dtype == torch.int64 and order.shape == (len(y),)
    assert torch.equal(order.sort().values, torch.arange(len(y)))  # the same images, each once
    assert torch.equal(order, label_shift_order(y, alpha, seed=3))  # reproducible from the seed
    assert torch.equal(order, label_shift_order(torch.from_numpy(y), alpha, seed=3))  # tensor labels
    assert not torch.equal(order, label_shift_order(y, alpha, seed=4))  # another seed, another order
    assert torch.equal(stream_order(stream_name(alpha), y, 3), order)


def test_label_shift_small_alpha_gives_long_runs_of_one_class():
    y = balanced_labels()
    seeds = range(5)

    def measure(stream):
        labels = [y[stream_order(stream, y, s).numpy()] for s in seeds]
        return np.mean([mean_run_length(v) for v in labels]), np.mean([majority_share(v) for v in labels])

    iid_run, iid_major = measure("iid")
    run_001, major_001 = measure("label-shift-0.01")
    run_01, major_01 = measure("label-shift-0.1")
    run_10, major_10 = measure("label-shift-10")
    assert iid_run < 1.2 and iid_major < 0.2
    assert run_001 > 5 * iid_run and major_001 > 0.8  # long runs: batches mostly one class
    assert run_01 > 5 * iid_run and major_01 > 0.6
    assert major_10 < major_01 < major_001  # a larger alpha mixes the classes more


def test_iid_stream_order_is_the_historical_one():
    y = torch.from_numpy(balanced_labels(50))
    for seed in (0, 7):
        assert torch.equal(stream_order("iid", y, seed), batches(y, y, 8, shuffle=True, seed=seed).order())


def test_stream_names():
    assert parse_stream("iid") is None and stream_name(None) == "iid"
    assert parse_stream("label-shift-0.1") == 0.1 and stream_name(0.1) == "label-shift-0.1"
    assert stream_name(0.001) == "label-shift-0.001" and stream_name(10) == "label-shift-10"
    assert canonical_stream("label-shift-0.10") == "label-shift-0.1"
    assert parse_stream_list("iid, label-shift-0.10,label-shift-0.1") == ["iid", "label-shift-0.1"]
    for bad in ("foo", "IID", "label-shift-", "label-shift-0", "label-shift--1", "label-shift-x",
                "label-shift-inf", "label-shift-nan"):  # fmt: skip
        with pytest.raises(ValueError, match=r"'label-shift-<alpha>'"):
            parse_stream(bad)
    with pytest.raises(ValueError, match="positive"):
        stream_name(0.0)
    with pytest.raises(ValueError, match="alpha"):
        label_shift_order(balanced_labels(10), -1.0, seed=0)
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        label_shift_order(np.zeros((2, 3), dtype=np.int64), 0.1, seed=0)


def test_protocol_streams():
    two = dict(methods=["source", "bn"], corruptions=["contrast"])
    p = small_protocol(**two, streams=["iid", "label-shift-0.10"])
    assert p.streams == ["iid", "label-shift-0.1"]
    assert small_protocol().streams == ["iid"]
    cells = p.cells()
    assert len(cells) == len(set(cells)) == 2 * 2 * 2  # methods × (clean, contrast) × streams
    # within a data set: stream, then seed, batch size, method
    clean = [(c.stream, c.method) for c in cells if c.corruption == CLEAN]
    shifted = "label-shift-0.1"
    assert clean == [("iid", "source"), ("iid", "bn"), (shifted, "source"), (shifted, "bn")]
    assert Protocol.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    old = small_protocol().to_dict()
    del old["streams"]  # a config.json from before streams existed
    assert Protocol.from_dict(old).streams == ["iid"]
    assert p.result_identity() == small_protocol(**two).result_identity()  # streams add cells only
    args = p.command_args()
    assert args[args.index("--streams") + 1] == "iid,label-shift-0.1"
    assert "--streams" not in small_protocol().command_args()
    with pytest.raises(ValueError, match="unknown stream 'shuffled'"):
        small_protocol(streams=["shuffled"])
    with pytest.raises(ValueError, match="no stream"):
        small_protocol(streams=[])


class _Recorder(nn.Module):
    """A "method" that records the images it is shown (their values are their indices)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.flatten(1)[:, 0].long().tolist()
        return torch.zeros(len(x), 10)


def test_stream_errors_draws_batches_in_the_stream_order():
    y = torch.from_numpy(balanced_labels(60))
    x = torch.arange(60).float().view(60, 1, 1, 1)
    for stream in ("iid", "label-shift-0.1"):
        rec = _Recorder()
        ((n, wrong, _), (n2, _, _)) = runner.stream_errors(rec, [(x, y), (x, y)], 7, 5, stream=stream)
        assert n == n2 == 60 and wrong == int((y != 0).sum())
        expected = stream_order(stream, y, 5).tolist()
        assert rec.seen == expected + expected  # each (continual) segment ordered by the stream
    assert expected != stream_order("iid", y, 5).tolist()


def test_summary_does_not_mix_streams():
    def row(stream, error, severity=5, seed=0):
        return {"method": "m", "corruption": "a", "severity": severity, "batch_size": 8, "seed": seed,
                "stream": stream, "n": 10, "n_wrong": int(error / 10), "error": error}  # fmt: skip

    rows = [row("label-shift-0.1", 50.0), row("iid", 10.0), row("iid", 30.0, seed=1)]
    s = Summary(rows, streams=["iid", "label-shift-0.1"])
    assert s.streams == ["iid", "label-shift-0.1"] and s.stream == "iid"
    assert s.error("m", "a", 5, 8) == 20.0  # the primary stream, iid, seeds averaged
    assert s.error("m", "a", 5, 8, "label-shift-0.1") == 50.0
    assert s.overall_mean("m", 8, "label-shift-0.1") == 50.0
    assert Summary(rows).stream == "label-shift-0.1"  # default: first appearance


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


def test_per_sample_reference_fitted_only_when_a_method_needs_it(model, data, tmp_path):
    p = small_protocol(methods=["dmc"], corruptions=["contrast"])
    run(p, tmp_path / "plain", model, data, tmp_path)
    plain = ReferenceStats.load(tmp_path / "plain" / "stats.safetensors")
    assert plain.per_sample == {}
    # a per-sample method cannot run on stats without the per-sample reference: said up front
    with pytest.raises(ValueError, match="no per-sample reference.*dmc fit --per-sample"):
        run(small_protocol(methods=["dmc-per-sample"], corruptions=["contrast"]), tmp_path / "x",
            model, data, tmp_path, stats_path=tmp_path / "plain" / "stats.safetensors")
    with pytest.raises(ValueError, match="no per-sample reference"):  # nor resume onto them
        run(small_protocol(methods=["dmc", "dmc-per-sample"], corruptions=["contrast"]),
            tmp_path / "plain", model, data, tmp_path, resume=True)
    p = small_protocol(methods=["dmc"], corruptions=["contrast"],
                       method_options={"dmc": {"estimate": {"*": "per-sample"}}})
    run(p, tmp_path / "ps", model, data, tmp_path)
    fitted = ReferenceStats.load(tmp_path / "ps" / "stats.safetensors")
    assert set(fitted.per_sample) and fitted.quantiles.keys() == plain.quantiles.keys()
    for site, q in plain.quantiles.items():  # the pooled tables are the same either way
        assert torch.equal(fitted.quantiles[site], q)


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
    assert config["execution"] == {"jobs": 2, "channels_last": True, "device": "cpu", "workers": 1}

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
    real = evaluate.stream_errors
    monkeypatch.setattr(evaluate, "stream_errors", lambda *a, **k: calls.append(1) or real(*a, **k))
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


def test_label_shift_end_to_end(model, data, tmp_path):
    streams = ["iid", "label-shift-0.1"]
    p = small_protocol(
        methods=["source", "bn"], corruptions=["contrast"], batch_sizes=[4, 8], streams=streams
    )
    out = tmp_path / "run"
    run(p, out, model, data, tmp_path, plots=True)
    for name, columns in (("results.csv", COLUMNS), ("timings.csv", TIMING_COLUMNS)):
        with open(out / name, newline="") as fh:
            header = tuple(next(csv.reader(fh)))
        assert header == columns and header.index("stream") == header.index("seed") + 1
    rows = read_results(out / "results.csv")
    assert len(rows) == len(p.cells()) == 2 * 2 * 2 * 2
    assert {r["stream"] for r in rows} == {"iid", "label-shift-0.1"}
    assert done_cells(rows) == set(p.cells())
    # the same images in another order: source (no adaptation) makes the same mistakes
    key = ("corruption", "batch_size", "stream")
    src = {tuple(r[k] for k in key): r["n_wrong"] for r in rows if r["method"] == "source"}
    for (c, b, stream), wrong in src.items():
        assert wrong == src[(c, b, "iid")], stream
    for png in ("batch_size.png", "batch_size_label-shift-0.1.png", "streams.png"):
        assert (out / png).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "## iid vs label-shifted streams" in report and "Δ label-shift-0.1 (pp)" in report
    assert "stream iid" in report and "(streams.png)" in report
    # continual: the order applies within each corruption segment; source is still unchanged
    pc = small_protocol(methods=["source"], setting="continual", streams=["label-shift-0.1"])
    run(pc, tmp_path / "cont", model, data, tmp_path)
    cont = read_results(tmp_path / "cont" / "results.csv")
    assert {r["stream"] for r in cont} == {"label-shift-0.1"} and len(cont) == 3


def test_stream_table_lists_only_batch_sizes_with_a_shifted_stream():
    def row(b, stream, error):
        return {"method": "m", "corruption": "a", "severity": 5, "batch_size": b, "seed": 0,
                "stream": stream, "n": 10, "n_wrong": int(error / 10), "error": error}

    rows = [row(4, "iid", 20.0), row(8, "iid", 30.0), row(8, "label-shift-0.1", 70.0)]
    report = render_report(rows, {"protocol": {"methods": ["m"], "seeds": [0]}})
    table = report.split("## iid vs label-shifted streams")[1].split("##")[0]
    assert "| 8 | m | 30.00 | 70.00 | 40.00 |" in table and "| 4 |" not in table


def test_dmc_report_rewrites_report_and_plots(model, data, tmp_path, capsys):
    from torch_dmc.cli import main

    out = tmp_path / "run"
    run(small_protocol(methods=["source", "bn"], corruptions=["contrast"]), out, model, data, tmp_path,
        plots=True)
    report = out / "report.md"
    expected = report.read_text()
    report.write_text("stale")
    assert main(["report", str(out)]) == 0
    assert report.read_text() == expected and (out / "heatmap.png").stat().st_size > 1000
    assert main(["report", str(tmp_path)]) == 2
    assert "has no results.csv or config.json" in capsys.readouterr().err


def test_resume_old_results_without_stream_column(model, data, tmp_path, monkeypatch):
    p = small_protocol(methods=["source", "bn"], corruptions=["contrast"])
    out = tmp_path / "old"
    run(p, out, model, data, tmp_path)
    new_rows = read_results(out / "results.csv")
    # make the folder look like one written before streams existed
    for name in ("results.csv", "timings.csv"):
        with open(out / name, newline="") as fh:
            table = list(csv.reader(fh))
        at = table[0].index("stream")
        with open(out / name, "w", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows([r[:at] + r[at + 1 :] for r in table])
    config = json.loads((out / "config.json").read_text())
    del config["protocol"]["streams"]
    (out / "config.json").write_text(json.dumps(config))
    assert "stream" not in (out / "results.csv").read_text().splitlines()[0]
    assert read_results(out / "results.csv") == new_rows  # read as iid rows
    calls = []
    real = evaluate.stream_errors
    monkeypatch.setattr(evaluate, "stream_errors", lambda *a, **k: calls.append(k["stream"]) or real(*a, **k))
    run(p, out, model, data, tmp_path, resume=True)
    assert calls == []  # every (iid) cell is already there
    with open(out / "results.csv", newline="") as fh:
        assert tuple(next(csv.reader(fh))) == COLUMNS  # the column was added
    assert read_results(out / "results.csv") == new_rows
    # adding a label-shifted stream to the old folder computes exactly its cells
    p2 = small_protocol(
        methods=["source", "bn"], corruptions=["contrast"], streams=["iid", "label-shift-1e-1"]
    )
    run(p2, out, model, data, tmp_path, resume=True)
    assert calls == ["label-shift-0.1"] * 4
    rows = read_results(out / "results.csv")
    assert done_cells(rows) == set(p2.cells())
    assert Cell("bn", "contrast", 5, 8, 0, "label-shift-0.1") in done_cells(rows)
    timings = (out / "timings.csv").read_text().splitlines()
    assert timings[0].split(",") == list(TIMING_COLUMNS) and len(timings) == 1 + len(rows)


def test_continual(model, data, tmp_path):
    p = small_protocol(methods=["source", "bn-ema"], setting="continual")
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
    assert s.seeds == [0, 1]
    assert s.seed_range("m", 5, 8) is None  # seed 1 lacks corruption b: one complete seed only
    rows.append({**rows[2], "seed": 1, "n_wrong": 5, "error": 50.0})
    s = Summary(rows)
    assert s.seed_range("m", 5, 8) == (35.0, 40.0)  # seed 0: (10 + 60) / 2, seed 1: (30 + 50) / 2
    report = render_report(rows, {"protocol": {"methods": ["m"], "seeds": [0, 1]}})
    assert "## Spread over stream seeds (severity 5" in report and "| 8 | 35.00–40.00 |" in report
    assert "Spread over stream seeds" not in render_report(rows[:3], {"protocol": {"seeds": [0]}})


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


def test_cli_streams_and_label_shift(tmp_path, capsys):
    p, _ = cli.bench_protocol(bench_args())
    assert p.streams == ["iid"]
    p, _ = cli.bench_protocol(bench_args("--label-shift", "0.1"))
    assert p.streams == ["iid", "label-shift-0.1"]  # one command gives both bars
    p, _ = cli.bench_protocol(bench_args("--streams", "label-shift-0.01", "--label-shift", "0.01"))
    assert p.streams == ["label-shift-0.01"]
    p, _ = cli.bench_protocol(bench_args("--streams", "iid,label-shift-0.1", "--label-shift", "1"))
    assert p.streams == ["iid", "label-shift-0.1", "label-shift-1"]
    assert p.command_args()[p.command_args().index("--streams") + 1] == "iid,label-shift-0.1,label-shift-1"
    with pytest.raises(ValueError, match="--streams: unknown stream 'shuffle'"):
        cli.bench_protocol(bench_args("--streams", "iid,shuffle"))
    out = str(tmp_path / "o")
    assert cli.run_bench(bench_args("--streams", "label-shift-abc", "--out", out, "--no-progress")) == 2
    assert "expected 'iid' or 'label-shift-<alpha>'" in capsys.readouterr().err
    assert cli.run_bench(bench_args("--label-shift", "0", "--out", out, "--no-progress")) == 2
    assert "--label-shift" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    parser = argparse.ArgumentParser()
    cli.add_bench_arguments(parser)
    assert "label-shift-0.1" in " ".join(parser.format_help().split())


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


def test_tune_grid_for_the_estimate_methods():
    sites = ["a", "b"]
    prior = TuneGrid(site_sets=["all"], strengths=[1.0], modes=["grid"], adapt_bn=[False],
                     method="dmc-prior", priors=[4, 16], momenta=[0.5])  # fmt: skip
    assert [c["options"]["prior"] for c in candidates(prior, sites)] == [4.0, 16.0]
    assert all("momentum" not in c["options"] for c in candidates(prior, sites)) and prior.size() == 2
    ema = TuneGrid(site_sets=["all", "first:1"], strengths=[1.0], modes=["grid"], adapt_bn=[False],
                   method="dmc-ema", momenta=[0.1, 0.5])  # fmt: skip
    assert len(candidates(ema, sites)) == 4 == ema.size()
    assert candidates(ema, sites)[1]["options"] == {
        "mode": "grid", "strength": 1.0, "adapt_bn": False, "momentum": 0.5
    }
    with pytest.raises(ValueError, match="method must be one of"):
        TuneGrid(method="tent")
    with pytest.raises(ValueError, match="momenta"):
        TuneGrid(method="dmc-ema", momenta=[0.0])


def test_method_configs_from_several_files_are_merged(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"methods": {"dmc": {"strength": 0.5}}}))
    b.write_text(json.dumps({"methods": {"dmc-prior": {"prior": 8}}}))
    p, config = cli.bench_protocol(bench_args("--method-config", f"{a},{b}"))
    assert p.method_options == {"dmc": {"strength": 0.5}, "dmc-prior": {"prior": 8}}
    assert len(config["files"]) == 2
    c = tmp_path / "c.json"
    c.write_text(json.dumps({"methods": {"dmc": {"strength": 1.0}}}))
    with pytest.raises(ValueError, match="in one file only"):
        cli.bench_protocol(bench_args("--method-config", f"{a},{c}"))


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


def test_tune_per_sample_fits_its_reference(tmp_path, fake_models):
    npz = tmp_path / "tiny.npz"
    np.savez(npz, **tiny_arrays())
    out = tmp_path / "tune-per-sample.json"
    rc = cli.run_tune(tune_args(
        "--data", str(npz), "--method", "dmc-per-sample", "--corruptions", "speckle_noise",
        "--severities", "3", "--n-test", "16", "--batch-size", "8", "--site-sets", "all",
        "--strengths", "1.0", "--adapt-bn", "false", "--fit-levels", "64", "--workers", "1",
        "--cache", str(tmp_path / "cache"), "--out", str(out), "--baselines", "", "--no-progress",
    ))
    assert rc == 0
    chosen = json.loads(out.read_text())
    assert "dmc-per-sample" in chosen["methods"]
    assert ReferenceStats.load(chosen["stats"]["path"]).per_sample


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


def test_groupnorm_models_stay_out_of_channels_last(data, tmp_path):
    # torch's CPU GroupNorm backward crashes (segfault) on a channels-last input that needs no
    # gradient (tent's case): auto keeps a GroupNorm model in its own layout, "on" is refused
    torch.manual_seed(0)
    gn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    assert runner.channels_last_unsafe(gn) and not runner.channels_last_unsafe(tiny_model())
    p = small_protocol(methods=["source", "tent"], corruptions=["contrast"])
    config = run(p, tmp_path / "auto", gn, data, tmp_path)
    assert config["execution"]["channels_last"] is False
    with pytest.raises(ValueError, match="GroupNorm"):
        run(p, tmp_path / "on", gn, data, tmp_path, channels_last=True)
