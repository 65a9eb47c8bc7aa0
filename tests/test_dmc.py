"""The public API: fit, DMC, corrected, shift_report, ReferenceStats files."""

import copy
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from torch import nn

import torch_dmc as dmc
from torch_dmc.transport import interp_quantiles


def bn_cnn(seed: int = 0, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 16), nn.BatchNorm1d(16),
        nn.ReLU(), nn.Linear(16, 10),
    )
    # non-trivial running statistics, as a trained model has
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(source_images(64, seed=100 + _))
    return model.eval()


def source_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 12, 12, generator=g)
    x[:, :, :2] = 0.0  # constant background rows: atoms
    return x


def distorted(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x ** 3 * 2.5 + 0.3 * torch.randn(x.shape, generator=g)).tanh()


@pytest.fixture(scope="module")
def model_and_stats():
    model = bn_cnn()
    data = [(source_images(64, seed=i), torch.zeros(64)) for i in range(12)]
    stats = dmc.fit(model, data, levels=257, progress=False)
    return model, stats


def test_fit_records_every_norm_site(model_and_stats):
    model, stats = model_and_stats
    assert stats.sites == ["1", "4", "7", "12"]
    assert stats.channels == {"1": 8, "4": 16, "7": 16, "12": 16}
    assert stats.levels == 257
    assert stats.info["images"] == 12 * 64 and stats.info["batches"] == 12
    for q in stats.quantiles.values():
        assert torch.all(q[:, 1:] >= q[:, :-1])


def test_fit_leaves_parameters_buffers_and_mode_untouched():
    model = bn_cnn()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dmc.fit(model, [source_images(32, seed=i) for i in range(3)], progress=False)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("mode", ["exact", "grid"])
def test_correction_removes_at_least_90_percent_of_w1_at_every_site(model_and_stats, mode):
    model, stats = model_and_stats
    # prior_values=0: the full batch transport also at the B×C site (its default shrinks it)
    report = dmc.shift_report(model, stats, distorted(source_images(128, seed=99), 1), mode=mode,
                              prior_values=0)
    assert list(report) == stats.sites
    for site, row in report.items():
        assert row["before"] > 1e-3, site  # the distortion really shifts every site
        assert row["after"] <= 0.1 * row["before"], (site, row)


def test_corrected_values_are_within_sketch_error_of_the_reference():
    # one channel, many source values: W1 (scipy) between corrected test values and the source
    # sample is bounded by the sketch's rank error times the source's range, plus 1/N
    g = torch.Generator().manual_seed(0)
    source = torch.distributions.Gamma(2.0, 1.0).sample((1, 200_000))
    model = nn.Sequential(nn.Identity()).eval()
    stats = dmc.fit(model, [source[:, i:i + 20_000].T for i in range(0, 200_000, 20_000)],
                    sites="0", channel_axes=1, levels=1025, progress=False)
    test = torch.randn(5000, 1, generator=g)
    with dmc.corrected(model, stats, mode="exact", prior_values=0) as m:
        out = m(test)
    w1 = wasserstein_distance(out[:, 0].numpy(), source[0].numpy())
    bound = (stats.info["rank_error_bound"] + 1 / 5000) * float(source.max() - source.min())
    assert w1 <= bound
    assert w1 < 0.05  # in absolute terms: the source has std 1.4


def test_remove_restores_bit_identical_outputs(model_and_stats):
    model, stats = model_and_stats
    x = distorted(source_images(16, seed=5), 2)
    reference = model(x)
    corrected = dmc.DMC(model, stats, mode="exact")
    assert not torch.equal(corrected(x), reference)
    assert corrected.remove() is model
    assert torch.equal(model(x), reference)
    with pytest.raises(RuntimeError, match="removed"):
        corrected(x)


def test_context_manager_restores_even_after_an_error(model_and_stats):
    model, stats = model_and_stats
    x = distorted(source_images(16, seed=6), 3)
    reference = model(x)
    with pytest.raises(KeyError):
        with dmc.corrected(model, stats, mode="grid") as m:
            assert not torch.equal(m(x), reference)
            raise KeyError("boom")
    assert torch.equal(model(x), reference)


