"""The Volatility 3 symbol table of a synthetic kernel: exact entries, Volatility's own schema,
and Volatility's own reader of the table."""

from __future__ import annotations

import base64
import hashlib
import json
import lzma
import re
from pathlib import Path

import jsonschema
import pytest
import volatility3
from volatility3.framework import contexts
from volatility3.framework.symbols import intermed

from collector.cli import main
from collector.interop.isf import FORMAT_VERSION, build_isf, write_isf
from collector.testing import SyntheticKernel

TYPES = """
typedef u32 my_u32;
typedef my_u32 counter_t;
typedef struct { u64 val; } kernel_cap_t;
enum color { RED, GREEN = 5, BLUE = -1 };
struct item;
struct ops { int (*open)(struct item *, int); void (*close)(void); };
struct flags {
    unsigned int a:3;
    unsigned int b:5;
    int c;
    enum color col:4;
    unsigned long long wide:40;
};
struct item {
    int id;
    union { long as_long; void *as_ptr; };
    struct { short x, y; };
    counter_t count;
    char name[16];
    struct item *next;
    int (*callback)(struct item *);
    const struct ops *ops;
    struct flags fl;
    unsigned long matrix[2][3];
    kernel_cap_t cap;
};
struct other { int before; struct { short x, y; }; };
struct task_struct { int pid; char comm[16]; };
struct list_head { struct list_head *next, *prev; };
DEFINE_PER_CPU(struct item, cpu_item);
"""

KASLR = 0x2A000000
BANNER = b"Linux version 6.1.0-test (builder@example) (gcc 12) #1 SMP\n"
#: A per-CPU variable's offset (x86_64 links .data..percpu at 0; KASLR does not move it).
PERCPU_OFFSET = 0x1A000
UNNAMED = re.compile(r"unnamed_[0-9a-f]{16}")


def synthetic() -> SyntheticKernel:
    sk = SyntheticKernel(TYPES)
    sk.vmcoreinfo_extra.append(f"KERNELOFFSET={KASLR:x}")  # the last KERNELOFFSET line wins
    sk.vmcoreinfo_extra.append("SYMBOL(vmemmap)=ffffea0000000000")  # a value, not a variable
    sk.write(sk.global_("linux_banner", "char", 64), BANNER + b"\0")
    sk.global_("init_task", "struct task_struct", pid=0, comm=b"swapper/0")
    sk.global_("modules", "struct list_head")
    sk.symbol("cpu_item", PERCPU_OFFSET)
    return sk


@pytest.fixture(scope="module")
def built():
    sk = synthetic()
    return sk, build_isf(sk.kernel())


def base(name: str) -> dict:
    return {"kind": "base", "name": name}


def pointer(sub: dict) -> dict:
    return {"kind": "pointer", "subtype": sub}


def test_struct_fields_offsets_typedef_chain_arrays_and_function_pointers(built) -> None:
    sk, result = built
    item = result.document["user_types"]["item"]
    off = lambda path: sk.offsetof("struct item", path)  # noqa: E731
    fields = item["fields"]
    assert item["kind"] == "struct"
    assert item["size"] == sk.sizeof("struct item")
    assert fields["id"] == {"offset": 0, "type": base("int")}
    # counter_t -> my_u32 -> u32 -> unsigned int
    assert fields["count"] == {"offset": off("count"), "type": base("unsigned int")}
    assert fields["name"] == {
        "offset": off("name"),
        "type": {"kind": "array", "count": 16, "subtype": base("char")},
    }
    assert fields["matrix"] == {
        "offset": off("matrix"),
        "type": {
            "kind": "array",
            "count": 2,
            "subtype": {"kind": "array", "count": 3, "subtype": base("long unsigned int")},
        },
    }
    assert fields["next"] == {
        "offset": off("next"),
        "type": pointer({"kind": "struct", "name": "item"}),
    }
    assert fields["callback"] == {"offset": off("callback"), "type": pointer({"kind": "function"})}
    assert fields["ops"] == {
        "offset": off("ops"),
        "type": pointer({"kind": "struct", "name": "ops"}),
    }
    assert fields["fl"] == {"offset": off("fl"), "type": {"kind": "struct", "name": "flags"}}
    # An anonymous struct named by a typedef takes the typedef's name (dwarf2json does too).
    assert fields["cap"] == {
        "offset": off("cap"),
        "type": {"kind": "struct", "name": "kernel_cap_t"},
    }
    assert result.document["user_types"]["kernel_cap_t"] == {
        "kind": "struct",
        "size": 8,
        "fields": {"val": {"offset": 0, "type": base("long long unsigned int")}},
    }
    assert result.document["user_types"]["ops"]["fields"] == {
        "open": {"offset": 0, "type": pointer({"kind": "function"})},
        "close": {"offset": 8, "type": pointer({"kind": "function"})},
    }


