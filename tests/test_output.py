"""Output formats: exact text for tables, JSON, JSON lines and CSV."""

from __future__ import annotations

import io
import json

import pytest

from collector.analyze import AnalysisResult, ImageInfo
from collector.errors import CollectorError
from collector.hookspecs import Analysis, Field
from collector.output import (
    MAX_COLUMN_WIDTH,
    format_cell,
    format_table,
    write_records,
    write_result,
)

FIELDS = (
    Field("address", "hex", "where"),
    Field("size", "int", "how big"),
    Field("name", "str", "what"),
    Field("live", "bool", "whether"),
)
RECORDS = [
    {"address": 0xFFFFFFFF81000000, "size": 4096, "name": "_stext", "live": True},
    {"address": 0x10, "size": None, "name": 'a,b "q"', "live": False},
]


def render(fmt: str, records=RECORDS, fields=FIELDS, **kw) -> str:
    out = io.StringIO()
    write_records(out, records, fields, fmt, **kw)
    return out.getvalue()


def test_table_aligns_numbers_right_and_text_left() -> None:
    assert render("table") == (
        "           address  size  name     live\n"
        "------------------  ----  -------  -----\n"
        "0xffffffff81000000  4096  _stext   true\n"
        '              0x10     -  a,b "q"  false\n'
    )


def test_table_title_comes_first_and_only_in_tables() -> None:
    assert render("table", title="T").startswith("T\n           address")
    assert "T" not in render("jsonl", title="T")


def test_one_record_is_shown_as_field_value_lines() -> None:
    assert render("table", records=RECORDS[:1]) == (
        "address  0xffffffff81000000\nsize     4096\nname     _stext\nlive     true\n"
    )


def test_no_records() -> None:
    assert render("table", records=[]) == "(no records)\n"
    assert render("json", records=[]) == "[]\n"
    assert render("jsonl", records=[]) == ""
    assert render("csv", records=[]) == "address,size,name,live\n"


def test_json_is_one_array_of_flat_records_with_integers() -> None:
    text = render("json")
    assert text == (
        "[\n"
        '{"address": 18446744071578845184, "size": 4096, "name": "_stext", "live": true},\n'
        '{"address": 16, "size": null, "name": "a,b \\"q\\"", "live": false}\n'
        "]\n"
    )
    assert json.loads(text)[0]["address"] == 0xFFFFFFFF81000000


def test_jsonl_is_one_record_per_line() -> None:
    assert render("jsonl") == (
        '{"address": 18446744071578845184, "size": 4096, "name": "_stext", "live": true}\n'
        '{"address": 16, "size": null, "name": "a,b \\"q\\"", "live": false}\n'
    )


def test_csv_quotes_as_rfc4180_and_keeps_integers() -> None:
    assert render("csv") == (
        'address,size,name,live\n18446744071578845184,4096,_stext,true\n16,,"a,b ""q""",false\n'
    )


def test_constants_are_extra_columns_in_machine_formats_only() -> None:
    one = RECORDS[:1]
    constants = {"plugin": "p", "plugin_version": "1.0"}
    assert render("csv", records=one, constants=constants) == (
        "address,size,name,live,plugin,plugin_version\n"
        "18446744071578845184,4096,_stext,true,p,1.0\n"
    )
    assert json.loads(render("jsonl", records=one, constants=constants))["plugin"] == "p"
    assert "plugin" not in render("table", records=one, constants=constants)


def test_missing_keys_are_null() -> None:
    assert render("jsonl", records=[{"name": "x"}]) == (
        '{"address": null, "size": null, "name": "x", "live": null}\n'
    )


def test_cells() -> None:
    assert format_cell(None, "hex") == "-"
    assert format_cell(0, "hex") == "0x0"
    assert format_cell(-0x1EF0A000, "hex") == "-0x1ef0a000"
    assert format_cell(255, "int") == "255"
    assert format_cell(True, "bool") == "true"


def test_untrusted_strings_cannot_drive_the_terminal() -> None:
    assert format_cell("a\x1b[2Jb\tc\nd\u200be", "str") == "a\\x1b[2Jb\\x09c\\x0ad\\u200be"
    assert format_cell("bad\udcffbyte", "str") == "bad\\udcffbyte"
    assert format_cell("héllo", "str") == "héllo"


def test_long_cells_are_cut_except_in_the_last_column() -> None:
    long = "x" * 70
    assert format_cell(long, "str") == "x" * (MAX_COLUMN_WIDTH - 1) + "…"
    fields = (Field("a", "str", ""), Field("b", "str", ""))
    table = format_table([{"a": long, "b": long}, {"a": "", "b": ""}], fields)
    first_row = table.splitlines()[2]
    assert first_row == "x" * 59 + "…" + "  " + long


def test_unknown_format_is_a_usage_error() -> None:
    with pytest.raises(CollectorError, match="unknown output format 'xml'") as e:
        render("xml")
    assert e.value.exit_code == 2


def result(records: list[dict], path: str | None = "img.lime.zst") -> AnalysisResult:
    analysis = Analysis("demo", "a demo", (Field("n", "int", "a number"),))
    return AnalysisResult(
        analysis=analysis,
        records=records,
        plugin="demo",
        plugin_version="2.0",
        image=ImageInfo(path, "6.1.0-56-amd64", None),
        options={},
    )


def test_result_table_names_its_producer() -> None:
    out = io.StringIO()
    write_result(out, result([{"n": 1}, {"n": 2}]), "table")
    assert out.getvalue() == (
        "demo: 2 records from img.lime.zst (6.1.0-56-amd64), plugin demo 2.0\nn\n-\n1\n2\n"
    )
    out = io.StringIO()
    write_result(out, result([{"n": 1}], path=None), "table")
    assert out.getvalue().splitlines()[0] == "demo: 1 record (6.1.0-56-amd64), plugin demo 2.0"


def test_result_json_records_carry_their_producer() -> None:
    out = io.StringIO()
    write_result(out, result([{"n": 1}]), "json")
    assert out.getvalue() == '[\n{"n": 1, "plugin": "demo", "plugin_version": "2.0"}\n]\n'


def test_a_long_table_streams_in_blocks_with_one_header(monkeypatch) -> None:
    import collector.output as output

    monkeypatch.setattr(output, "TABLE_BLOCK", 3)
    fields = [Field("n", "int", "a number"), Field("word", "str", "a word")]
    consumed = []

    def records():
        for n in (1, 22, 333, 4444, 5):
            consumed.append(n)
            yield {"n": n, "word": "w" * n if n < 10 else "x"}

    stream = io.StringIO()
    output.write_records(stream, records(), fields, "table", title=lambda n: f"title {n}")
    # The first block sets the widths; the second widens them where it must.
    assert stream.getvalue().splitlines() == [
        "title None",
        "  n  word",
        "---  ----",
        "  1  w",
        " 22  x",
        "333  x",
        "4444  x",
        "   5  wwwww",
    ]
    assert consumed == [1, 22, 333, 4444, 5]
