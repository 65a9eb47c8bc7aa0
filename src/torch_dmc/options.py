"""`DMCOptions`: every option of the correction, validated once, in one frozen object.

`torch_dmc.DMC`, the ``dmc`` methods (`torch_dmc.methods.dmc`) and ``dmc tune`` all build one;
a bad value fails here, with what was expected and what was found, before anything is hooked.
The meaning of each option is in docs/method.md (§ Strength, § Estimates, § Exact mode,
§ Grid mode).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["MODES", "ESTIMATES", "DEFAULT_MODE", "AUTO_PRIOR_VALUES", "DMCOptions", "SiteOptions"]

MODES = ("exact", "grid")
"""How the map is computed (docs/method.md § Exact mode, § Grid mode): a full sort, or a table at
knots from a histogram of a fixed random sample of positions."""

ESTIMATES = ("batch", "prior", "ema", "per-sample")
"""Which test distribution is matched to the reference (docs/method.md § Estimates): the current
batch's; the batch's blended with the reference (``prior``); a running estimate across batches
(``ema``); or each sample's own, per channel over its positions (``per-sample``)."""

DEFAULT_MODE = "grid"

AUTO_PRIOR_VALUES = 256.0
"""``V0`` that ``prior_values=None`` uses at sites with one position per image (``B×C``): on
clean Fashion-MNIST at batch size 16 it keeps 98.6 % of an MLP's predictions where the plain batch
estimate keeps 85.4 % (``benchmarks/small_estimates.py``)."""


class FrozenDict(Mapping):
    """A read-only dict (picklable and deep-copyable, unlike ``types.MappingProxyType``)."""

    def __init__(self, items: Mapping) -> None:
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return repr(self._items)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SiteOptions:
    """What one site uses: its strength ``λ`` and its estimate."""

    strength: float
    estimate: str