def test_anonymous_members_are_named_anonymous_fields_of_named_types(built) -> None:
    sk, result = built
    user_types = result.document["user_types"]
    fields = user_types["item"]["fields"]
    union_at = sk.offsetof("struct item", "as_long")
    struct_at = sk.offsetof("struct item", "x")
    union_field = fields[f"unnamed_field_{union_at:x}"]
    struct_field = fields[f"unnamed_field_{struct_at:x}"]
    assert union_field["anonymous"] is struct_field["anonymous"] is True
    assert union_field["offset"] == union_at and struct_field["offset"] == struct_at
    assert union_field["type"]["kind"] == "union" and struct_field["type"]["kind"] == "struct"
    union_name, struct_name = union_field["type"]["name"], struct_field["type"]["name"]
    assert UNNAMED.fullmatch(union_name) and UNNAMED.fullmatch(struct_name)
    assert user_types[union_name] == {
        "kind": "union",
        "size": 8,
        "fields": {
            "as_long": {"offset": 0, "type": base("long int")},
            "as_ptr": {"offset": 0, "type": pointer(base("void"))},
        },
    }
    assert user_types[struct_name] == {
        "kind": "struct",
        "size": 4,
        "fields": {
            "x": {"offset": 0, "type": base("short int")},
            "y": {"offset": 2, "type": base("short int")},
        },
    }
    # The name comes from the definition: the same anonymous struct elsewhere shares it, and
    # a second build names it the same.
    other = user_types["other"]["fields"]
    assert other[f"unnamed_field_{sk.offsetof('struct other', 'x'):x}"]["type"]["name"] == (
        struct_name
    )
    again = build_isf(synthetic().kernel()).document["user_types"]["item"]["fields"]
    assert again[f"unnamed_field_{union_at:x}"]["type"]["name"] == union_name


def test_bitfields_and_enums(built) -> None:
    sk, result = built
    flags = result.document["user_types"]["flags"]
    assert flags["size"] == sk.sizeof("struct flags") == 16

    def bitfield(offset: int, position: int, length: int, of: dict) -> dict:
        kind = {"kind": "bitfield", "bit_position": position, "bit_length": length, "type": of}
        return {"offset": offset, "type": kind}

    # a:3 and b:5 share the first unsigned int; col:4 opens the enum's 4-byte unit at byte 8;
    # wide:40 follows it in the 8-byte unit of its unsigned long long at byte 8, from bit 4.
    assert flags["fields"] == {
        "a": bitfield(0, 0, 3, base("unsigned int")),
        "b": bitfield(0, 3, 5, base("unsigned int")),
        "c": {"offset": 4, "type": base("int")},
        "col": bitfield(8, 0, 4, {"kind": "enum", "name": "color"}),
        "wide": bitfield(8, 4, 40, base("long long unsigned int")),
    }
    assert result.document["enums"]["color"] == {
        "size": 4,
        "base": "int",
        "constants": {"RED": 0, "GREEN": 5, "BLUE": -1},
    }
    bases = result.document["base_types"]
    assert bases["int"] == {"kind": "int", "size": 4, "signed": True, "endian": "little"}
    assert bases["char"] == {"kind": "char", "size": 1, "signed": True, "endian": "little"}
    assert bases["_Bool"] == {"kind": "bool", "size": 1, "signed": False, "endian": "little"}
    assert bases["pointer"] == {"kind": "int", "size": 8, "signed": False, "endian": "little"}
    assert bases["void"] == {"kind": "void", "size": 0, "signed": False, "endian": "little"}


