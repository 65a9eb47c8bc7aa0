"""The bench on data specs and protocols: CIFAR-10-C from disk end to end (each cell reads exactly
its rows and labels), the mixed and continual protocols, one definition of the reference fit.

The CIFAR files are written in the real layout with few images; every image encodes where it came
from (label, severity, corruption, row), and a recording model checks what each cell saw.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from torch_dmc import ReferenceStats
from torch_dmc.bench import cli as bench_cli
from torch_dmc.bench import evaluate, runner
from torch_dmc.bench.datasets import open_bench_data
from torch_dmc.bench.metrics import read_results
from torch_dmc.bench.protocol import Protocol
from torch_dmc.data.sources import ArraySet, ConcatSet
from torch_dmc.data.specs import DataSpec

N = 12  # images per severity
CORRUPTIONS = ["gaussian_noise", "fog", "contrast"]


#: What the Oracle saw, one list per batch; [0] is the bench's 2-image check of the model.
SEEN: list[list[tuple[int, int, int]]] = []


class Oracle(nn.Module):
    """Predicts the label encoded in channel 0 (label·20) and records, per image, the
    (severity, corruption index, row) encoded in pixel (0, 0) of channels 1, 2 and pixel (1, 0)."""

    def __init__(self, wrong_class: int | None = None) -> None:
        super().__init__()
        SEEN.clear()
        self.wrong_class = wrong_class

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        px = torch.round(x * 255).long()
        label = torch.div(px[:, 0, 5, 5] + 10, 20, rounding_mode="floor")
        SEEN.append([(int(a), int(b), int(c)) for a, b, c in
                          zip(px[:, 1, 0, 0] // 40, px[:, 2, 0, 0] // 40, px[:, 1, 1, 0], strict=True)])
        if self.wrong_class is not None:  # every image of that class is misclassified
            label = torch.where(label == self.wrong_class, (label + 1) % 10, label)
        return nn.functional.one_hot(label, 10).float()


def encoded(labels: np.ndarray, severity: int, corruption: int) -> np.ndarray:
    x = np.zeros((len(labels), 32, 32, 3), np.uint8)
    x[..., 0] = (labels * 20)[:, None, None]
    x[:, 0, 0, 1] = severity * 40
    x[:, 0, 0, 2] = corruption * 40
    x[:, 1, 0, 1] = np.arange(len(labels))
    return x


def write_cifar10_c(folder, labels: np.ndarray, corruptions=CORRUPTIONS) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "labels.npy", np.tile(labels, 5).astype(np.uint8))
    for ci, name in enumerate(corruptions, start=1):
        np.save(folder / f"{name}.npy", np.concatenate([encoded(labels, s, ci) for s in range(1, 6)]))


def write_cifar10_bin(folder, labels: np.ndarray, split: str) -> None:
    """The binary distribution's records: label byte, then planar R, G, B (32×32 each)."""
    folder.mkdir(parents=True, exist_ok=True)
    x = encoded(labels, 0, 0)
    records = np.concatenate([labels.astype(np.uint8)[:, None],
                              x.transpose(0, 3, 1, 2).reshape(len(x), -1)], axis=1)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    for part, name in zip(np.array_split(records, len(names)), names, strict=True):
        part.tofile(folder / name)


@pytest.fixture
def labels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 10, N)


@pytest.fixture
def cifar(tmp_path, labels):
    write_cifar10_c(tmp_path / "CIFAR-10-C", labels)
    write_cifar10_bin(tmp_path / "cifar-10-batches-bin", labels, "test")
    return tmp_path


def bench(protocol: Protocol, out, model, **kw):
    kw.setdefault("channels_last", False)  # the recording model itself runs, not a copy
    return runner.run_benchmark(protocol, out, model=model, workers=0, progress=False, plots=False,
                                log=lambda _: None, **kw)


# -- specs ------------------------------------------------------------------------------------
def test_data_spec_parsing(tmp_path):
    assert DataSpec.parse(None) == DataSpec("fmnist") == DataSpec.parse("fmnist")
    assert DataSpec.parse("cifar10-c:/d") == DataSpec("cifar10-c", "/d")
    assert str(DataSpec.parse("imagenet-c:/x:y")) == "imagenet-c:/x:y"  # ':' in the folder
    assert DataSpec.parse("a/b.npz") == DataSpec("npz", "a/b.npz")
    with pytest.raises(ValueError, match="unknown data kind 'cifar10c'"):
        DataSpec.parse("cifar10c:/d")
    with pytest.raises(ValueError, match="no folder after 'cifar10-c:'"):
        DataSpec.parse("cifar10-c:")
    with pytest.raises(ValueError, match="cannot be used here"):
        DataSpec.parse("cifar10-c:/d").check_role(("cifar10",), "--fit-data")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        DataSpec.parse(f"cifar10:{tmp_path / 'none'}").check_role(("cifar10",), "--fit-data")


