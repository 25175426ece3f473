"""kallsyms on kernels whose symbols come from a kallsyms blob, from VMCOREINFO, or nowhere."""

from __future__ import annotations

import argparse

import pytest

from collector import cli_analysis
from collector.analyze import analyze_kernel
from collector.errors import NotApplicable
from collector.image.sparse import SparseMemory
from collector.kernel.kernel import Kernel
from collector.plugin_manager import DISABLE_AUTOLOAD_ENV, PluginManager

VMCOREINFO = (
    b"OSRELEASE=6.1.0-56-amd64\n"
    b"PAGESIZE=4096\n"
    b"SYMBOL(init_uts_ns)=ffffffff9f613040\n"
    b"SYMBOL(_stext)=ffffffff9e000000\n"
)
KALLSYMS = (
    b"ffffffff9e000000 T _stext\n"
    b"ffffffffc0a01000 t vfat_mount\t[vfat]\n"
    b"ffffffff9e000000 T _text\n"
    b"ffffffff9f4a2e10 D init_task\n"
    b"ffffffffc0a00040 T fat_attach\t[fat]\n"
)


def kernel(blobs: dict[str, bytes]) -> Kernel:
    return Kernel(SparseMemory({0: bytes(4096)}, blobs=blobs))


def run(blobs: dict[str, bytes], **options) -> list[dict]:
    manager = PluginManager(autoload=False)
    result = analyze_kernel(kernel(blobs), "kallsyms", options, manager=manager)
    assert result.error is None
    return result.records


BOTH = "kallsyms text + vmcoreinfo"


def test_every_symbol_in_address_order_with_its_module_and_source() -> None:
    records = run({"kallsyms": KALLSYMS, "vmcoreinfo": VMCOREINFO})
    assert records == [
        {"address": 0xFFFFFFFF9E000000, "type": "T", "name": "_stext", "module": None, "source": BOTH},
        {"address": 0xFFFFFFFF9E000000, "type": "T", "name": "_text", "module": None, "source": BOTH},
        {"address": 0xFFFFFFFF9F4A2E10, "type": "D", "name": "init_task", "module": None, "source": BOTH},
        # only VMCOREINFO names it, so its type is unknown
        {"address": 0xFFFFFFFF9F613040, "type": "?", "name": "init_uts_ns", "module": None, "source": BOTH},
        {"address": 0xFFFFFFFFC0A00040, "type": "T", "name": "fat_attach", "module": "fat", "source": BOTH},
        {"address": 0xFFFFFFFFC0A01000, "type": "t", "name": "vfat_mount", "module": "vfat", "source": BOTH},
    ]  # fmt: skip


def test_match_and_name_filter_by_symbol_name() -> None:
    blobs = {"kallsyms": KALLSYMS, "vmcoreinfo": VMCOREINFO}
    assert [r["name"] for r in run(blobs, match="_t")] == ["_text", "init_task"]
    assert [r["name"] for r in run(blobs, name="_text")] == ["_text"]
    assert [r["name"] for r in run(blobs, match="t", name="fat_attach")] == ["fat_attach"]
    assert run(blobs, name="_tex") == []


def test_without_a_kallsyms_blob_the_table_says_it_is_vmcoreinfo_only() -> None:
    records = run({"vmcoreinfo": VMCOREINFO})
    assert [(r["name"], r["type"], r["source"]) for r in records] == [
        ("_stext", "?", "vmcoreinfo"),
        ("init_uts_ns", "?", "vmcoreinfo"),
    ]


def test_without_any_symbol_source_it_does_not_apply() -> None:
    with pytest.raises(NotApplicable) as e:
        run({})
    assert str(e.value).startswith(
        "kallsyms does not apply to this image: the image has no VMCOREINFO"
    )


def test_collect_analyze_kallsyms_csv(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    hostile = KALLSYMS + b"ffffffff9e100000 t evil\x1b[2J\n"
    the_kernel = kernel({"kallsyms": hostile, "vmcoreinfo": VMCOREINFO})

    def run_analysis(image, name, options, manager, consume=None):
        result = analyze_kernel(
            the_kernel, name, options, manager=manager, image_path=image, stream=bool(consume)
        )
        if consume is not None:
            consume(result)
        return result

    monkeypatch.setattr(cli_analysis, "run_analysis", run_analysis)
    parser = argparse.ArgumentParser(prog="collect")
    cli_analysis.register(parser.add_subparsers())
    args = parser.parse_args(["analyze", "img", "kallsyms", "--match", "i", "--format", "csv"])
    assert args.handler(args) == 0
    from collector import __version__ as v

    assert capsys.readouterr().out == (
        "address,type,name,module,source,plugin,plugin_version\n"
        f"{0xFFFFFFFF9E100000},t,evil\x1b[2J,,{BOTH},kallsyms,{v}\n"
        f"{0xFFFFFFFF9F4A2E10},D,init_task,,{BOTH},kallsyms,{v}\n"
        f"{0xFFFFFFFF9F613040},?,init_uts_ns,,{BOTH},kallsyms,{v}\n"
    )
    args = parser.parse_args(["analyze", "img", "kallsyms", "--match", "evil"])
    assert args.handler(args) == 0
    assert capsys.readouterr().out == (
        "kallsyms: 1 record from img (6.1.0-56-amd64), plugin kallsyms " + v + "\n"
        "address  0xffffffff9e100000\n"
        "type     t\n"
        "name     evil\\x1b[2J\n"
        "module   -\n"
        f"source   {BOTH}\n"
    )
