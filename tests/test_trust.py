"""Bad input and unusual use: each case gets a clear error or a safe, documented result.

One test (or a few) per case of the trust issue; each failed on the code before the fix. The
policies are stated in docs/method.md § Bad input and the README's "Behaviour on bad input".
"""

import warnings

import pytest
import torch
from torch import nn

import torch_dmc as dmc
from torch_dmc.transport import (
    apply_lut,
    empirical_quantiles,
    histogram_levels,
    lut_from_sample,
    transport_exact,
    transport_quantiles,
)


def gaussian_batches(shape, n_batches=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n_batches)]


class Tokens(nn.Module):
    """(B, N, C) tokens -> LayerNorm over C -> in-place ReLU -> linear head."""

    def __init__(self, c=6):
        super().__init__()
        self.proj = nn.Linear(3, c)
        self.norm = nn.LayerNorm(c)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(c, 2)

    def forward(self, x):  # x: B×N×3
        return self.head(self.act(self.norm(self.proj(x))).mean(1))


def flat_model(inplace=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.ReLU(inplace=inplace), nn.Linear(5, 2))


def conv_model(inplace=True, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=inplace),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=inplace),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    model.train()
    with torch.no_grad():
        for x in gaussian_batches((16, 2, 6, 6), 3, seed=9):
            model(x)
    return model.eval()


# --- 1. in-place ops after a site must not corrupt the reference -------------------------------

def _same_tables(a, b):
    assert a.sites == b.sites
    for s in a.sites:
        torch.testing.assert_close(a.quantiles[s], b.quantiles[s], rtol=0, atol=0)


@pytest.mark.parametrize("case", ["flat", "tokens", "channels_last", "batch_size_1"])
def test_inplace_op_after_a_site_does_not_change_the_reference(case):
    if case == "flat":
        inplace, plain = flat_model(True), flat_model(False)
        data = gaussian_batches((8, 4))
    elif case == "tokens":
        torch.manual_seed(0)
        inplace = Tokens()
        plain = Tokens()
        plain.load_state_dict(inplace.state_dict())
        plain.act = nn.ReLU()
        data = gaussian_batches((4, 5, 3))
    elif case == "channels_last":
        inplace = conv_model(True).to(memory_format=torch.channels_last)
        plain = conv_model(False).to(memory_format=torch.channels_last)
        data = [x.to(memory_format=torch.channels_last) for x in gaussian_batches((2, 2, 5, 5))]
    else:
        inplace, plain = conv_model(True), conv_model(False)
        data = gaussian_batches((1, 2, 5, 5), 10)
    a = dmc.fit(inplace, data, levels=33, progress=False)
    b = dmc.fit(plain, data, levels=33, progress=False)
    _same_tables(a, b)
    # a negative pre-activation is in the reference: the ReLU did not zero it
    assert min(float(q.min()) for q in a.quantiles.values()) < 0


def test_sketch_copies_what_it_buffers():
    from torch_dmc.sketch import QuantileSketch

    for act in (torch.randn(5, 4), torch.randn(1, 4, 3, 2)):  # (B,C) and a batch of 1: views
        sketch = QuantileSketch(4, capacity=64, samples_per_batch=64)
        sketch.update_activation(act, 1)
        expected = act.movedim(1, 0).reshape(4, -1).sort(dim=1).values
        act.zero_()  # an in-place op downstream
        q = sketch.quantiles(6)
        torch.testing.assert_close(q, empirical_quantiles(expected, 6))


# --- 2. non-finite values ----------------------------------------------------------------------

def test_exact_transport_leaves_non_finite_out_and_passes_them_through():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 50, generator=g).sort(dim=1).values
    x = torch.randn(3, 40, generator=g)
    bad = x.clone()
    bad[0, 5] = float("nan")
    bad[1, 7] = float("inf")
    bad[2, :] = float("-inf")  # a channel with no finite value
    y = transport_exact(bad, q)
    assert torch.isnan(y[0, 5]) and y[1, 7] == float("inf")
    assert torch.equal(y[2], bad[2])
    keep0 = torch.ones(40, dtype=torch.bool)
    keep0[5] = False
    torch.testing.assert_close(y[0, keep0], transport_exact(x[0:1, keep0], q[0:1])[0])
    keep1 = torch.ones(40, dtype=torch.bool)
    keep1[7] = False
    torch.testing.assert_close(y[1, keep1], transport_exact(x[1:2, keep1], q[1:2])[0])