def test_symbols_are_unrelocated_typed_and_the_banner_is_constant_data(built) -> None:
    sk, result = built
    symbols = result.document["symbols"]
    placed = {name: address for name, _, address in sk.symbols}
    assert symbols["init_task"] == {
        "address": placed["init_task"] - KASLR,
        "type": {"kind": "struct", "name": "task_struct"},
    }
    assert symbols["modules"] == {
        "address": placed["modules"] - KASLR,
        "type": {"kind": "struct", "name": "list_head"},
    }
    # A section bound: char [] as include/asm-generic/sections.h declares it.
    assert symbols["_stext"] == {
        "address": placed["_stext"] - KASLR,
        "type": {"kind": "array", "count": 0, "subtype": base("char")},
    }
    # A per-CPU variable: typed by its BTF VAR, its offset left alone.
    assert symbols["cpu_item"] == {
        "address": PERCPU_OFFSET,
        "type": {"kind": "struct", "name": "item"},
    }
    # linux_banner: the array up to the next symbol, its text and NUL as constant data.
    assert symbols["linux_banner"] == {
        "address": placed["linux_banner"] - KASLR,
        "type": {"kind": "array", "count": 64, "subtype": base("char")},
        "constant_data": base64.b64encode(BANNER + b"\0").decode(),
    }
    # VMCOREINFO's SYMBOL(init_top_pgt) is in the kernel image; SYMBOL(vmemmap) is not.
    assert symbols["init_top_pgt"] == {"address": 0xFFFFFFFF80000000 + 0x100000 - KASLR}
    assert "vmemmap" not in symbols
    assert result.notes == []


def test_metadata_names_the_format_producer_and_sources(built) -> None:
    sk, result = built
    meta = result.document["metadata"]
    assert meta["format"] == FORMAT_VERSION == "6.2.0"
    assert meta["producer"] == {"name": "collector", "version": "0.1.0"}
    blobs = sk.memory().blob
    assert meta["linux"] == {
        "types": [
            {
                "name": "btf",
                "hash_type": "sha256",
                "hash_value": hashlib.sha256(blobs("btf")).hexdigest(),
            }
        ],
        "symbols": [
            {
                "kind": "system-map",
                "name": "kallsyms",
                "hash_type": "sha256",
                "hash_value": hashlib.sha256(blobs("kallsyms")).hexdigest(),
            }
        ],
    }


