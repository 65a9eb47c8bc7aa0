"""Tests of torch_dmc.methods: source, bn, bn-prior, bn-ema, tent, dmc."""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_dmc
from torch_dmc import methods

NO_STATS = ["source", "bn", "bn-prior", "bn-ema", "tent"]


def tiny_cnn(seed: int = 0) -> nn.Sequential:
    """Conv-BN2d-ReLU, Conv-GN-ReLU, pool, Linear-BN1d-ReLU-Dropout, Linear; random BN stats."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(16, 10),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(100)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model.eval()


def batches(k: int = 3, n: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [1.5 * torch.randn(n, 3, 6, 6, generator=g) + 0.3 for _ in range(k)]


def snapshot(model: nn.Module):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    return state, modes, grads


def assert_same(model: nn.Module, snap) -> None:
    state, modes, grads = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads


def manual_forward(model: nn.Sequential, x: torch.Tensor, bn_stats) -> torch.Tensor:
    """Run ``model`` layer by layer; BatchNorm layers normalise with ``bn_stats(layer, x)``."""
    for layer in model:
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            mean, var = bn_stats(layer, x)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            x = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + layer.eps)
            x = x * layer.weight.view(shape) + layer.bias.view(shape)
        else:
            x = layer(x)
    return x


def hand_batch_stats(layer, x):
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims)
    var = ((x - mean.view((1, -1) + (1,) * (x.dim() - 2))) ** 2).mean(dims)
    return mean, var


# -- the interface --------------------------------------------------------------------------------


def test_available_and_registry():
    assert methods.available() == [
        "source", "bn", "bn-prior", "bn-ema", "tent", "dmc", "dmc-prior", "dmc-ema", "dmc-per-sample"
    ]
    for name, cls in methods.METHODS.items():
        assert cls.name == name
        assert issubclass(cls, methods.Method)
        assert len(cls.definition) > 40
        assert cls.__doc__ and "Definition" in cls.__doc__


@pytest.mark.parametrize("name", NO_STATS)
def test_forward_shape_and_options(name):
    model = tiny_cnn()
    method = methods.build(name, model)
    with torch.no_grad():
        out = method(batches(1)[0])
    assert out.shape == (8, 10)
    assert torch.isfinite(out).all()
    json.dumps(method.options())
    assert method.name == name


@pytest.mark.parametrize("name", NO_STATS)
@pytest.mark.parametrize("train_mode", [False, True])
def test_caller_model_untouched(name, train_mode):
    model = tiny_cnn().train(train_mode)
    snap = snapshot(model)
    method = methods.build(name, model)
    for x in batches(3):
        method(x)
    with torch.no_grad():
        method(batches(1, seed=5)[0])
    method.reset()
    method(batches(1, seed=6)[0])
    assert_same(model, snap)
    assert method.model is not model


@pytest.mark.parametrize("name", NO_STATS)
def test_reset_restores_exact_outputs(name):
    method = methods.build(name, tiny_cnn())
    xs = batches(3)
    first = [method(x) for x in xs]
    method.reset()
    again = [method(x) for x in xs]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NO_STATS)
def test_train_eval_on_wrapper_keep_configuration(name):
    method = methods.build(name, tiny_cnn())
    modes = [m.training for m in method.model.modules()]
    method.train()
    assert method.training
    method.eval()
    assert not method.training
    assert [m.training for m in method.model.modules()] == modes


def test_build_errors():
    model = tiny_cnn()
    with pytest.raises(ValueError, match="unknown method 'nope'.*source, bn, bn-prior"):
        methods.build("nope", model)
    with pytest.raises(ValueError, match=r"unknown option.*'momentum'.*prior"):
        methods.build("bn-prior", model, momentum=0.1)
    with pytest.raises(ValueError, match="lr, betas, steps"):
        methods.build("tent", model, learning_rate=0.1)
    with pytest.raises(ValueError, match="none"):
        methods.build("source", model, prior=3)
    with pytest.raises(ValueError, match="prior"):
        methods.build("bn-prior", model, prior=-1)
    with pytest.raises(ValueError, match="momentum"):
        methods.build("bn-ema", model, momentum=1.5)
    with pytest.raises(ValueError, match="steps"):
        methods.build("tent", model, steps=0)
    with pytest.raises(ValueError, match="needs reference statistics"):
        methods.build("dmc", model)


def test_options_resolved():
    model = tiny_cnn()
    assert methods.build("source", model).options() == {}
    assert methods.build("bn", model).options() == {}
    assert methods.build("bn-prior", model).options() == {"prior": 16.0}
    assert methods.build("bn-ema", model, momentum=0.2).options() == {"momentum": 0.2}
    assert methods.build("tent", model).options() == {
        "lr": 1e-3,
        "betas": [0.9, 0.999],
        "steps": 1,
    }


# -- source and the BatchNorm baselines -----------------------------------------------------------


def test_source_is_model_in_eval():
    model = tiny_cnn()
    x = batches(1)[0]
    with torch.no_grad():
        assert torch.equal(methods.build("source", model.train())(x), model.eval()(x))


@pytest.mark.parametrize("n", [8, 2])
def test_bn_equals_hand_computed_batch_normalisation(n):
    model = tiny_cnn()
    x = batches(1, n=n)[0]
    with torch.no_grad():
        out = methods.build("bn", model)(x)
        ref = manual_forward(model, x, hand_batch_stats)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bn_batch_size_one():
    """BN2d: the instance's spatial statistics; BN1d (one value per channel): source statistics."""
    model = tiny_cnn()
    x = batches(1, n=1)[0]

    def stats(layer, h):
        if h.dim() == 2:
            return layer.running_mean, layer.running_var
        return hand_batch_stats(layer, h)

    with torch.no_grad():
        for name in ("bn", "bn-prior", "bn-ema"):
            opts = {"prior": 0.0} if name == "bn-prior" else {}
            opts = {"momentum": 1.0} if name == "bn-ema" else opts
            out = methods.build(name, model, **opts)(x)
            torch.testing.assert_close(out, manual_forward(model, x, stats), rtol=1e-5, atol=1e-5)