def test_grid_transport_and_quantiles_ignore_non_finite():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 65, generator=g).sort(dim=1).values
    x = torch.randn(2, 400, generator=g)
    bad = x.clone()
    bad[0, :3] = float("nan")
    bad[1, 10] = float("inf")
    lut = lut_from_sample(bad, q, 64)
    assert torch.isfinite(lut.table).all()
    y = apply_lut(bad.unsqueeze(0), lut, channel_axis=1)[0]
    assert torch.isnan(y[0, :3]).all() and y[1, 10] == float("inf")
    assert torch.isfinite(y[0, 3:]).all()
    lo, step, level = histogram_levels(bad, 64)
    assert torch.isfinite(lo).all() and torch.isfinite(level).all()
    eq = empirical_quantiles(bad, 9)
    torch.testing.assert_close(eq[0], empirical_quantiles(x[0:1, 3:], 9)[0])
    z = transport_quantiles(bad, eq, q)
    assert torch.isnan(z[0, :3]).all() and z[1, 10] == float("inf")


@pytest.mark.parametrize("mode", ["grid", "exact"])
@pytest.mark.parametrize("estimate", ["batch", "prior", "ema", "per-sample"])
def test_a_nan_image_gives_nan_for_that_image_only(mode, estimate):
    model = conv_model(False)
    stats = dmc.fit(model, gaussian_batches((16, 2, 6, 6)), levels=65, progress=False, per_sample=True)
    x = torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    x[0, 0, 2, 2] = float("nan")
    with torch.no_grad():
        plain = model(x)
        m = dmc.DMC(model, stats, mode=mode, estimate=estimate, min_positions=4)
        y = m(x)
        m.remove()
    assert torch.isnan(plain[0]).all() and torch.isnan(y[0]).all()
    assert torch.isfinite(y[1:]).all()


def test_a_channel_with_no_finite_value_passes_through():
    bn = nn.BatchNorm1d(3).eval()
    model = nn.Sequential(bn)
    stats = dmc.fit(model, gaussian_batches((32, 3)), levels=17, progress=False)
    x = torch.randn(16, 3)
    x[:, 1] = float("nan")
    for mode in dmc.MODES:
        with torch.no_grad(), dmc.corrected(model, stats, mode=mode) as m:
            y = m(x)
        assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()


def test_fit_refuses_non_finite_values_naming_site_and_batch():
    model = conv_model(False)
    data = gaussian_batches((4, 2, 5, 5), 4)
    data[2][1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"site '1'.*batch 2"):
        dmc.fit(model, data, progress=False)


def test_fit_can_skip_non_finite_values_and_records_how_many():
    model = conv_model(False)
    data = gaussian_batches((4, 2, 5, 5), 4)
    data[2][1, 0, 0, 0] = float("inf")
    stats = dmc.fit(model, data, levels=17, progress=False, skip_nonfinite=True)
    for q in stats.quantiles.values():
        assert torch.isfinite(q).all()
    skipped = stats.info["nonfinite_skipped"]
    assert skipped["1"]["values"] > 0 and skipped["1"]["samples"] == 1


# --- 3. same input, same output ----------------------------------------------------------------

@pytest.mark.parametrize("estimate", ["batch", "prior", "per-sample"])
def test_grid_mode_gives_the_same_output_for_the_same_batch(estimate):
    model = conv_model(False)
    stats = dmc.fit(model, gaussian_batches((16, 2, 12, 12)), levels=65, progress=False,
                    per_sample=True)
    x = torch.randn(32, 2, 12, 12, generator=torch.Generator().manual_seed(5))
    other = torch.randn(32, 2, 12, 12, generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), dmc.corrected(model, stats, grid_sample=64, estimate=estimate,
                                        min_positions=4) as m:
        first = m(x)
        m(other)
        again = m(x)
    assert torch.equal(first, again)