def test_concat_set_reads_rows_of_each_part():
    a = ArraySet(np.full((3, 2, 2), 1, np.uint8), np.zeros(3))
    b = ArraySet(np.arange(4, dtype=np.uint8)[:, None, None].repeat(2, 1).repeat(2, 2) + 10, np.ones(4))
    c = ConcatSet([a, b])
    assert list(c.labels) == [0, 0, 0, 1, 1, 1, 1]
    assert list(c.source_of(np.array([6, 0, 3]))) == [1, 0, 1]
    assert list(c.read(np.array([6, 0, 3]))[:, 0, 0]) == [13, 1, 10]


# -- CIFAR-10-C end to end --------------------------------------------------------------------
def test_cifar10_c_cells_read_their_rows_and_labels(cifar, labels, tmp_path):
    model = Oracle()
    p = Protocol(methods=["source"], corruptions=["fog", "contrast"], severities=[2, 5], batch_sizes=[5],
                 data=f"cifar10-c:{cifar / 'CIFAR-10-C'}", clean_data=f"cifar10:{cifar}")
    config = bench(p, tmp_path / "out", model)
    rows = read_results(tmp_path / "out" / "results.csv")
    assert {(r["corruption"], r["severity"]) for r in rows} == {
        ("clean", 0), ("fog", 2), ("fog", 5), ("contrast", 2), ("contrast", 5)}
    assert all(r["n"] == N and r["n_wrong"] == 0 for r in rows)  # labels travel with their images
    # every cell saw each row of its own severity and corruption exactly once
    expected = {("clean", 0): (0, 0), ("fog", 2): (2, 2), ("fog", 5): (5, 2), ("contrast", 2): (2, 3),
                ("contrast", 5): (5, 3)}
    seen = [t for batch in SEEN[1:] for t in batch]
    for s, ci in expected.values():
        assert sorted(r for (sv, c, r) in seen if (sv, c) == (s, ci)) == list(range(N))
    assert len(seen) == 5 * N
    data = config["data"]
    assert data["kind"] == "cifar10-c" and data["images"] == {"selection": "all"}
    files = data["files_sha256"]
    assert set(files) >= {"fog.npy", "contrast.npy", "labels.npy", "test_batch.bin"}
    from torch_dmc.data.sources import sha256_file

    assert files["fog.npy"] == sha256_file(cifar / "CIFAR-10-C" / "fog.npy")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Images: all" in report


def test_cifar10_c_errors_count_per_cell(cifar, labels, tmp_path):
    model = Oracle(wrong_class=int(labels[0]))
    p = Protocol(methods=["source"], corruptions=["fog"], severities=[1], batch_sizes=[4], n_test=7,
                 data=f"cifar10-c:{cifar / 'CIFAR-10-C'}")
    bench(p, tmp_path / "out", model)
    (row,) = read_results(tmp_path / "out" / "results.csv")  # no clean set given: no clean cells
    assert row["n"] == 7 and row["n_wrong"] == int((labels[:7] == labels[0]).sum())


def test_cifar10_c_refusals(cifar, tmp_path):
    c10c = f"cifar10-c:{cifar / 'CIFAR-10-C'}"
    with pytest.raises(ValueError, match=r"no snow .*choose --corruptions"):
        bench(Protocol(methods=["source"], corruptions=["snow"], severities=[1], data=c10c),
              tmp_path / "a", Oracle())
    with pytest.raises(ValueError, match="--fit-data"):  # dmc needs training images
        bench(Protocol(methods=["source", "dmc"], corruptions=["fog"], severities=[1], data=c10c),
              tmp_path / "b", Oracle())
    with pytest.raises(ValueError, match="applies to image-tree data"):
        ids = tmp_path / "ids.txt"
        ids.write_text("a/b.JPEG\n")
        open_bench_data(data=c10c, image_ids=str(ids), need_fit=False)


