"""What a results folder records about where it came from: versions, git commit, machine, hashes."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ..models.store import sha256_file

__all__ = [
    "package_versions",
    "git_commit",
    "machine",
    "sha256_file",
    "sha256_files",
    "command_line",
]

_PACKAGES = ("torch-dmc", "torch", "numpy", "imagecorruptions-imaug", "matplotlib", "safetensors")


def package_versions() -> dict[str, str | None]:
    """Installed versions of torch-dmc and the packages a result depends on (``None``: absent)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    if out.get("torch-dmc") is None:
        import torch_dmc

        out["torch-dmc"] = torch_dmc.__version__
    return out


def git_commit(path: str | Path | None = None) -> dict[str, object] | None:
    """``{"commit": HEAD, "dirty": bool}`` of the git checkout holding ``path``, else ``None``.

    Args:
        path: a folder in the checkout (default: the torch_dmc package's folder).
    """
    if path is None:
        import torch_dmc

        path = Path(torch_dmc.__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return {"commit": head.stdout.strip(), "dirty": dirty}


def machine() -> dict[str, object]:
    """Platform, processor, CPU count and torch threads of this process."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def sha256_files(paths: list[Path]) -> dict[str, str]:
    """File name → SHA-256, for every file given."""
    return {p.name: sha256_file(p) for p in sorted(paths)}


def command_line(argv: list[str] | None = None) -> str:
    """The command line of this process, shell-quoted (``dmc bench …`` when run as ``dmc``)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    head = "python " + argv[0] if argv[0] in ("-c", "-m") else Path(argv[0]).name
    return " ".join([head, shlex.join(argv[1:])]).strip()