def test_bn_does_not_update_running_stats():
    method = methods.build("bn", tiny_cnn())
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    method(batches(1)[0])
    for k, v in method.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bn_keeps_layer_types_and_names():
    model = tiny_cnn()
    method = methods.build("bn", model)
    assert [(n, type(m)) for n, m in method.model.named_modules()] == [
        (n, type(m)) for n, m in model.named_modules()
    ]
    assert method.bn_layers == ["1", "9"]


def test_bn_prior_limits():
    model = tiny_cnn()
    x = batches(1)[0]
    with torch.no_grad():
        bn = methods.build("bn", model)(x)
        source = methods.build("source", model)(x)
        torch.testing.assert_close(
            methods.build("bn-prior", model, prior=0)(x), bn, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            methods.build("bn-prior", model, prior=math.inf)(x), source, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            methods.build("bn-prior", model, prior=1e9)(x), source, rtol=1e-5, atol=1e-5
        )


def test_bn_prior_formula():
    model = tiny_cnn()
    x = batches(1, n=4)[0]
    prior = 6.0

    def mixed(layer, h):
        mean_b, var_b = hand_batch_stats(layer, h)
        w = prior / (prior + h.shape[0])
        return w * layer.running_mean + (1 - w) * mean_b, w * layer.running_var + (1 - w) * var_b

    with torch.no_grad():
        out = methods.build("bn-prior", model, prior=prior)(x)
        torch.testing.assert_close(out, manual_forward(model, x, mixed), rtol=1e-5, atol=1e-5)