# --- 4. an outlier sample does not wreck grid mode ----------------------------------------------

def test_one_outlier_sample_keeps_grid_mode_close_to_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()
    stats = dmc.fit(model, gaussian_batches((32, 3, 8, 8)), levels=257, progress=False)
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 + 1
    x[0] *= 1e4
    with torch.no_grad():
        exact = dmc.DMC(model, stats, mode="exact")(x)
        model2 = nn.Sequential(nn.BatchNorm2d(3)).eval()
        grid = dmc.DMC(model2, stats, mode="grid")(x)
    # "close": the other samples' corrected values differ from exact mode's by at most 0.1
    # reference standard deviations (the reference here is N(0, 1)), 0.02 on average
    diff = (grid[1:] - exact[1:]).abs()
    assert diff.max() < 0.1 and diff.mean() < 0.02
    assert torch.isfinite(grid).all()


# --- 5. per-sample fallback is decided per batch -----------------------------------------------

def test_per_sample_fallback_is_decided_per_batch_and_reset_clears_it():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval()
    stats = dmc.fit(model, gaussian_batches((8, 1, 6, 6)), levels=33, progress=False, per_sample=True)
    m = dmc.DMC(model, stats, estimate="per-sample", min_positions=16)
    with torch.no_grad():
        big = torch.randn(4, 1, 6, 6)
        before = m(big)
        m(torch.randn(4, 1, 2, 2))  # 4 positions per sample: this batch falls back to prior
        assert m.estimate_used("1") == "prior"
        after = m(big)
        assert m.estimate_used("1") == "per-sample"
        assert torch.equal(before, after)
        m(torch.randn(4, 1, 2, 2))
        m.reset()
        assert m.estimate_used("1") == "per-sample" and not m.fallbacks


# --- 6. train mode -----------------------------------------------------------------------------

