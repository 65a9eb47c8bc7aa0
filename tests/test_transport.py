"""The transport math against brute force and by its properties."""

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.stats import rankdata, wasserstein_distance

from torch_dmc.sketch import gather_positions, sample_channel_values, sample_positions
from torch_dmc.transport import (
    affine_values,
    apply_lut,
    grid_transport,
    histogram_levels,
    interp_quantiles,
    lut_from_sample,
    lut_grid,
    midranks,
    tie_run_bounds,
    transport_exact,
    wasserstein1,
)


def brute_force_transport(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Direct sort-and-assign: rank by sorting, level (r - 1/2)/N, interpolate the table."""
    out = np.empty_like(x, dtype=np.float64)
    levels = np.linspace(0, 1, q.shape[1])
    for c in range(x.shape[0]):
        order = np.argsort(x[c], kind="stable")
        u = (np.arange(1, x.shape[1] + 1) - 0.5) / x.shape[1]
        out[c, order] = np.interp(u, levels, q[c])
    return out


def normal_table(channels: int, k: int = 257) -> torch.Tensor:
    """Quantile tables of N(c, 1+c) clipped to [-4σ, 4σ], one per channel."""
    t = torch.linspace(1e-4, 1 - 1e-4, k, dtype=torch.float64)
    z = torch.special.ndtri(t)
    c = torch.arange(channels, dtype=torch.float64).unsqueeze(1)
    return (c + (1 + c) * z).float()


values = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=60)


def test_exact_equals_brute_force_without_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 997, generator=g, dtype=torch.float64)
    q = normal_table(5).double()
    expected = brute_force_transport(x.numpy(), q.numpy())
    np.testing.assert_allclose(transport_exact(x, q).numpy(), expected, rtol=0, atol=1e-10)


@given(values)
def test_midranks_match_scipy_average_ranks(vals):
    x = torch.tensor([vals])
    np.testing.assert_allclose(midranks(x)[0].numpy(), rankdata(vals, method="average"))


@given(values)
def test_tie_run_bounds_bracket_equal_values(vals):
    s = torch.tensor([sorted(vals)])
    first, last = tie_run_bounds(s)
    for i, v in enumerate(s[0].tolist()):
        run = [j for j, w in enumerate(s[0].tolist()) if w == v]
        assert (first[0, i], last[0, i]) == (run[0], run[-1])


@settings(deadline=None)
@given(values)
def test_exact_is_monotone_and_ties_give_equal_outputs(vals):
    x = torch.tensor([vals])
    y = transport_exact(x, normal_table(1))[0]
    order = torch.argsort(x[0])
    assert torch.all(y[order][1:] >= y[order][:-1])
    for i in range(len(vals)):
        for j in range(len(vals)):
            if vals[i] == vals[j]:
                assert y[i] == y[j]


@settings(deadline=None)
@given(values, st.floats(0.01, 100), st.floats(-100, 100))
def test_exact_is_invariant_to_increasing_affine_maps(vals, scale, shift):
    x = torch.tensor([vals], dtype=torch.float64)
    q = normal_table(1).double()
    y = transport_exact(x, q)
    y_affine = transport_exact(x * scale + shift, q)
    # an affine map can merge values that rounding makes equal; otherwise outputs are identical
    if len(set((x * scale + shift)[0].tolist())) == len(set(vals)):
        torch.testing.assert_close(y_affine, y, rtol=0, atol=1e-12)


def test_exact_is_identity_when_batch_follows_reference():
    k = 4097
    q = normal_table(3, k).double()
    n = 2000
    u = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).expand(3, -1)
    x = interp_quantiles(q, u)[:, torch.randperm(n)]  # values at exactly the reference's levels
    torch.testing.assert_close(transport_exact(x, q), x, rtol=0, atol=1e-12)
    # an i.i.d. sample of the reference is moved by no more than its sampling noise
    g = torch.Generator().manual_seed(1)
    sample = interp_quantiles(q, torch.rand(3, 20000, generator=g, dtype=torch.float64))
    moved = (transport_exact(sample, q) - sample).abs().mean(dim=1)
    assert torch.all(moved < 0.02 * (1 + torch.arange(3)))


def test_atoms_get_average_rank_level():
    x = torch.tensor([[0.0, 0.0, 0.0, 1.0, 2.0, 2.0]])
    q = torch.linspace(0, 1, 7).unsqueeze(0)  # Q(u) = u
    y = transport_exact(x, q)
    # ranks 2, 2, 2, 4, 5.5, 5.5 -> levels (r - 1/2)/6
    torch.testing.assert_close(y, torch.tensor([[1.5, 1.5, 1.5, 3.5, 5.0, 5.0]]) / 6)


def test_interp_quantiles_hits_stored_levels_and_clamps():
    q = torch.tensor([[0.0, 1.0, 4.0]])
    u = torch.tensor([[-1.0, 0.0, 0.25, 0.5, 0.75, 1.0, 2.0]])
    torch.testing.assert_close(interp_quantiles(q, u), torch.tensor([[0, 0, 0.5, 1, 2.5, 4, 4.0]]))


def test_wasserstein1_matches_scipy():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3000, generator=g, dtype=torch.float64) * 2 + 1
    k = 8193
    q = normal_table(2, k).double()
    ref_samples = interp_quantiles(q, ((torch.arange(20000) + 0.5) / 20000).expand(2, -1).double())
    for c in range(2):
        expected = wasserstein_distance(x[c].numpy(), ref_samples[c].numpy())
        assert abs(float(wasserstein1(x, q)[c]) - expected) < 2e-3


def test_exact_minimises_w1_among_monotone_maps():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1000, generator=g, dtype=torch.float64) ** 3
    q = normal_table(1, 2049).double()
    w_exact = wasserstein1(transport_exact(x, q), q)
    w_affine = wasserstein1((x - x.mean()) / x.std(), q)  # what mean/variance matching achieves
    assert w_exact < 0.01 and w_exact < 0.2 * w_affine


# ----- grid mode: the tabulated map ------------------------------------------------------------


def relative_error(y, exact, q):
    return (y - exact).abs() / (q[:, -1] - q[:, 0]).unsqueeze(1)


def grid(x: torch.Tensor, q: torch.Tensor, knots: int = 1024) -> torch.Tensor:
    """Grid transport of channel-major values through the public pieces."""
    return apply_lut(x, lut_from_sample(x, q, knots), channel_axis=0)


@pytest.mark.parametrize("atoms", [False, True])
def test_grid_agrees_with_exact(atoms):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 50_000, generator=g)
    if atoms:  # ReLU zeros, padding constants, a repeated background value
        x[:, :20_000] = 0.0
        x[:, 20_000:25_000] = 1.5
    q = normal_table(8, 1025)
    exact = transport_exact(x, q)
    err = relative_error(grid(x, q), exact, q)
    assert float(err.mean()) < 1e-3
    assert float((err > 0.01).float().mean()) < 5e-3  # large errors: a few values in the far tails
    if atoms:  # an atom shares its cell only with the few values within half a knot spacing
        for v in (0.0, 1.5):
            assert float(err[x == v].max()) < 5e-3


def test_grid_from_subsample_stays_close():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(100_000, 4, generator=g)
    x[:30_000] = 0.0
    q = normal_table(4, 1025)
    exact = transport_exact(x.T, q)
    sample = sample_channel_values(x, 1, 4096, g)
    y = apply_lut(x, lut_from_sample(sample, q, 1024), channel_axis=1).T
    assert float(relative_error(y, exact, q).mean()) < 5e-3
    atom = x.T == 0  # its level is estimated from the sample too: error of order 1/sqrt(4096)
    assert float(relative_error(y, exact, q)[atom].max()) < 0.01


def test_grid_edge_cases():
    q = torch.linspace(0, 1, 5).unsqueeze(0)  # Q(u) = u: outputs are levels
    lut = lut_from_sample(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), q, 7)
    # far below the first and above the last value: the end cells' levels; each value its own
    y = apply_lut(torch.tensor([[-10.0, 1.0, 2.0, 3.0, 4.0, 10.0]]), lut, 0)
    torch.testing.assert_close(y, torch.tensor([[0.125, 0.125, 0.375, 0.625, 0.875, 0.875]]),
                               atol=1e-6, rtol=0)
    # two knots: the lower and upper half of the values share a level each
    y = apply_lut(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), lut_from_sample(
        torch.tensor([[1.0, 2.0, 3.0, 4.0]]), q, 2), 0)
    torch.testing.assert_close(y, torch.tensor([[0.25, 0.25, 0.75, 0.75]]), atol=1e-6, rtol=0)


def test_grid_all_equal_channel_maps_to_median():
    x = torch.full((2, 100), 3.0)
    q = torch.stack([torch.linspace(0, 1, 11), torch.linspace(-5, 5, 11)])
    for knots in (2, 16):
        torch.testing.assert_close(grid(x, q, knots), transport_exact(x, q))
        torch.testing.assert_close(grid(x, q, knots)[:, 0], torch.tensor([0.5, 0.0]))


def test_grid_two_value_channel_equals_exact_on_both_values():
    x = torch.tensor([[0.0] * 70 + [1.0] * 30])
    q = torch.linspace(0, 1, 101).unsqueeze(0)
    torch.testing.assert_close(grid(x, q, 2), transport_exact(x, q))  # two atoms: exact


@settings(deadline=None)
@given(values, st.integers(2, 40))
@example([0.0, 1.1754943508222875e-38], 5)  # a subnormal range: 1/step used to overflow
def test_grid_is_monotone_and_ties_give_equal_outputs(vals, k):
    x = torch.tensor([vals])
    y = grid(x, normal_table(1), k)[0]
    order = torch.argsort(x[0])
    assert torch.all(y[order][1:] >= y[order][:-1])
    for i in range(len(vals)):
        assert torch.all(y[x[0] == vals[i]] == y[i])


@pytest.mark.parametrize("layout", ["NCHW", "NTC"])
def test_grid_reads_the_channel_axis_of_any_layout(layout):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(50, 6, 10, 10, generator=g) * torch.arange(1, 7).view(1, 6, 1, 1)
    q = normal_table(6, 1025)
    flat = x.movedim(1, 0).reshape(6, -1)
    lut = lut_from_sample(flat, q, 512)
    if layout == "NCHW":
        y = apply_lut(x, lut, 1).movedim(1, 0).reshape(6, -1)
    else:  # tokens: channels last
        y = apply_lut(x.permute(0, 2, 3, 1).reshape(50, 100, 6), lut, -1).reshape(-1, 6).T
        flat = x.permute(0, 2, 3, 1).reshape(-1, 6).T
    assert float(relative_error(y, transport_exact(flat, q), q).mean()) < 2e-3
    with pytest.raises(ValueError, match="channels"):
        apply_lut(torch.zeros(2, 3, 4), lut, 1)


def test_bad_shapes_are_explained():
    with pytest.raises(ValueError, match="channel-major matrix"):
        transport_exact(torch.zeros(3), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="channels"):
        transport_exact(torch.zeros(3, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least 2 nodes"):
        lut_from_sample(torch.zeros(1, 5), torch.zeros(1, 4), 1)


# --- grid mode's knot range under outliers (docs/method.md § Knot placement) -------------------

@settings(max_examples=15)
@given(st.integers(0, 10_000), st.floats(0.01, 100), st.floats(-100, 100))
def test_robust_range_changes_nothing_without_outliers(seed, scale, shift):
    from torch_dmc.transport import histogram_levels

    x = torch.randn(3, 2000, generator=torch.Generator().manual_seed(seed)) * scale + shift
    for a, b in zip(histogram_levels(x, 257), histogram_levels(x, 257, robust=False), strict=True):
        assert torch.equal(a, b)


@settings(max_examples=20)
@given(st.integers(0, 10_000), st.sampled_from([1e2, 1e4, 1e8]), st.floats(0.1, 10),
       st.floats(-5, 5))
def test_grid_with_an_outlier_sample_is_monotone_close_to_exact_and_affine_invariant(
        seed, factor, scale, shift):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 2, 50, generator=g)
    x[0] *= factor  # one sample of 32 far off
    rows = x.transpose(0, 1).reshape(2, -1)
    q = normal_table(2)
    y = apply_lut(rows.unsqueeze(0), lut_from_sample(rows, q, 1024), channel_axis=1)[0]
    exact = transport_exact(rows, q)
    # monotone per channel
    for c in range(2):
        order = rows[c].argsort()
        assert torch.all(y[c, order][1:] >= y[c, order][:-1])
    # the other samples stay close to exact mode (in units of the reference's spread, 1 + c)
    others = torch.ones(32, 50, dtype=torch.bool)
    others[0] = False
    others = others.flatten().repeat(2).view(2, -1)
    spread = torch.tensor([[1.0], [2.0]])
    assert ((y - exact).abs() / spread)[others].max() < 0.15
    # an increasing affine change of the values leaves the map's output (nearly) unchanged
    moved = rows * scale + shift
    y2 = apply_lut(moved.unsqueeze(0), lut_from_sample(moved, q, 1024), channel_axis=1)[0]
    assert ((y2 - y).abs() / spread)[others].max() < 0.05


# --- grid mode in one call, the lookup's buffer, the affine lookup (BatchNorm sites) ------------

def _grid_cases():
    """(x, channel axis, name): atoms, an outlier sample, heavy tails, non-finite values, layouts."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, 5, 6, 6, generator=g) * torch.arange(1, 6).view(1, 5, 1, 1)
    atoms = x.clone()
    atoms[:, :, :2] = 0.0
    outlier = x.clone()
    outlier[0] *= 1e4  # the knot range is refined
    heavy = x.exp() ** 3  # skewed: the cheap "no refinement" test does not decide
    bad = x.clone()
    bad[3, 1, 2, 2] = float("nan")
    bad[5, 2, 0, 1] = float("inf")
    bad[:, 4] = float("-inf")  # a channel without finite values
    tokens = torch.randn(8, 30, 7, generator=g)
    return [(x, 1, "plain"), (atoms, 1, "atoms"), (outlier, 1, "outlier"), (heavy, 1, "heavy"),
            (bad, 1, "non-finite"), (tokens, -1, "tokens"), (x[:, :, 0, 0].T.contiguous(), 0, "rows"),
            (x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1), 3, "NHWC view")]


