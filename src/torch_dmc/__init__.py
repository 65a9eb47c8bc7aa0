"""torch-dmc: Distribution Mismatch Correction for trained PyTorch classifiers.

Every chosen layer's activations are mapped, channel by channel, onto the distribution that layer had
on training data, by the monotone map that minimises the 1-D Wasserstein distance (quantile
matching). No retraining, no labels.

    >>> import torch_dmc as dmc
    >>> stats = dmc.fit(model, train_loader)                          # doctest: +SKIP
    >>> corrected = dmc.DMC(model, stats)                             # doctest: +SKIP
    >>> model = corrected.remove()                                    # doctest: +SKIP
"""

from ._version import __version__
from .dmc import DMC, ESTIMATES, MODES, corrected, fit, format_shift_report, shift_report  # noqa: E402
from .stats_io import ReferenceStats, StatsMismatchError  # noqa: E402

__all__ = [
    "DMC",
    "ESTIMATES",
    "MODES",
    "ReferenceStats",
    "StatsMismatchError",
    "corrected",
    "fit",
    "format_shift_report",
    "shift_report",
    "__version__",
]
