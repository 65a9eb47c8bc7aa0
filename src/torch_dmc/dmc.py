"""Fit reference statistics, correct a model's activations, and measure the shift.

The three steps users see::

    stats = torch_dmc.fit(model, train_loader)          # reference quantiles of every site
    corrected = torch_dmc.DMC(model, stats)             # forward hooks map activations
    model = corrected.remove()                          # hooks gone, model as before

Modules and hooks here only route tensors to the math in `torch_dmc.transport`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__
from .sites import (
    SiteSpec,
    register_output_hooks,
    resolve_channel_axes,
    select_sites,
    site_fingerprint,
)
from .sketch import QuantileSketch, sample_channel_values
from .stats_io import ReferenceStats
from .transport import apply_lut, lut_from_sample, lut_grid, transport_exact, wasserstein1

__all__ = ["MODES", "fit", "DMC", "corrected", "shift_report", "format_shift_report"]

MODES = ("exact", "grid")
"""Ways of estimating the test distribution (DESIGN §1): full sort, or quantiles at knots."""

DEFAULT_MODE = "grid"
DEFAULT_KNOTS = 4096
DEFAULT_GRID_SAMPLE = 4096


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
        samples_per_batch: int | None = 1024, capacity: int = 4096, seed: int = 0
        ) -> ReferenceStats:
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
    sketches: dict[str, QuantileSketch] = {}

    def observe(name: str, output: Tensor) -> None:
        axis = axes[name]
        if name not in sketches:
            sketches[name] = QuantileSketch(output.shape[axis], capacity=capacity,
                                            samples_per_batch=samples_per_batch,
                                            generator=generator)
        sketches[name].update_activation(output, axis)

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
        },
    )


def _is_channels_last(output: Tensor, axis: int) -> bool:
    """Whether a 4-D ``N×C×H×W`` output (channels on axis 1) is stored channels-last (NHWC)."""
    return (output.dim() == 4 and axis == 1 and not output.is_contiguous()
            and output.is_contiguous(memory_format=torch.channels_last))


def _resolve_strengths(names: list[str], strength: float | Mapping[str, float]) -> dict[str, float]:
    if isinstance(strength, Mapping):
        out = {}
        for name in names:
            hits = [v for p, v in strength.items() if fnmatch.fnmatchcase(name, p)]
            out[name] = float(hits[-1]) if hits else 1.0
    else:
        out = dict.fromkeys(names, float(strength))
    bad = {k: v for k, v in out.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise ValueError(f"strength must lie in [0, 1], found {bad}")
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

    Example:
        >>> corrected = DMC(model, stats, mode="exact")              # doctest: +SKIP
        >>> logits = corrected(x)                                    # doctest: +SKIP
        >>> model = corrected.remove()                               # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, stats: ReferenceStats, *, mode: str = DEFAULT_MODE,
                 strength: float | Mapping[str, float] = 1.0, sites: str | list[str] | None = None,
                 knots: int = DEFAULT_KNOTS, grid_sample: int | None = DEFAULT_GRID_SAMPLE,
                 seed: int = 0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if knots < 2:
            raise ValueError(f"knots must be at least 2, found {knots}")
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
        self._tables: dict[tuple[str, torch.device], Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._grids: dict[tuple, Tensor] = {}  # grid mode's sampling buffers, one per shape
        active = [n for n in names if self.strengths[n] > 0]
        self._handles = register_output_hooks(model, active, self._correct)
        self._removed = False

    @property
    def sites(self) -> list[str]:
        """Names of the corrected sites."""
        return [n for n, s in self.strengths.items() if s > 0]

    def _table(self, name: str, device: torch.device) -> Tensor:
        key = (name, device)
        if key not in self._tables:
            self._tables[key] = self.stats.quantiles[name].to(device=device, dtype=torch.float32)
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
        """Restart grid mode's random sampling from ``seed`` (results become reproducible again)."""
        self._generators.clear()

    def _correct(self, name: str, output: Tensor) -> Tensor:
        self.stats.check_output(name, output)
        axis = self.stats.channel_axes[name] % output.dim()
        q = self._table(name, output.device)
        if self.mode == "exact":
            moved = output.movedim(axis, 0)
            y = transport_exact(moved.reshape(moved.shape[0], -1), q)
            y = y.reshape(moved.shape).movedim(0, axis).contiguous()
        else:
            y = self._correct_grid(name, output, axis, q)
        lam = self.strengths[name]
        return y if lam == 1.0 else torch.lerp(output, y, lam)

    def _correct_grid(self, name: str, output: Tensor, axis: int, q: Tensor) -> Tensor:
        """Grid mode on one site's output, in the output's own memory layout."""
        if _is_channels_last(output, axis):  # work on the NHWC view: no layout change
            return self._correct_grid(name, output.permute(0, 2, 3, 1), 3, q).permute(0, 3, 1, 2)
        c = output.shape[axis]
        n = output.numel() // c
        if self.grid_sample is not None and self.grid_sample < n:
            values = sample_channel_values(output, axis, self.grid_sample,
                                           self._generator(output.device))
        else:
            values = output.movedim(axis, 0).reshape(c, n)
        # no finer cells than about 4 values each: finer ones add cost, not accuracy
        knots = min(self.knots, max(32, values.shape[1] // 4))
        lut = lut_from_sample(values, q, knots)
        return apply_lut(output, lut, axis, self._grid(output, axis))

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
                 **options) -> dict[str, dict[str, float]]:
    """Per site, the mean per-channel W1 distance to the reference before and after correction.

    "Before" is the plain model's site output, "after" the corrected model's site output (with
    upstream sites corrected too). W1 is the quantity the exact transport minimises.

    Args:
        model: the network.
        stats: its reference statistics.
        batch: an input batch.
        **options: options of `DMC` (mode, strength, sites, …).

    Returns:
        ``{site: {"before": w1, "after": w1}}`` in model order.
    """
    report: dict[str, dict[str, float]] = {}

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
    return report


def format_shift_report(report: Mapping[str, Mapping[str, float]]) -> str:
    """The output of `shift_report` as a Markdown table with the relative reduction."""
    lines = ["| site | W1 before | W1 after | reduction |", "|---|---:|---:|---:|"]
    for name, row in report.items():
        red = 1 - row["after"] / row["before"] if row["before"] > 0 else 0.0
        lines.append(f"| {name} | {row['before']:.4f} | {row['after']:.4f} | {red:.0%} |")
    return "\n".join(lines)
