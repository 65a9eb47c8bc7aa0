"""The test-distribution estimates of DMC: prior, ema, per-sample, and their math.

Specified in docs/method.md § Estimates.
"""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_dmc as dmc
from torch_dmc.transport import (
    empirical_quantiles,
    interp_quantiles,
    midrank_levels,
    quantile_cdf,
    transport_exact,
    transport_quantiles,
)

values = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=60)


# -- math ---------------------------------------------------------------------------------------
@given(values, st.integers(2, 300))
def test_empirical_quantiles_match_numpy_interp_over_midpoints(vals, k):
    x = np.asarray(vals, dtype=np.float32)
    n = len(x)
    expected = np.interp(np.linspace(0, 1, k), (np.arange(n) + 0.5) / n, np.sort(x))
    got = empirical_quantiles(torch.from_numpy(x)[None], k)[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)


@settings(max_examples=40)
@given(st.integers(2, 6), st.integers(1, 40), st.integers(2, 300), st.integers(0, 2**31 - 1))
def test_empirical_quantiles_of_full_rows_match_numpy_and_the_per_row_path(rows, n, k, seed):
    # all rows complete (the read positions computed once and shared) → each row as numpy says,
    # and bit for bit what the per-row path (taken when some row has a non-finite value) gives
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed)) * 10
    got = empirical_quantiles(x, k)
    for row, q in zip(x.numpy(), got.numpy(), strict=True):
        expected = np.interp(np.linspace(0, 1, k), (np.arange(n) + 0.5) / n, np.sort(row))
        np.testing.assert_allclose(q, expected, rtol=1e-5, atol=1e-4)
    spoiled = torch.cat([x, torch.full((1, n), float("nan"))])
    assert torch.equal(empirical_quantiles(spoiled, k)[:rows], got)


def test_quantile_cdf_inverts_a_strictly_increasing_table():
    q = torch.sort(torch.randn(3, 50, generator=torch.Generator().manual_seed(0)), dim=1).values
    u = torch.rand(3, 200, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(quantile_cdf(q, interp_quantiles(q, u)), u, rtol=0, atol=1e-5)
    assert quantile_cdf(q, q[:, :1] - 1).eq(0).all() and quantile_cdf(q, q[:, -1:] + 1).eq(1).all()


def test_quantile_cdf_gives_an_atom_the_middle_of_its_levels():
    q = torch.tensor([[0.0, 1.0, 1.0, 1.0, 2.0]])  # levels 0, .25, .5, .75, 1: value 1 spans .25-.75
    assert quantile_cdf(q, torch.tensor([[1.0, 1.0]])).tolist() == [[0.5, 0.5]]


@settings(max_examples=60)
@given(values)
def test_transport_quantiles_is_monotone_and_ties_give_equal_outputs(vals):
    x = torch.tensor(vals, dtype=torch.float32)[None]
    q_test = empirical_quantiles(x, 64)
    q_ref = torch.linspace(-2, 3, 129)[None]
    y = transport_quantiles(x, q_test, q_ref)[0]
    order = torch.argsort(x[0])
    assert (y[order].diff() >= -1e-6).all()
    for v in x[0].unique():
        assert y[x[0] == v].unique().numel() == 1


def test_transport_quantiles_against_numpy_brute_force():
    g = np.random.default_rng(0)
    x = g.gamma(2.0, size=(2, 500)).astype(np.float32)
    q_ref = np.sort(g.normal(size=(2, 257)), axis=1).astype(np.float32)
    t = np.linspace(0, 1, 257)
    n0, n = 16.0, 8
    expected = np.empty_like(x, dtype=np.float64)
    blended = []
    for c in range(2):
        q_b = np.interp(t, (np.arange(500) + 0.5) / 500, np.sort(x[c]))
        q_hat = (n * q_b + n0 * q_ref[c]) / (n + n0)
        blended.append(q_hat)
        expected[c] = np.interp(np.interp(x[c], q_hat, t), t, q_ref[c])
    q_hat = torch.lerp(empirical_quantiles(torch.from_numpy(x), 257), torch.from_numpy(q_ref), n0 / (n + n0))
    np.testing.assert_allclose(q_hat.numpy(), np.stack(blended), rtol=1e-5, atol=1e-5)
    y = transport_quantiles(torch.from_numpy(x), q_hat, torch.from_numpy(q_ref))
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_transport_quantiles_is_identity_when_the_estimate_is_the_reference():
    q = torch.sort(torch.randn(2, 513), dim=1).values
    x = interp_quantiles(q, torch.rand(2, 300))
    torch.testing.assert_close(transport_quantiles(x, q, q), x, rtol=0, atol=1e-5)


def test_per_sample_rows_use_their_channels_table():
    q = torch.sort(torch.randn(3, 65), dim=1).values
    rows = torch.randn(4 * 3, 20)  # 4 samples × 3 channels, sample-major
    y = transport_exact(rows, q)
    for b in range(4):
        for c in range(3):
            r = b * 3 + c
            expected = interp_quantiles(q[c : c + 1], midrank_levels(rows[r : r + 1]))[0]
            torch.testing.assert_close(y[r], expected)
    with pytest.raises(ValueError, match="rows"):
        transport_exact(torch.randn(5, 20), q)


# -- the estimates on a network -----------------------------------------------------------------
def spatial_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 5),
    )
    model.train()
    with torch.no_grad():
        for i in range(4):
            model(images(64, 100 + i))
    return model.eval()


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 10, 10, generator=g)
    x[:, :, :2] = 0.0  # constant rows: atoms
    return x


