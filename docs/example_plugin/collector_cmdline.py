"""The kernel command line of a memory image: ``saved_command_line`` (init/main.c)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from collector.plugin_manager import Analysis, Field, hookimpl

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel

#: COMMAND_LINE_SIZE is 2048 on x86; a longer string is cut rather than read without bound.
MAX_CMDLINE = 4096

CMDLINE = Analysis(
    name="cmdline",
    summary="the kernel command line the system booted with",
    fields=(
        Field("address", "hex", "where the string lives: the value of saved_command_line"),
        Field("cmdline", "str", "the command line, as /proc/cmdline shows it"),
    ),
)


@hookimpl
def collector_analyses() -> list[Analysis]:
    return [CMDLINE]


@hookimpl
def collector_analyze(name: str, kernel: Kernel) -> list[dict[str, Any]] | None:
    if name != CMDLINE.name:
        return None
    # char *saved_command_line: a pointer to a copy made at boot, since the original
    # boot_command_line is __initdata and freed once the system is up. kernel.symbol()
    # raises NotApplicable, with the reason, when the symbol table lacks it.
    address = kernel.read_pointer(kernel.symbol("saved_command_line"))
    text = kernel.read_cstring(address, MAX_CMDLINE)
    return [{"address": address, "cmdline": text.decode("utf-8", errors="backslashreplace")}]
