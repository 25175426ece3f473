"""The kernel symbol table of an image, like /proc/kallsyms, and where it came from.

The table is the kernel layer's: the ``kallsyms`` blob (/proc/kallsyms at capture time), else
the kernel's compressed ``kallsyms_*`` tables decoded from memory (kernel/kallsyms.c), plus
VMCOREINFO's ``SYMBOL(...)`` entries.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from collector.api import Analysis, Field, NotApplicable, Option, hookimpl

if TYPE_CHECKING:
    from collector.api import Kernel

KALLSYMS = Analysis(
    name="kallsyms",
    summary="kernel symbols: address, type, name and module, in address order",
    fields=(
        Field("address", "hex", "the symbol's run-time virtual address (KASLR applied)"),
        Field(
            "type",
            "str",
            "nm-style letter: T/t text, D/d data, B/b bss, R/r read-only data..."
            " (upper case: global); ? when the source does not say",
        ),
        Field("name", "str", "the symbol's name"),
        Field("module", "str", "the module defining the symbol; null for the kernel image"),
        Field(
            "source",
            "str",
            "where the table came from: kallsyms text (the blob), decoded from memory,"
            " vmcoreinfo, or a combination joined by +",
        ),
    ),
    options=(
        Option("match", str, None, "only symbols whose name contains TEXT"),
        Option("name", str, None, "only symbols named exactly TEXT"),
    ),
    run=lambda kernel, options: kallsyms(kernel, match=options["match"], exact=options["name"]),
)


@hookimpl
def collector_analyses() -> list[Analysis]:
    return [KALLSYMS]


def kallsyms(kernel: Kernel, match: str | None = None, exact: str | None = None) -> Iterator[dict]:
    """Yield one record per symbol, in address order, optionally filtered by name.

    :raises NotApplicable: the image yields no symbol table at all.
    """
    table = kernel.symbols
    if len(table) == 0:
        raise NotApplicable(f"the kernel symbol table is empty ({table.source})")
    for sym in table:
        if exact is not None and sym.name != exact:
            continue
        if match is not None and match not in sym.name:
            continue
        yield {
            "address": sym.address,
            "type": sym.type,
            "name": sym.name,
            "module": sym.module,
            "source": table.source,
        }
