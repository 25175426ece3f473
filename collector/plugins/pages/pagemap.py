"""A picture of physical memory: one pixel per page (or per group of pages), coloured by class.

Drawn with Pillow, an optional dependency (``pip install collector[map]``): the picture needs
text for its legend and scale, and Pillow writes PNG and renders a font without anything
else installed. Everything but the drawing (which class each page is) comes from
:mod:`collector.kernel.pages`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from collector.errors import UsageError
from collector.kernel.pages import CLASSES, CODE, Batch, PageWalker

#: Pixels (pages or groups of pages) in a row: 1 MiB of 4 KiB pages.
ROW = 256
#: The most rows before pages are grouped into pixels (4 GiB of 4 KiB pages at one each).
MAX_ROWS = 4096
#: Pages not walked (no memory map, no node) and holes share one colour.
NOTHING = 255

COLOURS: dict[str, tuple[int, int, int]] = {
    "hole": (48, 48, 48),
    "uncaptured": (255, 0, 255),
    "hwpoison": (0, 0, 0),
    "buddy": (120, 200, 120),
    "buddy-tail": (170, 230, 170),
    "pcp": (60, 170, 90),
    "offline": (30, 30, 110),
    "unaccepted": (90, 90, 160),
    "guard": (200, 255, 200),
    "hugetlb": (200, 60, 200),
    "slab": (240, 150, 30),
    "pagetable": (130, 70, 190),
    "zsmalloc": (150, 110, 60),
    "large-kmalloc": (230, 200, 40),
    "reserved": (150, 150, 150),
    "swapcache": (250, 150, 190),
    "anon": (220, 60, 50),
    "file-writeback": (20, 60, 160),
    "file-dirty": (50, 110, 220),
    "file": (120, 170, 240),
    "compound-head": (250, 230, 90),
    "compound-tail": (250, 240, 150),
    "zero-refcount": (215, 215, 215),
    "other": (140, 100, 60),
}
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
ZONE_INK = (200, 0, 0)


class PageMap:
    """Collects the class of every pixel while the pages are walked; :meth:`save` draws it."""

    def __init__(self, walker: PageWalker) -> None:
        self.walker = walker
        self.base = min(n.start for n in walker.nodes)
        end = max(n.end for n in walker.nodes)
        self.base -= self.base % ROW
        pages = end - self.base
        group = 1
        while -(-pages // (ROW * group)) > max(MAX_ROWS, 1) and group < 1 << 40:
            group *= 2
        self.group = group
        self.rows = -(-pages // (ROW * group))
        self.pixels = np.full(self.rows * ROW, NOTHING, dtype=np.uint8)
        self.counts = np.zeros(len(CLASSES), dtype=np.int64)

    def add(self, batch: Batch) -> None:
        classes = batch.classes
        self.counts += np.bincount(classes, minlength=len(CLASSES))
        first = batch.start - self.base
        if self.group == 1:
            self.pixels[first : first + len(classes)] = classes
            return
        # The commonest class of each group of pages becomes the pixel's (a group split
        # between two batches takes the later part's).
        lead = -first % self.group
        start_pixel = -(-first // self.group)
        body = classes[lead:]
        whole = len(body) // self.group
        if lead:
            self.pixels[first // self.group] = np.bincount(classes[:lead]).argmax()
        if whole:
            groups = body[: whole * self.group].reshape(whole, self.group)
            votes = np.stack([(groups == c).sum(axis=1) for c in range(len(CLASSES))])
            self.pixels[start_pixel : start_pixel + whole] = votes.argmax(axis=0)
        rest = body[whole * self.group :]
        if len(rest):
            self.pixels[start_pixel + whole] = np.bincount(rest).argmax()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Draw the picture: memory, address scale, zone marks and legend."""
        try:
            from PIL import Image, ImageDraw, ImageFont
        except ImportError:
            raise UsageError("pages --map needs Pillow: pip install 'collector[map]'") from None
        lut = np.array([COLOURS[c] for c in CLASSES] + [COLOURS["hole"]] * (256 - len(CLASSES)))
        lut[NOTHING] = COLOURS["hole"]
        codes = self.pixels.copy()
        codes[codes == CODE["hole"]] = NOTHING
        memory = lut[codes].astype(np.uint8).reshape(self.rows, ROW, 3)
        font = ImageFont.load_default()
        gutter, top, legend_width = 170, 40, 440
        shown = int((self.counts > 0).sum()) + 2
        height = top + max(self.rows, 22 * shown) + 20
        canvas = Image.new("RGB", (gutter + ROW + legend_width, height), BACKGROUND)
        canvas.paste(Image.fromarray(memory, "RGB"), (gutter, top))
        draw = ImageDraw.Draw(canvas)
        page = self.walker.kernel.memory.page_size or 4096
        per_row = ROW * self.group * page
        draw.text(
            (10, 8),
            f"Physical memory of {self.walker.kernel.release or 'an image'}: one pixel is"
            f" {self.group} page{'s' if self.group > 1 else ''} of {page // 1024} KiB,"
            f" a row {_size(per_row)}",
            fill=INK,
            font=font,
        )
        # Address scale: a label every 32 rows (or fewer, for small pictures).
        every = max(1, min(32, self.rows // 8 or 1))
        for row in range(0, self.rows, every):
            address = (self.base + row * ROW * self.group) * page
            draw.text((gutter - 95, top + row - 5), f"{address:#011x}", fill=INK, font=font)
            draw.line((gutter - 6, top + row, gutter - 1, top + row), fill=INK)
        # Zones: a bar in the gutter over the rows of each zone, its name, and red ticks
        # beside the row where it begins.
        label_y = 0
        for node in self.walker.nodes:
            for zone in sorted(node.zones, key=lambda z: z.start):
                if zone.end <= zone.start:
                    continue
                first = (zone.start - self.base) // self.group
                last = (zone.end - 1 - self.base) // self.group
                y0, y1 = top + first // ROW, top + last // ROW
                draw.rectangle((8, y0, 12, y1), fill=ZONE_INK)
                label_y = max(y0, label_y)
                draw.text((16, label_y), f"node {node.nid} {zone.name}", fill=ZONE_INK, font=font)
                label_y += 14
                # Ticks either side of the row where it begins: memory is never drawn over.
                draw.line((gutter - 14, y0, gutter - 1, y0), fill=ZONE_INK, width=2)
                draw.line((gutter + ROW, y0, gutter + ROW + 12, y0), fill=ZONE_INK, width=2)
        # Legend: the classes present, with their pages.
        x, y = gutter + ROW + 30, top
        for code, name in enumerate(CLASSES):
            if not self.counts[code] or name == "hole":
                continue
            draw.rectangle((x, y, x + 14, y + 14), fill=COLOURS[name], outline=INK)
            draw.text(
                (x + 22, y + 1), f"{name}: {int(self.counts[code]):,} pages", fill=INK, font=font
            )
            y += 22
        holes = int(self.counts[CODE["hole"]])
        draw.rectangle((x, y, x + 14, y + 14), fill=COLOURS["hole"], outline=INK)
        draw.text(
            (x + 22, y + 1),
            f"hole: no RAM ({holes:,} pages with a struct page), or no memory map",
            fill=INK,
            font=font,
        )
        y += 22
        draw.line((x, y + 8, x + 14, y + 8), fill=ZONE_INK, width=2)
        draw.text(
            (x + 22, y + 1),
            "a zone begins in the row between these ticks",
            fill=ZONE_INK,
            font=font,
        )
        try:
            canvas.save(path, format="PNG")
        except OSError as e:
            raise UsageError(f"pages --map: cannot write {os.fspath(path)}: {e}") from None


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}"
        n //= 1024
    return f"{n} TiB"


def draw_map(
    walker: PageWalker, path: str | os.PathLike[str], batches: Iterator[Batch]
) -> Iterator[Batch]:
    """Pass ``batches`` through, and once they are all read, draw them into ``path``."""
    picture = PageMap(walker)
    for batch in batches:
        picture.add(batch)
        yield batch
    picture.save(path)


def check_map_path(path: Any) -> None:
    """Refuse a ``--map`` path whose folder does not exist, before any work is done."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise UsageError(f"pages --map: no folder {folder}")
