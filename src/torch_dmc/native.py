"""torch-dmc's compiled CPU kernels for grid mode: optional, the same results, faster.

Grid mode (docs/method.md § Grid mode) spends a site's time on the histogram of the sampled
values, the table, and the lookup of every activation value. As chains of PyTorch operators these
read and write the data several times and go through the dispatcher a few dozen times per site;
``src/torch_dmc/_native/kernels.cpp`` does a whole site in one call (`grid_site`), the histogram
and the lookup on their own (`histogram_counts`, `table_lookup`) for the other paths, and the
site's sample (`take`).
The kernels repeat the floating-point operations of the operators they replace, in the same
order, so the outputs are the same bit for bit (``tests/test_native.py``): whether they are in
use changes the speed, never a number. docs/method.md § Compiled kernels has the details.

They are compiled on first use (``torch.utils.cpp_extension``: a C++ compiler and ``ninja``;
about 15 s, once per machine, cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and used for CPU float32 tensors. Where the build fails, a
warning says why and the PyTorch implementation runs. ``TORCH_DMC_NATIVE=0`` turns them off
(no build is tried). ``results/perf/README.md`` has what they buy.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

ENV = "TORCH_DMC_NATIVE"
"""Environment variable: ``0`` turns the compiled kernels off (read when they are first needed)."""

SOURCE = Path(__file__).with_name("_native") / "kernels.cpp"

_state: dict = {"tried": False, "ops": None, "fused": False, "forced_off": 0}


def _fused_multiply_add() -> bool | None:
    """Whether ``torch.addcmul`` rounds ``z + x·y`` once (a fused multiply-add) on this machine,
    both in its vectorised body and its scalar tail; ``None`` when they disagree (the kernels
    could not repeat it, so they are not used)."""
    x = torch.full((67,), 1 + 2**-12)  # x·x = 1 + 2^-11 + 2^-24: float32 drops the 2^-24
    z = torch.full((67,), -(1 + 2**-11))
    got = torch.addcmul(z, x, x)
    fused = got == 2**-24
    if bool(fused.all()):
        return True
    if bool((got == 0).all()):
        return False
    return None


def compile_flags() -> list[str]:
    """The C++ compiler flags of the kernels on this machine: optimised, no contraction into fused
    multiply-adds (the results repeat PyTorch's rounding), OpenMP, and AVX2 where the CPU has it."""
    flags = ["-O3", "-ffp-contract=off", "-fopenmp"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _build():
    """Compile (unless already compiled) and load the kernels; their ``torch.ops`` namespace."""
    from torch.utils.cpp_extension import get_default_build_root, load

    flags = compile_flags()
    key = SOURCE.read_bytes() + " ".join([torch.__version__, sys.version, *flags]).encode()
    name = f"torch_dmc_kernels_{hashlib.sha256(key).hexdigest()[:12]}"
    directory = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / f"{name}.so").exists():
        print(f"torch-dmc: compiling its CPU kernels into {directory} (once, about 15 s)",
              file=sys.stderr, flush=True)
    path = os.environ.get("PATH", "")
    try:
        import ninja  # the PyPI build of ninja: its binary, wherever the environment is not active

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    except ImportError:
        pass
    try:
        load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
             build_directory=str(directory), is_python_module=False, verbose=False)
    finally:
        os.environ["PATH"] = path
    return torch.ops.torch_dmc


def kernels():
    """The kernels' ``torch.ops`` namespace (built on the first call), or ``None``: turned off
    (`ENV`, read on the first call; `disabled`), or the build failed (warned once)."""
    if _state["forced_off"]:
        return None
    if not _state["tried"]:
        _state["tried"] = True
        if os.environ.get(ENV, "1") == "0":
            return None
        fused = _fused_multiply_add()
        if fused is None:
            warnings.warn("torch-dmc: torch.addcmul rounds differently in its vectorised and scalar "
                          "code on this machine, so the compiled kernels could not repeat it; grid "
                          "mode uses its PyTorch implementation (the same results, slower)",
                          RuntimeWarning, stacklevel=2)
            return None
        try:
            _state["ops"] = _build()
            _state["fused"] = fused
        except Exception as error:  # noqa: BLE001 (any build failure: fall back, and say why)
            warnings.warn(f"torch-dmc: could not build its CPU kernels ({type(error).__name__}: "
                          f"{str(error).strip()[-500:]}); grid mode uses its PyTorch implementation "
                          f"(the same results, slower). Set {ENV}=0 to skip the build.",
                          RuntimeWarning, stacklevel=2)
    return _state["ops"]


