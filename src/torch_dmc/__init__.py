"""torch-dmc: Distribution Mismatch Correction for trained PyTorch classifiers.

Every chosen layer's activations are mapped, channel by channel, onto the distribution that layer had
on training data, by the monotone map that minimises the 1-D Wasserstein distance (quantile
matching). No retraining, no labels. The method as implemented: docs/method.md.

    >>> import torch_dmc as dmc
    >>> stats = dmc.fit(model, train_loader)                          # doctest: +SKIP
    >>> corrected = dmc.DMC(model, stats)                             # doctest: +SKIP
    >>> model = corrected.remove()                                    # doctest: +SKIP
"""

from ._version import __version__
from .correct import DMC, corrected
from .fit import fit
from .options import ESTIMATES, MODES, DMCOptions
from .shift import format_shift_report, shift_report
from .stats_io import ReferenceStats, StatsMismatchError

__all__ = [
    "DMC",
    "DMCOptions",
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
