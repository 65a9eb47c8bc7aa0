"""Tests of ImageNet-C's mCE and relative mCE (``torch_dmc.bench.mce``) and their report section."""

from __future__ import annotations

import random

import pytest

from torch_dmc.bench import mce as M
from torch_dmc.bench.metrics import Summary
from torch_dmc.bench.protocol import CLEAN
from torch_dmc.bench.report import render_report
from torch_dmc.data.corruptions import COMMON_CORRUPTIONS

SEV = (1, 2, 3, 4, 5)


def row(method, corruption, severity, error, *, seed=0, batch_size=64, stream="iid") -> dict:
    """A results.csv row (error in %, as read_results gives it)."""
    key = {"method": method, "corruption": corruption, "severity": severity, "batch_size": batch_size}
    return {**key, "seed": seed, "stream": stream, "n": 50000, "n_wrong": round(error * 500), "error": error}


def scaled_rows(
    method: str, factor: float, *, spread: float = 3.0, clean: float | None = None, **kw
) -> list[dict]:
    """Rows of a model whose mean error over severities is ``factor`` × AlexNet's on every corruption.

    Severity ``s`` gets ``100 · factor · E^AlexNet_c + spread · (s − 3)`` %: the offsets sum to 0.
    """
    rows = [
        row(method, c, s, 100.0 * factor * a + spread * (s - 3), **kw)
        for c, a in M.ALEXNET_ERRORS.items()
        for s in SEV
    ]
    if clean is not None:
        rows.append(row(method, CLEAN, 0, clean, **kw))
    return rows


def test_constants():
    assert tuple(M.ALEXNET_ERRORS) == COMMON_CORRUPTIONS == M.IMAGENET_C_CORRUPTIONS
    assert len(M.ALEXNET_ERRORS) == 15
    assert all(0.5 < v < 1.0 for v in M.ALEXNET_ERRORS.values())  # fractions, not %
    assert M.ALEXNET_ERRORS["gaussian_noise"] == 0.886428 and M.ALEXNET_ERRORS["jpeg_compression"] == 0.6065
    assert M.ALEXNET_CLEAN_ERROR == pytest.approx(1 - 0.56522)
    # every relative-CE denominator is positive (AlexNet errs more on every corruption than clean)
    assert min(M.ALEXNET_ERRORS.values()) - M.ALEXNET_CLEAN_ERROR > 0.1


def test_ce_of_a_model_with_a_known_fraction_of_alexnets_error():
    errors = M.cell_errors(scaled_rows("m", 0.6), "m", 64)
    assert errors[("fog", 5)] == pytest.approx(100 * 0.6 * 0.819324 + 6.0)  # % as in the rows
    ce = M.corruption_errors(errors)
    assert list(ce) == list(COMMON_CORRUPTIONS)
    for c in COMMON_CORRUPTIONS:
        assert ce[c] == pytest.approx(0.6)  # not 60 (percent / fraction), not 0.006
    r = M.mce(errors)
    assert r.complete and not r.partial and r.reason is None and r.missing == {}
    assert r.value == pytest.approx(0.6) and r.percent == pytest.approx(60.0)
    assert r.corruptions_used == COMMON_CORRUPTIONS
    # AlexNet's own errors give CE 1 everywhere
    assert M.mce(M.cell_errors(scaled_rows("a", 1.0, spread=0.0), "a", 64)).value == pytest.approx(1.0)


def test_brute_force_against_the_sum_formula():
    rng = random.Random(0)
    err = {(c, s): rng.uniform(5, 95) for c in COMMON_CORRUPTIONS for s in SEV}
    clean = 23.7
    err[(CLEAN, 0)] = clean
    ce, rel = M.corruption_errors(err), M.relative_corruption_errors(err)
    for c in COMMON_CORRUPTIONS:
        num = sum(err[(c, s)] / 100 for s in SEV)
        assert ce[c] == pytest.approx(num / (5 * M.ALEXNET_ERRORS[c]), rel=1e-12)
        num = sum(err[(c, s)] / 100 - clean / 100 for s in SEV)
        den = sum(M.ALEXNET_ERRORS[c] - M.ALEXNET_CLEAN_ERROR for _ in SEV)
        assert rel[c] == pytest.approx(num / den, rel=1e-12)
    assert M.mce(err).value == pytest.approx(sum(ce.values()) / 15, rel=1e-12)
    assert M.relative_mce(err).value == pytest.approx(sum(rel.values()) / 15, rel=1e-12)
    # an explicit clean error overrides the stored one
    assert M.relative_mce(err, clean=0.0).value != pytest.approx(M.relative_mce(err).value)


