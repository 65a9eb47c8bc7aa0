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
    "declared_channels",
    "channel_axis_for",
    "check_declared_channels",
    "channel_axis_overrides",
    "check_channel_axis",
    "model_device",
    "site_fingerprint",
    "register_output_hooks",
]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.GroupNorm, nn.LayerNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
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


_LAST_AXIS_TYPES = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def declared_channels(module: nn.Module) -> int | None:
    """The channel count a site module declares, or ``None`` when it declares none.

    ``num_channels`` (GroupNorm), ``num_features`` (BatchNorm, InstanceNorm and their subclasses),
    or the single entry of a one-axis ``normalized_shape`` (LayerNorm, RMSNorm, LayerNorm2d-style
    modules, also plain modules with that attribute). A LayerNorm over several axes declares none.
    """
    if isinstance(module, nn.GroupNorm):
        return int(module.num_channels)
    if isinstance(getattr(module, "num_features", None), int):
        return int(module.num_features)
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, int):
        return shape
    if isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 1:
        return int(shape[0])
    return None


def channel_axis_for(module: nn.Module, output_shape: Sequence[int] | None = None,
                     override: int | None = None, name: str = "") -> int:
    """The channel axis of a module's output (docs/method.md § Correction sites).

    - ``override`` if given;
    - ``-1`` for exactly ``nn.LayerNorm``/``nn.RMSNorm``: they normalise the last axis, so it holds
      the channels (``N×C``, ``N×T×C`` tokens, ``N×H×W×C`` channels-last);
    - for other modules with a one-axis ``normalized_shape`` (``C``), e.g. timm's ``LayerNorm2d``,
      an ``nn.LayerNorm`` subclass that normalises the channels of an ``N×C×H×W`` tensor: the one
      of axes 1 and -1 whose size is ``C`` (as 1 or -1), found from ``output_shape``;
    - ``1`` otherwise (``N×C×…``: BatchNorm, GroupNorm, InstanceNorm and the rest).

    Raises:
        ValueError: both axes 1 and -1 (or neither) have size ``C``: the axis cannot be told from
            the shape; the message says how to set ``channel_axes``.
    """
    if override is not None:
        return override
    if type(module) in _LAST_AXIS_TYPES:
        return -1
    declared = declared_channels(module)
    if getattr(module, "normalized_shape", None) is None or declared is None:
        return 1
    if output_shape is None:
        return -1
    dims = len(output_shape)
    hits = sorted({a % dims for a in (1, -1) if dims > 1 and output_shape[a] == declared})
    if len(hits) == 1:
        return -1 if hits[0] == dims - 1 else 1
    what = (f"site {name!r} ({type(module).__name__}, normalized_shape {tuple(module.normalized_shape)})"
            f" has output shape {tuple(output_shape)}")
    if not hits:
        raise ValueError(f"{what}: neither axis 1 nor the last axis has its {declared} channels; set "
                         f"channel_axes={{{name!r}: axis}} to the axis that holds them")
    raise ValueError(f"{what}: both axis 1 and the last axis have size {declared}, so the channel "
                     f"axis is ambiguous; set channel_axes={{{name!r}: 1}} for channels-first "
                     f"(N×C×H×W, e.g. LayerNorm2d) or {{{name!r}: -1}} for channels-last or tokens")


def check_declared_channels(name: str, module: nn.Module, output: Tensor, axis: int) -> None:
    """`ValueError` naming the site if the output's channel axis is not the module's channel count."""
    declared = declared_channels(module)
    if declared is not None and output.shape[axis] != declared:
        raise ValueError(
            f"site {name!r} ({type(module).__name__}) declares {declared} channels, but its output "
            f"of shape {tuple(output.shape)} has {output.shape[axis]} on channel axis {axis}; set "
            f"channel_axes={{{name!r}: axis}} to the axis that holds its {declared} channels")


def channel_axis_overrides(names: Iterable[str],
                           channel_axes: int | Mapping[str, int] | None = None) -> dict[str, int | None]:
    """The channel axis each site is given: one for all (int), the last matching pattern (dict), or
    ``None`` (decided by `channel_axis_for` from the module and its first output).

    Raises:
        TypeError: ``channel_axes`` or a value of it is not an int.
        ValueError: a pattern matches no site.
    """
    names = list(names)
    if isinstance(channel_axes, bool) or (channel_axes is not None
                                          and not isinstance(channel_axes, (int, Mapping))):
        raise TypeError(f"channel_axes must be an int, a dict of site pattern → int, or None; found "
                        f"{channel_axes!r}")
    if channel_axes is None or isinstance(channel_axes, int):
        return dict.fromkeys(names, channel_axes)
    _check_axis_patterns(channel_axes, names)
    out = {}
    for name in names:
        hits = [a for p, a in channel_axes.items() if fnmatch.fnmatchcase(name, p)]
        out[name] = hits[-1] if hits else None
    return out


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
