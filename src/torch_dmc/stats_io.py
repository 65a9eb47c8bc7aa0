"""`ReferenceStats`: the fitted reference quantiles of every site, and their safe file format.

Files are safetensors (tensors only, no pickle: safe to load from strangers) with the JSON
metadata stored in the safetensors header under the key ``"torch_dmc"``. `ReferenceStats.load`
trusts nothing in a file: it checks the metadata schema, every table (dtype, shape, finite,
non-decreasing), that the file holds no tensor the metadata does not name, and the SHA-256 of the
tensor data that `ReferenceStats.save` stores in the metadata (``"data_sha256"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import Tensor, nn

from .sites import declared_channels, site_fingerprint

__all__ = ["FORMAT_VERSION", "ReferenceStats", "StatsMismatchError"]

FORMAT_VERSION = 1
_META_KEY = "torch_dmc"
_CHECKSUM_KEY = "data_sha256"  # in the file's metadata only: not part of `ReferenceStats.checksum`


class StatsMismatchError(ValueError):
    """Reference statistics do not fit the model they are applied to."""


@dataclass
class ReferenceStats:
    """Reference quantile functions of every correction site, fitted on source data.

    Construction checks cheaply (no pass over the table values) what code can get wrong: at least
    one site; every table a 2-D ``C×K`` tensor with ``C ≥ 1`` channels and the same ``K ≥ 2``
    levels; ``channel_axes`` (int) and ``module_types`` (str) given for exactly the sites of
    ``quantiles``; ``per_sample`` only for those sites and with their channel counts; a str
    ``fingerprint`` and a dict ``info``. It raises ``ValueError`` naming the site and the problem.
    `validate` also checks the dtypes and values (float32, finite, non-decreasing); `save` calls it
    and `load` runs the same checks (around its data-checksum check).

    Attributes:
        quantiles: site name → ``C×K`` float32 table of the channel's quantile function at the
            levels ``j / (K - 1)``, endpoints included (see `torch_dmc.transport`).
        channel_axes: site name → axis of the site's output that holds the channels.
        module_types: site name → class name of the site module.
        fingerprint: `torch_dmc.sites.site_fingerprint` of the model the stats were fitted on.
        info: free JSON-serialisable facts about the fit (images, batches, rank-error bound, …).
        per_sample: site name → ``C×K`` mean per-sample quantile function (the barycenter of the
            per-sample distributions of each channel over its positions), the reference of the
            ``per-sample`` estimate; only sites with at least 2 positions per sample. Empty for
            stats fitted without it.
    """

    quantiles: dict[str, Tensor]
    channel_axes: dict[str, int]
    module_types: dict[str, str]
    fingerprint: str
    info: dict = field(default_factory=dict)
    per_sample: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = _structure_problem(self.quantiles, self.per_sample) or _fields_problem(self)
        if problem:
            raise ValueError(f"invalid ReferenceStats: {problem}")

    @property
    def sites(self) -> list[str]:
        """Site names in model order."""
        return list(self.quantiles)

    @property
    def levels(self) -> int:
        """Number of stored levels ``K`` per channel."""
        return next(iter(self.quantiles.values())).shape[1]

    @property
    def channels(self) -> dict[str, int]:
        """Site name → number of channels."""
        return {name: q.shape[0] for name, q in self.quantiles.items()}

    def validate(self) -> None:
        """Check everything construction checks, and the tables' dtypes and values.

        Every table (``quantiles`` and ``per_sample``) must be float32 exactly, hold only finite
        values and be non-decreasing along each row (a quantile function never decreases). `fit`'s
        output passes; `save` calls this and `load` runs the same checks. Costs one pass over the
        tables.

        Raises:
            ValueError: naming the site, the table and the first bad channel.
        """
        problem = (_structure_problem(self.quantiles, self.per_sample, dtype=True)
                   or _fields_problem(self) or _values_problem(self.quantiles, self.per_sample))
        if problem:
            raise ValueError(f"invalid ReferenceStats: {problem}")

    def nbytes(self) -> int:
        """Bytes of the stored tables."""
        tables = [*self.quantiles.values(), *self.per_sample.values()]
        return sum(q.numel() * q.element_size() for q in tables)

    def to(self, device: torch.device | str) -> ReferenceStats:
        """A copy with the tables on ``device``."""
        return ReferenceStats({k: v.to(device) for k, v in self.quantiles.items()},
                              dict(self.channel_axes), dict(self.module_types), self.fingerprint,
                              dict(self.info), {k: v.to(device) for k, v in self.per_sample.items()})

    def checksum(self) -> str:
        """SHA-256 of the tables and metadata (for results' provenance).

        Unchanged by the data checksum that `save` adds to files: a file written before it and the
        same file saved again give the same value.
        """
        h = hashlib.sha256(json.dumps(self._metadata(), sort_keys=True).encode())
        for name, q in self.quantiles.items():
            h.update(name.encode())
            h.update(q.detach().cpu().contiguous().numpy().tobytes())
        for name, q in self.per_sample.items():
            h.update(f"per_sample/{name}".encode())
            h.update(q.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def check(self, model: nn.Module) -> None:
        """Raise `StatsMismatchError` naming the mismatch if these stats do not fit ``model``."""
        modules = dict(model.named_modules())
        missing = [s for s in self.sites if s not in modules]
        if missing:
            raise StatsMismatchError(
                f"expected stats for a model with {len(self.sites)} sites; this model lacks "
                f"{len(missing)} of them ({', '.join(missing[:5])}): were the stats fitted on "
                "another model?")
        wrong = [f"{s} is {type(modules[s]).__name__}, stats say {self.module_types[s]}"
                 for s in self.sites if type(modules[s]).__name__ != self.module_types[s]]
        if wrong:
            raise StatsMismatchError(
                f"site types differ: {'; '.join(wrong[:5])}: were the stats fitted on another model?")
        expected = {s: declared_channels(modules[s]) for s in self.sites}
        wrong = [f"{s} has {expected[s]} channels, stats have {self.channels[s]}"
                 for s in self.sites if expected[s] is not None and expected[s] != self.channels[s]]
        if wrong:
            raise StatsMismatchError(
                f"channel counts differ: {'; '.join(wrong[:5])}: were the stats fitted on another "
                "model?")

    def check_output(self, name: str, output: Tensor) -> None:
        """Raise `StatsMismatchError` if a site's output does not have the fitted channel count."""
        axis = self.channel_axes[name]
        found = output.shape[axis] if -output.dim() <= axis < output.dim() else None
        if found != self.channels[name]:
            raise StatsMismatchError(
                f"site {name!r}: expected {self.channels[name]} channels on axis {axis}, found "
                f"output shape {tuple(output.shape)}: were the stats fitted on another model?")

    def _metadata(self) -> dict:
        """The metadata `checksum` covers; `save` writes it plus the data checksum."""
        meta = {
            "format_version": FORMAT_VERSION,
            "sites": self.sites,
            "channel_axes": self.channel_axes,
            "module_types": self.module_types,
            "levels": self.levels,
            "fingerprint": self.fingerprint,
            "info": self.info,
        }
        if self.per_sample:  # absent from older files (and their checksums stay as they were)
            meta["per_sample_sites"] = list(self.per_sample)
        return meta

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file: ``C×K`` tensors per site plus JSON metadata.

        The tensors are ``quantiles/<site>`` and ``per_sample/<site>``. The metadata (JSON under
        the header key ``"torch_dmc"``) holds the fields of `checksum`'s metadata plus
        ``"data_sha256"``: SHA-256 over the tensors in sorted name order, each as the UTF-8 line
        ``json.dumps([name, dtype, shape]) + "\\n"`` (dtype like ``"float32"``) followed by its
        raw little-endian bytes. `load` verifies it.

        Raises:
            ValueError: the stats are invalid (see `validate`): a file `load` would refuse is
                never written.
        """
        self.validate()
        tensors = {f"quantiles/{name}": q.detach().cpu().contiguous()
                   for name, q in self.quantiles.items()}
        tensors.update({f"per_sample/{name}": q.detach().cpu().contiguous()
                        for name, q in self.per_sample.items()})
        meta = self._metadata()
        meta[_CHECKSUM_KEY] = _data_sha256(tensors)
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> ReferenceStats:
        """Read a file written by `save`, trusting nothing in it; never unpickles anything.

        Checked, in this order, each failure a ``ValueError`` naming the file and the field,
        site or tensor, with what was expected and what was found:

        1. The file is a safetensors file with torch-dmc metadata that is a JSON object, of a
           format version this torch-dmc reads.
        2. The metadata schema: ``format_version`` (int), ``sites`` (non-empty list of unique
           non-empty str), ``channel_axes`` (object: every site → int), ``module_types`` (object:
           every site → str), ``levels`` (int ≥ 2), ``fingerprint`` (str); optional ``info``
           (object), ``per_sample_sites`` (list of unique str, a subset of ``sites``) and
           ``data_sha256`` (64 lowercase hex digits). Other fields are ignored.
        3. The tensors: exactly ``quantiles/<site>`` for every site and ``per_sample/<site>`` for
           every per-sample site, no other (an unnamed tensor means a tampered file); each float32
           exactly (float16, float64, ints are refused, not converted), 2-D with ``levels``
           columns, ``per_sample/<site>`` with the rows of ``quantiles/<site>``.
        4. The data checksum ``data_sha256`` (see `save`), if present: a mismatch means the
           tensor data were altered after save. Files written before checksums existed have none:
           they load with a ``UserWarning``; load and save such a file again to add one (this
           leaves `checksum` unchanged).
        5. The table values: all finite, non-decreasing along each row (see `validate`).

        The checksum detects damage, not forgery: whoever edits a file can recompute it; the
        checks above still bound what such a file can hold. The metadata is not covered by it.

        Args:
            path: the ``.safetensors`` file.
            model: if given, the stats are validated against it (`check`).

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not a torch-dmc safetensors file, its format is newer, or it
                fails one of the checks above.
            StatsMismatchError: the stats do not fit ``model``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no stats file at {path}; create one with torch_dmc.fit(...)"
                                    ".save(path) or `dmc fit`")
        try:
            data = path.read_bytes()
            tensors = load_bytes(data)
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + header_len])
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
        except (SafetensorError, ValueError, OSError, RecursionError) as err:
            raise ValueError(f"{path} is not a safetensors file ({err}); torch-dmc stats files "
                             "are written by ReferenceStats.save") from err
        raw = (header.get("__metadata__") or {}).get(_META_KEY)
        if raw is None:
            raise ValueError(f"{path} is a safetensors file but holds no torch-dmc metadata: "
                             "was it written by ReferenceStats.save?")
        meta = _parse_metadata(path, raw)
        per_sample_sites = meta.get("per_sample_sites", [])

        missing = [s for s in meta["sites"] if f"quantiles/{s}" not in tensors]
        missing += [f"per_sample/{s}" for s in per_sample_sites if f"per_sample/{s}" not in tensors]
        if missing:
            raise ValueError(f"{path} is damaged: no table for sites {missing[:5]}")
        expected = {f"quantiles/{s}" for s in meta["sites"]}
        expected |= {f"per_sample/{s}" for s in per_sample_sites}
        unnamed = sorted(set(tensors) - expected)
        if unnamed:
            raise ValueError(
                f"{path} holds tensors its metadata does not name: {unnamed[:5]} (expected only "
                "quantiles/<site> for its 'sites' and per_sample/<site> for its "
                "'per_sample_sites'): the file was altered after save; refusing it")
        quantiles = {s: tensors[f"quantiles/{s}"] for s in meta["sites"]}
        per_sample = {s: tensors[f"per_sample/{s}"] for s in per_sample_sites}
        problem = _structure_problem(quantiles, per_sample, levels=meta["levels"], dtype=True)
        if problem:
            raise ValueError(f"{path} holds an invalid table: {problem}")

        stored = meta.get(_CHECKSUM_KEY)
        if stored is None:
            warnings.warn(
                f"{path} has no data checksum (it was written by a torch-dmc before checksums), so "
                "damage to its tables cannot be detected; add one by loading and saving it again: "
                "ReferenceStats.load(path).save(path) (its checksum() stays the same)",
                UserWarning, stacklevel=2)
        else:
            found = _data_sha256(tensors)
            if found != stored:
                raise ValueError(
                    f"{path} is damaged: its tensor data do not match the checksum stored at save "
                    f"({_CHECKSUM_KEY} {stored[:16]}…, the data hash to {found[:16]}…): it was "
                    "altered or corrupted after it was written; restore it or fit the stats again")
        problem = _values_problem(quantiles, per_sample)
        if problem:
            raise ValueError(f"{path} holds an invalid table: {problem}")

        try:
            stats = cls(quantiles=quantiles, channel_axes=dict(meta["channel_axes"]),
                        module_types=dict(meta["module_types"]), fingerprint=meta["fingerprint"],
                        info=meta.get("info", {}), per_sample=per_sample)
        except ValueError as err:  # not expected after the checks above; named for the file
            raise ValueError(f"{path}: {err}") from err
        if model is not None:
            stats.check(model)
        return stats

    def fingerprint_matches(self, model: nn.Module) -> bool:
        """Whether ``model``'s sites have the same names, types and channels as at fit time."""
        modules = dict(model.named_modules())
        if any(s not in modules for s in self.sites):
            return False
        return site_fingerprint(model, self.channels) == self.fingerprint


