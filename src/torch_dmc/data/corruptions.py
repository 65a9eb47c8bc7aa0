"""Reproducible common corruptions (ImageNet-C style) for small images, with an on-disk cache.

The corruption functions come from ``imagecorruptions-imaug`` (``pip install torch-dmc[corruptions]``),
imported only when first needed. Protocol (docs/protocol.md § Corruptions), image by image:

1. pad with constant 0 (black) to at least 32×32, the minimum size the corruption code supports
   (28×28 Fashion-MNIST: 2 px on each side; the images' own background is black, so the padding
   continues it); larger images are not padded;
2. grey images are repeated to RGB;
3. corrupt with the library function at the given severity (1..5), as float;
4. clip to ``[0, 255]``, crop back to the original size;
5. grey images: average the three channels; RGB images keep their channels;
6. round to the nearest integer (``np.rint``) and store as ``uint8``. (``imagecorruptions.corrupt``
   truncates instead; rounding differs from it by at most one grey level.)

Determinism: corrupted image ``k`` is a pure function of ``(seed, corruption, severity, indices[k])``
and of the clean image, whatever the batch, order or number of worker processes. Its random numbers
come from ``numpy.random.SeedSequence([seed, crc32(corruption), severity, index])``: that state seeds
numpy's global generator for the duration of the call (saved and restored around every
:func:`corrupt`, so the caller's global stream is untouched) and is passed as ``seed=`` to
``impulse_noise`` and ``glass_blur``, the two functions that take one. Random parts of the library
covered this way: the noises, motion-blur angle, snow, frost (file and crop), fog (plasma fractal),
spatter, elastic transform and glass blur (numba generator, seeded inside the call).

Two departures from calling the library as is, both tested:

- ``frost`` is the library's code with its frost pictures read and resized once per process
  instead of once per image (25× faster; same random draws, bit-identical output).
- ``spatter`` at severities 1-3 divides 0 by 0 when an image receives no liquid at all (about 2% of
  32×32 images at severity 1), which makes the whole image NaN; such pixels keep their clean value.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import math
import os
import tempfile
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "COMMON_CORRUPTIONS",
    "VALIDATION_CORRUPTIONS",
    "ALL_CORRUPTIONS",
    "resolve_corruptions",
    "corrupt",
    "protocol_info",
    "shutdown_pool",
    "CorruptionCache",
]

#: The 15 ImageNet-C corruptions used for evaluation, in ImageNet-C order.
COMMON_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)

#: The 4 held-out corruptions: the only ones on which hyper-parameters may be tuned.
VALIDATION_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

#: All 19, common first.
ALL_CORRUPTIONS: tuple[str, ...] = COMMON_CORRUPTIONS + VALIDATION_CORRUPTIONS

_GROUPS = {"common": COMMON_CORRUPTIONS, "validation": VALIDATION_CORRUPTIONS, "all": ALL_CORRUPTIONS}
_SEEDED_BY_KWARG = ("impulse_noise", "glass_blur")
_MIN_SIZE = 32
_PACKAGE = "imagecorruptions-imaug"


def resolve_corruptions(spec: str | Sequence[str]) -> list[str]:
    """Expand a corruption spec into a list of corruption names.

    Args:
        spec: a name (``"fog"``), a group (``"common"``: the 15, ``"validation"``: the 4,
            ``"all"``: the 19), a comma-separated list of those (``"fog,contrast"``,
            ``"common,spatter"``), or a list of such strings.

    Returns:
        The names in the order given, duplicates dropped.

    Raises:
        ValueError: an unknown name (the message lists the valid ones) or an empty spec.

    Example:
        >>> resolve_corruptions("fog, contrast")
        ['fog', 'contrast']
        >>> len(resolve_corruptions("common"))
        15
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"corruption names must be strings; found {item!r}.")
        for token in item.split(","):
            token = token.strip().lower().replace("-", "_")
            if not token:
                continue
            if token in _GROUPS:
                expanded = _GROUPS[token]
            elif token in ALL_CORRUPTIONS:
                expanded = (token,)
            else:
                raise ValueError(
                    f"unknown corruption {token!r}; expected one of the groups "
                    f"{sorted(_GROUPS)} or the names {', '.join(ALL_CORRUPTIONS)}."
                )
            names.extend(n for n in expanded if n not in names)
    if not names:
        raise ValueError(f"no corruption named in {spec!r}; try 'common' or 'fog,contrast'.")
    return names


def _backend() -> dict:
    """Import the corruption functions lazily; a clear error if the extra is missing."""
    try:
        from imagecorruptions import corruption_dict
    except ImportError as err:
        raise ImportError(
            f"corruptions need the optional package {_PACKAGE} ({err}). Install it with "
            f"`pip install torch-dmc[corruptions]`."
        ) from err
    return corruption_dict


