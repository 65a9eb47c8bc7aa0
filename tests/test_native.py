"""The compiled CPU kernels (`torch_dmc.native`) give the PyTorch implementation's results bit for bit.

Every test runs the same call twice, with the kernels and inside `native.disabled()`, and compares
the bits (NaN positions alike): ties on cell boundaries, non-finite values, outliers that make the
site kernel decline, every layout the lookup reads, BatchNorm's affine map, a whole model. Then
what happens where the kernels cannot be built or are turned off.
"""

import shutil
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_dmc import DMC, fit, native, transport
from torch_dmc.transport import Lut, apply_lut, grid_transport, histogram_levels, lut_from_sample


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """The kernels must build wherever a C++ compiler is installed (as on CI)."""
    if native.kernels() is None:
        if shutil.which("c++") is None and shutil.which("g++") is None:
            pytest.skip("no C++ compiler: the kernels cannot be built here")
        pytest.fail("a C++ compiler is installed, but torch-dmc's kernels did not build (see the warning)")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    nan = a.isnan()
    assert torch.equal(nan, b.isnan())
    bits = torch.int32 if a.dtype == torch.float32 else torch.int64
    assert torch.equal(a.masked_fill(nan, 0).view(bits), b.masked_fill(nan, 0).view(bits))


def both(f):
    """``f()`` with the kernels and without, compared bit for bit; the kernels' result."""
    fast = f()
    with native.disabled():
        slow = f()
    for a, b in zip(fast if isinstance(fast, tuple) else (fast,),
                    slow if isinstance(slow, tuple) else (slow,), strict=True):
        same_bits(a, b)
    return fast


