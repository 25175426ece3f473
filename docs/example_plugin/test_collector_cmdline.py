"""Tests for the cmdline plugin, on a stand-in for the collector's Kernel."""

from __future__ import annotations

import struct

import collector_cmdline
import pytest

from collector.analyze import analyze_kernel
from collector.errors import NotApplicable
from collector.memory import Fate, PageNotCaptured
from collector.plugin_manager import PluginManager

SYMBOL = 0xFFFFFFFF82A0C2B8  # &saved_command_line, in the kernel image
PAGE_OFFSET = 0xFFFF888000000000  # the direct map of physical memory (without KASLR)
STRING = PAGE_OFFSET + 0x3E4D000  # saved_command_line, a kmalloc'ed copy


class FakeKernel:
    """The few Kernel methods the plugin uses, over a dict of virtual memory.

    Like the real Kernel, reading memory the image lacks raises PageNotCaptured; here every
    address is taken to be in the direct map.
    """

    def __init__(self, memory: dict[int, bytes], symbols: dict[str, int]) -> None:
        self.memory = memory
        self.symbols = symbols

    def symbol(self, name: str) -> int:
        if name not in self.symbols:
            raise NotApplicable(f"symbol {name!r} is not in the kernel symbol table")
        return self.symbols[name]

    def read_virt(self, vaddr: int, size: int) -> bytes:
        for start, data in self.memory.items():
            if start <= vaddr and vaddr + size <= start + len(data):
                return data[vaddr - start : vaddr - start + size]
        raise PageNotCaptured((vaddr - PAGE_OFFSET) & ~0xFFF, Fate.EXCLUDED)

    def read_pointer(self, vaddr: int) -> int:
        return struct.unpack("<Q", self.read_virt(vaddr, 8))[0]

    def read_cstring(self, vaddr: int, max_len: int = 4096) -> bytes:
        out = bytearray()
        while len(out) < max_len:
            byte = self.read_virt(vaddr + len(out), 1)
            if byte == b"\0":
                break
            out += byte
        return bytes(out)


CMDLINE = b"BOOT_IMAGE=/vmlinuz-6.1.0-56-amd64 root=UUID=1234 ro quiet"


def a_kernel(cmdline: bytes = CMDLINE + b"\0", symbols=None) -> FakeKernel:
    memory = {SYMBOL: struct.pack("<Q", STRING), STRING: cmdline}
    return FakeKernel(memory, {"saved_command_line": SYMBOL} if symbols is None else symbols)


def manager() -> PluginManager:
    """A manager with only this plugin, registered as the entry point would register it."""
    pm = PluginManager(builtins=(), autoload=False)
    pm.register(collector_cmdline, name="cmdline", version="test")
    return pm


def test_reads_the_command_line() -> None:
    result = analyze_kernel(a_kernel(), "cmdline", manager=manager())
    assert result.records == [{"address": STRING, "cmdline": CMDLINE.decode()}]
    assert (result.plugin, result.plugin_version, result.error) == ("cmdline", "test", None)


def test_without_the_symbol_it_says_why_it_does_not_apply() -> None:
    with pytest.raises(NotApplicable, match="symbol 'saved_command_line'"):
        analyze_kernel(a_kernel(symbols={}), "cmdline", manager=manager())


def test_a_page_that_was_not_captured_is_one_error_line() -> None:
    kernel = a_kernel()
    del kernel.memory[STRING]
    result = analyze_kernel(kernel, "cmdline", manager=manager())
    assert result.records == []
    assert result.error == (
        "cmdline: stopped after 0 records: physical page 0x3e4d000 was not captured: excluded"
    )
