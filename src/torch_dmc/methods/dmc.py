"""``dmc``: Distribution Mismatch Correction (the core ``torch_dmc.DMC``) as a method."""

from __future__ import annotations

import inspect
import json
from typing import Any

import torch
from torch import nn

from ..dmc import DMC
from .base import Method
from .norm import BatchStatistics, configure_bn


def _dmc_options() -> tuple[tuple[str, ...], dict[str, Any]]:
    """Keyword options of ``torch_dmc.DMC`` and their defaults, read from its signature."""
    params = list(inspect.signature(DMC.__init__).parameters.values())[1:]  # drop self
    names = tuple(p.name for p in params if p.name not in ("model", "stats"))
    defaults = {p.name: p.default for p in params
                if p.name in names and p.default is not p.empty}
    return names, defaults


def _jsonable(value: Any) -> Any:
    """``value`` if JSON can write it (tuples become lists), else its ``repr``."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return repr(value)


class DMCMethod(Method):
    """Distribution Mismatch Correction of the model's activations (``dmc``).

    Definition: at every correction site the activations of the current batch are mapped, per
    channel, onto the reference quantile function fitted on source data, y = x + λ·(Q_ref(u) − x)
    with u the mid-rank of x in the batch (``torch_dmc.DMC`` with the given options); with
    ``adapt_bn=True`` the BatchNorm layers first normalise with the batch statistics as in ``bn``.
    Stateless across batches: ``reset()`` restores the copy's state and the corrector's random
    sampling.

    Args:
        model: the trained classifier (deep-copied once; the caller's object is left as is).
        stats: the ``torch_dmc.ReferenceStats`` fitted on source data (required).
        adapt_bn: configure the copy's BatchNorm layers like ``bn`` before the correction. The
            transport is invariant to increasing affine maps, so this changes the output only where
            a BatchNorm output is not itself corrected at full strength (``strength`` < 1, a
            ``sites`` subset, or sites elsewhere in the network).
        **options: passed to ``torch_dmc.DMC`` (``mode``, ``strength``, ``sites``, ...); names that
            ``DMC`` does not accept raise ``ValueError``.

    Example:
        >>> stats = torch_dmc.fit(model, train_loader)      # doctest: +SKIP
        >>> method = DMCMethod(model, stats, mode="exact")  # doctest: +SKIP
        >>> logits = method(x)                              # doctest: +SKIP
    """

    name = "dmc"
    definition = (
        "Distribution Mismatch Correction: at every correction site the current batch's "
        "activations are mapped per channel onto the source reference quantile function, "
        "y = x + λ·(Q_ref(u) − x) with u the mid-rank of x in the batch (torch_dmc.DMC); with "
        "adapt_bn, BatchNorm layers first use the batch statistics as in 'bn'."
    )
    needs_stats = True

    def __init__(self, model: nn.Module, stats, *, adapt_bn: bool = False, **options: Any) -> None:
        if stats is None:
            raise ValueError(
                "method 'dmc' needs reference statistics: pass stats=torch_dmc.fit(model, "
                "source_loader) (or statistics loaded from a saved file)"
            )
        if not isinstance(adapt_bn, bool):
            raise ValueError(f"adapt_bn is expected to be True or False, got {adapt_bn!r}")
        names, defaults = _dmc_options()
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(
                f"method 'dmc' got unknown option(s) {unknown}; its options are: "
                f"{', '.join(('adapt_bn', *names))}"
            )
        super().__init__(model)
        self.model.eval()
        if adapt_bn:
            configure_bn(self.model, BatchStatistics())
        self.corrector = DMC(self.model, stats, **options)
        resolved = {"adapt_bn": adapt_bn, **defaults, **options}
        self._options = {k: _jsonable(v) for k, v in resolved.items()}
        self._save_initial_state()

    @classmethod
    def valid_options(cls) -> tuple[str, ...]:
        return ("adapt_bn", *_dmc_options()[0])

    def reset(self) -> None:
        """Restore the model's initial state and restart the corrector's random sampling."""
        super().reset()
        self.corrector.reset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.corrector(x)