# -- validation --------------------------------------------------------------------------------


def _data_sha256(tensors: dict[str, Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        h.update((json.dumps([name, dtype, list(t.shape)]) + "\n").encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _found(value: Any) -> str:
    """``value`` for an error message: its JSON text (shortened) and its JSON type."""
    text = json.dumps(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({_json_type(value)})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_metadata(path: Path, raw: Any) -> dict:
    """The torch-dmc metadata of the file at ``path``, its schema checked (see `load`)."""
    if not isinstance(raw, str):
        raise ValueError(f"{path}: the torch-dmc metadata must be a JSON string in the header, "
                         f"found {_found(raw)}")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path}: the torch-dmc metadata is not valid JSON ({err}): the file is "
                         "damaged or was not written by ReferenceStats.save") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the torch-dmc metadata must be a JSON object, found "
                         f"{_found(meta)}")

    def bad(name: str, expected: str, found: str | None = None) -> ValueError:
        if found is None:
            found = _found(meta[name]) if name in meta else "nothing (the field is missing)"
        return ValueError(f"{path}: invalid torch-dmc metadata: field {name!r} must be "
                          f"{expected}, found {found}")

    version = meta.get("format_version")
    if not _is_int(version) or version < 1:
        raise bad("format_version", "a positive integer")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {version}; this torch-dmc reads up to "
                         f"{FORMAT_VERSION}: upgrade torch-dmc")

    sites = meta.get("sites")
    expected = "a non-empty list of unique non-empty strings (the site names)"
    if not isinstance(sites, list) or not sites:
        raise bad("sites", expected)
    for i, s in enumerate(sites):
        if not isinstance(s, str) or not s:
            raise bad("sites", expected, f"item {i} = {_found(s)}")
        if s in sites[:i]:
            raise bad("sites", expected, f"{s!r} twice")

    for name, kind, check in (("channel_axes", "an integer axis", _is_int),
                              ("module_types", "a string class name",
                               lambda v: isinstance(v, str))):
        mapping = meta.get(name)
        expected = f"an object giving {kind} for every site"
        if not isinstance(mapping, dict):
            raise bad(name, expected)
        for s in sites:
            if s not in mapping:
                raise bad(name, expected, f"no entry for site {s!r}")
            if not check(mapping[s]):
                raise bad(name, expected, f"site {s!r} → {_found(mapping[s])}")
        extra = [k for k in mapping if k not in sites]
        if extra:
            raise bad(name, expected + " and no other",
                      f"entries for {extra[:5]}, which are not in 'sites'")

    if not _is_int(meta.get("levels")) or meta["levels"] < 2:
        raise bad("levels", "an integer >= 2 (the quantile levels per channel)")
    if not isinstance(meta.get("fingerprint"), str):
        raise bad("fingerprint", "a string (the model's site fingerprint)")
    if "info" in meta and not isinstance(meta["info"], dict):
        raise bad("info", "an object (facts about the fit)")
    if "per_sample_sites" in meta:
        ps = meta["per_sample_sites"]
        expected = "a list of unique strings, each one of 'sites'"
        if not isinstance(ps, list):
            raise bad("per_sample_sites", expected)
        for i, s in enumerate(ps):
            if not isinstance(s, str):
                raise bad("per_sample_sites", expected, f"item {i} = {_found(s)}")
            if s not in sites:
                raise bad("per_sample_sites", expected, f"{s!r}, which is not in 'sites'")
            if s in ps[:i]:
                raise bad("per_sample_sites", expected, f"{s!r} twice")
    if _CHECKSUM_KEY in meta:
        value = meta[_CHECKSUM_KEY]
        if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
            raise bad(_CHECKSUM_KEY, "a SHA-256 hex digest (64 lowercase hex digits)")
    return meta