def test_bn_ema_limits():
    model = tiny_cnn()
    xs = batches(3)
    ema0 = methods.build("bn-ema", model, momentum=0.0)
    ema1 = methods.build("bn-ema", model, momentum=1.0)
    source = methods.build("source", model)
    bn = methods.build("bn", model)
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(ema0(x), source(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ema1(x), bn(x), rtol=1e-5, atol=1e-5)


def test_bn_ema_stream_formula_and_reset():
    model = tiny_cnn()
    xs = batches(3)
    m = 0.3
    method = methods.build("bn-ema", model, momentum=m)
    running = {}

    def ema(layer, h):
        mean_b, var_b = hand_batch_stats(layer, h)
        mean, var = running.get(id(layer), (layer.running_mean, layer.running_var))
        mean, var = (1 - m) * mean + m * mean_b, (1 - m) * var + m * var_b
        running[id(layer)] = (mean, var)
        return mean, var

    with torch.no_grad():
        for x in xs:  # the current batch is included before it is normalised
            torch.testing.assert_close(
                method(x), manual_forward(model, x, ema), rtol=1e-5, atol=1e-5
            )
        bn_copy = method.model[1]
        torch.testing.assert_close(bn_copy.running_mean, running[id(model[1])][0])
        method.reset()
        assert torch.equal(bn_copy.running_mean, model[1].running_mean)
        assert torch.equal(bn_copy.running_var, model[1].running_var)


def test_bn_ema_under_inference_mode():
    method = methods.build("bn-ema", tiny_cnn(), momentum=0.5)
    xs = batches(2)
    with torch.no_grad():
        ref = [method(x) for x in xs]
    method.reset()
    with torch.inference_mode():
        out = [method(x) for x in xs]
    for a, b in zip(ref, out, strict=True):
        assert torch.equal(a, b)


def test_prior_and_ema_need_running_stats():
    model = tiny_cnn()
    model[1] = nn.BatchNorm2d(8, track_running_stats=False)
    with pytest.raises(ValueError, match="no running statistics"):
        methods.build("bn-prior", model)
    methods.build("bn", model)(batches(1)[0])


# -- tent -----------------------------------------------------------------------------------------


def reference_tent(model: nn.Module, xs, lr=1e-3, betas=(0.9, 0.999)):
    """An independent tent (Wang et al. 2021): returns the predictions and the final model."""
    model = copy.deepcopy(model)
    model.eval()
    params = []
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            m.train()
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.track_running_stats = False
                m.running_mean = None
                m.running_var = None
            m.weight.requires_grad_(True)
            m.bias.requires_grad_(True)
            params += [m.weight, m.bias]
    opt = torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=0)
    preds = []
    for x in xs:
        logits = model(x)
        loss = -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        preds.append(logits.detach())
    return preds, model