def test_bench_cli_with_a_data_spec(cifar, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "resolve_model", lambda spec: runner.ResolvedModel(Oracle(), "oracle", {}))
    args = ["--methods", "source", "--corruptions", "fog", "--severities", "3", "--batch-size", "6",
            "--data", f"cifar10-c:{cifar / 'CIFAR-10-C'}", "--clean-data", f"cifar10:{cifar}",
            "--protocol", "mixed", "--out", str(tmp_path / "out"), "--no-progress", "--workers", "0",
            "--channels-last", "off"]
    import argparse

    parser = argparse.ArgumentParser()
    bench_cli.add_bench_arguments(parser)
    assert bench_cli.run_bench(parser.parse_args(args)) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["protocol"]["setting"] == "mixed"
    assert "--protocol mixed" in config["explicit_command"]
    assert f"--clean-data cifar10:{cifar}" in config["explicit_command"]
    assert "- Protocol: mixed; all test images" in (tmp_path / "out" / "report.md").read_text()
    bad = parser.parse_args(["--methods", "source", "--data", "cifar10c:/x", "--out", str(tmp_path / "o2")])
    assert bench_cli.run_bench(bad) == 2
    assert "unknown data kind" in capsys.readouterr().err


# -- protocols --------------------------------------------------------------------------------
def test_mixed_batches_mix_corruptions_and_cells_count_each(cifar, labels, tmp_path):
    c10c = f"cifar10-c:{cifar / 'CIFAR-10-C'}"
    kinds = {}
    for setting in ("continual", "mixed"):
        model = Oracle(wrong_class=int(labels[1]))
        p = Protocol(methods=["source"], corruptions=CORRUPTIONS, severities=[4], batch_sizes=[6],
                     seeds=[3], setting=setting, data=c10c)
        bench(p, tmp_path / setting, model)
        batches = [{c for (_, c, _) in b} for b in SEEN[1:]]
        kinds[setting] = batches
        assert sorted(t for b in SEEN[1:] for t in b) == sorted(
            (4, ci, r) for ci in (1, 2, 3) for r in range(N))  # every image once
        rows = read_results(tmp_path / setting / "results.csv")
        assert [r["corruption"] for r in rows] == CORRUPTIONS
        # source is batch-independent: each corruption's errors are the same in both protocols
        assert all(r["n"] == N and r["n_wrong"] == int((labels == labels[1]).sum()) for r in rows)
    assert all(len(b) == 1 for b in kinds["continual"])  # one corruption per batch
    assert any(len(b) > 1 for b in kinds["mixed"])  # batches mix corruptions


@pytest.mark.parametrize("setting", ["continual", "mixed"])
def test_every_protocol_takes_every_stream_and_batch_size(cifar, labels, tmp_path, setting):
    c10c = f"cifar10-c:{cifar / 'CIFAR-10-C'}"
    model = Oracle()
    p = Protocol(methods=["source"], corruptions=CORRUPTIONS, severities=[2], batch_sizes=[1, 7],
                 seeds=[0], streams=["iid", "label-shift-0.1"], setting=setting, data=c10c)
    bench(p, tmp_path / "out", model)
    rows = read_results(tmp_path / "out" / "results.csv")
    assert len(rows) == 2 * 2 * len(CORRUPTIONS)
    assert all(r["n"] == N and r["n_wrong"] == 0 for r in rows)
    seen = [t for b in SEEN[1:] for t in b]
    assert sorted(seen) == sorted([(2, ci, r) for ci in (1, 2, 3) for r in range(N)] * 4)


def test_mixed_on_tensors_equals_episodic_for_source_not_for_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.LazyLinear(4)).eval()
    model(torch.rand(2, 1, 6, 6))
    segs = [(torch.rand(20, 1, 6, 6) * k, torch.randint(0, 4, (20,))) for k in (1.0, 3.0)]
    from torch_dmc import methods

    def errors(name, mixed):
        return [w for _, w, _ in evaluate.stream_errors(methods.build(name, model), segs, 8, 0,
                                                        mixed=mixed)]

    assert errors("source", True) == errors("source", False)
    assert errors("source", True) == [w for (_, w, _), in
                                      (evaluate.stream_errors(methods.build("source", model), [s], 8, 0)
                                       for s in segs)]
    assert errors("bn", True) != errors("bn", False)  # batch statistics of mixed batches differ


