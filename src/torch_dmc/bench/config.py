"""``config.json`` of a results folder: what was run, on what, and how to read it; and the checks
that a resumed folder is continued with the same protocol, model and stats."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._files import write_json
from .protocol import Protocol

__all__ = ["PROTOCOL_NOTES", "write_json", "now", "read_previous", "check_same_model",
           "check_same_stats"]

#: How to read the numbers; copied into ``config.json``.
PROTOCOL_NOTES: dict[str, str] = {
    "error": "top-1 error in % of the cell's n images (argmax of the logits vs the label)",
    "images": "generated data (fmnist, .npz): the first n_test test images; a corrupted image is a "
    "pure function of (gen_seed, corruption, severity, index). Data on disk (cifar10-c, "
    "imagenet-c, ...): the same rows of every corrupted set (data.images says which). Every method "
    "and seed sees the same images",
    "stream": "the order of the images; batches are consecutive slices of it, the last one "
    "smaller. 'iid': a seed permutes the images (torch.randperm with a torch.Generator seeded with "
    "the seed). 'label-shift-<alpha>': the same images with the classes in a Dirichlet(alpha) "
    "mixture over time (NOTE, RoTTA): with numpy.random.default_rng(seed), every class's shuffled "
    "images are split over as many time slots as classes by proportions drawn from "
    "Dirichlet(alpha * 1), and the slots follow each other in time, the class pieces of a slot in "
    "a random order, each piece contiguous (torch_dmc.bench.streams.label_shift_order); small "
    "alpha: long runs of one class. The stream is part of every cell's key; means never mix streams",
    "episodic": "a fresh method (the model reset) for every (method, corruption, severity, "
    "batch_size, seed, stream) cell",
    "continual": "for every (method, severity, batch_size, seed, stream): one stream through all "
    "corruptions in the listed order without reset; a corruption's images form their own batches, "
    "ordered by the stream within the segment, and its segment of the stream is one cell; clean "
    "cells stay episodic",
    "mixed": "for every (method, severity, batch_size, seed, stream): one stream of the images of "
    "all corruptions together, ordered by the stream over the whole (iid: every batch mixes "
    "corruptions at random), without reset; a corruption's cell counts its images' errors wherever "
    "they fell; clean cells stay episodic",
    "clean": "corruption 'clean', severity 0: the test images unchanged; run when a clean set exists",
    "means": "seeds averaged first per cell, then corruptions, then severities (all unweighted)",
    "fit": "DMC reference statistics fitted with torch_dmc.bench.fitting.fit_reference (sites "
    "'norm') on fit_images training images (all, or the sorted subset "
    "numpy.random.default_rng(fit_seed).permutation(N)[:fit_images]), batches of 500",
    "inference": "every method runs under torch.inference_mode except those with an optimizer "
    "(tent), which compute gradients themselves",
}


def now() -> str:
    """The time now, UTC, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_previous(out: Path, protocol: Protocol, *, resume: bool, has_results: bool) -> dict | None:
    """The folder's ``config.json`` when resuming, after checking the protocol gives the same values.

    Raises:
        FileExistsError: the folder holds results and ``resume`` is off.
        ValueError: resuming with a protocol that changes the value of a cell.
    """
    if has_results and not resume:
        raise FileExistsError(
            f"{out} already holds results; pass --resume to continue it, or choose another --out."
        )
    path = out / "config.json"
    if not (resume and path.is_file()):
        return None
    previous = json.loads(path.read_text())
    old = Protocol.from_dict(previous["protocol"]).result_identity()
    new = protocol.result_identity()
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        details = "; ".join(f"{k}: folder has {old.get(k)!r}, now {new.get(k)!r}" for k in diff)
        raise ValueError(
            f"--resume {out}: the folder's protocol differs in what changes results ({details}). "
            f"Use another --out, or the same options."
        )
    return previous


def check_same_model(out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse to resume ``out`` with another model: spec, weights, preprocessing or files."""
    if "spec" not in old:  # a folder written before the model flags existed
        return
    keys = ("spec", "weights", "preprocess", "files_sha256")
    diff = [k for k in keys if old.get(k) != new.get(k)]
    if diff:
        details = "; ".join(f"{k}: folder has {old.get(k)!r}, now {new.get(k)!r}" for k in diff)
        raise ValueError(f"--resume {out}: the folder's results are of another model ({details}). "
                         "Use another --out, or the same model flags.")


def check_same_stats(out: Path, previous: dict | None, stats_info: dict | None) -> None:
    """Refuse to resume ``out`` with other reference statistics than its results used."""
    old = (previous or {}).get("stats")
    if old and stats_info and old["checksum"] != stats_info["checksum"]:
        raise ValueError(
            f"--resume {out}: the stats now used ({stats_info['path']}) differ from the ones the "
            "folder's results were computed with; use the same stats or another --out."
        )
