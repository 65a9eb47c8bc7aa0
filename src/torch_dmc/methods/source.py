"""``source``: the trained model, unchanged."""

from __future__ import annotations

from torch import nn

from .base import Method


class Source(Method):
    """The trained model unchanged, in eval mode.

    Definition: every layer uses its trained parameters, and every BatchNorm layer its source
    running statistics; nothing is adapted.

    Args:
        model: the trained classifier (deep-copied once; the caller's object is left as is).

    Example:
        >>> method = Source(model)                          # doctest: +SKIP
        >>> logits = method(x)                              # doctest: +SKIP
    """

    name = "source"
    definition = (
        "The trained model unchanged, in eval mode: every layer uses its trained parameters and "
        "every BatchNorm layer its source running statistics; nothing is adapted."
    )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.model.eval()
        self._save_initial_state()
