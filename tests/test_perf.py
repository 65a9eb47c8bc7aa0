"""`dmc perf`'s measurement helpers: interleaved ratios and the Markdown report."""

from __future__ import annotations

import itertools

import torch_dmc.bench.perf as perf
from torch_dmc.bench.perf import METHODS, render, time_ratios


class _FakeClock:
    """Stands in for the ``time`` module: every call to ``perf_counter`` advances by what the
    timed function last asked for, so the ratios are known exactly."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_time_ratios_interleaved_and_exact(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(perf, "time", clock)
    order = []
    plain_times = itertools.cycle([1.0, 2.0])

    def plain():
        order.append("plain")
        clock.now += next(plain_times)

    def twice():  # always 2× the plain call it follows
        order.append("twice")
        clock.now += 2 * (1.0 if order.count("plain") % 2 else 2.0)

    def slow():
        order.append("slow")
        clock.now += 3.0

    out = time_ratios(plain, {"twice": twice, "slow": slow}, repeats=4, warmup=1)
    assert order[:3] == ["plain", "twice", "slow"] and order.count("plain") == 5
    assert out["twice"] == {"median": 2.0, "min": 2.0, "max": 2.0, "plain_ms": 1500.0}
    assert out["slow"]["min"] == 1.5 and out["slow"]["max"] == 3.0


def _ratio(r):
    return {"median": r, "min": r - 0.1, "max": r + 0.1, "plain_ms": 12.5}


def test_render_lists_every_method_and_both_fit_ratios():
    results = {
        "machine": {"cpu": "test CPU", "torch_threads": 1, "torch": "2.x"},
        "forward": {"m": {"batch 16": {name: _ratio(1.0 + i) for i, name in enumerate(METHODS)},
                          "stats_bytes": 10, "sites": 2, "levels": 8}},
        "fit": {"images": 100, "ratio": _ratio(1.6), "per_sample_ratio": _ratio(2.4)},
        "memory": {"plain pass, 100 images": 50.0},
    }
    text = render(results)
    assert "dmc unfused" in text and "dmc no kernels" in text and "dmc grid" not in text
    assert "| m | 16 | 12.5 | 1.00× (0.90–1.10) |" in text
    assert "training images: 1.60× (1.50–1.70)" in text
    assert "`per_sample=True`): 2.40× (2.30–2.50)" in text
    del results["fit"]["per_sample_ratio"]  # a perf.json of an older version still renders
    assert "per_sample" not in render(results)
    del results["forward"]["m"]["batch 16"]["dmc no kernels"]  # one without the kernels' column
    assert "| 4.00× (3.90–4.10) | – | 6.00× (5.90–6.10) |" in render(results)
    assert "Compiled kernels" not in render(results)
    results["machine"]["compiled_kernels"] = True
    assert "Compiled kernels (`torch_dmc.native`): in use." in render(results)
