"""Where one grid-mode site's time goes, against a BatchNorm pass, and what ``torch.compile`` does.

For activations of the shapes of the shipped Fashion-MNIST ResNet's three stages (24×28², 48×14²,
96×7² per image) at batch 16 and 200, times side by side in one process (median of interleaved
repetitions, milliseconds):

- ``bn``: one eval-mode ``batch_norm`` pass, the floor of a per-channel map;
- ``site``: `torch_dmc.transport.grid_transport` as the default grid mode calls it (4,096 sampled
  values per channel, ``min(4096, max(32, M // 4))`` knots);
- its parts: ``table`` (`lut_from_sample`: histogram of the sample and the quantile table) and
  ``lookup`` (`apply_lut`, the lookup of every value);
- each of the three with the compiled kernels (`torch_dmc.native`, where they build: ``site`` is
  then one ``grid_site`` call) and, marked ``(PyTorch)``, without them (``native.disabled()``:
  PyTorch operators, the ``grid_sample`` lookup; the same outputs);
- ``gather lookup``: the lookup as index arithmetic and one gather (the issue's suggestion);
- with ``--compile``: ``compiled``, one function doing the histogram (``index_add_``) and the
  gather lookup, through ``torch.compile`` (inductor, static shapes); its compile time is
  printed separately and the share of outputs that differ from ``site``'s (float contraction and
  rounding inside the generated kernels move a few values to a neighbouring node).

    python benchmarks/site_kernels.py --threads 1 [--repeats 31] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from torch_dmc import native
from torch_dmc.transport import _lookup, apply_lut, grid_transport, lut_from_sample, lut_grid

SHAPES = ((24, 28), (48, 14), (96, 7))


def _fused(x: torch.Tensor, values: torch.Tensor, q_ref: torch.Tensor, size: int) -> torch.Tensor:
    """`grid_transport` of an all-finite ``N×C×H×W`` ``x`` written as one traceable function
    (no refinement of the knot range, no checks): histogram by ``index_add_``, gather lookup."""
    c, m = values.shape
    k = q_ref.shape[1]
    lo, hi = values.amin(dim=1), values.amax(dim=1)
    step = (hi - lo) / (size - 1)
    step = torch.where(step == 0, torch.ones_like(step), step).clamp_min(torch.finfo(torch.float32).tiny)
    inv = step.reciprocal().unsqueeze(1)
    cell = torch.addcmul(-lo.unsqueeze(1) * inv, values, inv).round().clamp(0, size - 1)
    index = (cell + torch.arange(c).unsqueeze(1) * size).long().view(-1)
    counts = torch.zeros(c * size, dtype=torch.int64).index_add_(0, index, torch.ones_like(index))
    counts = counts.view(c, size).float()
    pos = ((counts.cumsum(1) - counts * 0.5) / m) * (k - 1)
    node = pos.floor().clamp(max=k - 2)
    frac = pos - node
    node = node.long()
    table = torch.lerp(q_ref.gather(1, node), q_ref[:, 1:].gather(1, node), frac)
    return _gather_lookup(x, table, lo, step)


def _gather_lookup(x: torch.Tensor, table: torch.Tensor, lo: torch.Tensor,
                   step: torch.Tensor) -> torch.Tensor:
    """Each value of ``x`` (``N×C×…``) takes its channel's table entry at its nearest node."""
    c, size = table.shape
    shape = (1, c) + (1,) * (x.dim() - 2)
    inv = step.reciprocal()
    node = torch.addcmul((-lo * inv).view(shape), x, inv.view(shape)).round_().clamp_(0, size - 1)
    node = node.add_((torch.arange(c, device=x.device) * size).view(shape).float()).long()
    return table.reshape(-1).take(node)


def _median_ms(calls: dict, repeats: int) -> dict[str, float]:
    for f in calls.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for name, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def _measure(batch: int, c: int, side: int, g: torch.Generator, compiled, repeats: int) -> str:
    """One line of the table: the timings at one activation shape."""
    x = torch.randn(batch, c, side, side, generator=g) * 2 + 0.5
    n = batch * side * side
    m = min(4096, n)
    values = x.movedim(1, 0).reshape(c, n)[:, torch.randperm(n, generator=g)[:m]].contiguous()
    q_ref = torch.randn(c, 1024, generator=g).sort(dim=1).values
    size = min(4096, max(32, m // 4))
    grid = lut_grid(x.shape, 1)
    lut = lut_from_sample(values, q_ref, size)
    assert torch.equal(apply_lut(x, lut, 1), grid_transport(x, values, q_ref, size, 1))
    mean, var = torch.zeros(c), torch.ones(c)
    def without_kernels(f):
        def call():
            with native.disabled():
                return f()
        return call

    parts = {
        "site": lambda: grid_transport(x, values, q_ref, size, 1, grid),
        "table": lambda: lut_from_sample(values, q_ref, size),
        "lookup": lambda: _lookup(x, lut, 1, grid, None, False),
    }
    calls = {"bn": lambda: torch.nn.functional.batch_norm(x, mean, var)}
    for name, f in parts.items():
        calls[name] = f
        calls[f"{name} (PyTorch)"] = without_kernels(f)
    calls["gather lookup"] = lambda: _gather_lookup(x, lut.table, lut.origin, lut.step)
    extra = ""
    if compiled is not None:
        t0 = time.perf_counter()
        out = compiled(x, values, q_ref, size)
        extra = f"  compile {time.perf_counter() - t0:.1f} s"
        differ = (out != grid_transport(x, values, q_ref, size, 1)).float().mean().item()
        extra += f", {100 * differ:.2f}% of outputs differ from site's"
        calls["compiled"] = lambda: compiled(x, values, q_ref, size)
    ms = _median_ms(calls, repeats)
    cells = "  ".join(f"{k} {v:.2f} ({v / ms['bn']:.1f}×)" for k, v in ms.items())
    return f"B={batch:<3} C={c:<2} {side}×{side}  M={m:<4} knots={size:<4}  {cells}{extra}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--batch-sizes", default="16,200")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd site")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compiled = torch.compile(_fused, dynamic=False) if args.compile else None
    g = torch.Generator().manual_seed(0)
    kernels = "in use" if native.kernels() is not None else "not in use"
    print(f"torch {torch.__version__}, {args.threads} thread(s), compiled kernels {kernels}; "
          "milliseconds (× a BatchNorm pass)")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for c, side in SHAPES:
            print(_measure(batch, c, side, g, compiled, args.repeats), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
