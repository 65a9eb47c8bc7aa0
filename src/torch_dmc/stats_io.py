"""`ReferenceStats`: the fitted reference quantiles of every site, and their safe file format.

Files are safetensors (tensors only, no pickle: safe to load from strangers) with the JSON
metadata stored in the safetensors header under the key ``"torch_dmc"``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .sites import site_fingerprint

__all__ = ["FORMAT_VERSION", "ReferenceStats", "StatsMismatchError"]

FORMAT_VERSION = 1
_META_KEY = "torch_dmc"


class StatsMismatchError(ValueError):
    """Reference statistics do not fit the model they are applied to."""


@dataclass
class ReferenceStats:
    """Reference quantile functions of every correction site, fitted on source data.

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
        """SHA-256 of the tables and metadata (for results' provenance)."""
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
        expected = _declared_channels(modules, self.sites)
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
        """Write a safetensors file: ``C×K`` tensors per site plus JSON metadata."""
        tensors = {f"quantiles/{name}": q.detach().cpu().contiguous()
                   for name, q in self.quantiles.items()}
        tensors.update({f"per_sample/{name}": q.detach().cpu().contiguous()
                        for name, q in self.per_sample.items()})
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(self._metadata())})

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> ReferenceStats:
        """Read a file written by `save`; never unpickles anything.

        Args:
            path: the ``.safetensors`` file.
            model: if given, the stats are validated against it (`check`).

        Raises:
            ValueError: the file is not a torch-dmc safetensors file, or its format is newer.
            StatsMismatchError: the stats do not fit ``model``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no stats file at {path}; create one with torch_dmc.fit(...)"
                                    ".save(path) or `dmc fit`")
        try:
            tensors = load_file(str(path))
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
        except (SafetensorError, ValueError, OSError) as err:
            raise ValueError(f"{path} is not a safetensors file ({err}); torch-dmc stats files "
                             "are written by ReferenceStats.save") from err
        raw = (header.get("__metadata__") or {}).get(_META_KEY)
        if raw is None:
            raise ValueError(f"{path} is a safetensors file but holds no torch-dmc metadata: "
                             "was it written by ReferenceStats.save?")
        meta = json.loads(raw)
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} has format version {meta['format_version']}; this torch-dmc "
                             f"reads up to {FORMAT_VERSION}: upgrade torch-dmc")
        per_sample_sites = meta.get("per_sample_sites", [])
        missing = [s for s in meta["sites"] if f"quantiles/{s}" not in tensors]
        missing += [f"per_sample/{s}" for s in per_sample_sites if f"per_sample/{s}" not in tensors]
        if missing:
            raise ValueError(f"{path} is damaged: no table for sites {missing[:5]}")
        stats = cls(
            quantiles={s: tensors[f"quantiles/{s}"] for s in meta["sites"]},
            channel_axes={k: int(v) for k, v in meta["channel_axes"].items()},
            module_types=dict(meta["module_types"]),
            fingerprint=meta["fingerprint"],
            info=meta.get("info", {}),
            per_sample={s: tensors[f"per_sample/{s}"] for s in per_sample_sites},
        )
        if model is not None:
            stats.check(model)
        return stats

    def fingerprint_matches(self, model: nn.Module) -> bool:
        """Whether ``model``'s sites have the same names, types and channels as at fit time."""
        modules = dict(model.named_modules())
        if any(s not in modules for s in self.sites):
            return False
        return site_fingerprint(model, self.channels) == self.fingerprint


def _declared_channels(modules: dict[str, nn.Module], sites: list[str]) -> dict[str, int | None]:
    """Channel count a site module declares (BN ``num_features``, GN ``num_channels``, …) or None."""
    out: dict[str, int | None] = {}
    for s in sites:
        m = modules[s]
        if isinstance(m, nn.GroupNorm):
            out[s] = m.num_channels
        elif hasattr(m, "num_features"):
            out[s] = int(m.num_features)
        elif isinstance(m, nn.LayerNorm):
            out[s] = int(m.normalized_shape[-1])
        else:
            out[s] = None
    return out