def _tables(quantiles: dict, per_sample: dict) -> list[tuple[str, Any, Any]]:
    """``(description, site, table)`` of every table, quantiles first."""
    return ([(f"site {s!r} (quantiles table)", s, q) for s, q in quantiles.items()]
            + [(f"site {s!r} (per_sample table)", s, q) for s, q in per_sample.items()])


def _structure_problem(quantiles: Any, per_sample: Any, levels: int | None = None,
                       dtype: bool = False) -> str | None:
    """What is wrong with the tables' types and shapes (cheap: no pass over values), or None.

    ``levels``: the column count they must have (default: that of the first quantiles table);
    ``dtype``: also require float32.
    """
    if not isinstance(quantiles, dict) or not quantiles:
        return ("quantiles must be a non-empty dict site name → C×K tensor, found "
                f"{type(quantiles).__name__}{' (empty)' if isinstance(quantiles, dict) else ''}")
    if not isinstance(per_sample, dict):
        return f"per_sample must be a dict site name → C×K tensor, found {type(per_sample).__name__}"
    tables = _tables(quantiles, per_sample)
    for what, site, t in tables:
        if not isinstance(site, str) or not site:
            return f"site names must be non-empty strings, found {site!r}"
        if not isinstance(t, Tensor):
            return f"{what} is a {type(t).__name__}, expected a torch.Tensor"
        if dtype and t.dtype != torch.float32:
            return (f"{what} has dtype {str(t.dtype).removeprefix('torch.')}, expected float32 "
                    "exactly (other dtypes are refused, not converted)")
        if t.dim() != 2:
            return (f"{what} has shape {tuple(t.shape)}, expected a 2-D C×K table (channels × "
                    "levels)")
        if t.shape[0] < 1:
            return f"{what} has shape {tuple(t.shape)}, expected at least one channel (row)"
    first = next(iter(quantiles))
    k = levels if levels is not None else quantiles[first].shape[1]
    source = "as the metadata's 'levels' says" if levels is not None else \
        f"like site {first!r} (quantiles table)"
    for what, _, t in tables:
        if t.shape[1] != k:
            return f"{what} has shape {tuple(t.shape)}, expected {k} levels (columns) {source}"
    if k < 2:
        return f"the tables have {k} level(s) (columns), expected at least 2 (both endpoints)"
    for s, t in per_sample.items():
        if s not in quantiles:
            return f"per_sample has a table for site {s!r}, which has no quantiles table"
        if t.shape[0] != quantiles[s].shape[0]:
            return (f"site {s!r} (per_sample table) has {t.shape[0]} channels (rows), expected "
                    f"{quantiles[s].shape[0]} like its quantiles table")
    return None


