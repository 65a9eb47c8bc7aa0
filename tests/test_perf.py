"""`dmc perf`'s measurement helpers: paired, interleaved ratios and the Markdown report."""

from __future__ import annotations

import torch_dmc.bench.perf as perf
from torch_dmc.bench.perf import METHODS, render, time_ratios


class _FakeClock:
    """Stands in for the ``time`` module: every call to ``perf_counter`` advances by what the
    timed function last asked for, so the ratios are known exactly."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_time_ratios_pairs_each_contender_with_its_own_plain_call(monkeypatch):
    """Each ratio comes from two adjacent calls (plain first, then second, in turn): a machine
    whose speed drifts from one pair of calls to the next still gives the exact ratios, which a
    single plain call per repetition would not."""
    clock = _FakeClock()
    monkeypatch.setattr(perf, "time", clock)
    order = []
    warmup_calls = 3  # the plain call and each contender once

    def timed(name, nominal):
        def f():
            pair = max(len(order) - warmup_calls, 0) // 2
            order.append(name)
            clock.now += nominal * (1 + pair)  # the machine slows down with every pair
        return f

    out = time_ratios(timed("plain", 1.0), {"twice": timed("twice", 2.0), "slow": timed("slow", 3.0)},
                      repeats=4, warmup=1)
    assert order[:3] == ["plain", "twice", "slow"]
    assert order[3:7] == ["plain", "twice", "plain", "slow"]
    assert order[7:11] == ["twice", "plain", "slow", "plain"]
    assert len(order) == 3 + 4 * 4
    assert out["twice"] == {"median": 2.0, "min": 2.0, "max": 2.0, "plain_ms": 4500.0}
    assert out["slow"] == {"median": 3.0, "min": 3.0, "max": 3.0, "plain_ms": 4500.0}


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
