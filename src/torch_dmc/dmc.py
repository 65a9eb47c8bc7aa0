"""Fit reference statistics, correct a model's activations, and measure the shift.

The three steps users see::

    stats = torch_dmc.fit(model, train_loader)          # reference quantiles of every site
    corrected = torch_dmc.DMC(model, stats)             # forward hooks map activations
    model = corrected.remove()                          # hooks gone, model as before

Modules and hooks here only route tensors to the math in `torch_dmc.transport`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._version import __version__
from .sites import (
    SiteSpec,
    register_output_hooks,
    resolve_channel_axes,
    select_sites,
    site_fingerprint,
)
from .sketch import QuantileSketch, sample_channel_values
from .stats_io import ReferenceStats
from .transport import (
    apply_lut,
    empirical_quantiles,
    histogram_levels,
    histogram_quantiles,
    interp_quantiles,
    lut_from_quantiles,
    lut_from_sample,
    lut_grid,
    transport_exact,
    transport_quantiles,
    wasserstein1,
)

__all__ = ["MODES", "ESTIMATES", "fit", "DMC", "corrected", "shift_report", "format_shift_report"]

MODES = ("exact", "grid")
"""How the map is computed (DESIGN §1): full sort, or a table at knots from a histogram."""

ESTIMATES = ("batch", "prior", "ema", "per-sample")
"""Which test distribution is matched to the reference (DESIGN §1): the current batch's; the
batch's blended with the reference (``prior``); a running estimate across batches (``ema``); or
each sample's own, per channel over its positions (``per-sample``)."""

DEFAULT_MODE = "grid"
DEFAULT_KNOTS = 4096
DEFAULT_GRID_SAMPLE = 4096
BLEND_LEVELS = 257
"""Levels of the quantile functions that grid mode blends for ``prior`` and ``ema`` (exact mode
uses the stats' ``K``): enough for the batch estimates, and 4× fewer searches than ``K = 1024``."""


