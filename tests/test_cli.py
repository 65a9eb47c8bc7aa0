"""Tests of the ``dmc`` command line: user errors, outputs of failed runs, defaults, ``--version``.

Every user error is one line ``dmc <command>: error: ...`` on stderr with exit status 2, found
before any heavy work; the inputs are tiny ``.npz`` files and a tiny BN network in ``tmp_path``.
"""

from __future__ import annotations

import pathlib
import re
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

from torch_dmc import ReferenceStats
from torch_dmc._version import __version__
from torch_dmc.bench import inputs, runner
from torch_dmc.bench.protocol import parse_int_list
from torch_dmc.cli import main, new_outputs


def tiny_model(channels: int = 1) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    )
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        model(torch.rand(16, channels, 28, 28))
    return model.eval()


def tiny_arrays(n_train: int = 32, n_test: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.int64) % 10,
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": np.arange(n_test, dtype=np.int64) % 10,
    }


def save_npz(path, **changes) -> str:
    """A tiny data set with ``changes`` (an array, or ``None`` to drop it) as an .npz file."""
    arrays = {**tiny_arrays(), **changes}
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output (runs/...) lands in tmp_path
    monkeypatch.setenv("DMC_CACHE_DIR", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    real = inputs.resolve_model
    resolved = inputs.ResolvedModel(tiny_model(), "tiny", {})

    def resolve(spec=None):  # the default model is the tiny one; any other goes to the resolver
        return resolved if inputs.ModelSpec.of(spec) == inputs.ModelSpec() else real(spec)

    monkeypatch.setattr(inputs, "resolve_model", resolve)  # dmc fit, dmc sites
    monkeypatch.setattr(runner, "resolve_model", resolve)  # dmc bench, dmc tune


def error_line(capsys, command: str) -> str:
    """The error line of a failed command: stderr's last line and its only error, no traceback
    (a progress bar may come before it)."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines and lines[-1].startswith(f"dmc {command}: error: "), err
    assert "error" not in "".join(lines[:-1]) and "Traceback" not in err, err
    return lines[-1]


# -- one line, exit status 2 ---------------------------------------------------------------------
FAST = ["--workers", "1", "--fit-levels", "16", "--no-progress"]


def _cases(t):
    """(argv, expected text) of user errors; ``t`` is the test's folder."""
    good = save_npz(t / "good.npz")
    return {
        "fit missing data": (["fit", "--data", str(t / "nope.npz"), "--out", str(t / "s")],
                             "--data " + str(t / "nope.npz") + ": no such file; expected an .npz"),
        "fit missing model": (["fit", "--model", str(t / "nomodel"), "--data", good,
                               "--out", str(t / "s")], "no such file, folder or model name"),
        "bench missing model": (["bench", "--model", str(t / "nomodel"), "--data", good, *FAST],
                                "a model folder written by `dmc train`"),
        "bench missing stats": (["bench", "--stats", str(t / "nope.safetensors"), "--data", good],
                                "--stats " + str(t / "nope.safetensors") + ": no such file"),
        "bench missing method config": (
            ["bench", "--method-config", str(t / "nope.json"), "--data", good], "no such file"),
        "tune missing grid": (["tune", "--grid", str(t / "nope.json"), "--data", good],
                              "--grid " + str(t / "nope.json") + ": no such file"),
        "report missing folder": (["report", str(t / "nofolder")], "has no results.csv"),
        "train missing data": (["train", "--data", str(t / "nope.npz"), "--out", str(t / "m")],
                               "no such file"),
        "bench npz without test arrays": (
            ["bench", "--data", save_npz(t / "train.npz", x_test=None, y_test=None), *FAST],
            "missing array(s) x_test, y_test (found: x_train, y_train); expected an .npz with "
            "arrays x_train, y_train, x_test, y_test"),
        "fit npz without x_train": (
            ["fit", "--data", save_npz(t / "nox.npz", x_train=None), "--out", str(t / "s")],
            "missing array(s) x_train (found: x_test, y_test, y_train)"),
        "fit float images": (
            ["fit", "--data", save_npz(t / "f.npz", x_train=np.zeros((4, 28, 28))), "--out",
             str(t / "s")], "array 'x_train' must hold uint8 pixel values 0..255; found dtype float64"),
        "fit images of wrong rank": (
            ["fit", "--data", save_npz(t / "r.npz", x_train=np.zeros((4, 28), np.uint8)), "--out",
             str(t / "s")], "must hold images N×H×W or N×H×W×C"),
        "bench float labels": (
            ["bench", "--data", save_npz(t / "l.npz", y_test=np.zeros(16)), *FAST],
            "array 'y_test' must hold integer class indices; found dtype float64"),
        "tune x and y lengths differ": (
            ["tune", "--data", save_npz(t / "n.npz", y_train=np.zeros(31, np.int64)), *FAST],
            "'y_train' has 31 labels but 'x_train' has 32 images"),
        "bench not an npz": (["bench", "--data", str(_junk(t / "junk.npz")), *FAST],
                             "not an .npz file"),
        "fit batch size 0": (["fit", "--data", good, "--out", str(t / "s"), "--batch-size", "0"],
                             "--batch-size: expected a positive integer; found 0."),
        "fit levels 1": (["fit", "--data", good, "--out", str(t / "s"), "--levels", "1"],
                         "--levels: expected an integer of at least 2; found 1."),
        "bench batch size 0": (["bench", "--data", good, "--batch-size", "0"],
                               "--batch-size: 0 out of range; expected positive integers."),
        "bench severity 9": (["bench", "--data", good, "--severities", "9"],
                             "--severities: 9 out of range; expected integers in 1..5."),
        "tune severity 9": (["tune", "--data", good, "--severities", "3,9"],
                            "--severities: 9 out of range"),
        "bench unknown method": (["bench", "--data", good, "--methods", "source,foo"],
                                 "--methods: unknown method(s) foo; expected some of: source"),
        "tune unknown baseline": (["tune", "--data", good, "--baselines", "foo"],
                                  "--baselines: unknown method(s) foo"),
        "tune unknown method": (["tune", "--data", good, "--method", "tent"],
                                "method must be one of"),
        "bench unknown corruption": (["bench", "--data", good, "--corruptions", "fog,smoke"],
                                     "--corruptions: unknown corruption 'smoke'"),
        "tune test corruption": (["tune", "--data", good, "--corruptions", "fog"], "refuses"),
        "perf repeats 0": (["perf", "--repeats", "0"], "--repeats: expected a positive integer"),
        "perf missing model": (["perf", "--model", str(t / "nomodel")], "no such folder"),
        "bench n-test 0": (["bench", "--data", good, "--n-test", "0"],
                           "--n-test: expected a positive integer; found 0."),
        "tune n-test negative": (["tune", "--data", good, "--n-test", "-5"],
                                 "--n-test: expected a positive integer; found -5."),
        "demo n-test 0": (["demo", "--n-test", "0", "--out", str(t / "demo")], "--n-test"),
        "bench fit-images 0": (["bench", "--data", good, "--fit-images", "0"],
                               "--fit-images: expected a positive integer; found 0."),
        "tune fit-images 0": (["tune", "--data", good, "--fit-images", "0"], "--fit-images"),
        "demo fit-images 0": (["demo", "--fit-images", "0", "--out", str(t / "demo")],
                              "--fit-images"),
        "perf fit-images 0": (["perf", "--fit-images", "0"], "--fit-images"),
        "fit images 0": (["fit", "--data", good, "--out", str(t / "s"), "--images", "0"],
                         "--images: expected a positive integer"),
        "bench jobs 0": (["bench", "--data", good, "--jobs", "0"],
                         "--jobs: expected a positive integer; found 0."),
        "bench workers -1": (["bench", "--data", good, "--workers", "-1"], "--workers"),
        "tune workers 0": (["tune", "--data", good, "--workers", "0"], "--workers"),
        "demo workers 0": (["demo", "--workers", "0", "--out", str(t / "demo")], "--workers"),
        "bench threads 0": (["bench", "--data", good, "--threads", "0"], "--threads"),
        "bench unknown device": (["bench", "--data", good, "--device", "nodevice"],
                                 "--device nodevice: not usable here"),
        "train epochs 0": (["train", "--epochs", "0", "--out", str(t / "m")], "--epochs"),
        "tune bad strength": (["tune", "--data", good, "--strengths", "0.5,x"],
                              "--strengths: cannot read 'x'"),
        "bench resume without out": (["bench", "--data", good, "--resume"], "--resume needs --out"),
        "bench out is a file": (["bench", "--data", good, "--out", good], "is a file; expected a folder"),
        "fit out is a folder": (["fit", "--data", good, "--out", str(t)], "is a folder"),
        "tune grid not an object": (["tune", "--data", good, "--grid", _write(t / "g.json", "[1]")],
                                    "expected a JSON object"),
    }


def _junk(path):
    path.write_bytes(b"not a zip archive")
    return path


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _case_names() -> list[str]:
    with tempfile.TemporaryDirectory() as d:
        return sorted(_cases(pathlib.Path(d)))


@pytest.mark.parametrize("case", _case_names())
def test_user_error_is_one_line_exit_2(case, tmp_path, capsys):
    argv, expected = _cases(tmp_path)[case]
    assert main(argv) == 2
    line = error_line(capsys, argv[0])
    assert expected in line, line
    assert "error: '" not in line  # a KeyError's message without the quotes str() adds
    for leftover in ("s", "m", "demo", "runs"):
        assert not (tmp_path / leftover).exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data"):
        main(["--debug", "fit", "--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "s")])
    with pytest.raises(ValueError, match="--severities"):
        main(["--debug", "bench", "--severities", "9"])


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"dmc {__version__}"


# -- dmc fit needs only the training images ------------------------------------------------------
@pytest.mark.parametrize("with_labels", [False, True])
def test_fit_needs_only_x_train(tmp_path, with_labels, capsys):
    a = tiny_arrays()
    arrays = {"x_train": a["x_train"], **({"y_train": a["y_train"]} if with_labels else {})}
    np.savez(tmp_path / "train.npz", **arrays)
    out = tmp_path / "new" / "stats.safetensors"
    argv = ["fit", "--data", str(tmp_path / "train.npz"), "--out", str(out), "--levels", "16"]
    assert main(argv) == 0, capsys.readouterr().err
    assert ReferenceStats.load(out).levels == 16
    assert sorted(p.name for p in out.parent.iterdir()) == ["stats.safetensors"]  # no temp file


def test_fit_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    data = save_npz(tmp_path / "good.npz")

    def broken_save(self, path):
        with open(path, "wb") as fh:
            fh.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ReferenceStats, "save", broken_save)
    out = tmp_path / "new" / "deeper" / "stats.safetensors"
    assert main(["fit", "--data", data, "--out", str(out), "--levels", "16"]) == 2
    assert "No space left on device" in error_line(capsys, "fit")
    assert not (tmp_path / "new").exists()
    # an existing folder stays, without the partial file or a temporary one
    assert main(["fit", "--data", data, "--out", str(tmp_path / "s.safetensors"), "--levels", "16"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.npz"]


def test_fit_model_that_does_not_take_the_images(tmp_path, capsys):
    rgb = np.zeros((8, 28, 28, 3), np.uint8)
    data = save_npz(tmp_path / "rgb.npz", x_train=rgb, x_test=rgb[:4], y_test=np.zeros(4, np.int64))
    assert main(["fit", "--data", data, "--out", str(tmp_path / "s.safetensors")]) == 2
    assert "the model cannot take the data's images" in error_line(capsys, "fit")


# -- failed runs leave no output behind ------------------------------------------------------------
def _bench(data, *more):
    return ["bench", "--data", data, "--methods", "source", "--corruptions", "contrast",
            "--severities", "1", "--batch-size", "8", *FAST, *more]


def test_failed_bench_removes_the_folder_it_created(tmp_path, capsys):
    rgb = np.zeros((32, 28, 28, 3), np.uint8)  # the tiny model takes one channel: fails in the run
    data = save_npz(tmp_path / "rgb.npz", x_train=rgb, x_test=rgb[:16])
    out = tmp_path / "new" / "run"
    assert main(_bench(data, "--out", str(out))) == 2
    assert "the model cannot take the data's images" in error_line(capsys, "bench")
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert main(_bench(data, "--out", str(existing))) == 2
    assert existing.is_dir()  # a folder that existed before is never removed


def test_failed_resume_keeps_the_results(tmp_path, capsys):
    data = save_npz(tmp_path / "good.npz")
    out = tmp_path / "run"
    assert main(_bench(data, "--out", str(out))) == 0, capsys.readouterr().err
    before = (out / "results.csv").read_text()
    capsys.readouterr()
    assert main(_bench(data, "--out", str(out), "--resume", "--n-test", "8")) == 2
    assert "protocol differs" in error_line(capsys, "bench")
    assert (out / "results.csv").read_text() == before


def test_failed_tune_removes_its_outputs(tmp_path, capsys):
    data = save_npz(tmp_path / "good.npz")
    # a site set that selects no site fails after the stats were fitted and saved
    argv = ["tune", "--data", data, "--corruptions", "speckle_noise", "--severities", "3",
            "--n-test", "16", "--batch-size", "8", "--site-sets", "pattern:nothing*",
            "--baselines", "", *FAST]
    assert main([*argv, "--out", str(tmp_path / "new" / "tune.json")]) == 2
    assert "selects none" in error_line(capsys, "tune")
    assert not (tmp_path / "new").exists()
    assert main([*argv, "--out", str(tmp_path / "tune.json")]) == 2
    capsys.readouterr()
    assert not list(tmp_path.glob("tune*"))  # neither the choice nor the fitted stats


def test_new_outputs(tmp_path):
    """On failure: what the block created goes, what existed stays; ``keep`` leaves everything."""
    (tmp_path / "old").mkdir()
    new = tmp_path / "a" / "b" / "c"
    with pytest.raises(RuntimeError), new_outputs(new, tmp_path / "old"):
        new.mkdir(parents=True)
        (new / "f").write_text("x")
        (tmp_path / "old" / "kept").write_text("x")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (tmp_path / "old" / "kept").exists()
    with pytest.raises(RuntimeError), new_outputs(tmp_path / "n", keep=lambda: True):
        (tmp_path / "n").mkdir()
        raise RuntimeError
    assert (tmp_path / "n").is_dir()


# -- defaults: runs/, not results/ -----------------------------------------------------------------
def test_bench_and_tune_default_to_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = save_npz(tmp_path / "good.npz")
    assert main(_bench(data)) == 0, capsys.readouterr().err
    (folder,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"bench-\d{8}-\d{6}", folder.name) and (folder / "results.csv").is_file()
    argv = ["tune", "--data", data, "--corruptions", "speckle_noise", "--severities", "3",
            "--n-test", "16", "--batch-size", "8", "--site-sets", "all", "--strengths", "1.0",
            "--adapt-bn", "false", "--baselines", "", *FAST]
    assert main(argv) == 0, capsys.readouterr().err
    names = sorted(p.name for p in (tmp_path / "runs").glob("dmc-tune-*"))
    assert len(names) == 2 and re.fullmatch(r"dmc-tune-\d{8}-\d{6}\.json", names[0])
    assert names[1] == names[0][: -len(".json")] + ".stats.safetensors"
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("command", ["bench", "tune"])
def test_help_texts(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "runs/" in text and "results/" not in text and "DESIGN" not in text


def test_parse_int_list_bounds():
    assert parse_int_list("1-5", "--severities", low=1, high=5) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match=r"--severities: 0, 6 out of range; expected integers in 1\.\.5"):
        parse_int_list("0,3,6", "--severities", low=1, high=5)
    with pytest.raises(ValueError, match="--seeds: .*non-negative"):
        parse_int_list([0, -1], "--seeds", low=0)


def test_default_methods_leave_out_those_that_do_not_apply(capsys):
    from torch import nn

    from torch_dmc.bench.cli import applicable_defaults
    from torch_dmc.bench.protocol import DEFAULT_METHODS

    gn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(3))
    kept = applicable_defaults(list(DEFAULT_METHODS), gn, "--methods")
    assert "bn" not in kept and "tent" in kept and "dmc" in kept and "source" in kept
    err = capsys.readouterr().err
    assert "leaving out bn" in err and "no BatchNorm" in err
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    assert applicable_defaults(list(DEFAULT_METHODS), bn, "--methods") == list(DEFAULT_METHODS)


def test_parse_channel_axes():
    from torch_dmc.cli import parse_channel_axes

    assert parse_channel_axes(None) is None
    assert parse_channel_axes("-1") == -1
    assert parse_channel_axes("stages.*.norm=1, head=-1") == {"stages.*.norm": 1, "head": -1}
    for bad in ("x", "a=b", "=1", ","):
        with pytest.raises(ValueError, match="--channel-axes"):
            parse_channel_axes(bad)


def test_python_dash_m_is_the_dmc_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "torch_dmc", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("dmc ")