def test_strength_interpolates_and_per_site_strengths(model_and_stats):
    model, stats = model_and_stats
    x = distorted(source_images(32, seed=7), 4)
    plain = model(x)
    with dmc.corrected(model, stats, mode="exact", strength=0.0) as m:
        assert m.sites == [] and torch.equal(m(x), plain)
    with dmc.corrected(model, stats, mode="exact", strength={"*": 0.0, "4": 1.0}) as m:
        assert m.sites == ["4"]
    with dmc.corrected(model, stats, mode="exact", sites=["1", "7"], strength=0.5) as m:
        assert m.sites == ["1", "7"] and m.strengths == {"1": 0.5, "7": 0.5}
    seen = {}
    with dmc.corrected(model, stats, mode="exact", strength=0.25, sites="1") as m:
        # registered after DMC's hook, so it sees the corrected output
        hook = model[1].register_forward_hook(lambda mod, i, o: seen.setdefault("y", o))
        try:
            m(x)
        finally:
            hook.remove()
    raw = model[1](model[0](x))
    with dmc.corrected(model, stats, mode="exact", sites="1") as m1:
        full = m1._correct("1", raw)
    torch.testing.assert_close(seen["y"], raw + 0.25 * (full - raw))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dmc.DMC(model, stats, strength=1.5)
    with pytest.raises(ValueError, match="unknown mode"):
        dmc.DMC(model, stats, mode="fast")


def test_grid_mode_close_to_exact_on_the_network(model_and_stats):
    model, stats = model_and_stats
    x = distorted(source_images(200, seed=8), 5)
    with dmc.corrected(model, stats, mode="exact") as m:
        exact = m(x).softmax(1)
    with dmc.corrected(model, stats, mode="grid") as m:
        grid = m(x).softmax(1)
    assert float((exact - grid).detach().abs().max()) < 0.02


def test_grid_mode_keeps_a_channels_last_layout_and_its_values(model_and_stats):
    import copy

    model, stats = model_and_stats
    x = distorted(source_images(64, seed=9), 4)
    with dmc.corrected(model, stats) as m:
        plain = m(x)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    layouts = []
    with dmc.corrected(cl_model, stats) as m:
        h = cl_model[2].register_forward_hook(  # the ReLU after the first corrected site
            lambda mod, inp, out: layouts.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
        cl = m(x.contiguous(memory_format=torch.channels_last))
        h.remove()
    assert layouts == [True]  # the corrected output kept the layout: no copy to NCHW
    torch.testing.assert_close(cl, plain, rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_is_exact(model_and_stats, tmp_path):
    model, stats = model_and_stats
    path = tmp_path / "model.dmc.safetensors"
    stats.save(path)
    loaded = dmc.ReferenceStats.load(path, model=model)
    assert loaded.sites == stats.sites
    assert loaded.channel_axes == stats.channel_axes and loaded.info == stats.info
    assert all(torch.equal(loaded.quantiles[s], stats.quantiles[s]) for s in stats.sites)
    assert loaded.checksum() == stats.checksum()
    assert loaded.fingerprint_matches(model)


def test_stats_of_another_model_are_refused(model_and_stats, tmp_path):
    _, stats = model_and_stats
    path = tmp_path / "s.safetensors"
    stats.save(path)
    wider = bn_cnn(width=4)
    with pytest.raises(dmc.StatsMismatchError, match="channels.*another model"):
        dmc.ReferenceStats.load(path, model=wider)
    other = nn.Sequential(nn.Conv2d(1, 8, 3), nn.GroupNorm(2, 8))
    with pytest.raises(dmc.StatsMismatchError, match="lacks"):
        dmc.DMC(other, stats)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['DMC_TEST_MARKER']}",))


def test_a_pickle_is_refused_without_being_executed(tmp_path, monkeypatch):
    marker = tmp_path / "executed"
    monkeypatch.setenv("DMC_TEST_MARKER", str(marker))
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(ValueError, match="not a safetensors file"):
        dmc.ReferenceStats.load(path)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="dmc fit"):
        dmc.ReferenceStats.load(tmp_path / "missing.safetensors")


def test_layernorm_tokens_use_the_last_axis():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 3)).eval()
    tokens = [torch.randn(4, 10, 6) for _ in range(4)]
    stats = dmc.fit(model, tokens, progress=False, levels=65)
    assert stats.channel_axes == {"1": -1} and stats.channels == {"1": 12}
    report = dmc.shift_report(model, stats, torch.randn(4, 10, 6) * 3 + 1, mode="exact")
    assert report["1"]["after"] < 0.2 * report["1"]["before"]


