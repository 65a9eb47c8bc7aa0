"""``tent``: test-time entropy minimisation (Wang et al., "Tent: Fully Test-Time Adaptation by
Entropy Minimization", ICLR 2021).

Mirrors the reference implementation (DequanWang/tent, ``tent.py``): small pure functions
(:func:`configure_model`, :func:`collect_params`, :func:`check_model`, :func:`softmax_entropy`,
:func:`forward_and_adapt`) and a thin wrapper, :class:`Tent`. One deliberate difference from
``tent.configure_model``: only the normalization layers are put in train mode; all other layers
(dropout, ...) stay in eval mode.

The adapted parameters are the affine ``weight`` and ``bias`` of every BatchNorm, GroupNorm and
LayerNorm layer (:data:`NORM_TYPES`, subclasses included): the reference implementation's BatchNorm
case, and the LayerNorm (ViT) and GroupNorm (ResNet-GN) variants of Tent used as baselines by Niu et
al., "Towards Stable Test-Time Adaptation in Dynamic Wild World" (SAR, ICLR 2023). BatchNorm layers
normalise with the current batch's statistics; GroupNorm and LayerNorm normalise every sample with
its own statistics in train and eval mode alike, so for them only the affine parameters change.
InstanceNorm, RMSNorm and every other layer are frozen. A model with no such layer with affine
parameters is refused (:meth:`Tent.applies_to`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .base import Method, describe_norm_layers

#: Layers whose affine parameters tent adapts (BatchNorm1d/2d/3d and SyncBatchNorm, GroupNorm,
#: LayerNorm, and their subclasses).
NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


def has_affine_norm(model: nn.Module) -> bool:
    """Whether ``model`` has a :data:`NORM_TYPES` layer with an affine ``weight`` or ``bias``."""
    return any(
        isinstance(getattr(m, pname, None), nn.Parameter)
        for m in model.modules()
        if isinstance(m, NORM_TYPES)
        for pname in ("weight", "bias")
    )


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of ``logits`` (``N×K``), per sample: -(softmax·log_softmax).sum(1)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def configure_model(model: nn.Module) -> nn.Module:
    """Configure ``model`` in place for tent and return it.

    All layers in eval mode except the normalization layers (:data:`NORM_TYPES`), which are in train
    mode; BatchNorm layers normalise with batch statistics and keep none (``track_running_stats =
    False``, ``running_mean = running_var = None``); only the affine ``weight``/``bias`` of the
    normalization layers require grad.
    """
    model.eval()
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            module.train()
            for pname in ("weight", "bias"):
                p = getattr(module, pname, None)
                if isinstance(p, nn.Parameter):
                    p.requires_grad_(True)
            if isinstance(module, _BatchNorm):
                module.track_running_stats = False
                module.running_mean = None
                module.running_var = None
    return model


def collect_params(model: nn.Module) -> tuple[list[nn.Parameter], list[str]]:
    """The affine parameters of the normalization layers, and their names, in module order."""
    params, names = [], []
    for mname, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            for pname, p in module.named_parameters(recurse=False):
                if pname in ("weight", "bias"):
                    params.append(p)
                    names.append(f"{mname}.{pname}" if mname else pname)
    return params, names


def check_model(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` is configured as :func:`configure_model` leaves it."""
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]
    if not norms:
        raise ValueError(
            "tent needs normalization layers (BatchNorm/GroupNorm/LayerNorm); the model has none"
        )
    not_train = [n for n, m in norms if not m.training]
    if not_train:
        raise ValueError(f"tent needs its normalization layers in train mode; in eval: {not_train}")
    with_stats = [n for n, m in norms if isinstance(m, _BatchNorm) and m.running_mean is not None]
    if with_stats:
        raise ValueError(f"tent's BatchNorm layers must keep no running statistics: {with_stats}")
    _, allowed = collect_params(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            "tent found no affine parameters to adapt: its normalization layers have "
            "affine=False / elementwise_affine=False"
        )
    extra = sorted(set(trainable) - set(allowed))
    if extra:
        raise ValueError(
            f"tent adapts only normalization affine parameters; also trainable: {extra}"
        )


