"""How far DMC moves a model on fresh in-distribution data, per kind of site and batch size.

DMC should be close to the identity when the test batch already follows the training
distribution. A site with few values per channel in a batch — a ``(B, C)`` site has only ``B`` —
estimates the test distribution badly, and mapping a batch of 16 values onto 16 reference quantiles
changes the activations a lot even without any shift. This script measures it on clean
Fashion-MNIST test images (never seen by the fit), for three kinds of sites:

- spatial: the shipped SmallResNet (BatchNorm2d outputs, ``B·H·W`` values per channel);
- tokens: the shipped SmallViT if present (LayerNorm on ``B×N×C`` tokens, ``B·N`` values);
- ``(B, C)``: a small MLP (``Linear → BatchNorm1d → ReLU → Linear → LayerNorm → ReLU → Linear``)
  trained here, seeded (``B`` values per channel).

For every batch size and DMC setting it prints the argmax agreement with the plain model (%) and
the mean absolute logit change relative to the mean absolute logit. Run::

    .venv/bin/python benchmarks/small_estimates.py --images 1024 --fit-images 5000 \
        --batch-sizes 16,64,256 --settings "prior-values:0;default;prior-values:1024"
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import torch_dmc as dmc
from torch_dmc.data.fashion_mnist import load_fashion_mnist


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.BatchNorm1d(256), nn.ReLU(),
                         nn.Linear(256, 128), nn.LayerNorm(128), nn.ReLU(), nn.Linear(128, 10))


def train_mlp(x: torch.Tensor, y: torch.Tensor, epochs: int = 1, seed: int = 0) -> nn.Module:
    model = mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def agreement(model: nn.Module, stats, x: torch.Tensor, batch: int, **options) -> tuple[float, float]:
    """Argmax agreement (%) and relative mean |Δ logit| of DMC vs the plain model on ``x``."""
    same = total = 0
    change = scale = 0.0
    with torch.no_grad():
        plain = torch.cat([model(b) for b in x.split(batch)])
        with dmc.corrected(model, stats, **options) as m:
            fixed = torch.cat([m(b) for b in x.split(batch)])
    same = int((plain.argmax(1) == fixed.argmax(1)).sum())
    total = len(x)
    change = float((plain - fixed).abs().mean())
    scale = float(plain.abs().mean())
    return 100.0 * same / total, change / scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2048, help="clean test images (default 2048)")
    parser.add_argument("--fit-images", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", default="16,32,64,128,256")
    parser.add_argument("--models", default="resnet,vit,mlp",
                        help="which of resnet (spatial sites), vit (tokens), mlp (B×C) to measure")
    parser.add_argument("--settings", default="prior-values:0;default;prior-values:1024",
                        help="';'-separated DMC settings: default (DMC's defaults), prior:N0 (the "
                        "prior estimate), prior-values:V0 (the batch estimate with V0)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_fashion_mnist()
    to_float = lambda a: torch.from_numpy(a).float().div(255).unsqueeze(1)  # noqa: E731
    x_train, y_train = to_float(data.x_train), torch.from_numpy(data.y_train).long()
    x_test = to_float(data.x_test[: args.images])
    fit_x = x_train[: args.fit_images]
    chosen = args.models.split(",")
    models = {}
    if "resnet" in chosen:
        models["spatial (SmallResNet)"] = dmc_models_load("resnet")
    if "vit" in chosen:
        models["tokens (SmallViT)"] = dmc_models_load("vit")
    if "mlp" in chosen:
        t0 = time.perf_counter()
        models["(B,C) (MLP)"] = train_mlp(x_train, y_train)
        print(f"MLP trained in {time.perf_counter() - t0:.0f} s")
    settings = [s.strip() for s in args.settings.split(";")]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print("| sites | setting | " + " | ".join(f"B={b}" for b in sizes) + " |")
    print("|---|---|" + "---:|" * len(sizes))
    for kind, model in models.items():
        stats = dmc.fit(model, fit_x.split(256), levels=1024, progress=False)
        for setting in settings:
            options = parse_setting(setting)
            cells = []
            for b in sizes:
                agree, change = agreement(model, stats, x_test, b, **options)
                cells.append(f"{agree:.1f} % / {change:.3f}")
            print(f"| {kind} | {setting} | " + " | ".join(cells) + " |", flush=True)


def parse_setting(setting: str) -> dict:
    name, _, value = setting.partition(":")
    if name == "default":
        return {}
    if name == "prior":
        return {"estimate": "prior", "prior": float(value)}
    if name == "prior-values":
        return {"prior_values": float(value)}
    raise ValueError(f"unknown setting {setting!r}")


def dmc_models_load(name: str):
    from torch_dmc import models

    if name == "resnet":
        return models.load_default()
    return models.load(name)


if __name__ == "__main__":
    main()
