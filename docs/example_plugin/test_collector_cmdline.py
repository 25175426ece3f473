"""Tests for the cmdline plugin, on a synthetic kernel built with collector.testing."""

from __future__ import annotations

import collector_cmdline
import pytest

from collector.analyze import analyze_kernel
from collector.api import Fate, Kernel, NotApplicable
from collector.plugin_manager import PluginManager
from collector.testing import SyntheticKernel

CMDLINE = b"BOOT_IMAGE=/vmlinuz-6.1.0-56-amd64 root=UUID=1234 ro quiet"


def a_kernel(with_symbol: bool = True, captured: bool = True) -> tuple[Kernel, int]:
    """A kernel whose saved_command_line points at CMDLINE; and where the string lives."""
    sk = SyntheticKernel()  # no structs needed: char * is a base type
    string = sk.alloc(len(CMDLINE) + 1)  # kmalloc'ed, in the direct map
    sk.write(string, CMDLINE + b"\0")
    if with_symbol:
        saved = sk.global_("saved_command_line", "u64")  # char *, in the kernel image
        sk.write_u64(saved, string)
        sk.global_("static_command_line", "u64")  # the next symbol
    if not captured:
        sk.drop(string, Fate.EXCLUDED)
    return sk.kernel(), string


def manager() -> PluginManager:
    """A manager with only this plugin, registered as the entry point would register it."""
    pm = PluginManager(builtins=(), autoload=False)
    pm.register(collector_cmdline, name="cmdline", version="test")
    return pm


def test_reads_the_command_line() -> None:
    kernel, string = a_kernel()
    result = analyze_kernel(kernel, "cmdline", manager=manager())
    assert result.records == [{"address": string, "cmdline": CMDLINE.decode()}]
    assert (result.plugin, result.plugin_version, result.error) == ("cmdline", "test", None)


def test_without_the_symbol_it_says_why_it_does_not_apply() -> None:
    kernel, _ = a_kernel(with_symbol=False)
    with pytest.raises(NotApplicable, match="symbol 'saved_command_line'"):
        analyze_kernel(kernel, "cmdline", manager=manager())


def test_a_page_that_was_not_captured_is_one_error_line() -> None:
    kernel, string = a_kernel(captured=False)
    result = analyze_kernel(kernel, "cmdline", manager=manager())
    assert result.records == []
    page = (string - kernel.layout.page_offset_base) & ~0xFFF
    assert result.error == (
        f"cmdline: stopped after 0 records: physical page {page:#x} was not captured: excluded"
    )
