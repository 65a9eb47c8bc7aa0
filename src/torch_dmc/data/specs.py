"""Data specs: the text of ``--data``, ``--clean-data`` and ``--fit-data``, parsed and opened.

A spec names a kind of data and, for data on disk, where it lies::

    fmnist                      Fashion-MNIST (the Debian package), corruptions generated
    PATH.npz                    x_train, y_train, x_test, y_test arrays, corruptions generated
    cifar10-c:DIR, cifar100-c:DIR       <corruption>.npy + labels.npy, memory-mapped
    cifar10:DIR, cifar100:DIR           the binary distributions (clean test set, fitting)
    imagenet-c:DIR, tiny-imagenet-c:DIR <corruption>/<severity>/<wnid>/*.JPEG, decoded in workers
    imagefolder:DIR                     <class>/*.{JPEG,jpg,png} (clean images, fitting)

Which role takes which kind: :data:`TEST_KINDS` (``--data``), :data:`CLEAN_KINDS`
(``--clean-data``), :data:`FIT_KINDS` (``--fit-data``). Nothing here downloads anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DataSpec",
    "GENERATED_KINDS",
    "TEST_KINDS",
    "CLEAN_KINDS",
    "FIT_KINDS",
    "SPEC_EXPECTED",
]

#: Kinds whose corrupted sets this library generates from the clean test images.
GENERATED_KINDS = ("fmnist", "npz")
#: Kinds ``--data`` (the corrupted test sets) takes.
TEST_KINDS = ("fmnist", "npz", "cifar10-c", "cifar100-c", "imagenet-c", "tiny-imagenet-c")
#: Kinds ``--clean-data`` (the clean test set) takes (its test split).
CLEAN_KINDS = ("fmnist", "npz", "cifar10", "cifar100", "imagefolder")
#: Kinds ``--fit-data`` (the reference's training images) takes (its training split).
FIT_KINDS = ("fmnist", "npz", "cifar10", "cifar100", "imagefolder")
_DIR_KINDS = ("cifar10-c", "cifar100-c", "cifar10", "cifar100", "imagenet-c", "tiny-imagenet-c",
              "imagefolder")

#: What a data spec looks like, for messages.
SPEC_EXPECTED = (
    "a data spec: 'fmnist', PATH.npz, or KIND:DIR with KIND one of " + ", ".join(_DIR_KINDS)
)


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec.

    Attributes:
        kind: ``"fmnist"``, ``"npz"`` or one of the ``KIND:DIR`` kinds.
        path: the file or folder (``None`` for ``fmnist``: the Debian package's folder).
    """

    kind: str
    path: str | None = None

    @classmethod
    def parse(cls, text: str | None, flag: str = "--data") -> DataSpec:
        """Parse ``text`` (``None`` → ``fmnist``); ``ValueError`` (one line) if it is not a spec."""
        if text is None or text == "fmnist":
            return cls("fmnist")
        text = str(text)
        kind, sep, rest = text.partition(":")
        if sep and kind in _DIR_KINDS:
            if not rest:
                raise ValueError(f"{flag} {text!r}: no folder after '{kind}:'; expected {kind}:DIR.")
            return cls(kind, rest)
        if text.endswith(".npz"):
            return cls("npz", text)
        if sep and kind.replace("-", "").isalnum() and not Path(text).exists():
            raise ValueError(f"{flag} {text!r}: unknown data kind {kind!r}; expected {SPEC_EXPECTED}.")
        raise ValueError(f"{flag} {text!r}: not a data spec; expected {SPEC_EXPECTED}.")

    def __str__(self) -> str:
        if self.kind == "fmnist":
            return "fmnist"
        if self.kind == "npz":
            return str(self.path)
        return f"{self.kind}:{self.path}"

    @property
    def generated(self) -> bool:
        """Whether the corrupted sets are generated here (Fashion-MNIST, ``.npz``)."""
        return self.kind in GENERATED_KINDS

    def check_role(self, kinds: tuple[str, ...], flag: str) -> DataSpec:
        """Refuse a spec whose kind does not serve this role (``--data``, ``--fit-data``, ...)
        (``ValueError``), or whose file or folder does not exist (``FileNotFoundError``)."""
        if self.kind not in kinds:
            raise ValueError(f"{flag} {self}: a {self.kind} spec cannot be used here; expected one "
                             f"of the kinds {', '.join(kinds)}.")
        if self.path is not None and not Path(self.path).exists():
            if self.kind == "npz":
                raise FileNotFoundError(f"{flag} {self.path}: no such file; expected an .npz with arrays "
                                 "x_train, y_train, x_test, y_test (uint8 images, integer labels).")
            raise FileNotFoundError(f"{flag} {self}: no such folder {self.path!r}.")
        return self
