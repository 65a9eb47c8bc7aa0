"""``report.md``: the tables of a results folder, computed from ``results.csv`` and ``config.json``.

Tables (all errors are top-1 in %, seeds averaged first; the lowest value of a row in bold):

1. summary per method: clean error, mean at the top severity (5), mean over all severities, and the
   difference and ratio to ``source``;
2. per corruption at the top severity, methods as columns;
3. mean over corruptions per severity;
4. mean over all corrupted cells per batch size (when several were run);
5. iid vs label-shifted streams: per batch size and method, the mean over corrupted cells (clean
   error when no corruption ran) in ``iid`` and in every ``label-shift-<alpha>`` stream, and the
   difference (when ``iid`` and at least one label-shifted stream ran).
6. spread over stream seeds: per batch size and stream, each method's lowest and highest seed mean
   at the top severity (with two or more seeds).

On ImageNet-C (``config["data"]["kind"] == "imagenet-c"``) a section after table 1 gives each
method's mCE and relative mCE (AlexNet-normalised, :mod:`.mce`) and its CE per corruption, for the
primary batch size and stream (and the mCE per batch size and stream when several ran); other data
kinds have none (no published AlexNet errors for them, Tiny-ImageNet-C included).

Tables 1–3 use the first batch size of the protocol (the "primary" one); tables 1–4 use the first
stream of the protocol (the primary one, ``iid`` by default). Means never mix streams.

When ``config["data"]["images"]`` is present, a line says which test images were used.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from . import mce as _mce
from .metrics import Summary, read_results
from .streams import IID

__all__ = ["render_report", "write_report", "finish"]


def _fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _row(label: str, values: Sequence[float | None], *, bold_min: bool = True, digits: int = 2) -> str:
    present = [v for v in values if v is not None]
    best = min(present) if (present and bold_min and len(present) > 1) else None
    cells = [f"**{_fmt(v, digits)}**" if best is not None and v == best else _fmt(v, digits) for v in values]
    return "| " + " | ".join([label, *cells]) + " |"


def _table(header: Sequence[str], rows: list[str]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
        *rows,
    ]


def _stream_section(summary: Summary) -> list[str]:
    """Table 5: iid vs every label-shifted stream, per batch size and method (empty if not both)."""
    shifted = [st for st in summary.streams if st != IID]
    if IID not in summary.streams or not shifted:
        return []
    corrupted = bool(summary.severities and summary.corruptions)

    def value(m: str, b: int, st: str) -> float | None:
        return summary.overall_mean(m, b, st) if corrupted else summary.clean(m, b, st)

    header = ["batch size", "method", IID]
    for st in shifted:
        header += [st, f"Δ {st} (pp)"]
    body = []
    for b in summary.batch_sizes:  # only the batch sizes that ran in iid and a shifted stream
        if not any(value(m, b, IID) is not None for m in summary.methods) or not any(
                value(m, b, st) is not None for m in summary.methods for st in shifted):
            continue
        for m in summary.methods:
            base = value(m, b, IID)
            cells = [_fmt(base)]
            for st in shifted:
                v = value(m, b, st)
                cells += [_fmt(v), _fmt(None if v is None or base is None else v - base)]
            body.append("| " + " | ".join([str(b), m, *cells]) + " |")
    if not body:
        return []
    what = "mean over all corrupted cells" if corrupted else "clean error"
    return [
        f"## iid vs label-shifted streams ({what}, top-1 error %)",
        "",
        "The same images in another order: Δ is the label-shifted error minus the iid error (pp).",
        "",
        *_table(header, body),
        "",
    ]


def _seed_section(summary: Summary) -> list[str]:
    """Table 6: per batch size and stream, each method's lowest–highest seed mean at the top
    severity (empty with one seed)."""
    top = summary.top_severity
    if len(summary.seeds) < 2 or top is None:
        return []
    body = []
    for st in summary.streams:
        for b in summary.batch_sizes_of(st):
            spans = [summary.seed_range(m, top, b, st) for m in summary.methods]
            if not any(spans):
                continue
            label = str(b) if st == IID else f"{b}, {st}"
            cells = ["–" if r is None else f"{r[0]:.2f}–{r[1]:.2f}" for r in spans]
            body.append("| " + " | ".join([label, *cells]) + " |")
    if not body:
        return []
    return [
        f"## Spread over stream seeds (severity {top}, top-1 error %)",
        "",
        f"Each seed's mean over the corruptions, lowest–highest over the seeds {summary.seeds} "
        "(only seeds that ran every corruption); the tables above show the mean over seeds.",
        "",
        *_table(["batch size", *summary.methods], body),
        "",
    ]


#: The data kinds whose report has the mCE section (those with published AlexNet errors).
MCE_KINDS: tuple[str, ...] = ("imagenet-c",)


def _images_line(images: dict | None) -> str | None:
    """``config["data"]["images"]`` in words (``None`` when absent): which test images were used."""
    if not images:
        return None
    sel, n = images.get("selection"), images.get("n", "?")
    if sel == "all":
        return f"- Images: all {n} of each set."
    if sel == "first":
        return f"- Images: the first {n} of each set."
    if sel == "ids":
        sha = images.get("ids_sha256")
        return (
            f"- Images: {n} listed in `{images.get('ids_file', '?')}`"
            + (f" (sha256 {sha[:12]}…)" if sha else "")
            + "."
        )
    return f"- Images: {sel} ({n})."


def _mce_section(summary: Summary, bs: int, tag: str, images: dict | None) -> list[str]:
    """The ImageNet-C section: mCE and relative mCE per method, CE per corruption, what is missing."""
    methods = summary.methods
    scores = {m: _mce.imagenet_c_scores(summary, m, bs) for m in methods}
    lines = [
        "## mCE (ImageNet-C, AlexNet-normalised)",
        "",
        "Hendrycks & Dietterich 2019 (arXiv:1903.12261): CE_c = Σ_s E_{s,c} / Σ_s E^AlexNet_{s,c} "
        "over severities 1–5; relative CE_c = Σ_s (E_{s,c} − E_clean) / Σ_s (E^AlexNet_{s,c} − "
        "E^AlexNet_clean); mCE and relative mCE are their means over the 15 corruptions, in % "
        "(100 = as AlexNet; lower is better). E is each method's error (seeds averaged first), "
        "E_clean its clean error at the same batch size and stream.",
        "",
    ]
    if images and images.get("selection") != "all":
        lines += [
            "Not on all of ImageNet-C's images (see *Images* above): not exactly comparable with "
            "published mCEs.",
            "",
        ]
    body = [
        "| " + " | ".join([m, _fmt(scores[m].mce.percent), _fmt(scores[m].relative_mce.percent)]) + " |"
        for m in methods
    ]
    lines += [
        f"### mCE per method (batch size {bs}{tag})",
        "",
        *_table(["method", "mCE (%)", "relative mCE (%)"], body),
        "",
    ]
    # what is missing, methods with the same gaps together
    gaps: dict[str, list[str]] = {}
    for m in methods:
        s = scores[m]
        if s.mce.reason:
            gaps.setdefault(f"no mCE: {s.mce.reason}", []).append(m)
        elif s.relative_mce.reason:
            gaps.setdefault(f"no relative mCE: {s.relative_mce.reason}", []).append(m)
    if gaps:
        lines += [f"- {', '.join(ms)}: {why}." for why, ms in gaps.items()]
        lines.append("")
    body = [
        _row(c, [None if scores[m].ce[c] is None else 100.0 * scores[m].ce[c] for m in methods])
        for c in _mce.IMAGENET_C_CORRUPTIONS
    ]
    lines += [
        f"### CE per corruption (batch size {bs}{tag}, %, AlexNet = 100)",
        "",
        *_table(["corruption", *methods], body),
        "",
    ]
    combos = [(b, st) for st in summary.streams for b in summary.batch_sizes_of(st)]
    if len(combos) > 1:
        body = [
            _row(
                str(b) if st == IID else f"{b}, {st}",
                [_mce.imagenet_c_scores(summary, m, b, st).mce.percent for m in methods],
            )
            for b, st in combos
        ]
        lines += [
            "### mCE per batch size and stream (%)",
            "",
            *_table(["batch size", *methods], body),
            "",
        ]
    return lines


def render_report(rows: list[dict], config: dict, plots: Sequence[str] = ()) -> str:
    """The Markdown text of ``report.md``.

    Args:
        rows: results rows (:func:`~torch_dmc.bench.metrics.read_results`).
        config: the folder's ``config.json`` content.
        plots: PNG file names to link at the end.
    """
    protocol = config.get("protocol", {})
    summary = Summary(rows, protocol.get("methods"), protocol.get("corruptions"), protocol.get("streams"))
    methods = summary.methods
    bs_list = protocol.get("batch_sizes") or summary.batch_sizes
    bs = next((b for b in bs_list if b in summary.batch_sizes), bs_list[0] if bs_list else None)
    top = summary.top_severity
    regime = protocol.get("setting") or ("continual" if protocol.get("continual") else "episodic")

    lines = [
        f"# DMC benchmark: {config.get('data', {}).get('name') or config.get('data', {}).get('spec', '?')}",
        "",
        "```",
        config.get("command", ""),
        "```",
        "",
    ]
    if config.get("explicit_command"):
        lines += [
            "Same protocol, every option explicit:",
            "",
            "```",
            config["explicit_command"],
            "```",
            "",
        ]
    data, model, stats = config.get("data", {}), config.get("model", {}), config.get("stats")
    versions, git = config.get("versions", {}), config.get("git")
    mach = config.get("machine", {})
    n_seeds = len(protocol.get("seeds", []))
    lines += [
        f"- Protocol: {regime}; {data.get('n_test') or data.get('images', {}).get('n', 'all')} test "
        "images; corruptions "
        f"{', '.join(summary.corruptions) or '–'}; severities "
        f"{', '.join(map(str, summary.severities)) or '–'} (clean = 0); batch sizes "
        f"{', '.join(map(str, summary.batch_sizes))}; stream(s) "
        f"{', '.join(summary.streams or protocol.get('streams') or [IID])}; {n_seeds} stream seed(s) "
        f"{protocol.get('seeds')}"
        + (
            ""
            if n_seeds < 2
            else " at every severity"
            if protocol.get("all_seeds_at") is None
            else f" at severities {protocol.get('all_seeds_at')} (0 = clean), the first seed elsewhere"
        )
        + "; "
        f"corruption generation seed {protocol.get('gen_seed')}.",
        *filter(None, [_images_line(data.get("images"))]),
        f"- Model: {model.get('source')} ({model.get('class')}, {model.get('parameters')} "
        f"parameters); files "
        + (", ".join(f"{k} sha256 {v[:12]}…" for k, v in model.get("files_sha256", {}).items()) or "–")
        + ".",
    ]
    if stats:
        fit = stats.get("fit_info", {})
        lines.append(
            f"- DMC stats: {len(stats.get('sites', []))} sites, K = {stats.get('levels')}, "
            f"fitted on {fit.get('images', protocol.get('fit_images') or 'all')} training images; "
            f"checksum {stats.get('checksum', '')[:12]}…."
        )
    lines.append(
        f"- torch-dmc {versions.get('torch-dmc')}, torch {versions.get('torch')}, "
        f"imagecorruptions-imaug {versions.get('imagecorruptions-imaug')}; git "
        + (f"{git['commit'][:12]}{' (dirty)' if git.get('dirty') else ''}" if git else "–")
        + f"; {mach.get('platform')}, {mach.get('cpu_count')} CPUs, "
        f"{mach.get('torch_threads')} torch threads; wall time {config.get('wall_s', '?')} s."
    )
    lines.append("")

    if bs is None or not methods:
        lines += ["No results yet.", ""]
        return "\n".join(lines)

    # the primary stream's name in headings, when it is not the only, iid, one
    tag = "" if summary.streams in ([], [IID]) else f", stream {summary.stream}"
    paren = f" (stream {summary.stream})" if tag else ""

    # 1. summary
    ref = "source" if "source" in methods else None
    header = [
        "method",
        "clean",
        f"mean sev {top}" if top else "mean sev –",
        "mean sev 1–5" if summary.severities == [1, 2, 3, 4, 5] else "mean all sev",
    ]
    if ref:
        header += ["Δ vs source (pp)", "rel. to source (%)"]
    body = []
    for m in methods:
        vals = [
            summary.clean(m, bs),
            summary.severity_mean(m, top, bs) if top else None,
            summary.overall_mean(m, bs),
        ]
        cells = [_fmt(v) for v in vals]
        if ref:
            a, b = summary.overall_mean(m, bs), summary.overall_mean(ref, bs)
            cells += [
                _fmt(None if a is None or b is None else a - b, 2),
                _fmt(summary.relative(m, bs, ref), 1),
            ]
        body.append("| " + " | ".join([m, *cells]) + " |")
    lines += [f"## Summary (batch size {bs}{tag}, top-1 error %)", "", *_table(header, body), ""]

    # ImageNet-C: mCE and relative mCE
    if data.get("kind") in MCE_KINDS:
        lines += _mce_section(summary, bs, tag, data.get("images"))

    # 2. per corruption at the top severity
    if top is not None:
        body = [_row(c, [summary.error(m, c, top, bs) for m in methods]) for c in summary.corruptions]
        body.append(_row("**mean**", [summary.severity_mean(m, top, bs) for m in methods]))
        lines += [
            f"## Severity {top}, per corruption (batch size {bs}{tag}, mean over seeds)",
            "",
            *_table(["corruption", *methods], body),
            "",
        ]

    # 3. per severity
    body = [_row("0 (clean)", [summary.clean(m, bs) for m in methods])]
    body += [_row(str(s), [summary.severity_mean(m, s, bs) for m in methods]) for s in summary.severities]
    body.append(
        _row(
            "**mean 1–5**" if summary.severities == [1, 2, 3, 4, 5] else "**mean**",
            [summary.overall_mean(m, bs) for m in methods],
        )
    )
    lines += [
        f"## Mean over corruptions per severity (batch size {bs}{tag})",
        "",
        *_table(["severity", *methods], body),
        "",
    ]

    # 4. batch size
    if len(summary.batch_sizes) > 1:
        body = [_row(str(b), [summary.overall_mean(m, b) for m in methods]) for b in summary.batch_sizes]
        lines += [
            f"## Mean over all corrupted cells per batch size{paren}",
            "",
            *_table(["batch size", *methods], body),
            "",
        ]
        body = [_row(str(b), [summary.clean(m, b) for m in methods]) for b in summary.batch_sizes]
        lines += [
            f"## Clean error per batch size{paren}",
            "",
            *_table(["batch size", *methods], body),
            "",
        ]

    # 5. iid vs label-shifted
    lines += _stream_section(summary)

    # 6. spread over seeds
    lines += _seed_section(summary)

    # methods
    lines += ["## Methods", ""]
    for m in methods:
        info = config.get("methods", {}).get(m, {})
        opts = json.dumps(info.get("options", {}), ensure_ascii=False)
        lines.append(f"- **{m}** `{opts}`: {info.get('definition', '')}")
    lines.append("")
    notes = config.get("protocol_notes")
    if notes:
        lines += ["## How to read the numbers", ""]
        lines += [f"- {k}: {v}." for k, v in notes.items()]
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
        lines.append("")
    return "\n".join(lines)


def write_report(out: str | Path, config: dict | None = None, plots: Sequence[str] = ()) -> Path:
    """Write ``out/report.md`` from ``out/results.csv`` and ``out/config.json``."""
    out = Path(out)
    if config is None:
        config = json.loads((out / "config.json").read_text())
    rows = read_results(out / "results.csv")
    path = out / "report.md"
    path.write_text(render_report(rows, config, plots))
    return path


def finish(
    out: str | Path,
    config: dict | None = None,
    *,
    plots: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the plots (if ``plots``) and ``report.md`` of a results folder; returns its path."""
    from .plots import write_plots

    out = Path(out)
    if config is None:
        config = json.loads((out / "config.json").read_text())
    rows = read_results(out / "results.csv")
    names: list[str] = []
    if plots:
        try:
            names = write_plots(rows, config, out)
        except ImportError as err:
            log(f"no plots: {err}")
    path = write_report(out, config, names)
    log(f"wrote {path}")
    return path
