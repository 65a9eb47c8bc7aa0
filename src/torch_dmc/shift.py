"""Measure the shift: per site, the W1 distance to the reference before and after correction.

W1 is the quantity the exact transport minimises (docs/method.md § Shift report).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .correct import corrected
from .sites import register_output_hooks
from .stats_io import ReferenceStats
from .transport import wasserstein1

__all__ = ["shift_report", "format_shift_report"]


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
