"""Sites and channel axes for the layouts of the field's models, re-implemented here (no timm).

For each layout: the right sites and axes, a reference that matches a direct sample along the
right axis, W1 to the reference cut by at least 80 % on a shifted batch, and a bit-identical model
after `remove()`.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_dmc as dmc
from torch_dmc.transport import empirical_quantiles


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: an nn.LayerNorm subclass over the channels of an N×C×H×W tensor."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtLayerNorm(nn.Module):
    """The official ConvNeXt LayerNorm: a plain module, channels_first or channels_last."""

    def __init__(self, normalized_shape, eps=1e-6, data_format="channels_first"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass with the activation inside its forward."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class ViTBlock(nn.Module):
    """A pre-norm transformer block on (B, N, C) tokens."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.blocks = nn.Sequential(ViTBlock(dim), ViTBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # B×N×C
        return self.head(self.norm(self.blocks(tokens)).mean(1))


class ChannelsLast(nn.Module):
    """A LayerNorm on a (B, H, W, C) tensor, as ConvNeXt's blocks use it."""

    def __init__(self, c=6):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        return self.head(self.norm(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2)))


def conv_then(norm, c=6):
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), norm, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(c, 4))


# name -> (model factory, input shape, {site: expected axis}, channels, fit kwargs)
LAYOUTS = {
    "layernorm2d": (lambda: conv_then(LayerNorm2d(6)), (8, 3, 10, 10), {"1": 1}, 6, {}),
    # width 6 == channels 6: ambiguous from the shape, so the axis is given
    "layernorm2d_c_eq_w": (lambda: conv_then(LayerNorm2d(6)), (8, 3, 5, 6), {"1": 1}, 6,
                           {"channel_axes": {"1": 1}}),
    "convnext_plain": (lambda: conv_then(ConvNeXtLayerNorm(6)), (8, 3, 10, 10), {"1": 1}, 6,
                       {"sites": ["1"]}),
    "batchnormact": (lambda: conv_then(BatchNormAct2d(6)), (8, 3, 10, 10), {"1": 1}, 6, {}),
    "groupnorm_1_group": (lambda: conv_then(nn.GroupNorm(1, 6)), (8, 3, 10, 10), {"1": 1}, 6, {}),
    "instancenorm_affine": (lambda: conv_then(nn.InstanceNorm2d(6, affine=True)), (8, 3, 10, 10),
                            {"1": 1}, 6, {}),
    "instancenorm_plain": (lambda: conv_then(nn.InstanceNorm2d(6)), (8, 3, 10, 10), {"1": 1}, 6, {}),
    "rmsnorm_tokens": (lambda: nn.Sequential(nn.Linear(3, 6), nn.RMSNorm(6), nn.Linear(6, 4)),
                       (8, 5, 3), {"1": -1}, 6, {}),
    "layernorm_flat": (lambda: nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 4)),
                       (64, 3), {"1": -1}, 6, {}),
    "layernorm_channels_last": (ChannelsLast, (8, 3, 6, 7), {"norm": -1}, 6, {}),
    "vit": (TinyViT, (8, 3, 8, 8), {"blocks.0.norm1": -1, "blocks.0.norm2": -1,
                                    "blocks.1.norm1": -1, "blocks.1.norm2": -1, "norm": -1}, 8, {}),
}


def site_output(model, name, x):
    out = {}
    handle = dict(model.named_modules())[name].register_forward_hook(
        lambda m, i, o: out.setdefault("y", o.detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return out["y"]


@pytest.fixture(params=sorted(LAYOUTS))
def layout(request):
    factory, shape, axes, channels, kwargs = LAYOUTS[request.param]
    torch.manual_seed(0)
    model = factory().eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(*shape, generator=g) for _ in range(6)]
    stats = dmc.fit(model, data, levels=65, samples_per_batch=None, progress=False, **kwargs)
    return request.param, model, stats, shape, axes, channels


def test_sites_axes_and_channel_counts(layout):
    _, model, stats, _, axes, channels = layout
    assert stats.channel_axes == axes
    assert all(c == channels for c in stats.channels.values())


def test_reference_matches_a_direct_sample_along_the_right_axis(layout):
    _, model, stats, shape, axes, _ = layout
    g = torch.Generator().manual_seed(1)
    data = torch.cat([torch.randn(*shape, generator=g) for _ in range(6)])
    for name, axis in axes.items():
        y = site_output(model, name, data)
        values = y.movedim(axis, 0).reshape(y.shape[axis], -1)
        direct = empirical_quantiles(values, 65)
        # sketch tables put the endpoints at the exact min/max; compare the interior loosely
        assert torch.allclose(stats.quantiles[name][:, 0], direct[:, 0], atol=1e-5)
        assert torch.allclose(stats.quantiles[name][:, -1], direct[:, -1], atol=1e-5)
        assert (stats.quantiles[name] - direct).abs().mean() < 0.05


@pytest.mark.parametrize("mode", dmc.MODES)
def test_correction_cuts_w1_and_remove_is_bit_identical(layout, mode):
    _, model, stats, shape, axes, _ = layout
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(*shape, generator=g) * 1.5).exp() - 1  # a shifted, skewed batch
    with torch.no_grad():
        before = model(x)
    # prior_values=0: the full transport also at B×C sites (their default prior shrinks it)
    report = dmc.shift_report(model, stats, x, mode=mode, prior_values=0)
    for name in axes:
        if report[name]["before"] > 1e-3:
            assert report[name]["after"] <= 0.2 * report[name]["before"], (name, report[name])
    m = dmc.DMC(model, stats, mode=mode)
    with torch.no_grad():
        assert not torch.equal(m(x), before)
    restored = m.remove()
    with torch.no_grad():
        assert torch.equal(restored(x), before)


def test_an_ambiguous_layernorm2d_axis_is_refused_with_a_way_out():
    model = conv_then(LayerNorm2d(6)).eval()
    with pytest.raises(ValueError, match=r"ambiguous.*channel_axes=\{'1': 1\}"):
        dmc.fit(model, [torch.randn(4, 3, 5, 6)], progress=False)  # width 6 == channels 6


def test_an_ambiguous_token_norm_axis_is_refused_with_a_way_out():
    # (B, N, C) with N == C through a LayerNorm subclass: axis 1 and -1 both have size C
    class TokenNorm(nn.LayerNorm):
        pass

    model = nn.Sequential(nn.Linear(3, 6), TokenNorm(6)).eval()
    data = [torch.randn(4, 6, 3)]
    with pytest.raises(ValueError, match=r"ambiguous.*channel_axes=\{'1': 1\}"):
        dmc.fit(model, data, progress=False)
    stats = dmc.fit(model, data, progress=False, levels=9, channel_axes={"1": -1})
    assert stats.channel_axes == {"1": -1}


def test_fit_checks_the_declared_channel_count():
    model = conv_then(nn.BatchNorm2d(6)).eval()
    with pytest.raises(ValueError, match=r"site '1' \(BatchNorm2d\) declares 6 channels.*has 10"):
        dmc.fit(model, [torch.randn(2, 3, 10, 10)], channel_axes=-1, progress=False)