@pytest.mark.parametrize("case", range(8))
@pytest.mark.parametrize("affine", [False, True])
def test_grid_transport_is_lut_from_sample_then_apply_lut(case, affine):
    x, axis, _ = _grid_cases()[case]
    c = x.shape[axis]
    q = normal_table(c, 129)
    values = x.movedim(axis, 0).reshape(c, -1)[:, ::3]  # a subsample, as grid mode samples
    pair = None
    if affine:  # any sign of the slope, zero included
        a = torch.linspace(-2, 3, c)
        a[c // 2] = 0.0
        pair = (a, torch.linspace(-1, 1, c))
        values_y = values * pair[0].unsqueeze(1) + pair[1].unsqueeze(1)
    else:
        values_y = values
    want = apply_lut(x, lut_from_sample(values_y, q, 100), axis, affine=pair)
    got = grid_transport(x, values, q, 100, axis, affine=pair)
    assert torch.equal(got.nan_to_num(), want.nan_to_num())  # the same arithmetic, bit for bit
    assert torch.equal(got.isnan(), want.isnan())


def test_the_affine_lookup_is_the_lookup_of_the_affine_image():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(32, 6, 9, 9, generator=g)
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    a = torch.tensor([1.5, -0.7, 0.0, 2.0, 1e-3, -3.0])
    b = torch.tensor([0.1, 2.0, -1.0, 0.0, 5.0, -0.3])
    y = x * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)  # what a BatchNorm in eval mode computes
    q = normal_table(6)
    values = x.movedim(1, 0).reshape(6, -1)
    want = grid_transport(y, values * a.unsqueeze(1) + b.unsqueeze(1), q, 512)
    got = grid_transport(x, values, q, 512, affine=(a, b))
    finite = torch.isfinite(x)
    # non-finite values come out as a·x + b, as from the BatchNorm (inf·0 is NaN)
    assert torch.equal(got[~finite].nan_to_num(), y[~finite].nan_to_num())
    assert torch.equal(got[~finite].isnan(), y[~finite].isnan())
    # finite ones as the lookup of a·x + b, but for the rounding of the lookup coordinate: a value
    # within a rounding error of a cell boundary may take the neighbouring node
    differ = (got != want) & finite
    assert float(differ.float().mean()) < 1e-3
    step = (q[:, 1:] - q[:, :-1]).max()
    assert float((got - want)[finite].abs().max()) <= float(step) * 4


