"""Saving and loading models without pickle: ``model.safetensors`` plus ``model.json``.

``model.json`` holds the architecture name and its constructor arguments, the SHA-256 of the weights
file, and optional training metadata; the weights hold tensors only, so loading a model from a
stranger cannot execute code.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from .resnet import SmallResNet
from .vit import SmallViT

__all__ = [
    "save_model",
    "load_model",
    "load_default",
    "load",
    "default_files",
    "sha256_file",
    "DEFAULT_WEIGHTS",
    "SHIPPED",
]

FORMAT = "torch-dmc-model"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.json"
#: The shipped Fashion-MNIST model, inside the package: ``weights/<name>.safetensors`` and ``.json``.
DEFAULT_WEIGHTS = "fmnist_resnet"
#: The shipped Fashion-MNIST models: name for :func:`load` → file stem under ``weights/``.
SHIPPED: dict[str, str] = {
    "resnet": DEFAULT_WEIGHTS,  # SmallResNet, BatchNorm
    "resnet-gn": "fmnist_resnet_gn",  # SmallResNet(norm="group"), GroupNorm
    "vit": "fmnist_vit",  # SmallViT, LayerNorm
}

_ARCHITECTURES: dict[str, type[nn.Module]] = {"SmallResNet": SmallResNet, "SmallViT": SmallViT}


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(model: nn.Module, directory: str | Path, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory`` (created if needed).

    Args:
        model: a :class:`SmallResNet` or :class:`SmallViT` (the architectures this package can
            rebuild).
        directory: the output folder; existing ``model.*`` files are replaced.
        metadata: extra JSON-serialisable information stored under ``"training"`` in
            ``model.json`` (e.g. the training command and the clean test error).

    Returns:
        The folder.

    Raises:
        TypeError: the model is not an architecture this package knows.
    """
    arch = type(model).__name__
    if arch not in _ARCHITECTURES or not hasattr(model, "config"):
        raise TypeError(
            f"save_model stores the architectures {sorted(_ARCHITECTURES)}; found {arch}. Save "
            f"other models with safetensors.torch.save_model(model, path)."
        )
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    weights = directory / WEIGHTS_NAME
    save_file(tensors, str(weights), metadata={"format": FORMAT, "architecture": arch})
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": arch,
        "kwargs": model.config,
        "weights": WEIGHTS_NAME,
        "sha256": sha256_file(weights),
    }
    if metadata:
        config["training"] = metadata
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"model description {path} not found; expected the {CONFIG_NAME} written by "
            f"save_model (or `dmc train --out DIR`) next to the weights."
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-save the model.") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path}: expected format {FORMAT!r}, found {found!r}.")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {config['format_version']} is newer than this torch-dmc "
            f"reads ({FORMAT_VERSION}); upgrade torch-dmc."
        )
    if config.get("architecture") not in _ARCHITECTURES:
        raise ValueError(
            f"{path}: unknown architecture {config.get('architecture')!r}; expected one of "
            f"{sorted(_ARCHITECTURES)}."
        )
    if not isinstance(config.get("kwargs"), dict):
        raise ValueError(f"{path}: missing 'kwargs' (the constructor arguments).")
    return config


def _load(weights: Path, config_path: Path, *, verify: bool = True) -> nn.Module:
    config = _read_config(config_path)
    if not weights.is_file():
        raise FileNotFoundError(
            f"weights file {weights} not found (described by {config_path}); re-save the model."
        )
    if verify and config.get("sha256"):
        digest = sha256_file(weights)
        if digest != config["sha256"]:
            raise ValueError(
                f"{weights} has SHA-256 {digest[:16]}…, but {config_path.name} records "
                f"{config['sha256'][:16]}…: the two files do not belong together (copied from "
                f"different runs, or modified). Re-save the model, or load with verify=False."
            )
    cls = _ARCHITECTURES[config["architecture"]]
    try:
        model = cls(**config["kwargs"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: cannot build {cls.__name__}(**{config['kwargs']}): {err}") from err
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file ({err}).") from err
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"{weights} does not match {cls.__name__}(**{config['kwargs']}): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {bad_shape[:5]}. "
            f"Were the weights saved for another architecture?"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_model(directory: str | Path, *, verify: bool = True) -> nn.Module:
    """Load a model written by :func:`save_model`.

    Args:
        directory: the folder with ``model.safetensors`` and ``model.json``.
        verify: check the weights' SHA-256 against ``model.json``.

    Returns:
        The model, in eval mode, on the CPU.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the files are corrupt, do not belong together, or do not match the
            architecture.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"no model folder at {directory}; expected a folder written by save_model or "
            f"`dmc train --out DIR`."
        )
    return _load(directory / WEIGHTS_NAME, directory / CONFIG_NAME, verify=verify)


def default_files(name: str = "resnet") -> tuple[Path, Path]:
    """Paths of shipped weights, e.g. ``(…/fmnist_resnet.safetensors, …/fmnist_resnet.json)``.

    Args:
        name: a key of :data:`SHIPPED` (``"resnet"``, ``"resnet-gn"``, ``"vit"``).
    """
    if name not in SHIPPED:
        raise ValueError(f"no shipped model {name!r}; expected one of {sorted(SHIPPED)}.")
    base = Path(str(resources.files("torch_dmc.models") / "weights"))
    return base / f"{SHIPPED[name]}.safetensors", base / f"{SHIPPED[name]}.json"


def load_default() -> nn.Module:
    """The shipped Fashion-MNIST :class:`SmallResNet` (see ``weights/fmnist_resnet.json``).

    Same as ``load("resnet")``.

    Returns:
        The model in eval mode; input ``N×1×28×28`` in ``[0, 1]``, output ``N×10`` logits.

    Raises:
        FileNotFoundError: the package was installed without its weights.
    """
    return load("resnet")


def load(name: str = "resnet") -> nn.Module:
    """A shipped Fashion-MNIST model, by name (see ``weights/<file>.json`` for its training record).

    Args:
        name: ``"resnet"`` (:class:`SmallResNet` with BatchNorm, the default model),
            ``"resnet-gn"`` (:class:`SmallResNet` with GroupNorm) or ``"vit"`` (:class:`SmallViT`,
            LayerNorm).

    Returns:
        The model in eval mode, weights checked against their SHA-256; input ``N×1×28×28`` in
        ``[0, 1]``, output ``N×10`` logits.

    Raises:
        ValueError: unknown name.
        FileNotFoundError: the package was installed without these weights.
    """
    weights, config = default_files(name)
    if not weights.is_file() or not config.is_file():
        raise FileNotFoundError(
            f"the shipped weights {weights.name} / {config.name} are missing from {weights.parent}; "
            f"reinstall torch-dmc, or train a model with `dmc train --out DIR` and use "
            f"torch_dmc.models.load_model(DIR)."
        )
    return _load(weights, config)
