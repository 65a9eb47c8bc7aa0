"""ImageNet-C's mean corruption error (mCE) and relative mCE, normalised by AlexNet's errors.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019 (arXiv:1903.12261), § 3. With ``E_{s,c}`` a model's top-1 error on
corruption ``c`` at severity ``s`` (1–5) and ``E_clean`` its error on the clean images::

    CE_c          = Σ_s E_{s,c} / Σ_s E^AlexNet_{s,c}
                  = mean_s E_{s,c} / ALEXNET_ERRORS[c]
    relative CE_c = Σ_s (E_{s,c} − E_clean) / Σ_s (E^AlexNet_{s,c} − E^AlexNet_clean)
                  = (mean_s E_{s,c} − E_clean) / (ALEXNET_ERRORS[c] − ALEXNET_CLEAN_ERROR)
    mCE           = mean of CE_c over the 15 corruptions of :data:`ALEXNET_ERRORS`
    relative mCE  = mean of relative CE_c over the same 15

(the two forms agree because every corruption has the same 5 severities). For a test-time method
``E_{s,c}`` is the method's error on that cell (it adapts on those images) and ``E_clean`` its
error on the clean cell of the same batch size and stream.

**Units.** ``results.csv`` errors are percentages; :data:`ALEXNET_ERRORS` and
:data:`ALEXNET_CLEAN_ERROR` are fractions. Every function here takes errors in % (as the rows and
:class:`~torch_dmc.bench.metrics.Summary` hold them), divides them by 100, and returns CEs as
plain ratios (1.0: as bad as AlexNet); a report shows ``100 ×`` the ratio, in %.

**Aggregation.** As everywhere in the benchmark (docs/protocol.md § Metrics), seeds are averaged
first within a cell ``(method, corruption, severity, batch_size, stream)``; then severities; then
corruptions. Streams and batch sizes are never mixed.

**Completeness.** ``CE_c`` exists only when all 5 severities of ``c`` are present; the mCE only
when all 15 ``CE_c`` do, and the relative ones only when the clean error is known too. Nothing is
silently averaged over fewer severities or corruptions: :class:`MCEResult` keeps the full value
apart from a *partial* mean over the complete corruptions, and says what is missing.

**Only ImageNet-C.** The normalisation is AlexNet's error on ImageNet-C itself; there are no
published AlexNet errors for Tiny-ImageNet-C (64×64, 200 classes), CIFAR-10/100-C or the corrupted
sets this library generates, so these numbers mean nothing there and the report shows them for
the ``imagenet-c`` data kind only. Other corruptions (e.g. the 4 validation ones) are ignored.

All functions are pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .metrics import Summary
from .protocol import CLEAN

__all__ = [
    "ALEXNET_ERRORS",
    "ALEXNET_CLEAN_ERROR",
    "IMAGENET_C_CORRUPTIONS",
    "SEVERITIES",
    "MCEResult",
    "ImageNetCScores",
    "cell_errors",
    "missing_severities",
    "describe_missing",
    "corruption_errors",
    "relative_corruption_errors",
    "mce",
    "relative_mce",
    "imagenet_c_scores",
]

#: AlexNet's top-1 error on each ImageNet-C corruption, the mean over severities 1–5, as a
#: fraction: the normaliser of the CE (Hendrycks & Dietterich 2019, arXiv:1903.12261). These are
#: the constants the authors publish in their ``robustness`` repository (``hendrycks/robustness``;
#: measured with its ``ImageNet-C/test.py``, which loads torchvision's pretrained ``alexnet``),
#: copied unchanged by every ImageNet-C evaluation since (e.g. AugMix's). In ImageNet-C order (the
#: benchmark's ``common`` order).
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}

#: AlexNet's top-1 error on the clean ImageNet validation set, as a fraction: torchvision's
#: pretrained ``alexnet`` (56.522 % top-1 accuracy, torchvision's published figure), the model the
#: constants of :data:`ALEXNET_ERRORS` were measured with. The normaliser's clean term in the
#: relative CE (arXiv:1903.12261, § 3).
ALEXNET_CLEAN_ERROR: float = 0.43478

#: The 15 corruptions the mCE averages over, in ImageNet-C order.
IMAGENET_C_CORRUPTIONS: tuple[str, ...] = tuple(ALEXNET_ERRORS)

#: The severities every CE needs.
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

#: Seed-mean errors in % of one method, batch size and stream: ``(corruption, severity) → error``;
#: the clean error, when known, under ``(CLEAN, 0)``.
Errors = Mapping[tuple[str, int], float]


@dataclass(frozen=True)
class MCEResult:
    """An mCE (or relative mCE), or why there is none.

    Attributes:
        value: the mean over all 15 corruptions, a ratio (1.0: as AlexNet); ``None`` unless every
            corruption has all 5 severities (and, for the relative mCE, the clean error is known).
        partial_value: the mean over :attr:`corruptions_used` only — **not** an mCE unless
            :attr:`complete`; ``None`` when no corruption is complete.
        corruptions_used: the corruptions with all 5 severities, in ImageNet-C order.
        missing: corruption → its missing severities (all 5 when the corruption did not run).
        reason: why :attr:`value` is ``None`` (``None`` when it is not).
    """

    value: float | None
    partial_value: float | None
    corruptions_used: tuple[str, ...]
    missing: dict[str, tuple[int, ...]]
    reason: str | None = None

    @property
    def complete(self) -> bool:
        """Whether :attr:`value` is the mCE over all 15 corruptions."""
        return self.value is not None

    @property
    def partial(self) -> bool:
        """Whether only :attr:`partial_value`, a mean over fewer than 15 corruptions, exists."""
        return self.value is None and self.partial_value is not None

    @property
    def percent(self) -> float | None:
        """:attr:`value` in % (``100 ×`` the ratio), as papers print the mCE."""
        return None if self.value is None else 100.0 * self.value


@dataclass(frozen=True)
class ImageNetCScores:
    """Every AlexNet-normalised number of one method, batch size and stream.

    Attributes:
        ce: corruption → ``CE_c`` (ratio) for the 15 corruptions; ``None`` where incomplete.
        relative_ce: corruption → relative ``CE_c`` (ratio); ``None`` where incomplete or without
            a clean error.
        mce: the mCE.
        relative_mce: the relative mCE.
        clean: the clean error in % (mean over seeds), ``None`` when no clean cell ran.
    """

    ce: dict[str, float | None]
    relative_ce: dict[str, float | None]
    mce: MCEResult
    relative_mce: MCEResult
    clean: float | None


def cell_errors(
    source: Summary | Iterable[Mapping],
    method: str,
    batch_size: int,
    stream: str | None = None,
) -> dict[tuple[str, int], float]:
    """Seed-mean errors (%) of one method, batch size and stream, keyed ``(corruption, severity)``.

    Args:
        source: a :class:`~torch_dmc.bench.metrics.Summary`, or results rows
            (:func:`~torch_dmc.bench.metrics.read_results`), which are summarised first.
        method, batch_size: which cells.
        stream: which stream (default: the summary's primary stream, the first to appear).

    Returns:
        every corrupted cell present, and the clean one under ``(CLEAN, 0)`` when it ran; each the
        mean over its seeds (:func:`~torch_dmc.bench.metrics.seed_means`).
    """
    summary = source if isinstance(source, Summary) else Summary(list(source))
    stream = summary.stream if stream is None else stream
    return {
        (c, s): e
        for (m, c, s, b, st), e in summary.cell.items()
        if m == method and b == batch_size and st == stream
    }


def missing_severities(errors: Errors) -> dict[str, tuple[int, ...]]:
    """Corruption → its severities (1–5) absent from ``errors``, for the incomplete ones of the 15.

    A corruption that did not run at all lists all 5; complete corruptions are left out.
    """
    out = {}
    for c in IMAGENET_C_CORRUPTIONS:
        gone = tuple(s for s in SEVERITIES if (c, s) not in errors)
        if gone:
            out[c] = gone
    return out


def describe_missing(missing: Mapping[str, tuple[int, ...]]) -> str:
    """``missing`` (as :func:`missing_severities` gives it) in words, for a report or a reason.

    Corruptions missing the same severities are grouped, e.g. ``"all 15 corruptions at
    severities 1, 2, 3, 4"`` or ``"fog (all severities); snow, frost (severity 2)"``.
    """
    if not missing:
        return "nothing"
    groups: dict[tuple[int, ...], list[str]] = {}
    for c, sev in missing.items():
        groups.setdefault(tuple(sev), []).append(c)

    def sev_words(sev: tuple[int, ...]) -> str:
        if sev == SEVERITIES:
            return "all severities"
        return ("severity " if len(sev) == 1 else "severities ") + ", ".join(map(str, sev))

    if len(groups) == 1 and len(missing) == len(IMAGENET_C_CORRUPTIONS):
        (sev,) = groups
        if sev == SEVERITIES:
            return f"all {len(missing)} corruptions (none ran)"
        return f"all {len(missing)} corruptions at {sev_words(sev)}"
    return "; ".join(f"{', '.join(cs)} ({sev_words(sev)})" for sev, cs in groups.items())


def _mean_fraction(errors: Errors, corruption: str) -> float | None:
    """``mean_s E_{s,c}`` as a fraction, or ``None`` unless all 5 severities are present."""
    vals = [errors.get((corruption, s)) for s in SEVERITIES]
    if any(v is None for v in vals):
        return None
    return sum(vals) / len(vals) / 100.0  # type: ignore[arg-type]


def _clean_fraction(errors: Errors, clean: float | None) -> float | None:
    clean = errors.get((CLEAN, 0)) if clean is None else clean
    return None if clean is None else clean / 100.0


def corruption_errors(errors: Errors) -> dict[str, float | None]:
    """``CE_c = mean_s E_{s,c} / ALEXNET_ERRORS[c]`` for each of the 15 corruptions (a ratio).

    Args:
        errors: seed-mean errors in % keyed ``(corruption, severity)`` (:func:`cell_errors`).

    Returns:
        corruption → ``CE_c``, in ImageNet-C order; ``None`` where a severity 1–5 is missing
        (never a mean over fewer severities).
    """
    out: dict[str, float | None] = {}
    for c, alexnet in ALEXNET_ERRORS.items():
        e = _mean_fraction(errors, c)
        out[c] = None if e is None else e / alexnet
    return out


def relative_corruption_errors(errors: Errors, clean: float | None = None) -> dict[str, float | None]:
    """Relative ``CE_c = (mean_s E_{s,c} − E_clean) / (ALEXNET_ERRORS[c] − ALEXNET_CLEAN_ERROR)``.

    Args:
        errors: seed-mean errors in % keyed ``(corruption, severity)`` (:func:`cell_errors`).
        clean: the clean error in % (default: ``errors[(CLEAN, 0)]``).

    Returns:
        corruption → relative ``CE_c`` (a ratio), in ImageNet-C order; ``None`` where a severity is
        missing, and everywhere when the clean error is unknown.
    """
    e_clean = _clean_fraction(errors, clean)
    out: dict[str, float | None] = {}
    for c, alexnet in ALEXNET_ERRORS.items():
        e = _mean_fraction(errors, c)
        out[c] = None if e is None or e_clean is None else (e - e_clean) / (alexnet - ALEXNET_CLEAN_ERROR)
    return out


def _result(ces: dict[str, float | None], errors: Errors, extra_reason: str | None = None) -> MCEResult:
    used = tuple(c for c, v in ces.items() if v is not None)
    missing = missing_severities(errors)
    partial = sum(ces[c] for c in used) / len(used) if used else None  # type: ignore[misc]
    if extra_reason is not None:
        return MCEResult(None, None, (), missing, extra_reason)
    if missing:
        return MCEResult(None, partial, used, missing, f"missing {describe_missing(missing)}")
    return MCEResult(partial, partial, used, missing, None)


def mce(errors: Errors) -> MCEResult:
    """The mCE: ``mean_c CE_c`` over the 15 corruptions (:func:`corruption_errors`), a ratio.

    Args:
        errors: seed-mean errors in % keyed ``(corruption, severity)`` (:func:`cell_errors`).

    Returns:
        an :class:`MCEResult`: ``value`` only when all 15 corruptions have all 5 severities;
        otherwise ``None`` with the reason, and the mean over the complete ones as
        ``partial_value``.
    """
    return _result(corruption_errors(errors), errors)


def relative_mce(errors: Errors, clean: float | None = None) -> MCEResult:
    """The relative mCE: the mean over the 15 corruptions of :func:`relative_corruption_errors`.

    Args:
        errors: seed-mean errors in % keyed ``(corruption, severity)`` (:func:`cell_errors`).
        clean: the clean error in % (default: ``errors[(CLEAN, 0)]``).

    Returns:
        an :class:`MCEResult` as :func:`mce` does; no value at all (reason ``"no clean error"``)
        when the clean error is unknown.
    """
    reason = "no clean error" if _clean_fraction(errors, clean) is None else None
    return _result(relative_corruption_errors(errors, clean), errors, reason)


def imagenet_c_scores(
    source: Summary | Iterable[Mapping],
    method: str,
    batch_size: int,
    stream: str | None = None,
) -> ImageNetCScores:
    """CE, relative CE, mCE and relative mCE of one method, batch size and stream.

    Args:
        source: a :class:`~torch_dmc.bench.metrics.Summary`, or results rows.
        method, batch_size: which cells.
        stream: which stream (default: the summary's primary stream).
    """
    errors = cell_errors(source, method, batch_size, stream)
    return ImageNetCScores(
        ce=corruption_errors(errors),
        relative_ce=relative_corruption_errors(errors),
        mce=mce(errors),
        relative_mce=relative_mce(errors),
        clean=errors.get((CLEAN, 0)),
    )
