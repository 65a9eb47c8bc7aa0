"""The streaming quantile sketch against numpy.quantile on the full data."""

import math

import numpy as np
import pytest
import torch

from torch_dmc.sketch import QuantileSketch, rank_error_bound, sample_channel_values


def rank_error(full: np.ndarray, table: np.ndarray) -> float:
    """Largest distance between each level t_j and the rank interval of the estimate Q̂(t_j)."""
    s = np.sort(full)
    n = len(s)
    t = np.linspace(0, 1, len(table))
    below = np.searchsorted(s, table, side="left") / n
    at_or_below = np.searchsorted(s, table, side="right") / n
    return float(np.max(np.maximum(0, np.maximum(below - t, t - at_or_below))))


def stream(batches: int, n: int, channels: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, channels + 1).unsqueeze(1)
    return [torch.randn(channels, n, generator=g).exp() * scale for _ in range(batches)]


def test_rank_error_within_documented_bound():
    data = stream(batches=40, n=20_000, channels=3, seed=0)
    sketch = QuantileSketch(3, capacity=1024, samples_per_batch=2048,
                            generator=torch.Generator().manual_seed(1))
    for x in data:
        sketch.update(x)
    table = sketch.quantiles(257).numpy()
    full = torch.cat(data, dim=1).numpy()
    bound = sketch.rank_error_bound()
    assert bound == rank_error_bound(800_000, 81_920, 40, 1024)
    assert bound < 0.02
    for c in range(3):
        assert rank_error(full[c], table[c]) <= bound
        # and against numpy's own estimate, in value terms at inner levels
        inner = np.quantile(full[c], np.linspace(0, 1, 257)[8:-8])
        spread = np.quantile(full[c], 0.99) - np.quantile(full[c], 0.01)
        assert np.max(np.abs(inner - table[c][8:-8])) < 0.05 * spread


def test_endpoints_are_exact_min_and_max():
    data = stream(batches=5, n=3000, channels=2, seed=2)
    sketch = QuantileSketch(2, capacity=256, samples_per_batch=100)
    for x in data:
        sketch.update(x)
    table = sketch.quantiles(11)
    full = torch.cat(data, dim=1)
    torch.testing.assert_close(table[:, 0], full.min(dim=1).values)
    torch.testing.assert_close(table[:, -1], full.max(dim=1).values)
    assert torch.all(table[:, 1:] >= table[:, :-1])


def test_without_sampling_or_compression_it_is_numpys_hazen_quantile():
    x = stream(batches=1, n=500, channels=2, seed=3)[0]
    sketch = QuantileSketch(2, capacity=1000, samples_per_batch=None)
    sketch.update(x)
    t = np.linspace(0, 1, 33)
    expected = np.stack([np.quantile(x[c].numpy(), t, method="hazen") for c in range(2)])
    np.testing.assert_allclose(sketch.quantiles(33).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert sketch.rank_error_bound() == 1 / 1000  # only the (empty) compression term


def test_merge_equals_one_stream_within_bound():
    data = stream(batches=16, n=4000, channels=2, seed=4)
    a, b, whole = (QuantileSketch(2, capacity=512, samples_per_batch=None) for _ in range(3))
    for i, x in enumerate(data):
        (a if i % 2 else b).update(x)
        whole.update(x)
    merged = a.merge(b)
    assert merged.total_values == whole.total_values == 64_000
    full = torch.cat(data, dim=1).numpy()
    for c in range(2):
        assert rank_error(full[c], merged.quantiles(129)[c].numpy()) <= merged.rank_error_bound()


def test_memory_is_bounded_by_capacity_times_log_batches():
    sketch = QuantileSketch(4, capacity=64, samples_per_batch=128)
    for x in stream(batches=100, n=1000, channels=4, seed=5):
        sketch.update(x)
    stored = sum(s.values.shape[1] for s in sketch._counter if s is not None)
    assert stored <= 64 * (math.ceil(math.log2(100)) + 1)


def test_memory_is_bounded_whatever_the_data_size_and_the_bound_still_holds():
    data = stream(batches=60, n=2000, channels=2, seed=6)
    sketch = QuantileSketch(2, capacity=128, samples_per_batch=None, max_levels=3)
    for x in data:
        sketch.update(x)
    sketch._flush()
    assert len(sketch._counter) <= 3
    assert sum(s.values.shape[1] for s in sketch._counter if s is not None) <= 3 * 128
    assert sketch.top_merges > 0
    full = torch.cat(data, dim=1).numpy()
    for c in range(2):
        assert rank_error(full[c], sketch.quantiles(65)[c].numpy()) <= sketch.rank_error_bound()


def test_random_sampling_does_not_alias_onto_columns():
    # every image column w holds the value w: a strided subsample of the flattened B×H×W axis
    # with a stride that is a multiple of W would see a single column
    b, c, h, w = 8, 2, 16, 16
    act = torch.arange(w, dtype=torch.float32).expand(b, c, h, w).contiguous()
    strided = act.movedim(1, 0).reshape(c, -1)[:, ::w]
    assert strided.unique().numel() == 1  # the failure mode
    values = sample_channel_values(act, 1, 4096, torch.Generator().manual_seed(0))
    assert values.shape == (c, 4096)
    counts = torch.bincount(values[0].long(), minlength=w).float()
    assert counts.min() > 0.5 * counts.mean()  # every column sampled about equally


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_sample_channel_values_reads_the_right_axis(axis):
    act = torch.randn(3, 5, 7)
    act = act + 100 * torch.arange(act.shape[axis]).reshape(
        [-1 if d == axis % 3 else 1 for d in range(3)])
    values = sample_channel_values(act, axis, 50)
    assert values.shape == (act.shape[axis], 50)
    assert torch.all((values / 100).round() == torch.arange(act.shape[axis]).unsqueeze(1))


def test_update_activation_equals_update_on_transposed_values():
    act = torch.randn(4, 3, 5, 5)
    a = QuantileSketch(3, samples_per_batch=None)
    b = QuantileSketch(3, samples_per_batch=None)
    a.update_activation(act, 1)
    b.update(act.movedim(1, 0).reshape(3, -1))
    torch.testing.assert_close(a.quantiles(9), b.quantiles(9))


def test_errors_say_what_was_expected():
    sketch = QuantileSketch(3)
    with pytest.raises(ValueError, match="C=3"):
        sketch.update(torch.zeros(2, 5))
    with pytest.raises(RuntimeError, match="no data"):
        sketch.quantiles(5)
    with pytest.raises(ValueError, match="at least 2"):
        QuantileSketch(3, capacity=1)