def protocol_info() -> dict:
    """The corruption protocol as a JSON-serialisable dict, for a results folder's config.

    Returns:
        ``{"package": ..., "version": ..., "min_size": 32, "padding": ..., "grey": ...,
        "rounding": ..., "seeding": ...}``.
    """
    try:
        from importlib.metadata import version

        ver = version(_PACKAGE)
    except Exception:  # noqa: BLE001 - metadata may be missing in odd installs
        ver = None
    return {
        "package": _PACKAGE,
        "version": ver,
        "min_size": _MIN_SIZE,
        "padding": "constant 0, centred, to at least 32x32; cropped back after corrupting",
        "grey": "repeated to RGB, corrupted, channels averaged",
        "rounding": "clip to [0, 255], np.rint, uint8",
        "seeding": "numpy SeedSequence([seed, crc32(name), severity, index]) per image",
    }


def _image_state(seed: int, name: str, severity: int, index: int) -> np.ndarray:
    """Per-image random state: 4 ``uint32`` words from a SeedSequence."""
    entropy = [int(seed), zlib.crc32(name.encode()), int(severity), int(index)]
    return np.random.SeedSequence(entropy).generate_state(4)


_FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")


@functools.lru_cache(maxsize=64)
def _frost_layer(idx: int, h: int, w: int) -> np.ndarray:
    """Frost picture ``idx``, rescaled exactly as ``imagecorruptions.frost`` does for an ``h×w`` image.

    Reading and resizing the picture is ~95% of the library's frost time, so it is cached per process.
    """
    import importlib.resources

    import cv2

    ref = importlib.resources.files("imagecorruptions") / "frost" / _FROST_FILES[idx]
    with importlib.resources.as_file(ref) as path:
        frost = cv2.imread(str(path))
    if frost is None:
        raise FileNotFoundError(f"cannot read the frost picture {ref}; reinstall {_PACKAGE}.")
    fh, fw = frost.shape[:2]
    if fh >= h and fw >= w:
        scaling_factor = 1
    elif fh < h and fw >= w:
        scaling_factor = h / fh
    elif fh >= h and fw < w:
        scaling_factor = w / fw
    else:
        scaling_factor = np.maximum(h / fh, w / fw)
    scaling_factor *= 1.1
    new_shape = (int(np.ceil(fw * scaling_factor)), int(np.ceil(fh * scaling_factor)))
    out = cv2.resize(frost, dsize=new_shape, interpolation=cv2.INTER_CUBIC)
    out.setflags(write=False)
    return out


def _frost(x, severity: int = 1) -> np.ndarray:
    """``imagecorruptions.frost`` for RGB images, same random draws and output, cached pictures."""
    c = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)][severity - 1]
    idx = np.random.randint(6)
    x = np.array(x)
    h, w = x.shape[:2]
    frost = _frost_layer(int(idx), h, w)
    x_start = np.random.randint(0, frost.shape[0] - h)
    y_start = np.random.randint(0, frost.shape[1] - w)
    crop = frost[x_start : x_start + h, y_start : y_start + w][..., [2, 1, 0]]
    return np.clip(c[0] * x + c[1] * crop, 0, 255)


def _corrupt_chunk(
    images: np.ndarray, name: str, severity: int, seed: int, indices: np.ndarray
) -> np.ndarray:
    """Corrupt ``images`` (``n×H×W`` or ``n×H×W×3`` uint8) one by one; see the module docstring."""
    from PIL import Image

    fn = _frost if name == "frost" else _backend()[name]
    grey = images.ndim == 3
    h, w = images.shape[1:3]
    ph, pw = max(_MIN_SIZE - h, 0), max(_MIN_SIZE - w, 0)
    top, left = ph // 2, pw // 2
    pad = [(0, 0), (top, ph - top), (left, pw - left)] + ([] if grey else [(0, 0)])
    padded = np.pad(images, pad, mode="constant", constant_values=0)
    if grey:
        padded = np.repeat(padded[..., None], 3, axis=-1)
    out = np.empty(images.shape, dtype=np.uint8)
    saved = np.random.get_state()
    try:
        for k in range(len(images)):
            state = _image_state(seed, name, severity, int(indices[k]))
            np.random.seed(state)
            kwargs = {"seed": int(state[0])} if name in _SEEDED_BY_KWARG else {}
            with np.errstate(invalid="ignore", divide="ignore"):
                res = fn(Image.fromarray(padded[k]), severity, **kwargs)
            res = np.asarray(res, dtype=np.float64)
            if res.shape != padded.shape[1:]:
                raise RuntimeError(
                    f"{name} returned shape {res.shape} for an input of shape {padded.shape[1:]}; "
                    f"expected the same shape. Is {_PACKAGE} at version 1.1.5?"
                )
            if not np.isfinite(res).all():
                # spatter (severity 1-3) divides 0 by 0 when an image gets no liquid at all:
                # keep the clean pixels there, which is what "no spatter" means.
                res = np.where(np.isfinite(res), res, padded[k])
            res = np.clip(res[top : top + h, left : left + w], 0.0, 255.0)
            if grey:
                res = res.mean(axis=-1)
            out[k] = np.rint(res).astype(np.uint8)
    finally:
        np.random.set_state(saved)
    return out


