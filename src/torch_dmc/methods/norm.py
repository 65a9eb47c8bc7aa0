"""BatchNorm statistics adaptation: ``bn``, ``bn-prior`` and ``bn-ema``.

Every BatchNorm layer (``BatchNorm1d/2d/3d``, and subclasses of ``_BatchNorm``) of the method's copy
normalises with statistics chosen by a small *rule* from the source statistics (the layer's running
buffers) and the statistics of the current test batch:

- :class:`BatchStatistics`: the batch's (``bn``),
- :class:`PriorStatistics`: source and batch mixed with weights N/(N+n) and n/(N+n) (``bn-prior``),
- :class:`EMAStatistics`: running statistics updated with momentum, then used (``bn-ema``).

The batch statistics of a channel are the mean and the *biased* variance (divisor m, as in
BatchNorm's train-mode normalisation) over all m = B·(spatial positions) values of that channel.
A layer whose input has a single value per channel (batch size 1 without spatial axes, e.g. ``N×C``
after global pooling) has no batch variance: there every rule uses the layer's current running
statistics unchanged (the source statistics, except for ``bn-ema`` where they are the running
estimate so far, which is not updated). For spatial BatchNorm at batch size 1 the batch statistics
are the single instance's spatial statistics.

A model with no BatchNorm layer is refused (``ValueError`` naming the norm layers it has): the
methods would silently be ``source`` there. ``tent`` and the ``dmc`` family apply to LayerNorm and
GroupNorm models.

The layers keep their class (``isinstance`` and module names unchanged, so correction sites and
stats keys still match); only the instance's ``forward`` is replaced by :func:`configure_bn`.
All statistics are computed for all channels at once (no loop over channels).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ..correct import AFFINE_FORWARD
from .base import Method, describe_norm_layers, has_batchnorm

Moments = tuple[torch.Tensor, torch.Tensor]


def batch_moments(x: torch.Tensor) -> Moments:
    """Per-channel mean and biased variance of a BatchNorm input.

    Uses PyTorch's fused BatchNorm statistics kernel (one pass, about 3× faster than
    ``torch.var_mean`` on CPU); not differentiable, which none of the rules needs.

    Args:
        x: ``N×C`` or ``N×C×…`` (channel axis 1).

    Returns:
        ``(mean, var)``, each of shape ``C``: over the N·(spatial positions) values of each channel,
        ``var`` with divisor N·(spatial positions).
    """
    with torch.no_grad():
        mean, var = torch.batch_norm_update_stats(x.detach(), None, None, 0.0)
    return mean, var


class BatchStatistics:
    """Rule ``bn``: normalise with the statistics of the current batch (Schneider et al., N=0)."""

    def __call__(self, bn: _BatchNorm, batch: Moments, n: int) -> Moments:
        return batch

    def __repr__(self) -> str:
        return "BatchStatistics()"


class PriorStatistics:
    """Rule ``bn-prior``: mean = (N·μ_s + n·μ_b)/(N+n), var = (N·σ²_s + n·σ²_b)/(N+n).

    Schneider et al. (2020), §3: a plain weighted mix of the source and batch means and of the
    source and batch variances (no between-means term), N the prior strength, n the batch size.
    N = 0 is :class:`BatchStatistics`; N = inf is the source statistics.

    Args:
        prior: N ≥ 0 (``math.inf`` allowed).
    """

    def __init__(self, prior: float) -> None:
        prior = float(prior)
        if not prior >= 0:
            raise ValueError(f"prior is expected to be a number >= 0 (or inf), got {prior}")
        self.prior = prior

    def weight(self, n: int) -> float:
        """Weight of the source statistics, N/(N+n)."""
        if math.isinf(self.prior):
            return 1.0
        return self.prior / (self.prior + n) if self.prior + n > 0 else 0.0

    def __call__(self, bn: _BatchNorm, batch: Moments, n: int) -> Moments:
        w = self.weight(n)
        (mean_b, var_b), mean_s, var_s = batch, bn.running_mean, bn.running_var
        return w * mean_s + (1.0 - w) * mean_b, w * var_s + (1.0 - w) * var_b

    def __repr__(self) -> str:
        return f"PriorStatistics(prior={self.prior})"


class EMAStatistics:
    """Rule ``bn-ema``: s ← (1−m)·s + m·s_batch for mean and (biased) variance, then normalise.

    The running statistics live in the layer's ``running_mean``/``running_var`` buffers (so they
    start from the source statistics and ``reset()`` restores them). The current batch is included
    before it is normalised: update first, then normalise with the updated statistics. Gradients do
    not flow through the statistics.

    Args:
        momentum: m in [0, 1]; 0 keeps the source statistics, 1 is :class:`BatchStatistics`.
    """

    def __init__(self, momentum: float) -> None:
        momentum = float(momentum)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum is expected in [0, 1], got {momentum}")
        self.momentum = momentum

    def __call__(self, bn: _BatchNorm, batch: Moments, n: int) -> Moments:
        mean_b, var_b = batch
        with torch.no_grad():
            bn.running_mean.lerp_(mean_b.detach().to(bn.running_mean.dtype), self.momentum)
            bn.running_var.lerp_(var_b.detach().to(bn.running_var.dtype), self.momentum)
        return bn.running_mean, bn.running_var

    def __repr__(self) -> str:
        return f"EMAStatistics(momentum={self.momentum})"


def _forward_with_rule(rule, bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm forward that normalises with ``rule``'s statistics (replaces ``bn.forward``).

    :class:`BatchStatistics` runs PyTorch's train-mode kernel without running buffers (batch
    statistics, differentiable); the other rules normalise with the eval-mode kernel and their
    statistics (not differentiated).
    """
    bn._check_input_dim(x)
    if x.shape[0] * math.prod(x.shape[2:]) == 1:
        # A single value per channel has no variance: keep the running statistics as they are.
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                "BatchNorm layer sees a single value per channel and has no running statistics "
                "to fall back to (track_running_stats=False): use a batch size > 1"
            )
        mean, var = bn.running_mean, bn.running_var
    elif isinstance(rule, BatchStatistics):
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    else:
        mean, var = rule(bn, batch_moments(x), x.shape[0])
    return F.batch_norm(x, mean.detach(), var.detach(), bn.weight, bn.bias, False, 0.0, bn.eps)


