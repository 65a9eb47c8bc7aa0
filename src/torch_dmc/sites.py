"""Correction sites: which modules' outputs are corrected, on which channel axis, and the hooks.

A *site* is a submodule whose output carries a channel axis. By default (``"norm"``) every
normalization layer's output, i.e. the pre-activation. Sites can also be chosen by module type or by
`fnmatch` patterns over ``model.named_modules()`` names (``"layer*.bn2"``), like timm's
``ActivationStatsHook``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "NORM_TYPES",
    "SiteSpec",
    "select_sites",
    "channel_axis_for",
    "resolve_channel_axes",
    "check_channel_axis",
    "model_device",
    "site_fingerprint",
    "register_output_hooks",
]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.GroupNorm, nn.LayerNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
"""Module types whose outputs are the default correction sites (``sites="norm"``)."""

SiteSpec = str | type | Sequence[str | type]
"""``"norm"``, a module type, an fnmatch pattern, or a list mixing types and patterns."""


def select_sites(model: nn.Module, sites: SiteSpec = "norm") -> list[str]:
    """Names of the modules of ``model`` chosen by ``sites``, in ``named_modules()`` order.

    Args:
        model: the network.
        sites: ``"norm"`` (every module in `NORM_TYPES`), a module type, an fnmatch pattern over
            module names, or a list mixing types and patterns (a module is chosen if any matches).

    Returns:
        Module names (never the root module ``""``).

    Raises:
        ValueError: if nothing matches, with the model's module names to choose from.
    """
    if isinstance(sites, (str, type)):
        sites = [sites]
    types = tuple(s for s in sites if isinstance(s, type))
    patterns = [s for s in sites if isinstance(s, str)]
    if "norm" in patterns:
        patterns.remove("norm")
        types = types + NORM_TYPES
    bad = [s for s in sites if not isinstance(s, (str, type))]
    if bad:
        raise TypeError(f"sites must be 'norm', module types or name patterns, found {bad!r}")
    named = [(name, module) for name, module in model.named_modules() if name]
    names = [n for n, _ in named]
    shown = ", ".join(names[:20]) + (" …" if len(names) > 20 else "")
    chosen = [
        name for name, module in named
        if isinstance(module, types) or any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]
    if not chosen:
        raise ValueError(f"no module of the model matches sites={sites!r}; its modules are: {shown}")
    unmatched = [repr(p) for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    unmatched += [t.__name__ for t in types if t not in NORM_TYPES
                  and not any(isinstance(m, t) for _, m in named)]
    if unmatched:
        raise ValueError(f"sites entry {', '.join(unmatched)} names no module of the model; its "
                         f"modules are: {shown}")
    return chosen


def channel_axis_for(module: nn.Module, override: int | None = None) -> int:
    """The channel axis of a module's output: ``override`` if given, -1 for LayerNorm, else 1.

    LayerNorm in transformers normalises ``N×T×C`` tokens over the last axis; every other layer
    here produces ``N×C×…``.
    """
    if override is not None:
        return override
    return -1 if isinstance(module, nn.LayerNorm) else 1


def resolve_channel_axes(model: nn.Module, names: Iterable[str],
                         channel_axes: int | Mapping[str, int] | None = None) -> dict[str, int]:
    """Channel axis of every site: one override for all (int), per-pattern overrides, or defaults."""
    modules = dict(model.named_modules())
    names = list(names)
    if channel_axes is not None and not isinstance(channel_axes, (int, Mapping)) or isinstance(
            channel_axes, bool):
        raise TypeError(f"channel_axes must be an int, a dict of site pattern → int, or None; found "
                        f"{channel_axes!r}")
    axes = {}
    for name in names:
        override = None
        if isinstance(channel_axes, int):
            override = channel_axes
        elif channel_axes is not None:
            _check_axis_patterns(channel_axes, names)
            hits = [a for p, a in channel_axes.items() if fnmatch.fnmatchcase(name, p)]
            override = hits[-1] if hits else None
        axes[name] = channel_axis_for(modules[name], override)
    return axes


def _check_axis_patterns(channel_axes: Mapping[str, int], names: list[str]) -> None:
    bad = {p: a for p, a in channel_axes.items() if not isinstance(a, int) or isinstance(a, bool)}
    if bad:
        raise TypeError(f"channel_axes values must be ints, found {bad}")
    unmatched = [p for p in channel_axes if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"channel_axes pattern(s) {unmatched} match no site; the sites are: "
                         f"{', '.join(names[:20])}")


def check_channel_axis(name: str, output: Tensor, axis: int) -> int:
    """``axis`` made non-negative for ``output``; `ValueError` naming the site if out of range."""
    if not -output.dim() <= axis < output.dim():
        raise ValueError(f"site {name!r}: channel axis {axis} is out of range for its output of "
                         f"shape {tuple(output.shape)} ({output.dim()}-D); set channel_axes for it "
                         f"to an axis in [-{output.dim()}, {output.dim() - 1}]")
    return axis % output.dim()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without either."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def site_fingerprint(model: nn.Module, channels: Mapping[str, int]) -> str:
    """SHA-256 over the sites' names, module types and channel counts (not over weights).

    Two models with the same architecture share it; stats fitted on another architecture do not.
    """
    modules = dict(model.named_modules())
    desc = [[name, type(modules[name]).__name__, int(c)] for name, c in channels.items()]
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()


def register_output_hooks(model: nn.Module, names: Iterable[str],
                          fn: Callable[[str, Tensor], Tensor | None]) -> list:
    """Register a forward hook on each named module calling ``fn(name, output)``.

    If ``fn`` returns a tensor it replaces the module's output. Returns the hook handles; call
    ``handle.remove()`` on each to undo.
    """
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        if name not in modules:
            raise KeyError(f"the model has no module named {name!r}")

        def hook(_module, _inputs, output, _name=name):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"site {_name!r} returned {type(output).__name__}, expected a tensor")
            return fn(_name, output)

        handles.append(modules[name].register_forward_hook(hook))
    return handles