def forward_and_adapt(
    x: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer
) -> torch.Tensor:
    """One tent step: forward, batch-mean entropy loss, backward, optimizer step.

    Returns:
        The (detached) logits of this forward, i.e. computed before the update.
    """
    outputs = model(x)
    loss = softmax_entropy(outputs).mean(0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return outputs.detach()


class Tent(Method):
    """Tent: entropy minimisation over the normalization layers' affine parameters.

    Definition (Wang et al., ICLR 2021; its LayerNorm/GroupNorm variant as in Niu et al., ICLR
    2023): the trained parameters are exactly the affine weight and bias of every BatchNorm
    (1d/2d/3d, SyncBatchNorm), GroupNorm and LayerNorm layer, subclasses included; every other
    parameter (convolutions, linear and attention layers, embeddings, InstanceNorm, RMSNorm, ...)
    is frozen. These normalization layers are in train mode, all other layers in eval mode:
    BatchNorm normalises with the current batch's statistics and keeps no running statistics;
    GroupNorm and LayerNorm normalise each sample with its own statistics as always. Training is
    by Adam (``lr``, ``betas``, weight decay 0) on the batch mean of the softmax entropy, ``steps``
    steps per batch; the prediction returned is the output of the forward that produced the (last)
    loss, i.e. before that step's update. Parameters and optimizer state persist across batches
    until ``reset()``.

    ``forward`` enables gradients itself, so it also works inside ``torch.no_grad()`` and
    ``torch.inference_mode()`` (an inference-mode input is cloned to a normal tensor).

    Args:
        model: the trained classifier (deep-copied once; the caller's object is left as is).
        lr: Adam learning rate (default 1e-3).
        betas: Adam betas (default (0.9, 0.999)).
        steps: optimisation steps per batch (default 1).

    Raises:
        ValueError: an invalid option, or a model with no BatchNorm/GroupNorm/LayerNorm layer
            with affine parameters (nothing to adapt; see ``applies_to``).

    Example:
        >>> method = Tent(model)                            # doctest: +SKIP
        >>> logits = method(x)  # adapts on x, predicts x   # doctest: +SKIP
        >>> method.reset()                                  # doctest: +SKIP
    """

    name = "tent"
    definition = (
        "Entropy minimisation (Wang et al., ICLR 2021; LayerNorm/GroupNorm variant as in Niu et "
        "al., ICLR 2023): only the affine weight and bias of every BatchNorm, GroupNorm and "
        "LayerNorm layer are trained, all other parameters frozen; these layers are in train mode "
        "(BatchNorm uses batch statistics and keeps none; GroupNorm/LayerNorm use each sample's "
        "own statistics as always), other layers in eval mode; Adam (lr, betas, weight decay 0) "
        "on the batch-mean softmax entropy, `steps` steps per batch, and the prediction is the "
        "output of the forward that produced the (last) loss."
    )

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        steps: int = 1,
    ) -> None:
        lr = float(lr)
        betas = tuple(float(b) for b in betas)
        if not lr > 0:
            raise ValueError(f"lr is expected to be > 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas is expected to be two numbers in [0, 1), got {betas}")
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps is expected to be an integer >= 1, got {steps!r}")
        self._refuse_if_not_applicable(model, {})
        super().__init__(model)
        # torch 2.13's CPU GroupNorm backward crashes (segfault) on channels-last activations:
        # a GroupNorm model is kept in the contiguous layout (same values up to rounding)
        self._groupnorm = any(isinstance(m, nn.GroupNorm) for m in self.model.modules())
        if self._groupnorm:
            self.model.to(memory_format=torch.contiguous_format)
        configure_model(self.model)
        check_model(self.model)
        params, self.param_names = collect_params(self.model)
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=0.0)
        self.steps = int(steps)
        self._options = {"lr": lr, "betas": list(betas), "steps": self.steps}
        self._save_initial_state()

    @classmethod
    def _not_applicable(cls, model: nn.Module, options: dict) -> str | None:
        if has_affine_norm(model):
            return None
        return (
            "tent adapts the affine weight and bias of normalization layers (BatchNorm, GroupNorm, "
            f"LayerNorm) and the model has none with affine parameters ({describe_norm_layers(model)})"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._groupnorm and x.dim() == 4:
            # torch 2.13's CPU GroupNorm backward crashes (segfault) on channels-last inputs; a
            # clone also resets the strides of a 1-channel image that only looks contiguous
            x = x.clone(memory_format=torch.contiguous_format)
        with torch.inference_mode(False), torch.enable_grad():
            if x.is_inference():
                x = x.clone()
            for _ in range(self.steps):
                outputs = forward_and_adapt(x, self.model, self.optimizer)
        return outputs
