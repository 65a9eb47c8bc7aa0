"""``dmc``: Distribution Mismatch Correction (the core ``torch_dmc.DMC``) as a method."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ..correct import DMC
from ..options import DMCOptions
from .base import Method, describe_norm_layers, has_batchnorm
from .norm import BatchStatistics, configure_bn


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
            ``sites`` subset, or sites elsewhere in the network); in grid mode such a fully
            corrected site skips the batch statistics altogether (docs/method.md § Grid mode,
            BatchNorm sites).
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
        self._refuse_if_not_applicable(model, {"adapt_bn": adapt_bn})
        unknown = sorted(set(options) - set(DMCOptions.names()))
        if unknown:
            raise ValueError(
                f"method {self.name!r} got unknown option(s) {unknown}; its options are: "
                f"{', '.join(self.valid_options())}"
            )
        dmc_options = DMCOptions(**options)  # validated once, before the model is copied
        super().__init__(model)
        self.model.eval()
        if adapt_bn:
            configure_bn(self.model, BatchStatistics())
        self.corrector = DMC(self.model, stats, dmc_options)
        self._options = {k: _jsonable(v) for k, v in {"adapt_bn": adapt_bn, **dmc_options.as_dict()}.items()}
        self._save_initial_state()

    @classmethod
    def valid_options(cls) -> tuple[str, ...]:
        return ("adapt_bn", *DMCOptions.names())

    @classmethod
    def _not_applicable(cls, model: nn.Module, options: dict[str, Any]) -> str | None:
        """``adapt_bn=True`` configures BatchNorm layers like ``bn``: refused without one."""
        if options.get("adapt_bn") is True and not has_batchnorm(model):
            return (f"adapt_bn=True configures the BatchNorm layers, but it has no BatchNorm layer "
                    f"({describe_norm_layers(model)}); use adapt_bn=False")
        return None

    def reset(self) -> None:
        """Restore the model's initial state and restart the corrector's random sampling."""
        super().reset()
        self.corrector.reset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.corrector(x)


class _FixedEstimate(DMCMethod):
    """``dmc`` with the test-distribution estimate fixed (the ``estimate`` option is not accepted)."""

    estimate = ""

    def __init__(self, model: nn.Module, stats, *, adapt_bn: bool = False, **options: Any) -> None:
        if "estimate" in options:
            raise ValueError(
                f"method {self.name!r} always uses estimate={self.estimate!r}; use method 'dmc' "
                "with estimate=... to choose another"
            )
        super().__init__(model, stats, adapt_bn=adapt_bn, estimate=self.estimate, **options)

    @classmethod
    def valid_options(cls) -> tuple[str, ...]:
        return tuple(o for o in super().valid_options() if o != "estimate")


class DMCPrior(_FixedEstimate):
    """DMC matching a blend of the batch and the reference (``dmc-prior``), for small batches.

    Definition: ``dmc`` with ``estimate="prior"``: every site maps the batch through the test
    quantile function (n·Q_batch + N0·Q_ref)/(n + N0), n the batch size, N0 = ``prior``
    (default 16), onto Q_ref. Options as for ``dmc`` (except ``estimate``).
    """

    name = "dmc-prior"
    estimate = "prior"
    definition = (
        "DMC with the prior estimate: each site's test quantile function is (n·Q_batch + "
        "N0·Q_ref)/(n + N0), n the batch size, N0 = prior (the 1-D Wasserstein barycenter of batch "
        "and reference), and the activations are mapped through it onto Q_ref."
    )


class DMCEMA(_FixedEstimate):
    """DMC matching a running estimate of the test distribution (``dmc-ema``), for streams.

    Definition: ``dmc`` with ``estimate="ema"``: each site keeps Q̂ ← (1 − m)·Q̂ + m·Q_batch
    (starting at Q_ref, m = ``momentum``, default 0.1) across the batches of a stream until
    ``reset()``, and maps each batch through Q̂ onto Q_ref.
    """

    name = "dmc-ema"
    estimate = "ema"
    definition = (
        "DMC with the ema estimate: each site keeps a running test quantile function "
        "Q̂ ← (1 − m)·Q̂ + m·Q_batch, starting at Q_ref, across the stream until reset, and maps "
        "each batch through it onto Q_ref."
    )


class DMCPerSample(_FixedEstimate):
    """DMC on every sample alone (``dmc-per-sample``): independent of batch size and batch mix.

    Definition: ``dmc`` with ``estimate="per-sample"``: each sample's channel is mapped over its
    own spatial positions onto the mean per-sample reference quantile function; sites with fewer
    than ``min_positions`` positions per sample use the ``prior`` estimate. Needs stats fitted with
    ``torch_dmc.fit(..., per_sample=True)`` (``dmc fit --per-sample``; ``dmc bench`` and ``dmc tune``
    do so when a method needs them).
    """

    name = "dmc-per-sample"
    estimate = "per-sample"
    definition = (
        "DMC with the per-sample estimate: each sample's channel is mapped over its own spatial "
        "positions onto the mean per-sample reference quantile function (fitted on source data), "
        "so outputs do not depend on the other samples of the batch; sites with fewer than "
        "min_positions positions per sample use the prior estimate."
    )