def test_relative_mce_with_clean_rows():
    # mean error = clean + 0.7 · (AlexNet_c − AlexNet_clean), in %: relative CE 0.7 everywhere
    clean = 20.0
    rows = [
        row("m", c, s, clean + 70.0 * (a - M.ALEXNET_CLEAN_ERROR) + 2.0 * (s - 3))
        for c, a in M.ALEXNET_ERRORS.items()
        for s in SEV
    ]
    errors = M.cell_errors(rows, "m", 64)
    no_clean = M.relative_mce(errors)
    assert no_clean.value is None and no_clean.reason == "no clean error" and not no_clean.partial
    assert all(v is None for v in M.relative_corruption_errors(errors).values())
    assert M.mce(errors).complete  # the mCE does not need the clean error

    rows.append(row("m", CLEAN, 0, clean))
    s = M.imagenet_c_scores(rows, "m", 64)
    assert s.clean == clean
    assert all(v == pytest.approx(0.7) for v in s.relative_ce.values())
    assert s.relative_mce.value == pytest.approx(0.7) and s.relative_mce.percent == pytest.approx(70.0)
    # the plain CE of the same rows: (clean + 0.7 (a − a_clean)) / a, per corruption
    for c, a in M.ALEXNET_ERRORS.items():
        assert s.ce[c] == pytest.approx((0.2 + 0.7 * (a - M.ALEXNET_CLEAN_ERROR)) / a)


def test_missing_severity_or_corruption_is_never_averaged_over():
    rows = [r for r in scaled_rows("m", 0.5) if not (r["corruption"] == "fog" and r["severity"] == 2)]
    errors = M.cell_errors(rows, "m", 64)
    ce = M.corruption_errors(errors)
    assert ce["fog"] is None and ce["snow"] == pytest.approx(0.5)
    r = M.mce(errors)
    assert r.value is None and r.percent is None and not r.complete and r.partial
    assert r.missing == {"fog": (2,)} and "fog" not in r.corruptions_used and len(r.corruptions_used) == 14
    assert r.partial_value == pytest.approx(0.5) and r.reason == "missing fog (severity 2)"

    # a whole corruption absent, another with two severities absent
    rows = [r for r in scaled_rows("m", 0.5) if r["corruption"] != "contrast"
            and not (r["corruption"] in ("snow", "frost") and r["severity"] in (1, 2))]  # fmt: skip
    r = M.mce(M.cell_errors(rows, "m", 64))
    assert r.value is None and r.missing == {"snow": (1, 2), "frost": (1, 2), "contrast": SEV}
    assert r.reason == "missing snow, frost (severities 1, 2); contrast (all severities)"

    # a severity-5-only run (--quick): nothing complete, no partial value either
    r = M.mce(M.cell_errors([r for r in scaled_rows("m", 0.5) if r["severity"] == 5], "m", 64))
    assert r.value is None and r.partial_value is None and not r.partial and r.corruptions_used == ()
    assert r.reason == "missing all 15 corruptions at severities 1, 2, 3, 4"
    assert M.mce({}).reason == "missing all 15 corruptions (none ran)"
    # other corruptions (validation ones) are ignored, neither counted nor required
    extra = scaled_rows("m", 0.5) + [row("m", "spatter", s, 99.0) for s in SEV]
    assert M.mce(M.cell_errors(extra, "m", 64)).value == pytest.approx(0.5)


def test_seeds_averaged_first_and_cells_not_mixed():
    rows = scaled_rows("m", 0.5, spread=0.0)
    # fog severity 5: seed 0 at 0.5 · AlexNet (from scaled_rows), seeds 1 and 2 at +10 and +20 pp:
    # seed mean = +10 pp at severity 5 → fog's mean over severities +2 pp. Pooling the 7 rows
    # would give +30/7 pp instead.
    rows += [row("m", "fog", 5, 100 * 0.5 * 0.819324 + d, seed=k) for k, d in ((1, 10.0), (2, 20.0))]
    # other batch sizes, streams and methods must not leak in
    rows += [row("m", "fog", 5, 99.0, batch_size=16), row("m", "fog", 5, 99.0, stream="label-shift-0.1"),
             row("x", "fog", 5, 99.0)]  # fmt: skip
    ce = M.corruption_errors(M.cell_errors(rows, "m", 64, "iid"))
    assert ce["fog"] == pytest.approx((0.5 * 0.819324 + 0.02) / 0.819324)
    assert ce["snow"] == pytest.approx(0.5)
    # from a Summary: the same, its primary stream by default
    s = Summary(rows, streams=["iid", "label-shift-0.1"])
    assert M.corruption_errors(M.cell_errors(s, "m", 64))["fog"] == pytest.approx(ce["fog"])
    other = M.cell_errors(s, "m", 64, "label-shift-0.1")
    assert other == {("fog", 5): 99.0}


def test_describe_missing():
    assert M.describe_missing({}) == "nothing"
    assert M.describe_missing({"fog": SEV}) == "fog (all severities)"
    assert M.describe_missing({c: (5,) for c in COMMON_CORRUPTIONS}) == "all 15 corruptions at severity 5"