def configure_bn(model: nn.Module, rule) -> list[str]:
    """Make every BatchNorm layer of ``model`` (in place) normalise with ``rule``'s statistics.

    The whole model is put in eval mode; each BatchNorm layer keeps its class, parameters and
    buffers, and only its instance ``forward`` is replaced.

    Args:
        model: the model to configure (a method's private copy, never the caller's).
        rule: :class:`BatchStatistics`, :class:`PriorStatistics` or :class:`EMAStatistics`.

    Returns:
        The names of the configured BatchNorm layers.

    Raises:
        ValueError: ``model`` has no BatchNorm layer, or a rule that needs source statistics meets a
            layer without running statistics.
    """
    if not has_batchnorm(model):
        raise ValueError(
            f"no BatchNorm layer to configure: the model has none ({describe_norm_layers(model)}), "
            "so BatchNorm statistics adaptation (the bn methods, dmc's adapt_bn=True) does not apply"
        )
    model.eval()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm):
            continue
        no_stats = module.running_mean is None or module.running_var is None
        if no_stats and not isinstance(rule, BatchStatistics):
            raise ValueError(
                f"BatchNorm layer {name!r} has no running statistics (track_running_stats=False), "
                f"but {rule!r} needs source statistics: use the 'bn' method for this model"
            )
        module.forward = functools.partial(_forward_with_rule, rule, module)
        if isinstance(rule, BatchStatistics):  # an affine map of the input, no side effect
            setattr(module.forward, AFFINE_FORWARD, True)
        names.append(name)
    return names


class _BNMethod(Method):
    """The BatchNorm statistics methods: refused on a model with no BatchNorm layer."""

    def __init__(self, model: nn.Module, rule) -> None:
        self._refuse_if_not_applicable(model, {})
        super().__init__(model)
        self.rule = rule
        self.bn_layers = configure_bn(self.model, rule)
        self._save_initial_state()

    @classmethod
    def _not_applicable(cls, model: nn.Module, options: dict) -> str | None:
        if has_batchnorm(model):
            return None
        return (
            f"it has no BatchNorm layer ({describe_norm_layers(model)}), so BatchNorm statistics "
            "adaptation does not apply"
        )