@pytest.mark.parametrize("lr", [1e-3, 5e-2])
def test_tent_matches_reference(lr):
    model = tiny_cnn()
    xs = batches(3)
    ref_preds, ref_model = reference_tent(model, xs, lr=lr)
    method = methods.build("tent", model, lr=lr)
    preds = [method(x) for x in xs]
    for a, b in zip(preds, ref_preds, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    ref_params = dict(ref_model.named_parameters())
    changed = 0
    for name, p in method.model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], rtol=0, atol=1e-6)
        changed += not torch.equal(p, dict(model.named_parameters())[name])
    assert changed == 6  # weight and bias of BN2d, GN, BN1d
    assert method.param_names == ["1.weight", "1.bias", "4.weight", "4.bias", "9.weight", "9.bias"]


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_tent_adapts_inside_no_grad(context):
    model = tiny_cnn()
    xs = batches(2)
    ref_preds, _ = reference_tent(model, xs)
    method = methods.build("tent", model)
    with context():
        preds = [method(x) for x in xs]
    for a, b in zip(preds, ref_preds, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_tent_steps():
    model = tiny_cnn()
    x = batches(1)[0]
    ref_preds, _ = reference_tent(model, [x, x, x])
    method = methods.build("tent", model, steps=3)
    torch.testing.assert_close(method(x), ref_preds[-1], rtol=0, atol=1e-6)


def test_tent_needs_norm_layers():
    with pytest.raises(ValueError, match="normalization layers"):
        methods.build("tent", nn.Sequential(nn.Flatten(), nn.Linear(108, 10)))


# -- dmc ------------------------------------------------------------------------------------------


@pytest.fixture
def fitted():
    model = tiny_cnn()
    x1, x2 = batches(2, n=16, seed=3)
    stats = torch_dmc.fit(model, [x1, x2], levels=64, progress=False, per_sample=True)
    return model, stats


@pytest.mark.parametrize("adapt_bn", [False, True])
@pytest.mark.parametrize("name", ["dmc", "dmc-prior", "dmc-ema", "dmc-per-sample"])
def test_dmc_runs_and_leaves_model_untouched(fitted, adapt_bn, name):
    model, stats = fitted
    snap = snapshot(model)
    method = methods.build(name, model, stats=stats, adapt_bn=adapt_bn)
    xs = batches(2)
    with torch.no_grad():
        out = [method(x) for x in xs]
        assert out[0].shape == (8, 10)
        assert all(torch.isfinite(o).all() for o in out)
        method.reset()
        assert torch.equal(method(xs[0]), out[0])
    assert_same(model, snap)
    opts = method.options()
    json.dumps(opts)
    assert opts["adapt_bn"] is adapt_bn


def test_dmc_adapt_bn_invisible_to_exact_full_correction(fitted):
    """Exact transport ignores increasing affine maps, so with every BN output corrected at full
    strength adapt_bn changes nothing; at strength < 1 it does."""
    model, stats = fitted
    x = batches(1)[0]
    with torch.no_grad():
        out = {
            (a, s): methods.build("dmc", model, stats=stats, mode="exact", strength=s, adapt_bn=a,
                          prior_values=0)(
                x
            )
            for a in (False, True)
            for s in (1.0, 0.5)
        }
    torch.testing.assert_close(out[False, 1.0], out[True, 1.0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[False, 0.5], out[True, 0.5], atol=1e-3)


def test_dmc_unknown_option(fitted):
    model, stats = fitted
    with pytest.raises((ValueError, TypeError), match="no_such_option"):
        methods.build("dmc", model, stats=stats, no_such_option=1)


@pytest.mark.parametrize(("name", "estimate"), [("dmc-prior", "prior"), ("dmc-ema", "ema"),
                                                ("dmc-per-sample", "per-sample")])
def test_dmc_estimate_methods_equal_dmc_with_that_estimate(fitted, name, estimate):
    model, stats = fitted
    xs = batches(2)
    fixed = methods.build(name, model, stats=stats, mode="exact")
    general = methods.build("dmc", model, stats=stats, mode="exact", estimate=estimate)
    with torch.no_grad():
        for x in xs:
            assert torch.equal(fixed(x), general(x))
    assert fixed.options()["estimate"] == estimate
    assert "estimate" not in type(fixed).valid_options()
    with pytest.raises(ValueError, match="estimate"):
        methods.build(name, model, stats=stats, estimate="batch")


def test_needs_per_sample():
    assert methods.needs_per_sample("dmc-per-sample")
    assert methods.needs_per_sample("dmc", {"estimate": "per-sample"})
    assert methods.needs_per_sample("dmc", {"estimate": {"stem*": "per-sample", "*": "prior"}})
    assert not methods.needs_per_sample("dmc")
    assert not methods.needs_per_sample("dmc", {"estimate": {"*": "prior"}})
    assert not methods.needs_per_sample("dmc-prior", {"estimate": "per-sample"})
    assert not methods.needs_per_sample("bn")


# -- models without BatchNorm: LayerNorm tokens (ViT-like) and GroupNorm convs --------------------


class TinyViT(nn.Module):
    """Patch embedding (Conv) → ``B×N×C`` tokens → one pre-norm block (LN-attention, LN-MLP) → LN →
    mean over tokens → head: 3 LayerNorm layers, no BatchNorm."""

    def __init__(self, in_chans: int = 3, patch: int = 2, dim: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # B×N×C
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.mlp(self.norm2(t))
        return self.head(self.norm(t).mean(1))


def tiny_vit(seed: int = 0, **kw) -> TinyViT:
    torch.manual_seed(seed)
    model = TinyViT(**kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model.eval()


def tiny_gn(seed: int = 0) -> nn.Sequential:
    """Conv-GN-ReLU, Conv-GN-ReLU, pool, Linear: 2 GroupNorm layers, no BatchNorm."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model.eval()


NO_BN_MODELS = {"vit": (tiny_vit, "3 LayerNorm"), "gn": (tiny_gn, "2 GroupNorm")}
DMC_FAMILY = ["dmc", "dmc-prior", "dmc-ema", "dmc-per-sample"]


@pytest.mark.parametrize("kind", NO_BN_MODELS)
@pytest.mark.parametrize("name", ["bn", "bn-prior", "bn-ema"])
def test_bn_methods_refused_without_batchnorm(kind, name):
    make, found = NO_BN_MODELS[kind]
    model = make()
    snap = snapshot(model)
    expected = (
        rf"method '{name}' does not apply to this model: it has no BatchNorm layer \(it has "
        rf"{found}\), so BatchNorm statistics adaptation does not apply; methods that apply to "
        r"it: source, tent, dmc, dmc-prior, dmc-ema, dmc-per-sample\.$"
    )
    assert re.match(expected, methods.METHODS[name].applies_to(model))
    with pytest.raises(ValueError, match=expected):
        methods.build(name, model)
    with pytest.raises(ValueError, match=expected):
        methods.METHODS[name](model)  # the class itself refuses, not only build()
    assert methods.METHODS[name].applies_to(tiny_cnn()) is None
    assert_same(model, snap)


def test_applicable():
    assert methods.applicable(tiny_cnn()) == methods.available()
    assert methods.applicable(tiny_vit()) == ["source", "tent", *DMC_FAMILY]
    assert methods.applicable(tiny_gn()) == ["source", "tent", *DMC_FAMILY]
    no_affine = nn.Sequential(nn.Flatten(), nn.LayerNorm(108, elementwise_affine=False))
    assert methods.applicable(no_affine) == ["source", *DMC_FAMILY]
    assert methods.describe_norm_layers(nn.Sequential(nn.Linear(2, 2))) == (
        "it has no normalization layer"
    )
    mixed = nn.Sequential(nn.GroupNorm(1, 4), nn.LayerNorm(4), nn.GroupNorm(2, 4))
    assert methods.describe_norm_layers(mixed) == "it has 2 GroupNorm and 1 LayerNorm"


def test_tent_refused_without_affine_norm():
    model = nn.Sequential(nn.Flatten(), nn.LayerNorm(108, elementwise_affine=False), nn.Linear(108, 10))
    with pytest.raises(
        ValueError,
        match=r"method 'tent' does not apply to this model: .*normalization layers \(BatchNorm, "
        r"GroupNorm, LayerNorm\) and the model has none with affine parameters \(it has 1 "
        r"LayerNorm\); methods that apply to it: source, dmc",
    ):
        methods.build("tent", model)
    assert methods.Tent.applies_to(tiny_vit()) is None


@pytest.mark.parametrize("kind", NO_BN_MODELS)
def test_tent_adapts_only_ln_gn_affine_params(kind):
    model = NO_BN_MODELS[kind][0]()
    norm_type = nn.LayerNorm if kind == "vit" else nn.GroupNorm
    snap = snapshot(model)
    method = methods.build("tent", model)
    norms = {n for n, m in model.named_modules() if isinstance(m, norm_type)}
    expected = [f"{n}.{p}" for n in sorted(norms, key=list(dict(model.named_modules())).index)
                for p in ("weight", "bias")]
    assert method.param_names == expected
    trainable = [n for n, p in method.model.named_parameters() if p.requires_grad]
    assert trainable == expected
    assert all(m.training == (n in norms) for n, m in method.model.named_modules() if n)
    method(batches(1)[0])
    before = dict(model.named_parameters())
    for name, p in method.model.named_parameters():
        if name in expected:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name
    for name, b in method.model.named_buffers():
        assert torch.equal(b, dict(model.named_buffers())[name]), name
    method.reset()
    for name, p in method.model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert_same(model, snap)


@pytest.mark.parametrize("kind", NO_BN_MODELS)
def test_tent_matches_reference_and_reset_on_ln_gn(kind):
    model = NO_BN_MODELS[kind][0]()
    xs = batches(2)
    ref_preds, _ = reference_tent(model, xs)
    method = methods.build("tent", model)
    first = [method(x) for x in xs]
    for a, b in zip(first, ref_preds, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    method.reset()
    for x, a in zip(xs, first, strict=True):
        assert torch.equal(method(x), a)


@pytest.mark.parametrize("kind", NO_BN_MODELS)
def test_tent_entropy_decreases_on_repeated_batch(kind):
    method = methods.build("tent", NO_BN_MODELS[kind][0](), lr=1e-2)
    x = batches(1)[0]
    losses = [methods.tent.softmax_entropy(method(x)).mean().item() for _ in range(6)]
    assert losses[-1] < losses[0]
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:], strict=False))


@pytest.fixture(params=list(NO_BN_MODELS))
def fitted_no_bn(request):
    model = NO_BN_MODELS[request.param][0]()
    x1, x2 = batches(2, n=16, seed=3)
    stats = torch_dmc.fit(model, [x1, x2], levels=64, progress=False, per_sample=True)
    return model, stats


def test_dmc_family_on_ln_and_gn_models(fitted_no_bn):
    model, stats = fitted_no_bn
    snap = snapshot(model)
    xs = batches(2)
    with torch.no_grad():
        plain = model(xs[0])
        for name in DMC_FAMILY:
            method = methods.build(name, model, stats=stats)
            out = [method(x) for x in xs]
            assert out[0].shape == (8, 10) and all(torch.isfinite(o).all() for o in out)
            assert not torch.allclose(out[0], plain, atol=1e-4), name  # it corrects something
            method.reset()
            assert torch.equal(method(xs[0]), out[0]), name
    assert_same(model, snap)


@pytest.mark.parametrize("name", DMC_FAMILY)
def test_dmc_adapt_bn_refused_without_batchnorm(fitted_no_bn, name):
    model, stats = fitted_no_bn
    found = "3 LayerNorm" if isinstance(model, TinyViT) else "2 GroupNorm"
    expected = (
        rf"method '{name}' with these options does not apply to this model: adapt_bn=True "
        rf"configures the BatchNorm layers, but it has no BatchNorm layer \(it has {found}\); use "
        r"adapt_bn=False\.$"
    )
    with pytest.raises(ValueError, match=expected):
        methods.build(name, model, stats=stats, adapt_bn=True)
    with pytest.raises(ValueError, match=expected):
        methods.METHODS[name](model, stats, adapt_bn=True)  # the class refuses too
    assert methods.METHODS[name].applies_to(model, {"adapt_bn": False}) is None
    assert methods.METHODS[name].applies_to(tiny_cnn(), {"adapt_bn": True}) is None


def test_bench_refuses_bn_on_vit_before_fitting(tmp_path):
    from torch_dmc.bench import runner
    from torch_dmc.bench.protocol import Protocol
    from torch_dmc.data import ImageData

    rng = np.random.default_rng(0)
    data = ImageData(
        rng.integers(0, 256, (16, 28, 28), dtype=np.uint8), np.arange(16) % 10,
        rng.integers(0, 256, (8, 28, 28), dtype=np.uint8), np.arange(8) % 10, name="tiny",
    )
    protocol = Protocol(methods=["source", "dmc", "bn", "bn-ema"], corruptions=["contrast"],
                        severities=[5], batch_sizes=[8], seeds=[0], fit_levels=64)
    model = tiny_vit(in_chans=1, patch=7)
    with pytest.raises(ValueError) as err:
        runner.run_benchmark(protocol, tmp_path / "out", model=model, data=data, workers=1,
                             progress=False, plots=False, cache_dir=tmp_path / "cache",
                             log=lambda _: None)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "method 'bn' does not apply to this model: it has no BatchNorm layer (it has 3 LayerNorm)"
    )
    assert message.endswith("Also not applicable: bn-ema. Leave them out of the methods to run.")
    assert not (tmp_path / "out" / "stats.safetensors").exists()
    runner.check_methods_apply(Protocol(methods=["source", "tent", "dmc"]), model)
    with pytest.raises(ValueError, match="adapt_bn=True"):
        runner.check_methods_apply(
            Protocol(methods=["dmc"], method_options={"dmc": {"adapt_bn": True}}), model
        )


def test_tent_on_a_channels_last_groupnorm_model_does_not_crash():
    # torch 2.13's CPU GroupNorm backward segfaults on channels-last activations that need no
    # gradient; Tent keeps GroupNorm models contiguous. Run in a subprocess: a crash kills it.
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from torch import nn\n"
        "from torch_dmc import methods\n"
        "torch.manual_seed(0)\n"
        "m = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1), nn.GroupNorm(8, 24), nn.Flatten(),\n"
        "                  nn.Linear(24 * 28 * 28, 10)).to(memory_format=torch.channels_last)\n"
        "x = torch.rand(64, 1, 28, 28).to(memory_format=torch.channels_last)\n"
        "print(methods.build('tent', m)(x).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    assert "torch.Size([64, 10])" in out.stdout