# -- report ------------------------------------------------------------------------------------
def config(kind: str | None, images: dict | None = None) -> dict:
    data: dict = {"name": "test set"}
    if kind is not None:
        data["kind"] = kind
    if images is not None:
        data["images"] = images
    return {"protocol": {"methods": ["source", "dmc"], "seeds": [0], "batch_sizes": [64]}, "data": data}


def report_rows() -> list[dict]:
    return scaled_rows("source", 0.8, clean=24.0) + scaled_rows("dmc", 0.5, clean=24.5)


def section(report: str, title: str) -> str:
    return report.split(title, 1)[1].split("\n## ", 1)[0]


def test_report_imagenet_c_section():
    report = render_report(report_rows(), config("imagenet-c"))
    assert "## mCE (ImageNet-C, AlexNet-normalised)" in report
    # it follows the summary and precedes the per-corruption table
    assert report.index("## Summary") < report.index("## mCE (ImageNet-C") < report.index("## Severity 5")
    text = section(report, "## mCE (ImageNet-C, AlexNet-normalised)")
    rel_src = sum((0.8 * a - 0.24) / (a - M.ALEXNET_CLEAN_ERROR) for a in M.ALEXNET_ERRORS.values()) / 15
    rel_dmc = sum((0.5 * a - 0.245) / (a - M.ALEXNET_CLEAN_ERROR) for a in M.ALEXNET_ERRORS.values()) / 15
    assert f"| source | 80.00 | {100 * rel_src:.2f} |" in text
    assert f"| dmc | 50.00 | {100 * rel_dmc:.2f} |" in text
    assert "| fog | 80.00 | **50.00** |" in text and "| jpeg_compression | 80.00 | **50.00** |" in text
    assert "no mCE" not in text and "per batch size and stream" not in text


def test_report_imagenet_c_says_what_is_missing():
    rows = [r for r in report_rows() if not (r["method"] == "dmc" and r["corruption"] == "snow")]
    rows = [r for r in rows if not (r["method"] == "source" and r["corruption"] == CLEAN)]
    text = section(render_report(rows, config("imagenet-c")), "## mCE (ImageNet-C")
    assert "| dmc | – | – |" in text and "| source | 80.00 | – |" in text
    assert "- dmc: no mCE: missing snow (all severities)." in text
    assert "- source: no relative mCE: no clean error." in text
    assert "| snow | 80.00 | – |" in text
    # a --quick run (severity 5 only): one line for both methods
    rows = [r for r in report_rows() if r["severity"] in (0, 5)]
    text = section(render_report(rows, config("imagenet-c")), "## mCE (ImageNet-C")
    assert "- source, dmc: no mCE: missing all 15 corruptions at severities 1, 2, 3, 4." in text


def test_report_mce_per_batch_size_and_stream():
    rows = (
        report_rows()
        + scaled_rows("dmc", 0.4, batch_size=16)
        + scaled_rows("dmc", 0.7, stream="label-shift-0.1")
    )
    text = section(render_report(rows, config("imagenet-c")), "## mCE (ImageNet-C")
    table = text.split("### mCE per batch size and stream (%)")[1]
    assert "| 16 | – | 40.00 |" in table and "| 64 | 80.00 | **50.00** |" in table
    assert "| 64, label-shift-0.1 | – | 70.00 |" in table


@pytest.mark.parametrize("kind", ["fmnist", "npz", "cifar10-c", "cifar100-c", "tiny-imagenet-c", None])
def test_report_other_kinds_have_no_mce(kind):
    report = render_report(report_rows(), config(kind))
    assert "mCE" not in report and "AlexNet" not in report
    assert "Images:" not in report  # no images key: no line, as before


@pytest.mark.parametrize(
    ("images", "line"),
    [
        ({"selection": "all", "n": 50000}, "- Images: all 50000 of each set."),
        ({"selection": "first", "n": 1000}, "- Images: the first 1000 of each set."),
        (
            {"selection": "ids", "n": 5000, "ids_file": "ids.txt", "ids_sha256": "1a2b3c4d5e6f7a8b9c0d" * 3},
            "- Images: 5000 listed in `ids.txt` (sha256 1a2b3c4d5e6f…).",
        ),
    ],
)
def test_report_images_line(images, line):
    for kind in ("fmnist", "imagenet-c"):
        report = render_report(report_rows(), config(kind, images))
        assert line in report.splitlines()
        assert report.index(line) < report.index("## Summary")  # near the top, with the provenance
        subset = "not exactly comparable with published mCEs" in report
        assert subset == (kind == "imagenet-c" and images["selection"] != "all")


def test_report_without_results_still_has_the_images_line():
    report = render_report([], config("imagenet-c", {"selection": "first", "n": 10}))
    assert "- Images: the first 10 of each set." in report and "No results yet." in report
    assert "mCE" not in report
