"""PNG plots of a results folder (matplotlib, Agg backend; ``pip install torch-dmc[plots]``).

- ``heatmap.png``: error per corruption × severity, one panel per method, one colour scale;
- ``severity_top.png``: grouped bars per corruption at the top severity (5), one bar per method;
- ``batch_size.png``: mean error over corrupted cells against batch size (only if several).

All use the protocol's first batch size except the batch-size plot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import Summary

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
    s = Summary(rows, protocol.get("methods"), protocol.get("corruptions"))
    bs_list = [b for b in protocol.get("batch_sizes", []) if b in s.batch_sizes] or s.batch_sizes
    bs = bs_list[0]
    written: list[str] = []
    corr, sevs, methods = s.corruptions, s.severities, s.methods

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
        fig.suptitle(f"error per corruption and severity (batch size {bs})", fontsize=11)
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
        ax.set_title(f"severity {top}, batch size {bs}")
        ax.legend(fontsize=8, ncol=min(len(methods), 6))
        ax.grid(axis="y", alpha=0.3)
        fig.savefig(out / "severity_top.png", dpi=110)
        plt.close(fig)
        written.append("severity_top.png")

    if len(s.batch_sizes) > 1 and sevs:
        fig, ax = plt.subplots(figsize=(6.0, 4.0), constrained_layout=True)
        for m in methods:
            ys = [s.overall_mean(m, b) for b in s.batch_sizes]
            ax.plot(s.batch_sizes, [np.nan if y is None else y for y in ys], marker="o", label=m)
        ax.set_xscale("log")
        ax.set_xticks(s.batch_sizes, [str(b) for b in s.batch_sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel("mean top-1 error over corrupted cells (%)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.savefig(out / "batch_size.png", dpi=110)
        plt.close(fig)
        written.append("batch_size.png")
    return written