def build() -> bool:
    """Build the kernels now (``make setup`` does, so that no test or job pays for it) and say
    on stdout whether they are in use; ``True`` if they are."""
    ready = kernels() is not None
    print("torch-dmc CPU kernels:", "ready" if ready else "not in use (the PyTorch implementation runs)")
    return ready


def fits(channels: int, nodes: int | None = None, values: int | None = None) -> bool:
    """Whether the kernels' size limits allow ``channels`` rows of a table of ``nodes`` nodes
    (``2 <= nodes < 2^22``, fewer than ``2^31`` entries in all) and ``values`` values per row
    (``1 <= values < 2^31``); an argument left out is not checked."""
    return ((nodes is None or (2 <= nodes < 2**22 and channels * nodes < 2**31))
            and (values is None or 0 < values < 2**31))


def available_for(*tensors: Tensor) -> bool:
    """Whether the kernels are loaded (building them if needed) and take these tensors: CPU
    float32, none requiring a gradient."""
    for t in tensors:
        if not t.is_cpu or t.dtype != torch.float32 or t.requires_grad:
            return False
    return kernels() is not None


@contextlib.contextmanager
def disabled():
    """Within this block the PyTorch implementation runs (for tests and side-by-side timings)."""
    _state["forced_off"] += 1
    try:
        yield
    finally:
        _state["forced_off"] -= 1


def histogram_counts(values: Tensor, shift: Tensor, inv: Tensor, size: int) -> Tensor:
    """Per-row cell counts: value ``v`` of row ``r`` counts in cell
    ``round(clamp(shift[r] + v·inv[r], 0, size - 1))``; non-finite values are not counted.

    Args:
        values: ``C×M`` float32 (any strides), ``M < 2^31``.
        shift, inv: ``C`` float32.
        size: cells per row, ``2 <= size < 2^22``.

    Returns:
        ``C×size`` int64 counts.
    """
    return kernels().histogram(values, shift, inv, size, _state["fused"])


def take(flat: Tensor, offsets: Tensor) -> Tensor:
    """``flat.index_select(0, offsets)`` with the reads run ahead (prefetched) and split over
    threads: grid mode's sample of a large activation is a few thousand scattered reads per
    channel, whose cache misses this overlaps.

    Args:
        flat: contiguous 1-D float32.
        offsets: contiguous 1-D int32 or int64, each in ``[0, flat.numel())`` (checked).

    Returns:
        A new 1-D tensor of ``len(offsets)`` values.
    """
    return kernels().take(flat, offsets)