def test_lut_grid_is_a_planar_buffer_reused_across_calls():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(10, 3, 4, 5, generator=g)
    flat = x.movedim(1, 0).reshape(3, -1)
    lut = lut_from_sample(flat, normal_table(3), 50)
    buffer = lut_grid(x.shape, 1)
    assert buffer.shape == (2, *x.shape)
    first = apply_lut(x, lut, 1, buffer)
    assert torch.equal(apply_lut(x * 2, lut, 1, buffer), apply_lut(x * 2, lut, 1))
    assert torch.equal(apply_lut(x, lut, 1, buffer), first)
    with pytest.raises(ValueError, match="grid buffer"):
        apply_lut(x, lut, 1, lut_grid((10, 3, 4, 4), 1))


@settings(deadline=None)
@given(values, st.integers(2, 40))
@example([0.0, 1.1754943508222875e-38], 5)
def test_grid_transport_is_monotone_gives_ties_equal_outputs_and_passes_nan(vals, k):
    x = torch.tensor([vals + [float("nan")]])
    y = grid_transport(x, x, normal_table(1), k, channel_axis=0)[0]
    assert torch.isnan(y[-1]) and torch.isfinite(y[:-1]).all()
    y, xs = y[:-1], x[0, :-1]
    order = torch.argsort(xs)
    assert torch.all(y[order][1:] >= y[order][:-1])
    for i in range(len(vals)):
        assert torch.all(y[xs == vals[i]] == y[i])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([1.0, 3.0, 10.0]), st.integers(2, 1100))