# The schema's "$schema" names no draft jsonschema knows; Volatility validates it, as here,
# with the newest draft.
@pytest.mark.filterwarnings("ignore:The metaschema specified by \\$schema was not found")
def test_validates_against_volatility3s_own_schema(built) -> None:
    _, result = built
    schema_dir = Path(volatility3.__file__).parent / "schemas"
    schema = json.loads((schema_dir / f"schema-{FORMAT_VERSION}.json").read_text())
    jsonschema.validate(result.document, schema)
    broken = json.loads(json.dumps(result.document))
    broken["user_types"]["item"]["fields"]["id"]["offset"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_volatility3_reads_the_table_flattening_anonymous_members(built, tmp_path) -> None:
    sk, result = built
    path = tmp_path / "k.json.xz"
    with path.open("wb") as out:
        write_isf(result, out, xz=True)
    context = contexts.Context()
    table = intermed.IntermediateSymbolTable(
        context, "temporary.isf", name="isf", isf_url=path.as_uri(), validate=False
    )
    context.symbol_space.append(table)
    members = context.symbol_space.get_type("isf!item").vol.members
    for name in ("id", "as_long", "as_ptr", "x", "y", "count", "name", "next", "fl"):
        assert members[name][0] == sk.offsetof("struct item", name), name
    col = context.symbol_space.get_type("isf!flags").vol.members["col"][1]
    assert (col.vol.start_bit, col.vol.end_bit) == (0, 4)
    symbol = context.symbol_space.get_symbol("isf!linux_banner")
    assert symbol.constant_data == BANNER + b"\0"
    assert symbol.address == dict((n, a) for n, _, a in sk.symbols)["linux_banner"] - KASLR


def test_cli_writes_json_or_xz(built, tmp_path, monkeypatch, capsys) -> None:
    sk, result = built
    monkeypatch.setattr("collector.image.open.open_image", lambda path, *_: sk.memory())
    plain, packed = tmp_path / "k.json", tmp_path / "k.json.xz"
    assert main(["export", "image", "--to", "isf", "-o", str(plain)]) == 0
    assert main(["export", "image", "--to", "isf", "-o", str(packed), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {plain}: Volatility 3 symbol table (ISF 6.2.0), ")
    report = json.loads(out[out.index("{") :])
    assert report["user_types"] == len(result.document["user_types"])
    assert json.loads(plain.read_bytes()) == result.document
    assert json.loads(lzma.decompress(packed.read_bytes())) == result.document
    assert plain.stat().st_mode & 0o777 == 0o600


def test_no_banner_is_one_clear_error(tmp_path, monkeypatch, capsys) -> None:
    sk = SyntheticKernel(TYPES)
    sk.global_("init_task", "struct task_struct")
    monkeypatch.setattr("collector.image.open.open_image", lambda path, *_: sk.memory())
    assert main(["export", "image", "--to", "isf", "-o", str(tmp_path / "k.json")]) == 1
    err = capsys.readouterr().err
    assert "no linux_banner" in err and "Traceback" not in err
    assert not (tmp_path / "k.json").exists()


TIMEKEEPING = """
struct seqcount { unsigned int sequence; };
typedef struct seqcount seqcount_t;
struct seqcount_raw_spinlock { seqcount_t seqcount; };
typedef struct seqcount_raw_spinlock seqcount_raw_spinlock_t;
struct timekeeper { u64 offs_real; u64 offs_boot; int shift; };
struct seq_operations { void *start, *stop, *next, *show; };
"""


def test_globals_volatility_reads_that_btf_does_not_type() -> None:
    """tk_core (a static anonymous struct before 6.13), kallsyms_num_syms, cap_last_cap and
    the protocols' seq_operations get types; tk_core's is written out as a user type."""
    sk = SyntheticKernel(TYPES + TIMEKEEPING)
    sk.write(sk.global_("linux_banner", "char", 64), BANNER + b"\0")
    sk.global_("init_task", "struct task_struct", pid=0, comm=b"swapper/0")
    # static struct { seqcount_raw_spinlock_t seq; struct timekeeper timekeeper; } tk_core:
    # the timekeeper at the 4-byte seq rounded up to its 8-byte alignment.
    tk_core = sk.global_("tk_core", "u8", 8 + sk.sizeof("struct timekeeper"))
    sk.global_("kallsyms_num_syms", "u32")
    sk.global_("cap_last_cap", "u32")
    sk.global_("udp_seq_ops", "struct seq_operations")
    sk.global_("end_of_data", "u64")
    result = build_isf(sk.kernel())
    symbols, user_types = result.document["symbols"], result.document["user_types"]
    assert symbols["tk_core"]["address"] == tk_core
    name = symbols["tk_core"]["type"]["name"]
    assert symbols["tk_core"]["type"] == {"kind": "struct", "name": name}
    assert UNNAMED.fullmatch(name)
    assert user_types[name] == {
        "kind": "struct",
        "size": 8 + 24,
        "fields": {
            "seq": {"offset": 0, "type": {"kind": "struct", "name": "seqcount_raw_spinlock"}},
            "timekeeper": {"offset": 8, "type": {"kind": "struct", "name": "timekeeper"}},
        },
    }
    assert symbols["kallsyms_num_syms"]["type"] == base("unsigned int")
    assert symbols["cap_last_cap"]["type"] == base("int")
    assert symbols["udp_seq_ops"]["type"] == {"kind": "struct", "name": "seq_operations"}
    assert result.notes == []