def test_old_config_with_continual_flag_loads():
    p = Protocol.from_dict({"methods": ["source"], "continual": True})
    assert p.setting == "continual"
    assert Protocol.from_dict({"methods": ["source"], "continual": False}).setting == "episodic"
    with pytest.raises(ValueError, match="--protocol must be one of"):
        Protocol(methods=["source"], setting="sometimes")


# -- one definition of the reference fit ------------------------------------------------------
def test_dmc_fit_and_bench_fit_the_same_stats(tmp_path, monkeypatch):
    from torch_dmc import cli
    from torch_dmc.bench import inputs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 10)).eval()
    rng = np.random.default_rng(1)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (1200, 12, 12), dtype=np.uint8),
             y_train=rng.integers(0, 10, 1200), x_test=rng.integers(0, 256, (20, 12, 12), dtype=np.uint8),
             y_test=np.arange(20) % 10)
    monkeypatch.setattr(inputs, "resolve_model", lambda spec=None: inputs.ResolvedModel(model, "m", {}))
    assert cli.main(["fit", "--data", str(npz), "--images", "700", "--seed", "3", "--levels", "64",
                     "--out", str(tmp_path / "fit.safetensors")]) == 0
    p = Protocol(methods=["dmc"], corruptions=["fog"], severities=[1], n_test=8, fit_images=700,
                 fit_seed=3, fit_levels=64, data=str(npz))
    monkeypatch.setenv("DMC_CACHE_DIR", str(tmp_path / "cache"))
    config = bench(p, tmp_path / "out", model, channels_last=True)  # fitted on the model as given
    a = ReferenceStats.load(tmp_path / "fit.safetensors")
    b = ReferenceStats.load(tmp_path / "out" / "stats.safetensors")
    assert a.checksum() == b.checksum() == config["stats"]["checksum"]
    assert a.info["fit_images"] == 700 and a.info["fit_batch_size"] == 500


# -- ImageNet-C layouts end to end (real JPEG files) -------------------------------------------
WNIDS = ["n01440764", "n01443537", "n01484850"]


def solid_jpeg(path, rgb, size: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), tuple(int(v) for v in rgb)).save(path, quality=95)


def colour(label: int, severity: int, corruption: int) -> tuple[int, int, int]:
    return 30 + 60 * label, 20 + 40 * severity, 20 + 60 * corruption