class BN(_BNMethod):
    """Test-batch statistics in every BatchNorm layer (``bn``).

    Definition: every BatchNorm1d/2d/3d layer normalises with the mean and biased variance of the
    current test batch (over batch and spatial positions), using and updating no running
    statistics; all other layers are in eval mode (Schneider et al. 2020 with N = 0; "norm" in Wang
    et al. 2021).
    A layer that sees a single value per channel (batch size 1, ``N×C`` input) uses its source
    statistics; spatial layers at batch size 1 use the instance's spatial statistics.

    Args:
        model: the trained classifier (deep-copied once; the caller's object is left as is).

    Raises:
        ValueError: the model has no BatchNorm layer (e.g. a ViT with LayerNorm only): the method
            does not apply (see ``applies_to``); ``tent`` and the ``dmc`` family do.
    """

    name = "bn"
    definition = (
        "Every BatchNorm layer normalises with the mean and biased variance of the current test "
        "batch (over batch and spatial positions) and uses or updates no running statistics; "
        "all other layers are in eval mode (Schneider et al. 2020 with N=0; 'norm' in Wang et al. "
        "2021). "
        "A layer that sees a single value per channel (batch size 1, N×C input) uses its source "
        "statistics instead."
    )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, BatchStatistics())


class BNPrior(_BNMethod):
    """Source and test-batch statistics mixed in every BatchNorm layer (``bn-prior``).

    Definition: every BatchNorm layer normalises with mean (N·μ_source + n·μ_batch)/(N+n) and
    variance (N·σ²_source + n·σ²_batch)/(N+n), a plain weighted mix of the variances as in Schneider
    et al. (2020), with N = ``prior``, n the batch size and σ²_batch the biased batch variance; all
    other layers are in eval mode. A layer that sees a single value per channel uses its source
    statistics. ``prior=0`` is ``bn``; ``prior=inf`` is ``source``.

    Args:
        model: the trained classifier (deep-copied once; the caller's object is left as is).
        prior: N ≥ 0, the number of source samples the source statistics count as (default 16).

    Raises:
        ValueError: the model has no BatchNorm layer (e.g. a ViT with LayerNorm only): the method
            does not apply (see ``applies_to``); ``tent`` and the ``dmc`` family do.
    """

    name = "bn-prior"
    definition = (
        "Every BatchNorm layer normalises with mean (N·μ_source + n·μ_batch)/(N+n) and variance "
        "(N·σ²_source + n·σ²_batch)/(N+n), a plain weighted mix of the variances (Schneider et al. "
        "2020), N = prior, n = batch size, σ²_batch the biased batch variance; all other layers "
        "are in eval mode, and a layer that sees a single value per channel uses the source "
        "statistics."
    )

    def __init__(self, model: nn.Module, prior: float = 16.0) -> None:
        super().__init__(model, PriorStatistics(prior))
        self._options = {"prior": self.rule.prior}


class BNEMA(_BNMethod):
    """Running BatchNorm statistics updated across the test stream (``bn-ema``).

    Definition: every BatchNorm layer keeps running statistics that start at the source statistics;
    for each test batch they are first updated, s ← (1−m)·s + m·s_batch for the mean and the biased
    variance, and then used to normalise that same batch; all other layers are in eval mode. The
    statistics persist across batches until ``reset()``. A layer that sees a single value per
    channel is normalised with its current statistics, which are then not updated.

    Args:
        model: the trained classifier (deep-copied once; the caller's object is left as is).
        momentum: m in [0, 1] (default 0.1). 0 is ``source``; 1 is ``bn``.

    Raises:
        ValueError: the model has no BatchNorm layer (e.g. a ViT with LayerNorm only): the method
            does not apply (see ``applies_to``); ``tent`` and the ``dmc`` family do.
    """

    name = "bn-ema"
    definition = (
        "Every BatchNorm layer keeps running statistics that start at the source statistics and, "
        "for each test batch, are first updated as s ← (1−m)·s + m·s_batch (mean and biased "
        "variance, m = momentum) and then used to normalise that same batch; all other layers are "
        "in eval mode, and the statistics persist across batches until reset."
    )

    def __init__(self, model: nn.Module, momentum: float = 0.1) -> None:
        super().__init__(model, EMAStatistics(momentum))
        self._options = {"momentum": self.rule.momentum}
