"""The benchmark: ``dmc bench`` (methods × corruptions × severities) and ``dmc tune``.

Modules: :mod:`.protocol` (the serialisable :class:`Protocol` and its cells), :mod:`.streams`
(iid and label-shifted test-stream orders), :mod:`.runner` (fit or reuse stats, stream every
cell, write the results folder), :mod:`.metrics` (the ``results.csv`` schema and the means),
:mod:`.report` (``report.md``), :mod:`.plots` (PNGs), :mod:`.tune` (choosing DMC's options on
validation corruptions only) and :mod:`.cli` (flags).

The core package never imports this one.

Example:
    >>> from torch_dmc.bench import Protocol, run_benchmark               # doctest: +SKIP
    >>> p = Protocol(methods=["source", "dmc"], corruptions=["fog"], severities=[5], n_test=500)
    >>> run_benchmark(p, "results/fog", model=model, data=data)          # doctest: +SKIP
"""

from .protocol import CLEAN, Cell, Protocol
from .runner import run_benchmark
from .tune import TuneGrid, TuneProtocol, tune

__all__ = ["CLEAN", "Cell", "Protocol", "run_benchmark", "TuneGrid", "TuneProtocol", "tune"]