def _batch_input(batch) -> Tensor:
    """The input tensor of a batch: the batch itself, or the first element of a tuple/list/dict."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in ("x", "image", "images", "input", "inputs", "pixel_values"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    raise TypeError(f"expected each batch to be a tensor or an (x, y, ...) tuple, found "
                    f"{type(batch).__name__}")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def fit(model: nn.Module, data: Iterable, *, sites: SiteSpec = "norm", levels: int = 1024,
        max_batches: int | None = None, device: torch.device | str | None = None,
        progress: bool = True, channel_axes: int | Mapping[str, int] | None = None,
        samples_per_batch: int | None = 1024, capacity: int = 4096, seed: int = 0,
        per_sample: bool = False, per_sample_images: int | None = 32) -> ReferenceStats:
    """Fit the reference quantile function of every site's channels on source data.

    Runs the unmodified model in eval mode under ``torch.inference_mode`` and streams every site's
    output into a `torch_dmc.sketch.QuantileSketch`: memory at most ``8 · capacity · channels``
    values, independent of the dataset size; values are sampled at random positions, never strided. The
    model's parameters, buffers and train/eval mode are left as they were.

    Args:
        model: the trained network.
        data: iterable of input tensors or ``(x, y, ...)`` tuples (e.g. a ``DataLoader``).
        sites: which module outputs to correct (see `torch_dmc.sites.select_sites`).
        levels: ``K``, quantile levels stored per channel, endpoints included.
        max_batches: stop after this many batches.
        device: where batches are sent (default: the model's device).
        progress: show a progress bar.
        channel_axes: channel axis for all sites (int) or per fnmatch pattern (dict); default 1,
            and -1 for LayerNorm.
        samples_per_batch: values drawn per channel from each batch (``None``: all values).
        capacity: points per channel per sketch summary (sets the compression error).
        seed: seed of the random sampling.
        per_sample: also fit the reference of the ``per-sample`` estimate in the same pass: per
            site with at least 2 positions per sample, the mean over samples of each sample's
            quantile function of a channel over its positions (axis 0 is the batch axis). Off by
            default: it sorts every drawn sample's positions, which doubles the cost of the fit
            and the size of the stats; only the ``per-sample`` estimate reads it.
        per_sample_images: samples per batch, drawn at random, whose quantile functions enter
            that mean (``None``: all); the mean is exact over the drawn samples.

    Returns:
        The `ReferenceStats`, with ``info`` recording the images seen and the rank-error bound.

    Example:
        >>> stats = fit(model, train_loader)                          # doctest: +SKIP
        >>> stats.save("model.dmc.safetensors")                       # doctest: +SKIP
    """
    if levels < 2:
        raise ValueError(f"levels must be at least 2 (both endpoints included), found {levels}")
    names = select_sites(model, sites)
    axes = resolve_channel_axes(model, names, channel_axes)
    device = torch.device(device) if device is not None else _model_device(model)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # its own stream, so the pooled reference does not depend on ``per_sample``
    sample_generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    sketches: dict[str, QuantileSketch] = {}
    sample_sums: dict[str, list] = {}  # site -> [C×K float64 sum of per-sample tables, count]

    def observe(name: str, output: Tensor) -> None:
        axis = axes[name]
        if name not in sketches:
            sketches[name] = QuantileSketch(output.shape[axis], capacity=capacity,
                                            samples_per_batch=samples_per_batch,
                                            generator=generator)
        sketches[name].update_activation(output, axis)
        if per_sample:
            rows = _per_sample_rows(output, axis, per_sample_images, sample_generator)
            if rows is not None:
                b = rows.shape[0] // output.shape[axis]
                table = empirical_quantiles(rows, levels).double()
                table = table.view(b, -1, levels).sum(dim=0)
                if name in sample_sums:
                    sample_sums[name][0] += table
                    sample_sums[name][1] += b
                else:
                    sample_sums[name] = [table, b]

    was_training = model.training
    handles = register_output_hooks(model, names, observe)
    images = batches = 0
    total = max_batches
    if total is None and hasattr(data, "__len__"):
        total = len(data)
    try:
        model.eval()
        with torch.inference_mode():
            for batch in tqdm(data, total=total, desc="fit", unit="batch", disable=not progress):
                if max_batches is not None and batches >= max_batches:
                    break
                x = _batch_input(batch).to(device)
                model(x)
                images += x.shape[0]
                batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if batches == 0:
        raise ValueError("fit received no batches: `data` is empty")
    never = [n for n in names if n not in sketches]
    if never:
        raise ValueError(f"sites {never[:5]} produced no output during fit: they are not used in "
                         "the model's forward; choose other sites")
    channels = {n: s.channels for n, s in sketches.items()}
    modules = dict(model.named_modules())
    return ReferenceStats(
        quantiles={n: sketches[n].quantiles(levels).cpu() for n in names},
        channel_axes=axes,
        module_types={n: type(modules[n]).__name__ for n in names},
        fingerprint=site_fingerprint(model, channels),
        info={
            "torch_dmc_version": __version__,
            "images": images,
            "batches": batches,
            "samples_per_batch": samples_per_batch,
            "capacity": capacity,
            "seed": seed,
            "rank_error_bound": max(s.rank_error_bound() for s in sketches.values()),
            "per_sample_images": per_sample_images if per_sample else None,
            "per_sample_samples": {n: int(v[1]) for n, v in sample_sums.items()},
        },
        per_sample={n: (v[0] / v[1]).float().cpu() for n, v in sample_sums.items()},
    )


def _per_sample_rows(output: Tensor, axis: int, samples: int | None,
                     generator: torch.Generator | None = None) -> Tensor | None:
    """``B'·C×P`` rows, ordered (sample, channel): each sample's channel over its ``P`` positions.

    Axis 0 is the batch axis. ``samples`` draws that many samples at random without replacement
    (``None``: all). ``None`` when a sample has fewer than 2 positions per channel.
    """
    if axis == 0:
        raise ValueError("per-sample correction needs the batch on axis 0 and channels elsewhere")
    b, c = output.shape[0], output.shape[axis]
    positions = output.numel() // max(b * c, 1)
    if positions < 2:
        return None
    if samples is not None and samples < b:
        pick = torch.randperm(b, generator=generator)[:samples].to(output.device)
        output = output.index_select(0, pick)
        b = samples
    return output.detach().movedim(axis, 1).reshape(b * c, positions)


def _is_channels_last(output: Tensor, axis: int) -> bool:
    """Whether a 4-D ``N×C×H×W`` output (channels on axis 1) is stored channels-last (NHWC)."""
    return (output.dim() == 4 and axis == 1 and not output.is_contiguous()
            and output.is_contiguous(memory_format=torch.channels_last))


def _per_site(names: list[str], value, default):
    """``value`` for every site, or a dict of fnmatch pattern → value (last match wins)."""
    if isinstance(value, Mapping):
        out = {}
        for name in names:
            hits = [v for p, v in value.items() if fnmatch.fnmatchcase(name, p)]
            out[name] = hits[-1] if hits else default
        return out
    return dict.fromkeys(names, value)


def _per_channel(output: Tensor, axis: int, transport) -> Tensor:
    """Apply a ``C×N → C×N`` map to an output's channel-major view; same shape back."""
    moved = output.movedim(axis, 0)
    y = transport(moved.reshape(moved.shape[0], -1))
    return y.reshape(moved.shape).movedim(0, axis).contiguous()


def _resolve_strengths(names: list[str], strength: float | Mapping[str, float]) -> dict[str, float]:
    out = {k: float(v) for k, v in _per_site(names, strength, 1.0).items()}
    bad = {k: v for k, v in out.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise ValueError(f"strength must lie in [0, 1], found {bad}")
    return out


def _resolve_estimates(names: list[str], estimate: str | Mapping[str, str]) -> dict[str, str]:
    out = _per_site(names, estimate, "batch")
    bad = {k: v for k, v in out.items() if v not in ESTIMATES}
    if bad:
        raise ValueError(f"unknown estimate(s) {bad}; choose from {', '.join(ESTIMATES)}")
    return out


class DMC(nn.Module):
    """A model whose chosen activations are corrected onto their reference distributions.

    At every site the output's channel values ``x`` (batch and spatial positions pooled) become
    ``y = x + λ·(T(x) - x)`` with ``T`` the monotone quantile-matching map to the reference
    (DESIGN §1) and ``λ`` the site's strength. Hooks are registered on ``model`` itself (no copy);
    `remove` takes them off again and returns the model, whose outputs are then bit-identical to
    before.

    Args:
        model: the trained network (left in whatever train/eval mode it is in).
        stats: `ReferenceStats` fitted on this model (validated here).
        mode: ``"exact"`` (full sort, the reference implementation) or ``"grid"`` (the default:
            the test CDF ``F̂`` at ``knots`` uniform knots from a histogram of a random subsample,
            the map ``x ↦ Q_ref(F̂(x))`` tabulated there, each value mapped by its nearest knot
            in one pass; see
            `torch_dmc.transport.lut_from_sample`).
        strength: ``λ`` in ``[0, 1]`` for every site, or a dict of fnmatch pattern → ``λ`` (the last
            matching pattern wins; unmatched sites get 1). Sites with ``λ = 0`` are not hooked.
        sites: fnmatch patterns choosing a subset of the stats' sites (default: all of them).
        knots: grid mode's largest ``K'``, knots (table nodes) per channel; a site whose ``M``
            values (or sample) per channel are few uses ``max(32, M // 4)`` knots instead, since
            finer cells than that add cost but not accuracy.
        grid_sample: grid mode estimates its knots from this many random positions per channel
            (``None``: from all values); adds a rank error of order ``1/sqrt(grid_sample)``.
        seed: seed of grid mode's sampling (`reset` restarts it).
        estimate: which test distribution each site matches to its reference (`ESTIMATES`), one
            for all sites or a dict of fnmatch pattern → estimate (last match wins; unmatched sites
            use ``"batch"``). Each works in both modes:

            - ``"batch"``: the current batch's values (the default);
            - ``"prior"``: the blended quantile function ``(n·Q_batch + N0·Q_ref)/(n + N0)``, ``n``
              the batch size and ``N0 = prior`` (the 1-D Wasserstein barycenter; N0 = 0 is
              ``batch``, N0 = ∞ the identity);
            - ``"ema"``: a running quantile function ``Q̂ ← (1 − m)·Q̂ + m·Q_batch`` with
              ``m = momentum``, starting at ``Q_ref`` and kept across batches until `reset`
              (m = 1 is ``batch``);
            - ``"per-sample"``: each sample's channel over its own positions, mapped onto the mean
              per-sample reference (``stats.per_sample``): the output of a sample does not
              depend on the rest of the batch. A site with fewer than ``min_positions``
              positions per sample (or without a per-sample reference) uses ``"prior"`` instead;
              `fallbacks` and `shift_report` say so.

            The blends use the stats' ``K`` levels (grid mode: `BLEND_LEVELS`).
        prior: ``N0 >= 0`` of the ``prior`` estimate (``math.inf`` allowed).
        momentum: ``m`` in ``(0, 1]`` of the ``ema`` estimate.
        min_positions: fewest positions per sample for the ``per-sample`` estimate.

    Example:
        >>> corrected = DMC(model, stats, mode="exact")              # doctest: +SKIP
        >>> logits = corrected(x)                                    # doctest: +SKIP
        >>> model = corrected.remove()                               # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, stats: ReferenceStats, *, mode: str = DEFAULT_MODE,
                 strength: float | Mapping[str, float] = 1.0, sites: str | list[str] | None = None,
                 knots: int = DEFAULT_KNOTS, grid_sample: int | None = DEFAULT_GRID_SAMPLE,
                 seed: int = 0, estimate: str | Mapping[str, str] = "batch", prior: float = 16.0,
                 momentum: float = 0.1, min_positions: int = 16):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if knots < 2:
            raise ValueError(f"knots must be at least 2, found {knots}")
        if not float(prior) >= 0:
            raise ValueError(f"prior (N0) must be >= 0 or inf, found {prior}")
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum must lie in (0, 1], found {momentum}")
        if min_positions < 2:
            raise ValueError(f"min_positions must be at least 2, found {min_positions}")
        stats.check(model)
        names = stats.sites
        if sites is not None:
            patterns = [sites] if isinstance(sites, str) else list(sites)
            names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
            if not names:
                raise ValueError(f"sites={sites!r} matches none of the stats' sites: "
                                 f"{', '.join(stats.sites[:20])}")
        self.model = model
        self.stats = stats
        self.mode = mode
        self.knots = knots
        self.grid_sample = grid_sample
        self.seed = seed
        self.strengths = _resolve_strengths(names, strength)
        self.estimates = _resolve_estimates(names, estimate)
        self.prior = float(prior)
        self.momentum = float(momentum)
        self.min_positions = int(min_positions)
        self.fallbacks: dict[str, str] = {}  # site -> why per-sample became prior
        for name in names:
            if self.estimates[name] == "per-sample" and name not in stats.per_sample:
                if not stats.per_sample:
                    raise ValueError(
                        "estimate 'per-sample' needs per-sample reference statistics, and these "
                        "stats have none: fit them with torch_dmc.fit(..., per_sample=True)")
                self.fallbacks[name] = "prior: fewer than 2 positions per sample at fit time"
        self._ema: dict[str, Tensor] = {}  # running quantile tables of the ema estimate
        self._tables: dict[tuple, Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._grids: dict[tuple, Tensor] = {}  # grid mode's sampling buffers, one per shape
        active = [n for n in names if self.strengths[n] > 0]
        self._handles = register_output_hooks(model, active, self._correct)
        self._removed = False

    @property
    def sites(self) -> list[str]:
        """Names of the corrected sites."""
        return [n for n, s in self.strengths.items() if s > 0]

    def _table(self, name: str, device: torch.device, per_sample: bool = False) -> Tensor:
        key = (name, device, per_sample)
        if key not in self._tables:
            source = self.stats.per_sample if per_sample else self.stats.quantiles
            self._tables[key] = source[name].to(device=device, dtype=torch.float32)
        return self._tables[key]

    def _coarse_table(self, name: str, device: torch.device) -> Tensor:
        """The reference at grid mode's `BLEND_LEVELS` (or fewer) levels, for prior/ema blends."""
        key = (name, device, "coarse")
        if key not in self._tables:
            q = self._table(name, device)
            levels = min(BLEND_LEVELS, q.shape[1])
            t = torch.linspace(0, 1, levels, device=device).expand(q.shape[0], -1)
            self._tables[key] = interp_quantiles(q, t)
        return self._tables[key]

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _grid(self, output: Tensor, axis: int) -> Tensor:
        """A reusable `lut_grid` buffer per activation shape."""
        key = (tuple(output.shape), axis, output.device)
        if key not in self._grids:
            self._grids[key] = lut_grid(output.shape, axis, output.device)
        return self._grids[key]

    def reset(self) -> None:
        """Restart grid mode's random sampling from ``seed`` and forget the ``ema`` estimates."""
        self._generators.clear()
        self._ema.clear()

    def estimate_used(self, name: str) -> str:
        """The estimate a site actually uses (``per-sample`` sites may fall back to ``prior``)."""
        return "prior" if name in self.fallbacks else self.estimates[name]

    def _correct(self, name: str, output: Tensor) -> Tensor:
        self.stats.check_output(name, output)
        axis = self.stats.channel_axes[name] % output.dim()
        estimate = self.estimate_used(name)
        if estimate == "per-sample":
            positions = output.numel() // max(output.shape[0] * output.shape[axis], 1)
            if positions < self.min_positions:
                self.fallbacks[name] = (f"prior: {positions} position(s) per sample, fewer than "
                                        f"min_positions={self.min_positions}")
                estimate = "prior"
        if estimate == "per-sample":
            y = self._correct_per_sample(name, output, axis)
        elif estimate == "batch" or (estimate == "prior" and self.prior == 0) or (
                estimate == "ema" and self.momentum == 1.0):
            y = self._correct_batch(name, output, axis)
        elif estimate == "prior" and math.isinf(self.prior):
            return output
        else:
            y = self._correct_blended(name, output, axis, estimate)
        lam = self.strengths[name]
        return y if lam == 1.0 else torch.lerp(output, y, lam)

    def _correct_batch(self, name: str, output: Tensor, axis: int) -> Tensor:
        """Match the batch's values of every channel to the reference (``batch``)."""
        q = self._table(name, output.device)
        if self.mode == "exact":
            return _per_channel(output, axis, lambda x: transport_exact(x, q))
        values = self._batch_values(output, axis)
        return self._apply(output, axis, lut_from_sample(values, q, self._knots(values)))

    def _correct_per_sample(self, name: str, output: Tensor, axis: int) -> Tensor:
        """Match every sample's channel, over its positions, to the per-sample reference."""
        q = self._table(name, output.device, per_sample=True)
        rows = _per_sample_rows(output, axis, None)  # B·C×P, a copy unless already laid out so
        if self.mode == "exact":
            y = transport_exact(rows, q)
        else:
            y = apply_lut(rows, lut_from_sample(rows, q, self._knots(rows)), channel_axis=0)
        moved = output.movedim(axis, 1)
        return y.view(moved.shape).movedim(1, axis)

    def _batch_values(self, output: Tensor, axis: int) -> Tensor:
        """``C×M`` values of the batch: all (exact mode) or grid mode's random sample."""
        c = output.shape[axis]
        n = output.numel() // c
        if self.mode == "grid" and self.grid_sample is not None and self.grid_sample < n:
            return sample_channel_values(output, axis, self.grid_sample, self._generator(output.device))
        return output.movedim(axis, 0).reshape(c, n)

    def _correct_blended(self, name: str, output: Tensor, axis: int, estimate: str) -> Tensor:
        """``prior`` and ``ema``: match to the reference through an estimated quantile function."""
        q_ref = self._table(name, output.device)
        values = self._batch_values(output, axis)
        if self.mode == "exact":
            q_batch = empirical_quantiles(values, q_ref.shape[1])
        else:  # from a histogram, no sort; blended at fewer levels
            q_ref = self._coarse_table(name, output.device)
            knots = self._knots(values)
            lo, step, level = histogram_levels(values, knots)
            q_batch = histogram_quantiles(lo, step, level, q_ref.shape[1])
        if estimate == "prior":
            n = output.shape[0]
            q_test = torch.lerp(q_batch, q_ref, self.prior / (self.prior + n))
        else:
            previous = self._ema.get(name, q_ref)
            q_test = torch.lerp(previous, q_batch, self.momentum)
            self._ema[name] = q_test
        if self.mode == "exact":
            return _per_channel(output, axis, lambda x: transport_quantiles(x, q_test, q_ref))
        return self._apply(output, axis, lut_from_quantiles(q_test, q_ref, lo, step, knots))

    def _apply(self, output: Tensor, axis: int, lut) -> Tensor:
        """`apply_lut` in the output's own memory layout (a channels-last output stays so)."""
        if _is_channels_last(output, axis):  # work on the NHWC view: no layout change
            view = output.permute(0, 2, 3, 1)
            return apply_lut(view, lut, 3, self._grid(view, 3)).permute(0, 3, 1, 2)
        return apply_lut(output, lut, axis, self._grid(output, axis))

    def _knots(self, values: Tensor) -> int:
        """Grid mode's table nodes for ``C×M`` values: no finer cells than about 4 values each
        (finer ones add cost, not accuracy)."""
        return min(self.knots, max(32, values.shape[1] // 4))

    def forward(self, *args, **kwargs):
        """Run the wrapped model with corrected sites."""
        if self._removed:
            raise RuntimeError("this DMC was removed; call the model directly or wrap it again")
        return self.model(*args, **kwargs)

    def remove(self) -> nn.Module:
        """Take the hooks off and return the original model (outputs bit-identical to before)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._removed = True
        return self.model

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, sites={len(self.sites)}"


@contextmanager
def corrected(model: nn.Module, stats: ReferenceStats, **options) -> Iterator[DMC]:
    """Context manager: ``model`` is corrected inside the block and restored on exit.

    Example:
        >>> with corrected(model, stats) as m:                        # doctest: +SKIP
        ...     logits = m(x)
    """
    wrapper = DMC(model, stats, **options)
    try:
        yield wrapper
    finally:
        wrapper.remove()


def shift_report(model: nn.Module, stats: ReferenceStats, batch: Tensor,
                 **options) -> dict[str, dict[str, float | str]]:
    """Per site, the mean per-channel W1 distance to the reference before and after correction.

    "Before" is the plain model's site output, "after" the corrected model's site output (with
    upstream sites corrected too). W1 is the quantity the exact transport minimises (measured
    against the pooled reference, whatever the estimate).

    Args:
        model: the network.
        stats: its reference statistics.
        batch: an input batch.
        **options: options of `DMC` (mode, strength, sites, estimate, …).

    Returns:
        ``{site: {"before": w1, "after": w1, "estimate": used}}`` in model order; ``estimate``
        is the estimate the site used, with the reason where ``per-sample`` fell back to
        ``prior`` (``"prior (per-sample fallback: …)"``); sites not corrected say ``"none"``.
    """
    report: dict[str, dict[str, float | str]] = {}

    def measure(key: str):
        def hook(name: str, output: Tensor) -> None:
            axis = stats.channel_axes[name] % output.dim()
            x = output.detach().movedim(axis, 0).reshape(output.shape[axis], -1)
            q = stats.quantiles[name].to(x.device)
            report.setdefault(name, {})[key] = float(wasserstein1(x.float(), q).mean())
        return hook

    def run(forward, key: str) -> None:
        handles = register_output_hooks(model, stats.sites, measure(key))
        try:
            forward(batch)
        finally:
            for h in handles:
                h.remove()

    with torch.no_grad():
        run(model, "before")
        with corrected(model, stats, **options) as m:
            run(m, "after")  # measured after DMC's own hook: the corrected output
            for name in report:
                if name not in m.sites:
                    report[name]["estimate"] = "none"
                elif name in m.fallbacks:
                    report[name]["estimate"] = f"prior (per-sample fallback: {m.fallbacks[name]})"
                else:
                    report[name]["estimate"] = m.estimates[name]
    return report


def format_shift_report(report: Mapping[str, Mapping[str, float | str]]) -> str:
    """The output of `shift_report` as a Markdown table with the relative reduction."""
    lines = ["| site | estimate | W1 before | W1 after | reduction |", "|---|---|---:|---:|---:|"]
    for name, row in report.items():
        red = 1 - row["after"] / row["before"] if row["before"] > 0 else 0.0
        lines.append(f"| {name} | {row.get('estimate', '')} | {row['before']:.4f} | "
                     f"{row['after']:.4f} | {red:.0%} |")
    return "\n".join(lines)
