"""Per-architecture profiles: paging, address-space layout and the live-machine check.

A profile is a module exposing ``PROFILE`` with ``name``, ``description``,
``check_machine(uname_machine, cpu_flags, vmcoreinfo)``, ``Paging`` and ``Layout``.
"""

from __future__ import annotations

import importlib
from typing import Any

from collector.errors import CollectorError

# Profile name -> module; modules are imported only when asked for.
_PROFILES = {
    "x86_64": "collector.profiles.x86_64",
}


def names() -> list[str]:
    """The names of every built-in profile, sorted."""
    return sorted(_PROFILES)


def available() -> list[Any]:
    """Every built-in profile (each with ``name`` and ``description``), sorted by name."""
    return [get(n) for n in names()]


def get(name: str) -> Any:
    """Return the profile called ``name``.

    :raises CollectorError: no such profile; the message lists the available ones.
    """
    module = _PROFILES.get(name)
    if module is None:
        raise CollectorError(
            f"unknown profile {name!r}; available: {', '.join(names())}", exit_code=2
        )
    return importlib.import_module(module).PROFILE