def test_sites_by_type_and_pattern():
    model = bn_cnn()
    data = [source_images(16, seed=0)]
    assert dmc.fit(model, data, sites=[nn.BatchNorm1d], progress=False).sites == ["12"]
    assert dmc.fit(model, data, sites=["1", "[47]"], progress=False).sites == ["1", "4", "7"]
    with pytest.raises(ValueError, match="no module of the model matches"):
        dmc.fit(model, data, sites="layer*.bn", progress=False)


def test_fit_errors_and_limits():
    model = bn_cnn()
    with pytest.raises(ValueError, match="no batches"):
        dmc.fit(model, [], progress=False)
    with pytest.raises(TypeError, match="tensor or an"):
        dmc.fit(model, ["not a tensor"], progress=False)
    stats = dmc.fit(model, [source_images(8, seed=i) for i in range(10)], max_batches=3,
                    progress=False)
    assert stats.info["batches"] == 3


def test_wrong_input_channels_at_apply_time_are_explained(model_and_stats):
    model, stats = model_and_stats
    tokens = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12)).eval()
    stats_tok = dmc.fit(tokens, [torch.randn(2, 3, 6)], progress=False, levels=9)
    stats_tok.channel_axes["1"] = 1  # pretend it was fitted on N×C×… outputs
    with dmc.corrected(tokens, stats_tok) as m, pytest.raises(dmc.StatsMismatchError,
                                                                 match="expected 12 channels"):
        m(torch.randn(2, 3, 6))


def test_identity_when_test_batch_is_the_source_distribution(model_and_stats):
    model, stats = model_and_stats
    x = source_images(256, seed=1234)
    with dmc.corrected(model, stats, mode="exact") as m:
        out = m(x)
    agree = (out.argmax(1) == model(x).argmax(1)).float().mean()
    assert agree > 0.95


def test_interp_helper_matches_numpy():
    q = torch.tensor([[0.0, 2.0, 3.0]])
    u = torch.tensor([[0.1, 0.6]])
    np.testing.assert_allclose(interp_quantiles(q, u)[0].numpy(),
                               np.interp([0.1, 0.6], [0, 0.5, 1], [0, 2, 3]), rtol=1e-6)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["exact", "grid"])
def test_every_device_gives_the_cpu_result(model_and_stats, device, mode):
    model, stats = model_and_stats
    x = distorted(source_images(64, seed=11), 6)
    with dmc.corrected(model, stats, mode=mode) as m:
        expected = m(x)
    moved = bn_cnn().to(device)
    moved.load_state_dict(model.state_dict())
    fitted = dmc.fit(moved, [(source_images(64, seed=i).to(device), None) for i in range(12)],
                     levels=257, progress=False)
    for s in stats.sites:
        torch.testing.assert_close(fitted.quantiles[s], stats.quantiles[s], atol=1e-4, rtol=1e-4)
    with dmc.corrected(moved, fitted.to(device), mode=mode) as m:
        out = m(x.to(device)).cpu()
    if mode == "exact" or device == "cpu":
        torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-3)
    else:  # grid mode samples with the device's own random generator
        assert float((out - expected).abs().mean()) < 0.05 * float(expected.abs().mean())


# --- BatchNorm sites corrected from their input (docs/method.md § Grid mode, BatchNorm sites) --

def _unfused(monkeypatch, *args, **kwargs) -> dmc.DMC:
    """A DMC built with every site as a hook on its output (the BatchNorm runs, then the lookup)."""
    import torch_dmc.correct as correct

    with monkeypatch.context() as m:
        m.setattr(correct, "FUSE_BATCHNORM", False)
        return dmc.DMC(*args, **kwargs)


def _count_batch_norm(monkeypatch) -> list:
    calls = []
    original = torch.nn.functional.batch_norm

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "batch_norm", counted)
    return calls