def table_lookup(x: Tensor, image: Tensor, scale: Tensor, shift: Tensor, axis: int,
           affine: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Nearest-node table lookup of a contiguous activation: value ``v`` of channel ``c`` becomes
    ``image[c, j]`` with ``j`` its node ``round(clamp((shift[c] + v·scale[c] + 1)·(B - 1)/2, 0,
    B - 1))`` (``grid_sample``'s nearest mode, border padding, aligned corners); a non-finite
    ``v`` passes through (as ``a[c]·v + b[c]`` with ``affine = (a, b)``).

    Args:
        x: contiguous float32 activation, ``C`` channels on ``axis``.
        image: ``R×B`` float32 table, ``R >= C`` (rows past ``C`` unread).
        scale, shift: ``C`` float32.
        axis: the channel axis, ``0 <= axis < x.dim()``.
        affine: optional ``(a, b)``, each ``C`` float32.

    Returns:
        A new tensor of ``x``'s shape.
    """
    a, b = (None, None) if affine is None else affine
    return kernels().lookup(x, image, scale, shift, axis, a, b,
                            _state["fused"])


def grid_site(x: Tensor, values: Tensor | None, q_ref: Tensor, size: int, axis: int,
              affine: tuple[Tensor, Tensor] | None, outlier_level: float,
              outlier_margin: float, refinements: int) -> Tensor | None:
    """A whole grid-mode site in one call: `torch_dmc.transport.grid_transport`'s result
    (knot-range refinement included) where every sampled value (after ``affine``) is finite;
    ``None`` where one is not (the caller then takes the general path).

    Args:
        x: contiguous float32 activation, ``C`` channels on ``axis``.
        values: ``C×M`` float32 sampled values, ``1 <= M < 2^31``; ``None``: every value of
            ``x``, read in place (what ``x.movedim(axis, 0).reshape(C, -1)`` would copy).
        q_ref: ``C×K`` float32 reference quantile table, ``K >= 2``.
        size: nodes per channel, ``2 <= size < 2^22``.
        axis: the channel axis, ``0 <= axis < x.dim()``.
        affine: optional ``(a, b)``, each ``C`` float32: map ``a·x + b``.
        outlier_level, outlier_margin, refinements: `torch_dmc.transport.OUTLIER_LEVEL`,
            `OUTLIER_MARGIN`, `REFINEMENTS`.

    Returns:
        A new tensor of ``x``'s shape, or ``None``.
    """
    a, b = (None, None) if affine is None else affine
    out, done = kernels().grid_site(x, values, q_ref, size, axis, a, b, outlier_level,
                                    outlier_margin, refinements, _state["fused"])
    return out if done else None


def sort_rows(values: Tensor) -> Tensor | None:
    """Each row of ``values`` sorted, as ``values.sort(dim=1).values`` gives it (a radix sort of
    the float32 bits), or ``None`` where torch's order of equal values could differ: a row with a
    NaN, or with zeros of both signs (the caller then sorts with torch).

    Args:
        values: ``C×N`` float32.

    Returns:
        A new ``C×N`` tensor, or ``None``.
    """
    out, ok = kernels().sort_rows(values)
    return out if ok else None


def merge_rows(a_values: Tensor, a_masses: Tensor, b_values: Tensor,
               b_masses: Tensor) -> tuple[Tensor, Tensor] | None:
    """Two weighted summaries merged row by row in one pass: the values of
    ``torch.cat([a_values, b_values], 1).sort(1)`` and the masses in that order, or ``None``
    where that order of equal values is not the only one (equal values with other bits or other
    masses: torch's unstable sort could leave them otherwise) or a row is not ascending.

    Args:
        a_values, a_masses: ``C×Sa`` float32, each values row non-decreasing.
        b_values, b_masses: ``C×Sb`` float32, likewise.

    Returns:
        ``(values, masses)``, each a new ``C×(Sa+Sb)`` tensor, or ``None``.
    """
    values, masses, ok = kernels().merge_rows(a_values, a_masses, b_values, b_masses)
    return (values, masses) if ok else None


def compress_rows(values: Tensor, masses: Tensor, levels: Tensor) -> Tensor:
    """Each summary row read at ``levels`` of its mass-weighted midpoint CDF:
    `torch_dmc.sketch`'s compression (cumulative masses, the midpoint levels, the interpolation)
    in one pass per row, with a linear walk where torch does a binary search per level.

    Args:
        values: ``C×S`` float32, ``S >= 2``; masses: ``C×S`` float32.
        levels: ``L`` float32.

    Returns:
        A new ``C×L`` tensor.
    """
    return kernels().compress_rows(values, masses, levels, _state["fused"])


def channel_extremes(x: Tensor, axis: int) -> tuple[Tensor, Tensor] | None:
    """Per-channel minimum and maximum of a contiguous activation in one pass (``amin`` and
    ``amax`` over every axis but ``axis``), or ``None`` where a value is not finite or an extreme
    is zero (which zero torch's reductions return, -0.0 or +0.0, depends on their order).

    Args:
        x: contiguous float32, ``C`` channels on ``axis`` (``0 <= axis < x.dim()``).

    Returns:
        ``(minimum, maximum)``, each ``C`` float32, or ``None``.
    """
    lo, hi, ok = kernels().channel_extremes(x, axis)
    return (lo, hi) if ok else None


def sample_table_sum(rows: Tensor, samples: int, lo: Tensor, hi: Tensor,
                     frac: Tensor) -> Tensor | None:
    """The per-sample reference's sum in one pass: each row sorted and read at the shared
    positions of `torch_dmc.transport.empirical_quantiles` (``lerp(v[lo], v[hi], frac)``), the
    ``samples`` tables summed per channel in float64. ``None`` where that sum could depend on its
    order (the kernel checks that every partial sum is exact: values on one grid of the smallest
    ulp among them, their absolute sum below ``2^52`` of it), a table holds -0.0, or a row has a
    non-finite value or zeros of both signs.

    Args:
        rows: ``(samples·C)×P`` float32, ordered (sample, channel).
        samples: ``B >= 1``.
        lo, hi: ``K`` int64 in ``[0, P)``; frac: ``K`` float32.

    Returns:
        ``C×K`` float64, or ``None``.
    """
    total, ok = kernels().sample_table_sum(rows, samples, lo, hi, frac, _state["fused"])
    return total if ok else None
