"""Many images at once: `collect sweep` runs analyses over a fleet's images on Dask into a
Parquet dataset, and `collect stack` asks it which values few hosts share.

Nothing here is imported by capture or by single-image analysis; dask, pyarrow and duckdb are
imported only by the modules that need them, and :func:`require` names the extra to install
when one is missing.
"""

from __future__ import annotations

import importlib

from collector.errors import CollectorError

#: The distribution extra that brings what this package needs.
EXTRA = "fleet"

#: Module each command needs, by command.
NEEDS = {
    "sweep": ("dask.distributed", "pyarrow", "duckdb"),
    "stack": ("duckdb",),
}


def require(command: str) -> None:
    """Import what ``command`` needs, or say in one line which extra installs it.

    :raises CollectorError: a module of the extra is not installed.
    """
    missing = []
    for module in NEEDS[command]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise CollectorError(
            f"collect {command} needs {', '.join(missing)}: pip install 'collector[{EXTRA}]'"
        )
