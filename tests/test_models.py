"""Tests for torch_dmc.models: SmallResNet, save/load, shipped weights, training."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from torch_dmc.data import ImageData, load_fashion_mnist
from torch_dmc.data.fashion_mnist import DEFAULT_DATA_DIR
from torch_dmc.models import (
    SmallResNet,
    build_default,
    default_files,
    evaluate_error,
    load_default,
    load_model,
    save_model,
    sha256_file,
    train_main,
    train_model,
)
from torch_dmc.models.training import _augment

HAVE_FMNIST = os.path.isfile(os.path.join(DEFAULT_DATA_DIR, "t10k-images-idx3-ubyte.gz"))


def n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (1, 17)])
def test_forward_shape(channels, size):
    model = SmallResNet(in_channels=channels, num_classes=7).eval()
    out = model(torch.rand(3, channels, size, size))
    assert out.shape == (3, 7) and out.dtype == torch.float32
    assert n_bn(model) >= 5
    with pytest.raises(ValueError, match=f"N×{channels}×H×W"):
        model(torch.rand(3, channels + 1, size, size))


def test_architecture_names_and_size():
    model = build_default(1, 10)
    names = dict(model.named_modules())
    for site in ("stem.bn", "layer1.bn1", "layer1.bn2", "layer3.bn2", "layer2.downsample.1"):
        assert isinstance(names[site], nn.BatchNorm2d), site
    assert n_bn(model) == 9
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert n_bytes < 5e6
    assert not any(getattr(m, "inplace", False) for m in model.modules())  # hooks see clean outputs


def test_normalisation_buffers():
    model = SmallResNet(3, 2, mean=[0.1, 0.2, 0.3], std=0.5)
    assert model.mean.shape == (1, 3, 1, 1) and model.std.flatten().tolist() == [0.5] * 3
    assert "mean" in model.state_dict() and "std" in model.state_dict()
    with pytest.raises(ValueError, match="in_channels=3"):
        SmallResNet(3, 2, mean=[0.1, 0.2])
    with pytest.raises(ValueError, match="positive"):
        SmallResNet(1, 2, std=0.0)
    with pytest.raises(ValueError, match="widths"):
        SmallResNet(1, 2, widths=(8, 16))


def trained_toy_model() -> nn.Module:
    torch.manual_seed(0)
    model = SmallResNet(1, 4, widths=(4, 8, 8), mean=0.3, std=0.2)
    model.train()
    with torch.no_grad():  # make running stats and affine params non-trivial
        for _ in range(3):
            model(torch.rand(16, 1, 12, 12))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_save_load_roundtrip(tmp_path):
    model = trained_toy_model()
    x = torch.rand(5, 1, 12, 12)
    save_model(model, tmp_path / "m", metadata={"note": "toy"})
    cfg = json.loads((tmp_path / "m" / "model.json").read_text())
    assert cfg["architecture"] == "SmallResNet" and cfg["kwargs"]["widths"] == [4, 8, 8]
    assert cfg["sha256"] == sha256_file(tmp_path / "m" / "model.safetensors")
    assert cfg["training"] == {"note": "toy"}
    loaded = load_model(tmp_path / "m")
    assert not loaded.training
    assert torch.equal(loaded(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_load_errors(tmp_path):
    model = trained_toy_model()
    d = save_model(model, tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no model folder"):
        load_model(tmp_path / "nothing")
    with pytest.raises(TypeError, match="SmallResNet"):
        save_model(nn.Linear(2, 2), tmp_path / "lin")
    # weights and description from different models
    other = save_model(SmallResNet(1, 4, widths=(4, 8, 16)), tmp_path / "other")
    (d / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="do not belong together"):
        load_model(d)
    with pytest.raises(ValueError, match="wrong shapes.*layer3"):
        load_model(d, verify=False)
    # missing files
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(d)
    (other / "model.json").unlink()
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_model(other)
    # bad JSON and unknown architecture
    bad = save_model(model, tmp_path / "bad")
    (bad / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(bad)
    cfg = json.loads((d / "model.json").read_text())
    cfg["architecture"] = "ResNet50"
    (bad / "model.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown architecture 'ResNet50'"):
        load_model(bad)


def test_shipped_weights_metadata():
    weights, config = default_files()
    assert weights.is_file() and config.is_file()
    assert weights.stat().st_size <= 5_000_000
    cfg = json.loads(config.read_text())
    assert cfg["sha256"] == sha256_file(weights)
    training = cfg["training"]
    assert training["command"].startswith("dmc train --out ")
    assert f"--epochs {training['epochs']}" in training["command"]
    assert training["clean_test_error"] <= 8.0


def test_load_default():
    model = load_default()
    assert isinstance(model, SmallResNet) and not model.training
    assert n_bn(model) >= 5
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed")
def test_load_default_clean_error():
    data = load_fashion_mnist(DEFAULT_DATA_DIR)
    error = evaluate_error(load_default(), data.x_test[:2000], data.y_test[:2000])
    assert error <= 9.0


def test_evaluate_error():
    class Fixed(nn.Module):
        def forward(self, x):
            return torch.stack([x.flatten(1).mean(1), 0.5 * torch.ones(len(x))], 1)

    x = torch.tensor([0.0, 1.0, 1.0, 0.0]).view(4, 1, 1, 1)  # predicts class 1, 0, 0, 1
    assert evaluate_error(Fixed(), x, torch.tensor([1, 0, 1, 0]), batch_size=3) == 50.0
    imgs = np.array([0, 255, 255, 0], np.uint8).reshape(4, 1, 1)
    assert evaluate_error(Fixed(), imgs, np.array([1, 0, 0, 1])) == 0.0


def test_augment_shapes():
    x = torch.rand(6, 2, 9, 9)
    gen = torch.Generator().manual_seed(0)
    y = _augment(x, gen)
    assert y.shape == x.shape
    flipped = _augment(x, torch.Generator().manual_seed(1), crop=False)
    for a, b in zip(x, flipped, strict=True):
        assert torch.equal(a, b) or torch.equal(a.flip(2), b)


def toy_data(n: int = 96) -> ImageData:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    x = (rng.integers(0, 60, (n, 10, 10)) + 60 * y[:, None, None]).astype(np.uint8)
    return ImageData(x[: n - 32], y[: n - 32], x[n - 32 :], y[n - 32 :], name="toy")


def test_train_model_deterministic():
    data = toy_data()

    def run(global_seed):
        torch.manual_seed(0)
        model = SmallResNet(1, 3, widths=(4, 8, 8))
        torch.manual_seed(global_seed)  # train_model must not depend on the global state
        return train_model(
            data, epochs=2, batch_size=32, lr=0.1, seed=1, progress=False, augment=True, model=model
        )

    a, b = run(5), run(6)
    assert not a.training
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_train_main_npz(tmp_path, capsys):
    data = toy_data()
    path = tmp_path / "toy.npz"
    np.savez(path, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test)
    summary = train_main(str(path), tmp_path / "out", epochs=1, seed=2, progress=False)
    assert summary["command"] == f"dmc train --data {path} --out {tmp_path / 'out'} --epochs 1 --seed 2"
    assert 0.0 <= summary["clean_test_error"] <= 100.0
    assert summary["sha256"] == sha256_file(tmp_path / "out" / "model.safetensors")
    model = load_model(tmp_path / "out")
    assert model.config["num_classes"] == 3 and model.config["in_channels"] == 1
    cfg = json.loads((tmp_path / "out" / "model.json").read_text())
    assert cfg["training"]["clean_test_error"] == round(summary["clean_test_error"], 3)
    assert "clean test error" in capsys.readouterr().out
