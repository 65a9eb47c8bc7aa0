"""PNG plots of a results folder (matplotlib, Agg backend; ``pip install torch-dmc[plots]``).

- ``heatmap.png``: error per corruption × severity, one panel per method, one colour scale;
- ``severity_top.png``: grouped bars per corruption at the top severity (5), one bar per method;
- ``batch_size.png``: mean error over corrupted cells against batch size (log-2 axis), one line
  per method (only if several batch sizes ran); one figure per stream, ``batch_size.png`` for
  ``iid`` and ``batch_size_<stream>.png`` for the others;
- ``streams.png``: iid vs label-shifted bars, one group per method, one bar per stream, one panel
  per batch size that has both (only if ``iid`` and a ``label-shift-<alpha>`` stream ran).

The heatmap and the severity bars use the protocol's first batch size and first stream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import Summary
from .streams import IID

__all__ = ["write_plots"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            f"plots need matplotlib ({err}); install it with `pip install torch-dmc[plots]`."
        ) from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_plots(rows: list[dict], config: dict, out: str | Path) -> list[str]:
    """Write the PNG plots into ``out``; returns their file names (none when there are no rows).

    Raises:
        ImportError: matplotlib is not installed.
    """
    if not rows:
        return []
    plt = _pyplot()
    out = Path(out)
    protocol = config.get("protocol", {})
    s = Summary(rows, protocol.get("methods"), protocol.get("corruptions"), protocol.get("streams"))
    bs_list = [b for b in protocol.get("batch_sizes", []) if b in s.batch_sizes] or s.batch_sizes
    bs = bs_list[0]
    written: list[str] = []
    corr, sevs, methods = s.corruptions, s.severities, s.methods
    tag = "" if s.streams in ([], [IID]) else f", stream {s.stream}"

    if corr and sevs:
        grids = {
            m: np.array(
                [[np.nan if (v := s.error(m, c, sv, bs)) is None else v for sv in sevs] for c in corr]
            )
            for m in methods
        }
        vmax = max(np.nanmax(g) if np.isfinite(g).any() else 0.0 for g in grids.values()) or 1.0
        ncol = min(3, len(methods))
        nrow = (len(methods) + ncol - 1) // ncol
        fig, axes = plt.subplots(
            nrow,
            ncol,
            figsize=(
                3.0 + max(2.0, 0.6 * len(sevs)) * ncol,
                1.0 + max(1.8, 0.3 * len(corr) + 0.8) * nrow,
            ),
            squeeze=False,
            constrained_layout=True,
        )
        im = None
        for k, ax in enumerate(axes.flat):
            if k >= len(methods):
                ax.axis("off")
                continue
            m = methods[k]
            im = ax.imshow(grids[m], vmin=0, vmax=vmax, cmap="viridis", aspect="auto")
            ax.set_title(m, fontsize=10)
            ax.set_xticks(range(len(sevs)), [str(v) for v in sevs], fontsize=8)
            ax.set_yticks(range(len(corr)), corr if k % ncol == 0 else [""] * len(corr), fontsize=7)
            ax.set_xlabel("severity", fontsize=8)
            if len(sevs) * len(corr) <= 120:
                for i in range(len(corr)):
                    for j in range(len(sevs)):
                        v = grids[m][i, j]
                        if np.isfinite(v):
                            ax.text(
                                j,
                                i,
                                f"{v:.0f}",
                                ha="center",
                                va="center",
                                fontsize=6,
                                color="white" if v < 0.6 * vmax else "black",
                            )
        if im is not None:
            fig.colorbar(im, ax=axes, shrink=0.8, label="top-1 error (%)")
        fig.suptitle(f"error per corruption and severity (batch size {bs}{tag})", fontsize=11)
        fig.savefig(out / "heatmap.png", dpi=110)
        plt.close(fig)
        written.append("heatmap.png")

    top = s.top_severity
    if corr and top is not None:
        fig, ax = plt.subplots(
            figsize=(max(6.0, 0.65 * len(corr) * max(1, len(methods)) / 3 + 3), 4.0),
            constrained_layout=True,
        )
        width = 0.8 / max(1, len(methods))
        x = np.arange(len(corr))
        for k, m in enumerate(methods):
            vals = [np.nan if (v := s.error(m, c, top, bs)) is None else v for c in corr]
            ax.bar(x + (k - (len(methods) - 1) / 2) * width, vals, width, label=m)
        ax.set_xticks(x, corr, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("top-1 error (%)")
        ax.set_title(f"severity {top}, batch size {bs}{tag}")
        ax.legend(fontsize=8, ncol=min(len(methods), 6))
        ax.grid(axis="y", alpha=0.3)
        fig.savefig(out / "severity_top.png", dpi=110)
        plt.close(fig)
        written.append("severity_top.png")

    for stream in s.streams:
        sizes = s.batch_sizes_of(stream)
        if len(sizes) < 2 or not sevs:
            continue
        fig, ax = plt.subplots(figsize=(6.0, 4.0), constrained_layout=True)
        for m in methods:
            ys = [s.overall_mean(m, b, stream) for b in sizes]
            ax.plot(sizes, [np.nan if y is None else y for y in ys], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
        ax.set_xlabel("batch size (log scale)")
        ax.set_ylabel("mean top-1 error over corrupted cells (%)")
        ax.set_title(f"error vs batch size, stream {stream}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        name = "batch_size.png" if stream == IID else f"batch_size_{stream}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    name = _stream_bars(plt, s, out)
    if name:
        written.append(name)
    return written


def _stream_bars(plt, s: Summary, out: Path) -> str | None:
    """``streams.png``: iid vs label-shifted error per method, a panel per batch size with both."""
    shifted = [st for st in s.streams if st != IID]
    if IID not in s.streams or not shifted:
        return None
    corrupted = bool(s.severities and s.corruptions)

    def value(m: str, b: int, st: str) -> float:
        v = s.overall_mean(m, b, st) if corrupted else s.clean(m, b, st)
        return np.nan if v is None else v

    both = set(s.batch_sizes_of(IID)) & {b for st in shifted for b in s.batch_sizes_of(st)}
    sizes = sorted(both)
    if not sizes:
        return None
    streams = [IID, *shifted]
    fig, axes = plt.subplots(
        1,
        len(sizes),
        figsize=(max(5.0, 0.5 * len(s.methods) * len(streams) / 2 + 2.5) * len(sizes), 4.0),
        squeeze=False,
        sharey=True,
        constrained_layout=True,
    )
    width = 0.8 / len(streams)
    x = np.arange(len(s.methods))
    for ax, b in zip(axes.flat, sizes, strict=True):
        for k, st in enumerate(streams):
            vals = [value(m, b, st) for m in s.methods]
            ax.bar(x + (k - (len(streams) - 1) / 2) * width, vals, width, label=st)
        ax.set_xticks(x, s.methods, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"batch size {b}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].set_ylabel(
        "mean top-1 error over corrupted cells (%)" if corrupted else "clean top-1 error (%)"
    )
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle("iid vs label-shifted test streams (same images, another order)", fontsize=11)
    fig.savefig(out / "streams.png", dpi=110)
    plt.close(fig)
    return "streams.png"
