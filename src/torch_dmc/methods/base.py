"""The interface every test-time method implements.

A method owns a private deep copy of the caller's model, made once when the method is built: the
caller's model is never modified (parameters, buffers, train/eval modes, ``requires_grad``), and
nothing is copied on the hot path. ``forward`` adapts (if the method adapts) and predicts;
``reset()`` restores the state the method started from.
"""

from __future__ import annotations

import copy
import inspect
from collections import Counter
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..sites import NORM_TYPES as _SITE_NORM_TYPES


def describe_norm_layers(model: nn.Module) -> str:
    """The normalization layers of ``model``, counted by class, for error messages.

    Counts the modules of the correction-site norm types (``torch_dmc.sites.NORM_TYPES``: BatchNorm,
    GroupNorm, LayerNorm, InstanceNorm, RMSNorm, and their subclasses, each under its own class
    name).

    Returns:
        E.g. ``"it has 13 LayerNorm"``, ``"it has 2 GroupNorm and 1 LayerNorm"``, or ``"it has no
        normalization layer"``.
    """
    counts = Counter(type(m).__name__ for m in model.modules() if isinstance(m, _SITE_NORM_TYPES))
    if not counts:
        return "it has no normalization layer"
    parts = [f"{n} {cls}" for cls, n in counts.items()]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"it has {listed}"


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, subclasses)."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())


class Method(nn.Module):
    """Base class of the test-time methods.

    Subclasses configure ``self.model`` (the private copy) in their ``__init__`` and then call
    ``self._save_initial_state()``; ``reset()`` restores exactly that state (model parameters and
    buffers, and the optimizer state for methods that have an optimizer).

    The train/eval modes of the wrapped model are part of a method's definition: ``train()`` and
    ``eval()`` on the method only set its own ``training`` flag and never reconfigure the model.

    Whether a method applies to a model is a property of its class, :meth:`applies_to` (``bn`` needs
    a BatchNorm layer, ``tent`` a norm layer with affine parameters, ...): ``build()`` and the
    constructors that have such a rule refuse a model it does not apply to, with that message.

    Args:
        model: the trained classifier. It is deep-copied once; the caller's object is left as is.

    Attributes:
        name: the name ``build()`` knows the method by.
        definition: the exact definition in one or two sentences (written into benchmark results).
        needs_stats: whether the method requires reference statistics (``stats``).
        model: the method's private copy of the model.
        optimizer: the optimizer of an adapting method, else ``None``.
    """

    name: ClassVar[str] = ""
    definition: ClassVar[str] = ""
    needs_stats: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self.model = copy.deepcopy(model)
        self.optimizer: torch.optim.Optimizer | None = None
        self._options: dict[str, Any] = {}
        self._initial_model_state: dict[str, torch.Tensor] | None = None
        self._initial_optimizer_state: dict[str, Any] | None = None

    # -- applicability ----------------------------------------------------------------------------
    @classmethod
    def applies_to(cls, model: nn.Module, options: Mapping[str, Any] | None = None) -> str | None:
        """Why the method with ``options`` does not apply to ``model``, or ``None`` if it does.

        Constructing a method that does not apply raises ``ValueError`` with this message; callers
        (``dmc bench``) ask before any work. Only the model's structure is looked at, never its
        outputs.

        Args:
            model: the classifier.
            options: the options the method would be built with (default: its defaults).

        Returns:
            ``None``, or one line: ``method 'bn' does not apply to this model: <reason>; methods
            that apply to it: ...``, or, where only the options are refused (``dmc`` with
            ``adapt_bn=True`` on a model with no BatchNorm layer), ``method 'dmc' with these
            options does not apply to this model: <reason>.``
        """
        reason = cls._not_applicable(model, dict(options or {}))
        if reason is None:
            return None
        if options and cls._not_applicable(model, {}) is None:  # only these options are refused
            return f"method {cls.name!r} with these options does not apply to this model: {reason}."
        from . import applicable  # the registry (imports this module)

        return (
            f"method {cls.name!r} does not apply to this model: {reason}; methods that apply to "
            f"it: {', '.join(applicable(model))}."
        )

    @classmethod
    def _not_applicable(cls, model: nn.Module, options: dict[str, Any]) -> str | None:
        """The bare reason behind :meth:`applies_to` (no method name, no suggestions).

        Subclasses that do not apply to every model override it (``bn``: no BatchNorm layer;
        ``tent``: no affine norm layer; ``dmc``: ``adapt_bn=True`` without BatchNorm).
        """
        return None

    def _refuse_if_not_applicable(self, model: nn.Module, options: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` with :meth:`applies_to`'s message (call before copying the model)."""
        if not isinstance(model, nn.Module):
            return  # Method.__init__ raises the TypeError
        message = self.applies_to(model, options)
        if message is not None:
            raise ValueError(message)

    # -- subclasses -------------------------------------------------------------------------------
    def _save_initial_state(self) -> None:
        """Snapshot the configured copy (and optimizer) that ``reset()`` returns to."""
        self._initial_model_state = {
            k: v.detach().clone() for k, v in self.model.state_dict().items()
        }
        if self.optimizer is not None:
            self._initial_optimizer_state = copy.deepcopy(self.optimizer.state_dict())

    @classmethod
    def valid_options(cls) -> tuple[str, ...]:
        """Names of the options the method accepts (the keyword arguments of ``__init__``)."""
        params = inspect.signature(cls.__init__).parameters.values()
        return tuple(
            p.name
            for p in params
            if p.name not in ("self", "model", "stats")
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``options`` holds a name the method does not accept."""
        valid = cls.valid_options()
        unknown = sorted(set(options) - set(valid))
        if unknown:
            accepted = ", ".join(valid) if valid else "none"
            raise ValueError(
                f"method {cls.name!r} got unknown option(s) {unknown}; its options are: {accepted}"
            )

    # -- public -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Adapt on ``x`` (if the method adapts) and return the logits for ``x``."""
        return self.model(x)

    def reset(self) -> None:
        """Restore the initial state: model parameters and buffers, and the optimizer state."""
        if self._initial_model_state is None:
            raise RuntimeError(
                f"{type(self).__name__} did not save its initial state: a subclass of Method must "
                "call self._save_initial_state() at the end of __init__"
            )
        self.model.load_state_dict(self._initial_model_state, strict=True)
        for p in self.model.parameters():
            p.grad = None
        if self.optimizer is not None and self._initial_optimizer_state is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._initial_optimizer_state))

    def options(self) -> dict[str, Any]:
        """The resolved options (defaults filled in), JSON-serialisable."""
        return copy.deepcopy(self._options)

    def train(self, mode: bool = True) -> Method:
        """Set this wrapper's ``training`` flag only; the model's modes stay as configured."""
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be boolean, got {mode!r}")
        self.training = mode
        return self

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"name={self.name!r}" + (f", {opts}" if opts else "")
