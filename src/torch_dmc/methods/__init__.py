"""Test-time methods under one interface: source, bn, bn-prior, bn-ema, tent, and dmc with its
estimates (dmc-prior, dmc-ema, dmc-per-sample).

Every method is an ``nn.Module`` built around a private deep copy of the caller's model (made once;
the caller's model is never modified). ``forward(x)`` adapts (if the method adapts) and returns the
logits for ``x``; ``reset()`` restores the initial state; ``name``, ``definition`` and ``options()``
describe the method exactly.

Not every method applies to every model: ``bn``, ``bn-prior`` and ``bn-ema`` need a BatchNorm layer,
``tent`` a BatchNorm/GroupNorm/LayerNorm layer with affine parameters, and ``dmc`` with
``adapt_bn=True`` a BatchNorm layer. ``Method.applies_to(model, options)`` says why not (or
``None``), :func:`applicable` lists the methods that do, and building one that does not raises
``ValueError`` with that reason.

Example:
    >>> from torch_dmc import methods                       # doctest: +SKIP
    >>> method = methods.build("bn-prior", model, prior=16)  # doctest: +SKIP
    >>> logits = method(x)                                  # doctest: +SKIP
    >>> method.reset()                                      # doctest: +SKIP
"""

from __future__ import annotations

from torch import nn

from .base import Method, describe_norm_layers, has_batchnorm
from .dmc import DMCEMA, DMCMethod, DMCPerSample, DMCPrior
from .norm import (
    BN,
    BNEMA,
    BatchStatistics,
    BNPrior,
    EMAStatistics,
    PriorStatistics,
    batch_moments,
    configure_bn,
)
from .source import Source
from .tent import Tent

#: Method name → class.
METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Source, BN, BNPrior, BNEMA, Tent, DMCMethod, DMCPrior, DMCEMA, DMCPerSample)
}


def available() -> list[str]:
    """The names ``build()`` accepts."""
    return list(METHODS)


def applicable(model: nn.Module) -> list[str]:
    """The names of the methods that apply to ``model`` with their default options, in order.

    A method applies unless its class's ``applies_to(model)`` gives a reason (``bn`` on a model with
    no BatchNorm layer, ...).
    """
    return [name for name, cls in METHODS.items() if cls._not_applicable(model, {}) is None]


def build(name: str, model: nn.Module, stats=None, **options) -> Method:
    """Build the method ``name`` around a private copy of ``model``.

    Args:
        name: one of :func:`available`.
        model: the trained classifier; it is deep-copied once and never modified.
        stats: reference statistics (``torch_dmc.ReferenceStats``), required by methods with
            ``needs_stats`` (``dmc``) and ignored by the others.
        **options: the method's options (see each class); unknown names raise ``ValueError``.

    Returns:
        The method, ready to call on test batches.

    Raises:
        ValueError: unknown method name, unknown option, invalid option value, missing stats, or
            a method that does not apply to ``model`` (the message of ``Method.applies_to``, e.g.
            ``bn`` on a model with no BatchNorm layer).
    """
    cls = METHODS.get(name)
    if cls is None:
        raise ValueError(f"unknown method {name!r}; expected one of: {', '.join(METHODS)}")
    cls.check_options(options)
    reason = cls.applies_to(model, options) if isinstance(model, nn.Module) else None
    if reason is not None:
        raise ValueError(reason)
    if cls.needs_stats:
        return cls(model, stats, **options)
    return cls(model, **options)


def needs_per_sample(name: str, options: dict | None = None) -> bool:
    """Whether method ``name`` with ``options`` reads the per-sample reference statistics.

    True for ``dmc-per-sample`` and for ``dmc`` whose ``estimate`` option (one estimate, or a dict of
    site pattern → estimate) names ``per-sample``: their stats must be fitted with
    ``torch_dmc.fit(..., per_sample=True)``.
    """
    if name == DMCPerSample.name:
        return True
    if name != DMCMethod.name:
        return False
    estimate = (options or {}).get("estimate", "batch")
    chosen = estimate.values() if isinstance(estimate, dict) else [estimate]
    return DMCPerSample.estimate in chosen


__all__ = [
    "BN",
    "BNEMA",
    "METHODS",
    "BNPrior",
    "BatchStatistics",
    "DMCEMA",
    "DMCMethod",
    "DMCPerSample",
    "DMCPrior",
    "EMAStatistics",
    "Method",
    "PriorStatistics",
    "Source",
    "Tent",
    "applicable",
    "available",
    "batch_moments",
    "build",
    "configure_bn",
    "describe_norm_layers",
    "has_batchnorm",
    "needs_per_sample",
]