def test_a_corrected_forward_in_train_mode_warns_once():
    model = conv_model(False)
    stats = dmc.fit(model, gaussian_batches((8, 2, 5, 5)), levels=17, progress=False)
    m = dmc.DMC(model, stats)
    model.train()
    with pytest.warns(UserWarning, match="train mode"):
        m(torch.randn(8, 2, 5, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(torch.randn(8, 2, 5, 5))  # once per wrapper
    model.eval()
    m.remove()


def test_fit_restores_every_submodules_own_mode():
    model = conv_model(False).train()
    model[1].eval()  # a frozen BatchNorm inside a train-mode model
    dmc.fit(model, gaussian_batches((4, 2, 5, 5), 2), levels=9, progress=False)
    assert model.training and not model[1].training and model[4].training


# --- 8. unchecked arguments --------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    model = conv_model(False)
    return model, dmc.fit(model, gaussian_batches((8, 2, 5, 5)), levels=17, progress=False)


def test_fit_argument_errors(small):
    model, _ = small
    data = gaussian_batches((4, 2, 5, 5), 2)
    with pytest.raises(ValueError, match="per_sample_images"):
        dmc.fit(model, data, per_sample=True, per_sample_images=0, progress=False)
    with pytest.raises(ValueError, match=r"'1'.*channel axis 7"):
        dmc.fit(model, data, channel_axes=7, progress=False)
    with pytest.raises(ValueError, match="no module"):
        dmc.fit(model, data, sites=["1", "nope*"], progress=False)


def test_fit_skips_an_empty_batch_and_says_so(small):
    model, _ = small
    data = [torch.zeros(0, 2, 5, 5)] + gaussian_batches((4, 2, 5, 5), 2)
    stats = dmc.fit(model, data, levels=9, progress=False)
    assert stats.info["empty_batches"] == 1 and stats.info["batches"] == 2
    with pytest.raises(ValueError, match="no batches with images"):
        dmc.fit(model, [torch.zeros(0, 2, 5, 5)], progress=False)


def test_dmc_argument_errors(small, tmp_path):
    model, stats = small
    with pytest.raises(ValueError, match="grid_sample"):
        dmc.DMC(model, stats, grid_sample=0)
    with pytest.raises(ValueError, match=r"bnX\*.*matches no"):
        dmc.DMC(model, stats, strength={"bnX*": 0.5})
    with pytest.raises(ValueError, match=r"bnX\*.*matches no"):
        dmc.DMC(model, stats, estimate={"bnX*": "prior"})
    with pytest.raises(ValueError, match=r"'nope'.*matches no"):
        dmc.DMC(model, stats, sites=["1", "nope"])
    with pytest.raises(TypeError, match="ReferenceStats"):
        dmc.DMC(model, {"1": torch.zeros(4, 17)})
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    m = dmc.DMC(model, str(path))  # a path is loaded (and checked against the model)
    assert m.sites == stats.sites
    m.remove()


# --- 9. inference mode and the per-shape cache -------------------------------------------------

def test_grid_mode_under_inference_mode_then_no_grad_then_grad(small):
    model, stats = small
    m = dmc.DMC(model, stats)
    x = torch.randn(8, 2, 5, 5)
    with torch.inference_mode():
        a = m(x)
    with torch.no_grad():
        b = m(x)
    c = m(x.requires_grad_())
    assert torch.equal(a, b) and torch.equal(b, c.detach())
    m.remove()


def test_the_per_shape_cache_is_bounded_and_reset_clears_it(small):
    model, stats = small
    m = dmc.DMC(model, stats, grid_sample=8)
    with torch.no_grad():
        for size in range(3, 43):
            m(torch.randn(2, 2, size, size))
    assert 0 < m.cache_size() <= dmc.correct.SHAPE_CACHE_SIZE
    m.reset()
    assert m.cache_size() == 0
    m.remove()


# --- 10. empty batch ---------------------------------------------------------------------------

@pytest.mark.parametrize("estimate", ["batch", "ema", "per-sample"])
def test_an_empty_batch_returns_the_plain_output_and_changes_no_state(small, estimate):
    model, _ = small
    stats = dmc.fit(model, gaussian_batches((8, 2, 5, 5)), levels=17, progress=False, per_sample=True)
    x = torch.randn(8, 2, 5, 5)
    with torch.no_grad():
        plain = model(torch.zeros(0, 2, 5, 5))
        m = dmc.DMC(model, stats, estimate=estimate, min_positions=4)
        first = m(x)
        m.reset()
        out = m(torch.zeros(0, 2, 5, 5))
        assert out.shape == plain.shape == (0, 3)
        assert torch.equal(m(x), first)  # nothing changed (ema state included)
        m.remove()


# --- 11. BatchNorm sites corrected from their input keep the non-finite policy ------------------

def test_a_fused_batchnorm_site_passes_non_finite_values_as_the_batchnorm_computes_them():
    model = conv_model(False)
    with torch.no_grad():
        model[1].weight[0] = -1.5  # a negative slope: +inf in becomes -inf out
        model[1].weight[2] = 0.0  # a zero slope: inf in becomes NaN out (inf·0)
    stats = dmc.fit(model, gaussian_batches((16, 2, 6, 6)), levels=65, progress=False)
    x = torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(4))
    seen = {}
    m = dmc.DMC(model, stats)
    model[0].register_forward_hook(lambda mod, i, o: o.__setitem__((1, slice(None), 0, 0), float("inf")))
    model[1].register_forward_hook(lambda mod, i, o: seen.setdefault("y", o))
    with torch.no_grad():
        m(x)
        bn = model[1]
        a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        expected = float("inf") * a  # BatchNorm's value at the +inf inputs
    y = seen["y"]
    assert torch.equal(y[1, :, 0, 0].nan_to_num(), expected.nan_to_num())
    assert torch.equal(y[1, :, 0, 0].isnan(), expected.isnan())
    assert y[1, 0, 0, 0] == float("-inf")
    y[1, :, 0, 0] = 0.0
    assert torch.isfinite(y).all()  # every other value corrected to a finite one
