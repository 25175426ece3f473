"""Plausibility checks: values a real kernel can hold, so that types which do not fit an
image's memory end an analysis with one line instead of a page of garbage.

An image whose BTF or symbols belong to another kernel (or were tampered with) still reads:
every offset lands on some bytes. What gives it away is the values: a PID of -5, a command
name full of binary, a list that never closes. Analyses check the first few records they
read with these functions and stop with :class:`Implausible`, which names what was checked.
"""

from __future__ import annotations

from collector.errors import ImageError

__all__ = ["Implausible", "plausible_int", "plausible_text"]


class Implausible(ImageError):
    """The image's types or symbols do not fit its memory: a value no real kernel holds.

    :param what: what was read (``"init_task.pid"``, ``"task 0xffff... comm"``).
    :param detail: what was wrong with it.
    """

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(
            f"the kernel metadata looks wrong for this image: {what} {detail}"
            " (are the image's BTF and symbols those of the captured kernel?)"
        )
        self.what = what
        self.detail = detail


def plausible_int(value: int, low: int, high: int, what: str) -> int:
    """``value`` when ``low <= value <= high``; else :class:`Implausible` naming ``what``."""
    if not low <= value <= high:
        raise Implausible(what, f"is {value}, outside {low}..{high}")
    return value


def plausible_text(raw: bytes, what: str, allow_empty: bool = False) -> str:
    """``raw`` up to its first NUL, decoded, when it is printable text (what a kernel name, a
    command name or a module name is); else :class:`Implausible` naming ``what``."""
    text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    if not text and not allow_empty:
        raise Implausible(what, "is empty")
    if "\ufffd" in text or not text.isprintable():
        raise Implausible(what, f"is not text: {raw[:32].hex()}")
    return text