def _fields_problem(stats: ReferenceStats) -> str | None:
    """What is wrong with the non-table fields of ``stats`` (cheap), or None."""
    for name, kind, check in (("channel_axes", "an int axis", _is_int),
                              ("module_types", "a str class name", lambda v: isinstance(v, str))):
        mapping = getattr(stats, name)
        if not isinstance(mapping, dict):
            return f"{name} must be a dict site name → {kind}, found {type(mapping).__name__}"
        missing = [s for s in stats.quantiles if s not in mapping]
        if missing:
            return f"{name} must give {kind} for every site; it lacks sites {missing[:5]}"
        extra = [s for s in mapping if s not in stats.quantiles]
        if extra:
            return f"{name} names sites {extra[:5]} that have no quantiles table"
        wrong = [f"{s!r} → {mapping[s]!r}" for s in stats.quantiles if not check(mapping[s])]
        if wrong:
            return f"{name} must map every site to {kind}, found {', '.join(wrong[:5])}"
    if not isinstance(stats.fingerprint, str):
        return f"fingerprint must be a str, found {type(stats.fingerprint).__name__}"
    if not isinstance(stats.info, dict):
        return f"info must be a dict, found {type(stats.info).__name__}"
    return None


def _values_problem(quantiles: dict[str, Tensor], per_sample: dict[str, Tensor]) -> str | None:
    """The first non-finite or decreasing table row, or None (one pass over the values)."""
    for what, _, t in _tables(quantiles, per_sample):
        bad = ~torch.isfinite(t)
        if bad.any():
            c = int(bad.any(dim=1).nonzero()[0])
            j = int(bad[c].nonzero()[0])
            return (f"{what}, channel {c}: level {j} is {t[c, j].item()}, expected finite values "
                    "only")
        down = t[:, 1:] < t[:, :-1]
        if down.any():
            c = int(down.any(dim=1).nonzero()[0])
            j = int(down[c].nonzero()[0])
            return (f"{what}, channel {c}: level {j + 1} is {t[c, j + 1].item()} < level {j} = "
                    f"{t[c, j].item()}, expected non-decreasing rows (a quantile function never "
                    "decreases)")
    return None