def test_batchnorm_sites_skip_their_own_pass_and_agree_with_the_hooked_correction(
        model_and_stats, monkeypatch):
    model, stats = model_and_stats
    x = distorted(source_images(128, seed=21), 3)
    reference = model(x)
    hooked = _unfused(monkeypatch, copy.deepcopy(model), stats)
    with torch.no_grad():
        want = hooked(x)
    calls = _count_batch_norm(monkeypatch)
    fused = dmc.DMC(model, stats)
    with torch.no_grad():
        got = fused(x)
    # the three BatchNorm2d sites are looked up from their input; BatchNorm1d on (B, C) has a
    # value prior (docs/method.md § Estimates), so it runs and is corrected as its output
    assert len(calls) == 1
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())
    assert float((got.argmax(1) == want.argmax(1)).float().mean()) > 0.95
    assert torch.equal(fused(x), got)  # same input, same output
    model = fused.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(model(x), reference)


def test_a_batchnorm_with_a_replaced_unmarked_forward_is_corrected_from_what_that_forward_returns(
        model_and_stats, monkeypatch):
    """A user's own instance ``forward`` on a BatchNorm site (not marked affine) must run: the
    site is then corrected from its output, exactly as on the hooked path, and `remove` keeps it."""
    model, stats = model_and_stats
    x = distorted(source_images(64, seed=23), 3)
    nets = [copy.deepcopy(model) for _ in range(2)]
    calls = []
    name = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    for net in nets:
        bn = net.get_submodule(name)
        plain = bn.forward

        def replaced(inp, plain=plain):  # not an affine map of the input: must not be skipped
            calls.append(1)
            return torch.tanh(plain(inp))
        bn.forward = replaced
    # that site alone: the other sites' fusion would round differently
    want = _unfused(monkeypatch, nets[0], stats, sites=[name])
    with torch.no_grad():
        expected = want(x)
    calls.clear()
    fused = dmc.DMC(nets[1], stats, sites=[name])
    with torch.no_grad():
        got = fused(x)
    assert calls == [1]
    assert torch.equal(got, expected)
    assert fused.remove().get_submodule(name).forward.__name__ == "replaced"


@pytest.mark.parametrize("case", ["strength", "prior", "exact", "train"])
def test_batchnorm_sites_run_their_own_pass_where_the_lookup_needs_it(model_and_stats, monkeypatch,
                                                                      case):
    model, stats = model_and_stats
    net = copy.deepcopy(model)
    options = {"strength": {"strength": 0.5}, "prior": {"estimate": "prior"},
               "exact": {"mode": "exact"}, "train": {}}[case]
    m = dmc.DMC(net, stats, **options)
    if case == "train":
        net.train()
    calls = _count_batch_norm(monkeypatch)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the train-mode warning
        m(distorted(source_images(16, seed=22), 3))
    assert len(calls) == 4


def test_a_fused_batchnorm_site_keeps_a_channels_last_layout(model_and_stats, monkeypatch):
    model, stats = model_and_stats
    x = distorted(source_images(64, seed=23), 4)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    layouts = []
    with dmc.corrected(cl_model, stats) as m, torch.no_grad():
        h = cl_model[1].register_forward_hook(
            lambda mod, inp, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
        got = m(xc)
        h.remove()
    assert layouts == [True]
    with torch.no_grad():
        want = _unfused(monkeypatch, copy.deepcopy(model), stats)(x)
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())


def test_adapt_bn_batch_statistics_are_skipped_at_fully_corrected_sites(monkeypatch):
    from torch_dmc.methods import build

    model = bn_cnn(seed=1)
    data = [source_images(64, seed=30 + i) for i in range(6)]
    stats = dmc.fit(model, data, levels=257, progress=False)
    x = distorted(source_images(96, seed=24), 2)
    with monkeypatch.context() as m:
        import torch_dmc.correct as correct

        m.setattr(correct, "FUSE_BATCHNORM", False)
        hooked = build("dmc", copy.deepcopy(model), stats, adapt_bn=True)
    fused = build("dmc", copy.deepcopy(model), stats, adapt_bn=True)
    with torch.no_grad():
        want, got = hooked(x), fused(x)
    # the output of a site corrected at full strength does not depend on its BatchNorm's
    # statistics (docs/method.md § Transport: invariant to increasing affine maps), up to rounding
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())
    # a non-finite value spoils a batch-statistics BatchNorm's whole channel: then it runs
    x[0, 0, 5, 5] = float("nan")
    with torch.no_grad():
        assert torch.equal(fused(x).isnan(), hooked(x).isnan())
