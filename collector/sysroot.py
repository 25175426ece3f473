"""Resolve the live machine's paths under an optional root, so tests run on fake hosts."""

from __future__ import annotations

import os
from pathlib import Path


class Sysroot:
    """Every /proc, /sys and /dev path the collector opens goes through here.

    :param root: the directory standing in for ``/``; ``/`` on a live machine.
    """

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = Path(root)

    def path(self, absolute: str) -> Path:
        """Map an absolute path such as ``/proc/iomem`` under the root."""
        return self.root / absolute.lstrip("/")

    def read_text(self, absolute: str) -> str:
        return self.path(absolute).read_text(errors="replace")

    def read_bytes(self, absolute: str) -> bytes:
        return self.path(absolute).read_bytes()

    def exists(self, absolute: str) -> bool:
        return os.path.lexists(self.path(absolute))

    @property
    def is_live(self) -> bool:
        return self.root == Path("/")