def test_the_cheap_no_refinement_test_never_skips_a_refinement(seed, power, size):
    from torch_dmc.transport import _refine

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3000, generator=g)
    x = x.sign() * x.abs() ** power  # heavier tails with the power
    x[1, :5] *= 50  # a few outliers in one channel
    fast = histogram_levels(x, size)
    _, step, level = histogram_levels(x, size, robust=False)
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    full = _refine(x, None, x.shape[1], lo, hi, step, level, size, None)  # always checks
    for a, b in zip(fast, full, strict=True):
        assert torch.equal(a, b)


def test_ordered_positions_are_the_same_draw_sorted():
    shape = (7, 3, 5, 4)
    a = sample_positions(shape, 1, 500, torch.Generator().manual_seed(2))
    b = sample_positions(shape, 1, 500, torch.Generator().manual_seed(2), ordered=True)
    flat_a = torch.tensor(np.ravel_multi_index([i.numpy() for i in a], (7, 5, 4)))
    flat_b = torch.tensor(np.ravel_multi_index([i.numpy() for i in b], (7, 5, 4)))
    assert torch.equal(flat_a.sort().values, flat_b) and torch.all(flat_b[1:] >= flat_b[:-1])
    x = torch.randn(shape)
    va, vb = gather_positions(x, 1, a), gather_positions(x, 1, b)
    assert torch.equal(va.sort(dim=1).values, vb.sort(dim=1).values)


def test_affine_values_is_an_eval_batchnorm_on_channel_rows():
    g = torch.Generator().manual_seed(3)
    bn = torch.nn.BatchNorm1d(5).eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(5, generator=g))
        bn.running_var.copy_(torch.rand(5, generator=g) + 0.1)
    a = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    b = bn.bias.detach() - bn.running_mean * a
    values = torch.randn(5, 40, generator=g)  # C×M
    with torch.no_grad():
        torch.testing.assert_close(affine_values(values, (a, b)), bn(values.T).T)