def shifted(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x**2 * 2 + 0.3 * torch.randn(x.shape, generator=g)).tanh()


@pytest.fixture(scope="module")
def net_and_stats():
    model = spatial_cnn()
    stats = dmc.fit(model, [images(50, i) for i in range(8)], levels=129, progress=False, per_sample=True)
    return model, stats


def test_fit_stores_the_mean_per_sample_quantile_function(net_and_stats, tmp_path):
    model, stats = net_and_stats
    assert sorted(stats.per_sample) == ["1", "4"]  # "9" (BatchNorm1d) has one position per sample
    batches = [images(10, i) for i in range(3)]
    exact = dmc.fit(model, batches, levels=33, progress=False, per_sample=True, per_sample_images=None)
    with torch.no_grad():
        act = model[1](model[0](torch.cat(batches)))
    rows = act.reshape(30 * 6, 100)
    expected = empirical_quantiles(rows, 33).view(30, 6, 33).mean(0)
    torch.testing.assert_close(exact.per_sample["1"], expected, rtol=1e-5, atol=1e-5)
    assert exact.info["per_sample_samples"]["1"] == 30
    stats.save(tmp_path / "s.safetensors")
    back = dmc.ReferenceStats.load(tmp_path / "s.safetensors", model=model)
    assert back.checksum() == stats.checksum()
    for k, v in stats.per_sample.items():
        assert torch.equal(back.per_sample[k], v)
    # off by default; the pooled reference does not depend on whether per-sample tables were fitted
    without = dmc.fit(model, [images(50, i) for i in range(8)], levels=129, progress=False)
    assert without.per_sample == {} and without.quantiles.keys() == stats.quantiles.keys()
    for k in stats.quantiles:
        assert torch.equal(without.quantiles[k], stats.quantiles[k])