@dataclass(frozen=True)
class DMCOptions:
    """The options of `torch_dmc.DMC`, validated on construction.

    Attributes:
        mode: ``"exact"`` (full sort, the reference implementation) or ``"grid"`` (the default:
            a histogram of a fixed random sample of positions, the map tabulated at knots).
        strength: ``λ`` in ``[0, 1]`` for every site, or a mapping of fnmatch pattern → ``λ``
            (the last matching pattern wins; unmatched sites get 1; every pattern must match a
            corrected site). Sites with ``λ = 0`` are not hooked.
        sites: fnmatch patterns choosing a subset of the stats' sites (``None``: all); every
            pattern must match one.
        knots: grid mode's largest number of table nodes per channel (``>= 2``).
        grid_sample: positions per channel sampled by grid mode (``>= 2``; ``None``: all values).
        seed: seed of grid mode's sample positions (a fixed function of the seed and the
            activation's shape: the same batch always gives the same output).
        estimate: one of `ESTIMATES` for every site, or a mapping of fnmatch pattern → estimate
            (last match wins; unmatched sites use ``"batch"``; every pattern must match).
        prior: ``N0 >= 0`` of the ``prior`` estimate, in images (``math.inf`` allowed).
        prior_values: ``V0 >= 0``, a prior of the ``batch`` estimate sized in *values per
            channel*: ``Q̂ = (n·Q_batch + V0·Q_ref)/(n + V0)`` with ``n`` the batch's values per
            channel (``B`` at a ``B×C`` site, ``B·H·W`` at a spatial one), so a site with few
            values stays near the identity and one with many is matched to its batch; ``0``: the
            plain batch estimate; skipped where its weight ``V0/(n + V0)`` is below 1/1000.
            ``None`` (the default): `AUTO_PRIOR_VALUES` at sites with one position per image
            (``B×C`` outputs, only ``B`` values per channel) and 0 elsewhere (docs/method.md
            § Estimates, measured by ``benchmarks/small_estimates.py``).
        momentum: ``m`` in ``(0, 1]`` of the ``ema`` estimate.
        min_positions: fewest positions per sample (``>= 2``) for the ``per-sample`` estimate;
            a batch with fewer uses ``prior`` at that site, for that batch only.

    Raises:
        ValueError: an option out of range, of the wrong type, or unknown (`from_kwargs`).

    Example:
        >>> DMCOptions(mode="exact", strength={"layer1.*": 0.5}).mode
        'exact'
    """

    mode: str = DEFAULT_MODE
    strength: float | Mapping[str, float] = 1.0
    sites: tuple[str, ...] | None = None
    knots: int = 4096
    grid_sample: int | None = 4096
    seed: int = 0
    estimate: str | Mapping[str, str] = "batch"
    prior: float = 16.0
    prior_values: float | None = None
    momentum: float = 0.1
    min_positions: int = 16

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not _is_int(self.knots) or self.knots < 2:
            raise ValueError(f"knots must be an int >= 2, found {self.knots!r}")
        if self.grid_sample is not None and (not _is_int(self.grid_sample) or self.grid_sample < 2):
            raise ValueError(f"grid_sample must be an int >= 2 (positions sampled per channel) or "
                             f"None (all values), found {self.grid_sample!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int, found {self.seed!r}")
        if not _is_number(self.prior) or not float(self.prior) >= 0:
            raise ValueError(f"prior (N0) must be a number >= 0 or math.inf, found {self.prior!r}")
        if self.prior_values is not None and (not _is_number(self.prior_values)
                                              or not 0 <= float(self.prior_values) < float("inf")):
            raise ValueError(f"prior_values (V0) must be a finite number >= 0 or None (automatic), "
                             f"found {self.prior_values!r}")
        if not _is_number(self.momentum) or not 0.0 < float(self.momentum) <= 1.0:
            raise ValueError(f"momentum must lie in (0, 1], found {self.momentum!r}")
        if not _is_int(self.min_positions) or self.min_positions < 2:
            raise ValueError(f"min_positions must be an int >= 2, found {self.min_positions!r}")
        object.__setattr__(self, "prior", float(self.prior))
        object.__setattr__(self, "momentum", float(self.momentum))
        if self.prior_values is not None:
            object.__setattr__(self, "prior_values", float(self.prior_values))
        object.__setattr__(self, "strength", _freeze(self.strength, "strength", _check_strength))
        object.__setattr__(self, "estimate", _freeze(self.estimate, "estimate", _check_estimate))
        if self.sites is not None:
            sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
            bad = [s for s in sites if not isinstance(s, str)]
            if bad or not sites:
                raise ValueError(f"sites must be a name pattern or a non-empty list of them, found "
                                 f"{self.sites!r}")
            object.__setattr__(self, "sites", sites)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, **options: Any) -> DMCOptions:
        """Build from keyword options; an unknown name raises `ValueError` listing the valid ones."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown DMC option(s) {unknown}; the options are: {', '.join(cls.names())}")
        return cls(**options)

    def as_dict(self) -> dict[str, Any]:
        """The options as plain JSON-writable values (mappings as dicts, ``inf`` as a float)."""
        out = asdict(self)
        for key in ("strength", "estimate"):
            if isinstance(out[key], Mapping):
                out[key] = dict(out[key])
        if out["sites"] is not None:
            out["sites"] = list(out["sites"])
        return out

    def resolve(self, available: list[str]) -> dict[str, SiteOptions]:
        """Every chosen site's `SiteOptions`, in ``available``'s order.

        Args:
            available: the sites the stats hold (in model order).

        Raises:
            ValueError: a ``sites``, ``strength`` or ``estimate`` pattern that matches none of the
                sites, listing them.
        """
        chosen = list(available)
        if self.sites is not None:
            _check_patterns(self.sites, available, "sites")
            chosen = [n for n in available if any(fnmatch.fnmatchcase(n, p) for p in self.sites)]
        strengths = _per_site(chosen, self.strength, 1.0, "strength")
        estimates = _per_site(chosen, self.estimate, "batch", "estimate")
        return {n: SiteOptions(float(strengths[n]), estimates[n]) for n in chosen}


def _check_strength(value: Any) -> None:
    if not _is_number(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], found {value!r}")


def _check_estimate(value: Any) -> None:
    if value not in ESTIMATES:
        raise ValueError(f"unknown estimate {value!r}; choose from {', '.join(ESTIMATES)}")


def _freeze(value: Any, what: str, check) -> Any:
    """A validated value, or a read-only mapping of pattern → validated value."""
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"{what} mapping is empty; give a value or at least one pattern")
        for pattern, v in value.items():
            if not isinstance(pattern, str):
                raise ValueError(f"{what} patterns must be strings, found {pattern!r}")
            check(v)
        return FrozenDict(value)
    check(value)
    return float(value) if what == "strength" else value


def _check_patterns(patterns, names: list[str], what: str) -> None:
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        shown = ", ".join(names[:30]) + (" …" if len(names) > 30 else "")
        raise ValueError(f"{what} pattern(s) {', '.join(map(repr, unmatched))} matches no site; "
                         f"the sites are: {shown}")


def _per_site(names: list[str], value: Any, default: Any, what: str) -> dict[str, Any]:
    """``value`` for every site, or a mapping of fnmatch pattern → value (last match wins)."""
    if not isinstance(value, Mapping):
        return dict.fromkeys(names, value)
    _check_patterns(list(value), names, what)
    out = {}
    for name in names:
        hits = [v for p, v in value.items() if fnmatch.fnmatchcase(name, p)]
        out[name] = hits[-1] if hits else default
    return out