def messy(generator: torch.Generator, shape, *, ties: bool, nonfinite: bool, outliers: bool):
    """Values with the hard cases on demand: many exact ties (a coarse grid of values), a few
    non-finite values, a few huge outliers."""
    x = torch.randn(shape, generator=generator) * 3 + 1
    if ties:
        x = torch.round(x * 4) / 4
    flat = x.view(-1)
    n = flat.numel()
    if outliers and n > 4:
        idx = torch.randint(0, n, (max(1, n // 100),), generator=generator)
        flat[idx] = flat[idx] * 1e4
    if nonfinite and n > 2:
        idx = torch.randint(0, n, (3,), generator=generator)
        flat[idx] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    return x


cases = st.tuples(st.integers(0, 2**31 - 1), st.booleans(), st.booleans(), st.booleans())


@settings(max_examples=40)
@given(cases, st.integers(1, 6), st.integers(1, 400), st.integers(2, 300), st.booleans())
def test_histogram_levels_are_the_same(case, c, m, size, transposed):
    seed, ties, nonfinite, outliers = case
    g = torch.Generator().manual_seed(seed)
    values = messy(g, (c, m), ties=ties, nonfinite=nonfinite, outliers=outliers)
    if transposed:  # rows not contiguous
        values = values.T.contiguous().T
    both(lambda: histogram_levels(values, size))


def test_values_on_cell_boundaries_round_half_to_even():
    # every value on a midpoint between two nodes: the rounding decides each cell
    lo, step, size = 0.0, 0.25, 9
    values = (lo + (torch.arange(size - 1) + 0.5) * step).repeat(3, 5)
    levels = both(lambda: histogram_levels(values, size, robust=False))[2]
    assert torch.equal(levels[0], levels[1])
    table = torch.linspace(-1, 1, size).repeat(3, 1)
    lut = Lut(table, torch.zeros(3), torch.full((3,), step))
    both(lambda: apply_lut(values, lut, 0))


LAYOUTS = {  # shape, channel axis, and whether the tensor is a channels-last view
    "NCHW": ((4, 5, 6, 7), 1, False),
    "NHWC view of channels_last": ((4, 5, 6, 7), 3, True),
    "NTC": ((3, 11, 5), -1, False),
    "C×M": ((5, 50), 0, False),
    "M×C": ((50, 5), 1, False),
    "one channel": ((2, 1, 3, 3), 1, False),
    # rows longer than the kernel's 64-value span, and not a multiple of its 8 lanes
    "NCHW, long rows": ((2, 3, 13, 11), 1, False),
    "NHWC view, many channels": ((2, 77, 3, 5), 3, True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("affine", [False, True])
def test_lookup_is_the_same_in_every_layout(layout, affine):
    shape, axis, channels_last = LAYOUTS[layout]
    g = torch.Generator().manual_seed(1)
    x = messy(g, shape, ties=True, nonfinite=True, outliers=False)
    if channels_last:  # what grid mode hands the lookup for a channels-last activation
        x = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        assert x.is_contiguous()
    c = x.shape[axis]
    values = x.movedim(axis, 0).reshape(c, -1)
    lut = lut_from_sample(values, torch.randn(c, 33).sort(dim=1).values, 64)
    ab = (torch.randn(c, generator=g), torch.randn(c, generator=g)) if affine else None
    if ab is not None:
        ab[0][0] = 0.0  # a zero scale: every finite value at one node
    both(lambda: apply_lut(x, lut, axis, affine=ab))
    # non-finite values in many of the kernel's 64-value spans, at every lane position
    dense = x.clone()
    dense.view(-1)[5::7] = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(
        dense.numel() // 7 + 1)[:dense.view(-1)[5::7].numel()]
    both(lambda: apply_lut(dense, lut, axis, affine=ab))


@settings(max_examples=40)
@given(cases, st.integers(1, 5), st.integers(2, 200), st.sampled_from([None, True]),
       st.booleans(), st.booleans())
def test_grid_transport_is_the_same(case, c, size, finite, affine, sample):
    seed, ties, nonfinite, outliers = case
    g = torch.Generator().manual_seed(seed)
    x = messy(g, (3, c, 5, 4), ties=ties, nonfinite=nonfinite and finite is None, outliers=outliers)
    values = x.movedim(1, 0).reshape(c, -1)
    if sample:
        values = values[:, torch.randperm(values.shape[1], generator=g)[:30]]
    q_ref = torch.randn(c, 17, generator=g).sort(dim=1).values
    ab = (torch.randn(c, generator=g), torch.randn(c, generator=g)) if affine else None
    both(lambda: grid_transport(x, values, q_ref, size, 1, affine=ab, finite=finite))


def test_site_kernel_refines_outliers_and_declines_nonfinite_samples(monkeypatch):
    calls = []

    def counting(*args):
        out = native.grid_site(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(transport, "grid_site", counting)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 10, 10, generator=g)
    q_ref = torch.randn(3, 65, generator=g).sort(dim=1).values
    values = x.movedim(1, 0).reshape(3, -1)
    both(lambda: grid_transport(x, values, q_ref, 256))
    assert calls == [True]  # the kernels' call (the other ran inside `disabled`)
    x[0, 0, 0, 0] = 1e6  # an outlier: the knot range narrows (refined in the kernel)
    values = x.movedim(1, 0).reshape(3, -1)
    both(lambda: grid_transport(x, values, q_ref, 256))
    x[0, 1, 0, 0] = float("nan")  # a non-finite sampled value: the general path
    values = x.movedim(1, 0).reshape(3, -1)
    both(lambda: grid_transport(x, values, q_ref, 256))
    assert calls == [True, True, False]


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_corrected_model_gives_the_same_logits(channels_last):
    torch.manual_seed(0)
    model = SmallNet().eval()
    train = torch.randn(64, 3, 12, 12)
    stats = fit(model, [train[:32], train[32:]], progress=False)
    test = torch.randn(16, 3, 12, 12) * 2 + 0.5
    test[0, 0, 0, 0] = float("nan")  # one sample's NaN stays in that sample
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        test = test.contiguous(memory_format=torch.channels_last)
    dmc = DMC(model, stats)
    with torch.no_grad():
        logits = both(lambda: dmc(test))
    assert torch.isfinite(logits[1:]).all()


def test_a_failed_build_warns_once_and_changes_no_result(monkeypatch):
    def no_compiler():
        raise OSError("c++: command not found")

    monkeypatch.setattr(native, "_state", {"tried": False, "ops": None, "fused": False, "forced_off": 0})
    monkeypatch.setattr(native, "_build", no_compiler)
    with pytest.warns(RuntimeWarning, match="could not build its CPU kernels.*command not found"):
        assert native.kernels() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert native.kernels() is None
        x = torch.randn(4, 3, 5, 5)
        q_ref = torch.randn(3, 9).sort(dim=1).values
        assert not native.available_for(x)
        y = grid_transport(x, x.movedim(1, 0).reshape(3, -1), q_ref, 32)
    monkeypatch.undo()  # the kernels back
    assert native.kernels() is not None
    same_bits(y, grid_transport(x, x.movedim(1, 0).reshape(3, -1), q_ref, 32))


def test_the_environment_variable_turns_them_off_without_a_build(monkeypatch):
    monkeypatch.setattr(native, "_state", {"tried": False, "ops": None, "fused": False, "forced_off": 0})
    monkeypatch.setattr(native, "_build", lambda: pytest.fail("no build may be tried"))
    monkeypatch.setenv(native.ENV, "0")
    assert native.kernels() is None
    assert not native.available_for(torch.zeros(2))


def test_only_cpu_float32_tensors_without_gradients_take_them():
    assert native.available_for(torch.zeros(2))
    assert not native.available_for(torch.zeros(2, dtype=torch.float64))
    assert not native.available_for(torch.zeros(2, dtype=torch.float16))
    assert not native.available_for(torch.zeros(2, requires_grad=True))
    with native.disabled():
        assert not native.available_for(torch.zeros(2))


def test_compile_flags_never_contract_and_use_avx2_only_where_the_cpu_has_it(monkeypatch):
    for capability, vector in (("AVX512", True), ("AVX2", True), ("DEFAULT", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        flags = native.compile_flags()
        assert "-ffp-contract=off" in flags and "-O3" in flags and "-fopenmp" in flags
        assert ("-mavx2" in flags) == vector and ("-mfma" in flags) == vector


def test_the_probe_says_how_addcmul_rounds_here():
    fused = native._fused_multiply_add()
    assert fused in (True, False)
    g = torch.Generator().manual_seed(0)
    x, y, z = (torch.randn(1003, generator=g) for _ in range(3))
    got = torch.addcmul(z, x, y)
    once = (z.double() + x.double() * y.double()).float()  # exact product: one rounding of the sum
    twice = z + x * y
    assert torch.equal(got, once if fused else twice)


def test_bad_arguments_are_refused_with_a_message():
    ops = native.kernels()
    x = torch.zeros(2, 3, 4)
    image, scale = torch.zeros(3, 8), torch.ones(3)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.lookup(x.double(), image, scale, scale, 1, None, None, True)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.lookup(x.transpose(0, 2), image, scale, scale, 1, None, None, True)
    with pytest.raises(RuntimeError, match="3 rows"):
        ops.lookup(x, image[:2], scale, scale, 1, None, None, True)
    with pytest.raises(RuntimeError, match="size must be"):
        ops.histogram(torch.zeros(3, 5), scale, scale, 1, True)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_take_reads_what_index_select_reads(dtype):
    g = torch.Generator().manual_seed(3)
    flat = torch.randn(100_000, generator=g)
    flat[::997] = float("nan")
    offsets = torch.randint(0, flat.numel(), (20_000,), generator=g).sort().values.to(dtype)
    same_bits(native.take(flat, offsets), flat.index_select(0, offsets))
    assert native.take(flat, offsets[:0]).shape == (0,)
    for bad in (-1, flat.numel()):
        with pytest.raises(RuntimeError, match="offsets must lie in"):
            native.take(flat, torch.tensor([0, bad], dtype=dtype))


def test_grid_mode_samples_the_same_values_with_the_kernels():
    from torch_dmc.correct import ShapeCache

    x = torch.randn(50, 8, 20, 20)
    for output in (x, x.contiguous(memory_format=torch.channels_last)):
        cache = ShapeCache(seed=0)
        both(lambda: cache.sample(output, 1, 512))  # noqa: B023 (called at once)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC view of channels_last", "NTC"])
@pytest.mark.parametrize("affine", [False, True])
def test_all_values_read_in_place_give_the_copied_values_result(layout, affine):
    g = torch.Generator().manual_seed(5)
    x = messy(g, (6, 4, 5, 3), ties=True, nonfinite=False, outliers=True)
    axis = 1
    if layout == "NHWC view of channels_last":
        x, axis = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1), 3
    elif layout == "NTC":
        x, axis = x.reshape(6, 4, 15).transpose(1, 2).contiguous(), 2
    c = x.shape[axis]
    copied = x.movedim(axis, 0).reshape(c, -1)
    q_ref = torch.randn(c, 33, generator=g).sort(dim=1).values
    ab = (torch.randn(c, generator=g), torch.randn(c, generator=g)) if affine else None
    y = both(lambda: grid_transport(x, None, q_ref, 40, axis, affine=ab))
    with native.disabled():
        same_bits(y, grid_transport(x, copied, q_ref, 40, axis, affine=ab))


def test_a_site_read_in_place_declines_a_nonfinite_value_in_any_channel():
    # each channel is looked up as soon as its table is built; a later channel's NaN must still
    # make the whole call decline (the caller then takes the general path)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 6, 6, generator=g)
    q_ref = torch.randn(5, 33, generator=g).sort(dim=1).values
    rule = (transport.OUTLIER_LEVEL, transport.OUTLIER_MARGIN, transport.REFINEMENTS)
    assert native.grid_site(x, None, q_ref, 40, 1, None, *rule) is not None
    for channel in (0, 4):
        y = x.clone()
        y[1, channel, 2, 3] = float("nan")
        assert native.grid_site(y, None, q_ref, 40, 1, None, *rule) is None
        both(lambda y=y: grid_transport(y, None, q_ref, 40, 1))


# ---- the fit's kernels: the sketch's sort, merge and compression, the channel extremes ----

def test_sort_rows_gives_torch_sort_values_or_declines_where_ties_could_differ():
    g = torch.Generator().manual_seed(3)
    for shape in [(1, 1), (3, 2), (5, 4096), (2, 9000)]:
        x = messy(g, shape, ties=True, nonfinite=False, outliers=True) + 0.125  # no +0.0
        x.view(-1)[:3] = torch.tensor([float("inf"), -float("inf"), -0.0])[:x.numel()]
        same_bits(native.sort_rows(x), x.sort(dim=1).values)
    assert native.sort_rows(torch.empty(3, 0)).shape == (3, 0)
    with_nan = torch.tensor([[1.0, float("nan"), 0.5]])
    assert native.sort_rows(with_nan) is None
    both_zeros = torch.tensor([[0.0, 1.0, -0.0]])
    assert native.sort_rows(both_zeros) is None
    same_bits(native.sort_rows(-both_zeros.abs()), torch.tensor([[-1.0, -0.0, -0.0]]))


def summary(g, c, s, ties, mass):
    values = messy(g, (c, s), ties=ties, nonfinite=False, outliers=False) + 0.125  # no ±0 ties
    values = values.sort(dim=1).values
    return values, torch.full_like(values, mass)


@settings(max_examples=40)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.integers(1, 300), st.integers(1, 300),
       st.booleans(), st.sampled_from([(1.5, 1.5), (1.5, 2.0), (0.1, 0.1)]))
def test_merge_rows_is_the_sorted_concatenation_or_declines(seed, c, sa, sb, ties, masses):
    from torch_dmc.sketch import _merge, _Summary

    g = torch.Generator().manual_seed(seed)
    a, b = _Summary(*summary(g, c, sa, ties, masses[0])), _Summary(*summary(g, c, sb, ties, masses[1]))
    merged = both(lambda: (lambda s: (s.values, s.masses))(_merge(a, b)))
    direct = native.merge_rows(a.values, a.masses, b.values, b.masses)
    tied = any(bool(torch.isin(a.values[r], b.values[r]).any()) for r in range(c))  # within a row
    tied_unequal = tied and masses[0] != masses[1]
    if tied_unequal:  # torch's unstable sort decides the masses' order: the kernel declines
        assert direct is None
    else:
        assert direct is not None
        same_bits(direct[0], merged[0])
        same_bits(direct[1], merged[1])


def test_merge_rows_declines_unsorted_rows_nan_and_mixed_zeros():
    one = torch.ones(1, 2)
    assert native.merge_rows(torch.tensor([[2.0, 1.0]]), one, torch.tensor([[0.0, 3.0]]), one) is None
    assert native.merge_rows(torch.tensor([[0.0, float("nan")]]), one, one, one) is None
    assert native.merge_rows(torch.tensor([[-0.0, 1.0]]), one, torch.tensor([[0.0, 2.0]]), one) is None
    with pytest.raises(RuntimeError, match="masses must have"):
        native.merge_rows(one, torch.ones(1, 3), one, one)


@settings(max_examples=40)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(2, 500), st.integers(2, 300),
       st.sampled_from(["equal", "random", "signed"]))
def test_compress_rows_reads_the_midpoint_cdf_as_torch_does(seed, c, s, capacity, masses):
    from torch_dmc.sketch import _compress, _Summary

    g = torch.Generator().manual_seed(seed)
    values = messy(g, (c, s), ties=True, nonfinite=False, outliers=True).sort(dim=1).values
    m = {"equal": torch.full((c, s), 3.0), "random": torch.rand(c, s, generator=g) + 0.01,
         # not increasing cumulative masses: the kernel takes torch's binary search, step for step
         "signed": torch.randn(c, s, generator=g)}[masses]
    s_ = _Summary(values, m)
    both(lambda: (lambda r: (r.values, r.masses))(_compress(s_, capacity)))


@pytest.mark.parametrize("shape,axis,channels_last", [
    ((4, 3, 5, 6), 1, False), ((4, 3, 5, 6), 1, True), ((4, 5, 6, 3), 3, False), ((7, 3), 1, False),
    ((2, 9, 3), 2, False), ((3, 4, 20), 0, False), ((2, 3, 1, 1), 1, False)])
def test_channel_extremes_are_amin_and_amax(shape, axis, channels_last):
    from torch_dmc import sketch
    from torch_dmc.sketch import channel_extremes

    g = torch.Generator().manual_seed(1)
    x = messy(g, shape, ties=True, nonfinite=False, outliers=True) + 0.125  # no zero extreme
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    lo, hi = both(lambda: channel_extremes(x, axis))
    other = [d for d in range(x.dim()) if d != axis]
    same_bits(lo, x.amin(dim=other))
    same_bits(hi, x.amax(dim=other))
    declined = []
    positive = x.abs()
    for y in [x, x, positive, -positive]:  # a NaN, an infinity, a zero minimum, a zero maximum
        y = y.clone()
        y[(0,) * y.dim()] = [float("nan"), float("inf"), 0.0, -0.0][len(declined)]
        calls = []
        with pytest.MonkeyPatch.context() as patch:  # the kernel is asked, and declines
            patch.setattr(sketch, "kernel_channel_extremes",
                          lambda *a, calls=calls: calls.append(native.channel_extremes(*a)) or calls[-1])
            both(lambda y=y: channel_extremes(y, axis))
        declined.append(calls[0])
    assert declined == [None] * 4
    with pytest.MonkeyPatch.context() as patch:  # and takes the good one
        patch.setattr(sketch, "kernel_channel_extremes", lambda *a: calls.append(a) or None)
        calls = []
        channel_extremes(x, axis)
        assert len(calls) == 1


@pytest.mark.parametrize("per_sample", [False, True])
def test_fit_writes_the_same_statistics_with_the_kernels(per_sample):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, padding=1), nn.GroupNorm(2, 4)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1, generator=g)
    x = torch.randn(70, 2, 9, 9, generator=g)
    x[:, :, :3] = 0.5  # constant pixels: many exactly equal activations
    batches = list(x.split(16))  # a partial last batch: other masses
    kw = dict(progress=False, samples_per_batch=64, capacity=128, levels=33, per_sample=per_sample)
    fast = fit(model, batches, **kw)
    with native.disabled():
        slow = fit(model, batches, **kw)
    for name in fast.sites:
        same_bits(fast.quantiles[name], slow.quantiles[name])
        if per_sample:
            same_bits(fast.per_sample[name], slow.per_sample[name])


@settings(max_examples=30)
@given(cases, st.integers(1, 5), st.integers(1, 6), st.integers(2, 300), st.integers(2, 80))
def test_summed_quantiles_are_torchs_sum_of_the_tables(case, samples, c, p, levels):
    seed, ties, _, outliers = case
    g = torch.Generator().manual_seed(seed)
    rows = messy(g, (samples * c, p), ties=ties, nonfinite=False, outliers=outliers) + 0.125
    total = both(lambda: transport.summed_quantiles(rows, samples, levels))
    table = transport.empirical_quantiles(rows, levels).view(samples, c, levels)
    same_bits(total, table.sum(dim=0, dtype=torch.float64))


def test_sample_table_sum_declines_sums_that_could_round():
    from torch_dmc.transport import _read_positions

    lo, hi, frac = (t[0] for t in _read_positions(torch.tensor([[3]]), 5))
    exact = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # 2 samples of 1 channel
    assert native.sample_table_sum(exact, 2, lo, hi, frac) is not None
    rounding = torch.tensor([[1.0, 2.0, 3.0], [2.0**-60, 5.0, 6.0]])  # 1 + 2^-60 rounds in float64
    assert native.sample_table_sum(rounding, 2, lo, hi, frac) is None
    assert native.sample_table_sum(exact.neg().clamp_max(-0.0) * 0, 2, lo, hi, frac) is None  # -0.0
    assert native.sample_table_sum(exact.clone().index_fill_(1, torch.tensor([0]), float("nan")),
                                   2, lo, hi, frac) is None
    for rows in [exact, rounding]:  # the general path gives the same sum either way
        both(lambda rows=rows: transport.summed_quantiles(rows, 2, 5))
    with pytest.raises(RuntimeError, match="must lie in"):
        native.sample_table_sum(exact, 2, lo + 3, hi, frac)