def _init_worker() -> None:
    """Process-pool initializer: one thread per worker process."""
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover - cv2 comes with imagecorruptions
        pass


_POOL: tuple[int, object] | None = None


def _get_pool(workers: int):
    """The process pool of ``workers`` processes, started on first use and kept for later calls.

    Starting ``spawn`` workers costs seconds (each imports numpy, OpenCV, scikit-image and numba),
    so one pool serves every :func:`corrupt` call of the process; :func:`shutdown_pool` ends it.
    """
    global _POOL
    if _POOL is not None and _POOL[0] == workers:
        return _POOL[1]
    shutdown_pool()
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker)
    _POOL = (workers, pool)
    return pool


def shutdown_pool() -> None:
    """Stop the worker processes that :func:`corrupt` keeps for ``workers > 1`` (no-op if none)."""
    global _POOL
    if _POOL is not None:
        _POOL[1].shutdown(wait=True, cancel_futures=True)
        _POOL = None


atexit.register(shutdown_pool)


def corrupt(
    images: np.ndarray,
    corruption: str,
    severity: int,
    *,
    seed: int = 0,
    indices: Sequence[int] | np.ndarray | None = None,
    workers: int = 1,
    progress: bool = True,
) -> np.ndarray:
    """Apply one corruption at one severity to every image, reproducibly.

    Args:
        images: ``uint8`` images, ``N×H×W`` (grey), ``N×H×W×1`` (grey) or ``N×H×W×3`` (RGB).
        corruption: one name of :data:`ALL_CORRUPTIONS` (e.g. ``"gaussian_noise"``).
        severity: 1..5.
        seed: non-negative integer; with the corruption, severity and image index it fixes every
            random choice.
        indices: ``N`` non-negative integers, the identity of each image in the random stream
            (default ``arange(N)``): pass the positions in the full data set when corrupting a
            subset, and the result equals the same rows of the full corruption.
        workers: processes to use; the result does not depend on it. The ``spawn`` pool is started
            on first use (seconds) and kept for later calls (:func:`shutdown_pool` ends it). Scripts
            that use ``workers > 1`` need the ``if __name__ == "__main__":`` guard.
        progress: show a tqdm progress bar.

    Returns:
        ``uint8`` array with the shape of ``images``.

    Raises:
        ValueError, TypeError: bad images, name, severity, seed, indices or workers.
        ImportError: ``imagecorruptions-imaug`` is not installed.

    Example:
        >>> x = np.zeros((2, 28, 28), np.uint8)
        >>> corrupt(x, "fog", 3, progress=False).shape
        (2, 28, 28)
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        found = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
        raise TypeError(f"corrupt expects a uint8 numpy array of images; found {found}.")
    shape = images.shape
    if images.ndim == 4 and shape[-1] == 1:
        work = images[..., 0]
    elif images.ndim == 3 or (images.ndim == 4 and shape[-1] == 3):
        work = images
    else:
        raise ValueError(
            f"corrupt expects images N×H×W, N×H×W×1 or N×H×W×3 (channels last); found shape {shape}."
        )
    names = resolve_corruptions(corruption)
    if len(names) != 1 or names[0] != str(corruption).strip().lower().replace("-", "_"):
        raise ValueError(
            f"corrupt takes one corruption name; found {corruption!r}. Loop over "
            f"resolve_corruptions({corruption!r}) for several."
        )
    name = names[0]
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not (1 <= severity <= 5):
        raise ValueError(f"severity must be an integer in 1..5; found {severity!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; found {seed!r}.")
    n = len(work)
    if indices is None:
        idx = np.arange(n, dtype=np.int64)
    else:
        idx = np.asarray(indices)
        if idx.shape != (n,) or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(
                f"indices must be {n} integers, one per image; found shape {idx.shape}, dtype {idx.dtype}."
            )
        if n and idx.min() < 0:
            raise ValueError(f"indices must be non-negative; found minimum {int(idx.min())}.")
        idx = idx.astype(np.int64)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer; found {workers!r}.")
    _backend()  # fail early, in this process, if the package is missing
    severity, seed = int(severity), int(seed)

    from tqdm.auto import tqdm

    out = np.empty(work.shape, dtype=np.uint8)
    bar = tqdm(total=n, desc=f"{name}-{severity}", unit="img", disable=not progress, leave=False)
    try:
        if workers == 1 or n <= 1:
            step = 256
            for s in range(0, n, step):
                out[s : s + step] = _corrupt_chunk(
                    work[s : s + step], name, severity, seed, idx[s : s + step]
                )
                bar.update(min(step, n - s))
        else:
            from concurrent.futures import as_completed
            from concurrent.futures.process import BrokenProcessPool

            step = max(1, min(256, math.ceil(n / (workers * 4))))
            pool = _get_pool(workers)
            futures = {
                pool.submit(_corrupt_chunk, work[s : s + step], name, severity, seed, idx[s : s + step]): s
                for s in range(0, n, step)
            }
            try:
                for fut in as_completed(futures):
                    s = futures[fut]
                    res = fut.result()
                    out[s : s + len(res)] = res
                    bar.update(len(res))
            except BrokenProcessPool:
                shutdown_pool()
                raise
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    finally:
        bar.close()
    return out.reshape(shape)


def _default_root() -> Path:
    env = os.environ.get("DMC_CACHE_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "torch_dmc" / "corruptions"


class CorruptionCache:
    """Corrupted copies of an image array, computed once and kept as ``.npy`` files.

    Layout: ``root/<key>/<seed>/<corruption>-<severity>.npy``, where ``key`` is the first 16 hex
    digits of the SHA-256 of the images' dtype, shape and bytes. Files are written atomically
    (temporary file, then rename), so parallel runs and interrupted runs never leave a half file.

    Args:
        root: cache folder. Default: environment variable ``DMC_CACHE_DIR``, else
            ``~/.cache/torch_dmc/corruptions``.

    Example:
        >>> cache = CorruptionCache("/tmp/dmc-cache")
        >>> xc = cache.get(data.x_test, "fog", 5)  # doctest: +SKIP
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else _default_root()

    def __repr__(self) -> str:
        return f"CorruptionCache(root={str(self.root)!r})"

    @staticmethod
    def key(images: np.ndarray) -> str:
        """The cache key of an image array: 16 hex digits of SHA-256(dtype, shape, bytes)."""
        h = hashlib.sha256()
        h.update(f"{images.dtype.str}{tuple(images.shape)}".encode())
        h.update(np.ascontiguousarray(images).data)
        return h.hexdigest()[:16]

    def path(self, images: np.ndarray, corruption: str, severity: int, *, seed: int = 0) -> Path:
        """Where :meth:`get` stores this corruption of ``images``."""
        return self.root / self.key(images) / str(int(seed)) / f"{corruption}-{int(severity)}.npy"

    def get(
        self,
        images: np.ndarray,
        corruption: str,
        severity: int,
        *,
        seed: int = 0,
        workers: int = 1,
        progress: bool = True,
    ) -> np.ndarray:
        """Return ``corrupt(images, corruption, severity, seed=seed)``, from disk when cached.

        Args:
            images: ``uint8`` images, as for :func:`corrupt`; indices are ``arange(N)``.
            corruption: one corruption name.
            severity: 1..5.
            seed: the corruption seed.
            workers: processes used when computing.
            progress: progress bar when computing.

        Returns:
            ``uint8`` array with the shape of ``images``.
        """
        if not isinstance(images, np.ndarray):
            raise TypeError(f"images must be a numpy array; found {type(images).__name__}.")
        name = str(corruption).strip().lower().replace("-", "_")
        if name not in ALL_CORRUPTIONS:
            resolve_corruptions(name)  # raises with the list of valid names
            raise ValueError(f"CorruptionCache.get takes one corruption name; found {corruption!r}.")
        path = self.path(images, name, severity, seed=seed)
        if path.is_file():
            try:
                cached = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                cached = None
                reason = f"unreadable ({err})"
            else:
                reason = f"shape {cached.shape}, dtype {cached.dtype}"
            if cached is not None and cached.shape == images.shape and cached.dtype == np.uint8:
                return cached
            warnings.warn(
                f"ignoring cached corruption {path}: {reason}; expected shape {images.shape}, "
                f"uint8. Recomputing it.",
                stacklevel=2,
            )
        result = corrupt(images, name, severity, seed=seed, workers=workers, progress=progress)
        self._write(path, result)
        return result

    @staticmethod
    def _write(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, array, allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
