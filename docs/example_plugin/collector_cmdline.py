"""The kernel command line of a memory image: ``saved_command_line`` (init/main.c)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from collector.api import Analysis, Field, Kernel, hookimpl

#: COMMAND_LINE_SIZE is 2048 on x86; a longer string is cut rather than read without bound.
MAX_CMDLINE = 4096


def cmdline(kernel: Kernel, options: dict[str, Any]) -> Iterator[dict[str, Any]]:
    # char *saved_command_line: a copy made at boot, since the original boot_command_line
    # is __initdata and freed once the system is up. kernel.variable() raises
    # NotApplicable, with the reason, when the image's symbol table lacks it.
    saved = kernel.variable("saved_command_line")
    yield {"address": saved.value(), "cmdline": saved.text(MAX_CMDLINE)}


CMDLINE = Analysis(
    name="cmdline",
    summary="the kernel command line the system booted with",
    fields=(
        Field("address", "hex", "where the string lives: the value of saved_command_line"),
        Field("cmdline", "str", "the command line, as /proc/cmdline shows it"),
    ),
    run=cmdline,
)


@hookimpl
def collector_analyses() -> list[Analysis]:
    return [CMDLINE]