class ColourOracle(nn.Module):
    """Predicts the label from the mean red level; records (severity, corruption, label) per image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = (x.mean((2, 3)) * 255).round()
        label = ((m[:, 0] - 30) / 60).round().long()
        SEEN.append([(int(round((g - 20) / 40)), int(round((b - 20) / 60)), int(lab))
                     for g, b, lab in zip(m[:, 1].tolist(), m[:, 2].tolist(), label.tolist(), strict=True)])
        return nn.functional.one_hot(label.clamp(0, 9), 10).float()


def write_imagenet_c(root, size: int, corruptions=("gaussian_noise", "fog"), severities=(1, 5),
                     per_class: int = 2) -> None:
    for ci, c in enumerate(corruptions, start=1):
        for s in severities:
            for label, w in enumerate(WNIDS):
                for k in range(per_class):
                    solid_jpeg(root / c / str(s) / w / f"ILSVRC2012_val_{label}{k:07d}.JPEG",
                               colour(label, s, ci), size)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")


def test_tiny_imagenet_c_mixed_with_workers_and_image_ids(tmp_path):
    root = tmp_path / "Tiny-ImageNet-C"
    write_imagenet_c(root, 64)
    ids = tmp_path / "ids.txt"
    ids.write_text("# a subset\nn01443537/ILSVRC2012_val_10000001.JPEG\n"
                   "n01440764/ILSVRC2012_val_00000000.JPEG\nn01484850/ILSVRC2012_val_20000000.JPEG\n")
    SEEN.clear()
    p = Protocol(methods=["source"], corruptions=["gaussian_noise", "fog"], severities=[5], batch_sizes=[2],
                 setting="mixed", data=f"tiny-imagenet-c:{root}", image_ids=str(ids))
    config = runner.run_benchmark(p, tmp_path / "out", model=ColourOracle(), workers=2, progress=False,
                                  plots=False, log=lambda _: None, channels_last=False)
    rows = read_results(tmp_path / "out" / "results.csv")
    assert [(r["corruption"], r["n"], r["n_wrong"]) for r in rows] == [
        ("gaussian_noise", 3, 0), ("fog", 3, 0)]
    seen = sorted(t for b in SEEN[1:] for t in b)
    assert seen == sorted((5, ci, label) for ci in (1, 2) for label in (0, 1, 2))  # the listed images
    assert config["data"]["images"]["selection"] == "ids" and config["data"]["images"]["n"] == 3
    assert len(config["data"]["files_sha256"]) >= 1
    assert "3 listed in" in (tmp_path / "out" / "report.md").read_text()


def test_imagenet_c_with_an_imagefolder_clean_set(tmp_path):
    root = tmp_path / "ImageNet-C"
    write_imagenet_c(root, 224, corruptions=("fog",), severities=(3,), per_class=1)
    clean = tmp_path / "val"
    for label, w in enumerate(WNIDS):  # 256² clean images: resized 256, centre-cropped 224
        solid_jpeg(clean / w / f"ILSVRC2012_val_{label}0000000.JPEG", colour(label, 0, 0), 256)
    SEEN.clear()
    p = Protocol(methods=["source"], corruptions=["fog"], severities=[3], batch_sizes=[2],
                 data=f"imagenet-c:{root}", clean_data=f"imagefolder:{clean}")
    config = runner.run_benchmark(p, tmp_path / "out", model=ColourOracle(), workers=0, progress=False,
                                  plots=False, log=lambda _: None, channels_last=False)
    rows = read_results(tmp_path / "out" / "results.csv")
    assert [(r["corruption"], r["n"], r["n_wrong"]) for r in rows] == [("clean", 3, 0), ("fog", 3, 0)]
    assert config["data"]["kind"] == "imagenet-c"
    assert "mCE (ImageNet-C" in (tmp_path / "out" / "report.md").read_text()


def write_cifar100_bin(folder, labels: np.ndarray, split: str) -> None:
    """CIFAR-100 binary records: coarse label, fine label, then planar R, G, B."""
    folder.mkdir(parents=True, exist_ok=True)
    x = encoded(labels % 10, 0, 0)
    records = np.concatenate([(labels // 5).astype(np.uint8)[:, None], labels.astype(np.uint8)[:, None],
                              x.transpose(0, 3, 1, 2).reshape(len(x), -1)], axis=1)
    records.tofile(folder / ("train.bin" if split == "train" else "test.bin"))


def test_cifar100_c_with_a_reference_fitted_on_the_binary_training_set(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 100, N)
    root = tmp_path / "CIFAR-100-C"
    root.mkdir()
    np.save(root / "labels.npy", np.tile(labels, 5).astype(np.uint8))
    np.save(root / "fog.npy", rng.integers(0, 256, (5 * N, 32, 32, 3), dtype=np.uint8))
    write_cifar100_bin(tmp_path / "cifar-100-binary", rng.integers(0, 100, 40), "train")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 100)).eval()
    p = Protocol(methods=["source", "dmc"], corruptions=["fog"], severities=[5], batch_sizes=[4],
                 fit_levels=16, data=f"cifar100-c:{root}", fit_data=f"cifar100:{tmp_path}")
    config = bench(p, tmp_path / "out", model)
    rows = read_results(tmp_path / "out" / "results.csv")
    assert [(r["method"], r["n"]) for r in rows] == [("source", N), ("dmc", N)]
    assert config["stats"]["fit_info"]["fit_images"] == 40
    assert set(config["data"]["fit_files_sha256"]) == {"train.bin"}
    assert config["data"]["n_fit"] == 40 and config["data"]["num_classes"] == 100


def test_tune_on_the_validation_files_of_cifar10_c(tmp_path, labels):
    from torch_dmc.bench.tune import TuneGrid, TuneProtocol, tune

    root = tmp_path / "CIFAR-10-C"
    write_cifar10_c(root, labels, corruptions=["saturate", "fog"])
    write_cifar10_bin(tmp_path / "cifar-10-batches-bin", np.arange(30) % 10, "train")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 10)).eval()
    p = TuneProtocol(corruptions=["saturate"], severities=[2], n_test=8, batch_size=4, fit_levels=16,
                     data=f"cifar10-c:{root}", fit_data=f"cifar10:{tmp_path}")
    result = tune(p, TuneGrid(site_sets=["all"], strengths=[1.0], adapt_bn=[False]), tmp_path / "t.json",
                  model=model, workers=0, progress=False, log=lambda _: None, baselines=("source",))
    assert set(result["methods"]) == {"dmc"}
    with pytest.raises(ValueError, match="refuses the test corruption"):
        TuneProtocol(corruptions=["fog"], data=f"cifar10-c:{root}")
