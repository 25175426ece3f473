"""The picture of physical memory (pages --map), drawn from a synthetic memory map."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.analyze import analyze_kernel
from collector.errors import UsageError
from collector.kernel.pages import PageWalker
from collector.plugin_manager import PluginManager
from collector.plugins.pages import pagemap
from collector.plugins.pages.pagemap import COLOURS, PageMap
from collector.testing.pages import MemoryMap

Image = pytest.importorskip("PIL.Image")

START = 0x20000


def a_map() -> MemoryMap:
    """64 pages: a free block of 32 at the start, anonymous pages, two holes at the end."""
    m = MemoryMap("6.12", START, 64, holes=(START + 62, START + 63))
    m.buddy(START, 5)
    for pfn in range(START + 32, START + 48):
        m.in_use(pfn, mapping=0xFFFF888012345671)
    for pfn in range(START + 48, START + 62):
        m.in_use(pfn, flags=m.bit("PG_reserved"))
    return m


def test_map_draws_each_page_in_its_class_colour(tmp_path: Path) -> None:
    m = a_map()
    out = tmp_path / "map.png"
    records = analyze_kernel(
        m.kernel(), "pages", {"map": str(out)}, manager=PluginManager(autoload=False)
    ).records
    assert sum(r["pages"] for r in records) == 64
    picture = Image.open(out).convert("RGB")
    # The memory starts at the gutter and the title's height; the node starts a row.
    x0, y0 = 170, 40
    assert START % pagemap.ROW == 0
    assert picture.getpixel((x0 + 0, y0)) == COLOURS["buddy"]
    assert picture.getpixel((x0 + 1, y0)) == COLOURS["buddy-tail"]
    assert picture.getpixel((x0 + 40, y0)) == COLOURS["anon"]
    assert picture.getpixel((x0 + 50, y0)) == COLOURS["reserved"]
    assert picture.getpixel((x0 + 62, y0)) == COLOURS["hole"]
    assert picture.getpixel((x0 + 100, y0)) == COLOURS["hole"]  # beyond the node


def test_large_memory_is_grouped_by_the_commonest_class(monkeypatch) -> None:
    monkeypatch.setattr(pagemap, "MAX_ROWS", 1)
    monkeypatch.setattr(pagemap, "ROW", 4)
    m = a_map()
    walker = PageWalker(m.kernel())
    picture = PageMap(walker)
    assert picture.group == 64 // 4 and picture.rows == 1
    for batch in walker.batches():
        picture.add(batch)
    codes = [pagemap.CLASSES[c] for c in picture.pixels[:4]]
    assert codes == ["buddy-tail", "buddy-tail", "anon", "reserved"]


def test_a_map_into_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    m = a_map()
    with pytest.raises(UsageError, match="no folder"):
        analyze_kernel(
            m.kernel(),
            "pages",
            {"map": str(tmp_path / "nowhere" / "map.png")},
            manager=PluginManager(autoload=False),
        )