@pytest.mark.parametrize("mode", ["exact", "grid"])
def test_per_sample_output_does_not_depend_on_the_batch(net_and_stats, mode):
    model, stats = net_and_stats
    x = shifted(images(12, 50), 1)
    options = dict(mode=mode, estimate="per-sample", sites=["1", "4"])
    with dmc.corrected(model, stats, **options) as m, torch.no_grad():
        full = m(x)
        alone = torch.cat([m(x[i : i + 1]) for i in range(3)])
        other = m(torch.cat([x[:3], shifted(images(20, 51), 2)]))[:3]
    torch.testing.assert_close(alone, full[:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other, full[:3], rtol=1e-5, atol=1e-5)


def test_per_sample_falls_back_to_prior_where_a_sample_has_one_position(net_and_stats):
    model, stats = net_and_stats
    x = shifted(images(16, 52), 3)
    report = dmc.shift_report(model, stats, x, estimate="per-sample")
    assert report["1"]["estimate"] == "per-sample"
    assert report["9"]["estimate"].startswith("prior (per-sample fallback")
    with dmc.corrected(model, stats, estimate="per-sample", min_positions=50) as m, torch.no_grad():
        m(x)
        assert m.estimate_used("4") == "prior" and "25 position(s)" in m.fallbacks["4"]  # 5×5
        assert m.estimate_used("1") == "per-sample"
    assert "estimate" in dmc.format_shift_report(report)


def test_per_sample_needs_per_sample_stats(net_and_stats):
    model, stats = net_and_stats
    bare = copy.copy(stats)
    bare.per_sample = {}
    with pytest.raises(ValueError, match="per_sample=True"):
        dmc.DMC(model, bare, estimate="per-sample")


def site_output(model, stats, x, **options) -> torch.Tensor:
    """Output of site "1" (the first BatchNorm), corrected with ``options``."""
    seen = []
    with torch.no_grad():
        with dmc.corrected(model, stats, sites="1", **options) as m:
            h = model[1].register_forward_hook(lambda mod, i, o: seen.append(o))  # after DMC's hook
            try:
                m(x)
            finally:
                h.remove()
    return seen[0]


@pytest.mark.parametrize("mode", ["exact", "grid"])
def test_prior_limits(net_and_stats, mode):
    model, stats = net_and_stats
    x = shifted(images(16, 53), 4)
    with torch.no_grad():
        plain = model[1](model[0](x))
    batch = site_output(model, stats, x, mode=mode)
    assert torch.equal(site_output(model, stats, x, mode=mode, estimate="prior", prior=0), batch)
    assert torch.equal(site_output(model, stats, x, mode=mode, estimate="prior", prior=math.inf), plain)
    huge = site_output(model, stats, x, mode=mode, estimate="prior", prior=1e9)
    mid = site_output(model, stats, x, mode=mode, estimate="prior", prior=16)
    # N0 → ∞ tends to the identity on the reference's range (values beyond it are clamped to it)
    q = stats.quantiles["1"]
    inside = (plain > q[:, 1].view(1, -1, 1, 1)) & (plain < q[:, -2].view(1, -1, 1, 1))
    assert inside.float().mean() > 0.5
    assert (huge - plain)[inside].abs().max() < 0.05 * (batch - plain)[inside].abs().max()
    # N0 = 16 with n = 16 lies between the two
    assert (mid - batch).abs().mean() < (plain - batch).abs().mean()
    assert (mid - plain).abs().mean() < (plain - batch).abs().mean()


@pytest.mark.parametrize("mode", ["exact", "grid"])
def test_ema_limits_and_state(net_and_stats, mode):
    model, stats = net_and_stats
    xs = [shifted(images(16, 60 + i), i) for i in range(3)]
    with torch.no_grad():
        with dmc.corrected(model, stats, mode=mode) as m:
            batch = [m(x) for x in xs]
        with dmc.corrected(model, stats, mode=mode, estimate="ema", momentum=1.0) as m:
            for x, b in zip(xs, batch, strict=True):
                torch.testing.assert_close(m(x), b, rtol=0, atol=0)
        with dmc.corrected(model, stats, mode=mode, estimate="ema", momentum=0.3) as m:
            first = m(xs[0])
            m(xs[1])
            again = m(xs[0])  # the running estimate has moved: another output
            m.reset()
            torch.testing.assert_close(m(xs[0]), first, rtol=0, atol=0)
    assert (again - first).abs().max() > 1e-4


def test_estimates_per_site_and_bad_options(net_and_stats):
    model, stats = net_and_stats
    with dmc.corrected(model, stats, estimate={"*": "prior", "1": "per-sample"}) as m:
        assert m.estimates == {"1": "per-sample", "4": "prior", "9": "prior"}
    with pytest.raises(ValueError, match="unknown estimate"):
        dmc.DMC(model, stats, estimate="median")
    with pytest.raises(ValueError, match="momentum"):
        dmc.DMC(model, stats, estimate="ema", momentum=0)
    with pytest.raises(ValueError, match="prior"):
        dmc.DMC(model, stats, estimate="prior", prior=-1)


def test_histogram_quantiles_invert_the_histogram_cdf():
    from torch_dmc.transport import histogram_levels, histogram_quantiles

    x = torch.randn(3, 4000, generator=torch.Generator().manual_seed(0)) * torch.tensor([[1.0], [2.0], [0.5]])
    lo, step, level = histogram_levels(x, 512)
    q = histogram_quantiles(lo, step, level, 257)
    assert (q.diff(dim=1) >= 0).all()
    torch.testing.assert_close(q[:, 0], x.min(dim=1).values)
    torch.testing.assert_close(q[:, -1], x.max(dim=1).values)
    exact = empirical_quantiles(x, 257)
    # within a cell's width everywhere, and much closer in the bulk
    assert ((q - exact).abs() <= step.unsqueeze(1) * 1.01).all()


@pytest.mark.parametrize("estimate", ["prior", "ema"])
def test_grid_blended_estimates_close_to_exact(net_and_stats, estimate):
    model, stats = net_and_stats
    x = shifted(images(64, 70), 5)
    exact = site_output(model, stats, x, mode="exact", estimate=estimate, prior=32, momentum=0.5)
    grid = site_output(model, stats, x, mode="grid", estimate=estimate, prior=32, momentum=0.5)
    spread = exact.std()
    assert (grid - exact).abs().mean() < 0.02 * spread


# --- prior_values: a prior of the batch estimate sized in values per channel ---------------------

def test_prior_values_zero_is_batch_and_large_is_near_identity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).eval()
    data = [torch.randn(64, 4) for _ in range(8)]
    stats = dmc.fit(model, data, levels=257, progress=False)
    x = torch.randn(16, 4)  # in distribution, at a (B, C) site: 16 values per channel
    with torch.no_grad():
        plain = model(x)
        for mode in dmc.MODES:
            with dmc.corrected(model, stats, mode=mode, prior_values=0) as m:
                batch = m(x)
            with dmc.corrected(model, stats, mode=mode, prior_values=1e9) as m:
                near = m(x)
            assert (near - plain).abs().max() < 0.05 < (batch - plain).abs().max()
            # the default at a B×C site is AUTO_PRIOR_VALUES
            with dmc.corrected(model, stats, mode=mode) as m:
                auto = m(x)
            with dmc.corrected(model, stats, mode=mode, prior_values=256) as m:
                assert torch.equal(m(x), auto)


def test_prior_values_default_leaves_spatial_sites_to_the_batch(net_and_stats):
    model, stats = net_and_stats
    x = shifted(images(16, 5), 0)
    with torch.no_grad():
        for mode in dmc.MODES:  # site "1" is spatial: the default adds no value prior there
            default = site_output(model, stats, x, mode=mode)
            assert torch.equal(default, site_output(model, stats, x, mode=mode, prior_values=0))


def test_prior_values_weight_is_values_per_channel():
    # V0 = n values gives the same map as the prior estimate with N0 = B when each image has
    # one value per channel (a (B, C) site): both weigh the reference by 1/2
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)).eval()
    stats = dmc.fit(model, [torch.randn(64, 4) for _ in range(8)], levels=129, progress=False)
    x = torch.randn(32, 4)
    with torch.no_grad():
        with dmc.corrected(model, stats, mode="exact", prior_values=32) as m:
            a = m(x)
        with dmc.corrected(model, stats, mode="exact", estimate="prior", prior=32,
                           prior_values=0) as m:
            b = m(x)
    torch.testing.assert_close(a, b)
