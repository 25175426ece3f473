"""Parse /proc/iomem into a resource tree and choose the physical ranges a capture reads.

The text is what ``r_show()`` in kernel/resource.c prints: ``"%*s%0*llx-%0*llx : %s"`` with
two spaces of indentation per nesting level, inclusive end addresses, and names as drivers
registered them.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from collector.errors import CollectorError

U64_MAX = (1 << 64) - 1

# kernel/resource.c: r_show() never indents deeper than MAX_IORES_LEVEL levels; deeper
# resources are printed at that level, so a parser must accept siblings there.
MAX_IORES_LEVEL = 5

# A real /proc/iomem is a few KiB, a few hundred KiB on the largest machines; this bound
# only stops a corrupt or planted file from driving the parse.
MAX_IOMEM_BYTES = 4 << 20

_LINE = re.compile(r"^( *)([0-9a-fA-F]{1,16})-([0-9a-fA-F]{1,16}) : (.*)$")
_SIZE = re.compile(r"^(0[xX][0-9a-fA-F]+|[0-9]+)([kKmMgGtT]?)$")
_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def is_system_ram_name(name: str) -> bool:
    """True for resources the kernel registers as IORESOURCE_SYSTEM_RAM.

    Boot memory is ``System RAM``; memory added later carries its driver in parentheses:
    ``System RAM (kmem)`` from device-dax, ``System RAM (virtio_mem)`` from virtio-mem. The
    kernel's own walkers (walk_system_ram_range(), /proc/kcore, devmem_is_allowed()) treat
    all of them as RAM, so the collector does too.
    """
    return name == "System RAM" or name.startswith("System RAM (")


@dataclass(frozen=True)
class Range:
    """A physical address range ``[start, end)``: ``end`` is exclusive.

    ``name`` says where it came from (``System RAM`` for iomem RAM, the user's name for an
    explicitly included range); it takes no part in comparisons.
    """

    start: int
    end: int
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end <= U64_MAX + 1:
            raise ValueError(f"bad range {self.start:#x}-{self.end:#x}")

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def last(self) -> int:
        """The inclusive end address, as /proc/iomem and LiME headers write it."""
        return self.end - 1

    @property
    def is_ram(self) -> bool:
        """True for System RAM and for unnamed ranges; False for a user-named non-RAM range."""
        return not self.name or is_system_ram_name(self.name)

    def display(self) -> str:
        """The inclusive form for people: ``0x1000-0x9fbff``."""
        if not self.size:
            return f"{self.start:#x} (empty)"
        return f"{self.start:#x}-{self.last:#x}"

    def __str__(self) -> str:
        return self.display()

    def contains(self, other: int | Range) -> bool:
        """Whether an address, or a whole range, lies inside this one."""
        if isinstance(other, Range):
            return self.start <= other.start and other.end <= self.end
        return self.start <= other < self.end

    def intersect(self, other: Range) -> Range | None:
        start, end = max(self.start, other.start), min(self.end, other.end)
        if start >= end:
            return None
        return Range(start, end, self.name)

    def subtract(self, others: Iterable[Range]) -> list[Range]:
        """The parts of this range that none of ``others`` covers, in address order."""
        pieces = [self]
        for cut in sorted(others, key=lambda r: r.start):
            nxt: list[Range] = []
            for p in pieces:
                if cut.end <= p.start or cut.start >= p.end:
                    nxt.append(p)
                    continue
                if p.start < cut.start:
                    nxt.append(Range(p.start, cut.start, p.name))
                if cut.end < p.end:
                    nxt.append(Range(cut.end, p.end, p.name))
            pieces = nxt
        return pieces

    def to_json(self) -> dict:
        return {"start": self.start, "end": self.end, "range": self.display(), "name": self.name}


@dataclass(eq=False)
class Resource:
    """One line of /proc/iomem: ``start``..``end`` inclusive, as the kernel prints it."""

    start: int
    end: int
    name: str
    depth: int
    line: int
    parent: Resource | None = field(default=None, repr=False)
    children: list[Resource] = field(default_factory=list, repr=False)

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    def as_range(self) -> Range:
        return Range(self.start, self.end + 1, self.name)

    def walk(self) -> Iterator[Resource]:
        """This resource and all below it, in the order iomem prints them."""
        yield self
        for child in self.children:
            yield from child.walk()


def walk(roots: Iterable[Resource]) -> Iterator[Resource]:
    """Every resource of the tree, in the order /proc/iomem prints them."""
    for root in roots:
        yield from root.walk()


def parse_iomem(text: str) -> list[Resource]:
    """Parse /proc/iomem text into its top-level resources (children nested under them).

    :raises CollectorError: for any line the kernel would not print, naming its line number.
    """
    roots: list[Resource] = []
    stack: list[Resource] = []
    lines = text.split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, 1):
        m = _LINE.match(line)
        if m is None:
            shown = line if len(line) <= 60 else line[:57] + "..."
            raise CollectorError(f"/proc/iomem line {number}: not 'START-END : NAME': {shown!r}")
        indent, start_hex, end_hex, name = m.groups()
        if len(indent) % 2:
            raise CollectorError(f"/proc/iomem line {number}: odd indentation")
        depth = len(indent) // 2
        if depth > MAX_IORES_LEVEL:
            raise CollectorError(
                f"/proc/iomem line {number}: indented {depth} levels, deeper than the kernel "
                f"prints ({MAX_IORES_LEVEL})"
            )
        start, end = int(start_hex, 16), int(end_hex, 16)
        if start > end:
            raise CollectorError(f"/proc/iomem line {number}: start {start:#x} after end {end:#x}")
        if depth > len(stack):
            raise CollectorError(f"/proc/iomem line {number}: indented below no parent")
        del stack[depth:]
        parent = stack[-1] if stack else None
        if parent is not None and not (parent.start <= start and end <= parent.end):
            raise CollectorError(
                f"/proc/iomem line {number}: {start:#x}-{end:#x} lies outside its parent "
                f"{parent.start:#x}-{parent.end:#x} (line {parent.line})"
            )
        res = Resource(start, end, name, depth, number, parent)
        if parent is None:
            roots.append(res)
        else:
            parent.children.append(res)
        stack.append(res)
    return roots


def is_unprivileged_view(roots: list[Resource]) -> bool:
    """True when every address is zero: the kernel hides them from readers without
    CAP_SYS_ADMIN (r_show() prints ``start = end = 0``)."""
    seen = False
    for res in walk(roots):
        seen = True
        if res.start or res.end:
            return False
    return seen


def system_ram(roots: list[Resource]) -> list[Range]:
    """Every System RAM resource, top-level or nested, as iomem gives it, in address order.

    Nothing is merged: adjacent ranges stay separate, sub-page ends stay sub-page. A System RAM
    resource nested inside another is already covered by its ancestor and is not repeated.

    :raises CollectorError: for an unprivileged view (all addresses zero) or overlapping RAM.
    """
    if is_unprivileged_view(roots):
        raise CollectorError(
            "/proc/iomem shows every address as zero: it was read without CAP_SYS_ADMIN "
            "(run as root)"
        )
    found: list[Range] = []

    def visit(res: Resource) -> None:
        if is_system_ram_name(res.name):
            found.append(res.as_range())
            return
        for child in res.children:
            visit(child)

    for root in roots:
        visit(root)
    found.sort(key=lambda r: r.start)
    for a, b in itertools.pairwise(found):
        if b.start < a.end:
            raise CollectorError(f"/proc/iomem: System RAM ranges {a} and {b} overlap")
    return found


def check_addressable(roots: list[Resource], bits: int, evidence: str) -> None:
    """Refuse System RAM that lies beyond the machine's physical address space.

    Such a line cannot describe RAM, and a capture would otherwise spend its time (and a
    plan its probes) on addresses that do not exist.

    :param bits: the width of physical addresses (:func:`collector.acquire.host.phys_address_bits`).
    :param evidence: where ``bits`` comes from, for the message.
    :raises CollectorError: naming the first such line.
    """
    limit = 1 << bits
    for res in walk(roots):
        if is_system_ram_name(res.name) and res.end >= limit:
            raise CollectorError(
                f"/proc/iomem line {res.line}: {res.name} {res.start:#x}-{res.end:#x} ends "
                f"beyond the {bits}-bit physical address space of this machine ({evidence}); "
                "no RAM can be there"
            )


def parse_range(text: str) -> Range:
    """Parse a range given on the command line.

    Accepted forms (an optional ``NAME=`` prefix names the range): ``START-END`` with an
    inclusive end like /proc/iomem (``0x1000-0x1fff``), or ``START+SIZE`` where SIZE may end in
    K, M, G or T (``0x100000+4M``). Numbers are hex with ``0x`` or decimal.

    :raises CollectorError: (exit status 2) with one line saying what is wrong.
    """
    raw = text.strip()
    name = ""
    if "=" in raw:
        name, raw = (part.strip() for part in raw.split("=", 1))
        if not name:
            raise CollectorError(f"bad range {text!r}: empty name before '='", 2)
    if "+" in raw:
        start_s, size_s = raw.split("+", 1)
        start = _parse_number(start_s, text)
        m = _SIZE.match(size_s.strip())
        if m is None:
            raise CollectorError(f"bad range {text!r}: size {size_s.strip()!r} is not a number", 2)
        size = _parse_number(m.group(1), text) * _SUFFIX[m.group(2).lower()]
        if size == 0:
            raise CollectorError(f"bad range {text!r}: size is zero", 2)
        end = start + size
    elif "-" in raw:
        start_s, last_s = raw.split("-", 1)
        start = _parse_number(start_s, text)
        last = _parse_number(last_s, text)
        if last < start:
            raise CollectorError(f"bad range {text!r}: end is below start", 2)
        end = last + 1
    else:
        raise CollectorError(f"bad range {text!r}: expected START-END or START+SIZE", 2)
    if end > U64_MAX + 1:
        raise CollectorError(f"bad range {text!r}: beyond the 64-bit address space", 2)
    return Range(start, end, name)


def _parse_number(s: str, whole: str) -> int:
    s = s.strip()
    try:
        if s[:2].lower() == "0x":
            if not s[2:]:
                raise ValueError
            return int(s[2:], 16)
        if not s.isdigit():
            raise ValueError
        return int(s, 10)
    except ValueError:
        raise CollectorError(f"bad range {whole!r}: {s!r} is not a number", 2) from None


def apply_user_ranges(
    ram: list[Range], include: list[Range], exclude: list[Range], page_size: int = 4096
) -> tuple[list[Range], list[Range]]:
    """Combine iomem's RAM with the user's ``--include`` and ``--exclude`` ranges.

    The parts of an include range that lie inside System RAM are already selected. Parts
    outside System RAM may be device memory, where a read can hang the machine, so they are
    accepted only when the user named the range (``NAME=START-END``); each becomes a selected
    range of its own carrying that name. Exclusions never shrink the selected ranges (they
    are the image's LiME ranges): they come back as a second list, clipped to the selected
    ranges and widened to whole pages, so the capture records those pages as EXCLUDED.

    :returns: ``(selected, excluded)``, both in address order.
    :raises CollectorError: for an unnamed include outside RAM, or include ranges that overlap.
    """
    selected = sorted(ram, key=lambda r: r.start)
    extra: list[Range] = []
    for inc in sorted(include, key=lambda r: r.start):
        outside = inc.subtract(selected)
        if not outside:
            continue
        if not inc.name:
            raise CollectorError(
                f"include range {inc} reaches outside System RAM ({outside[0]}): reading device "
                "memory can hang the machine; name the range (NAME=START-END) to read it anyway",
                2,
            )
        for piece in outside:
            for other in extra:
                if piece.intersect(other) is not None:
                    raise CollectorError(f"include ranges {inc} and {other} overlap", 2)
            extra.append(Range(piece.start, piece.end, inc.name))
    selected = sorted(selected + extra, key=lambda r: r.start)

    excluded: list[Range] = []
    for exc in exclude:
        widened = Range(
            exc.start - exc.start % page_size,
            min(-(-exc.end // page_size) * page_size, U64_MAX + 1),
            exc.name or "excluded",
        )
        for sel in selected:
            part = widened.intersect(sel)
            if part is not None:
                excluded.append(Range(part.start, part.end, widened.name))
    excluded.sort(key=lambda r: r.start)
    merged: list[Range] = []
    for r in excluded:
        if merged and r.start <= merged[-1].end and _same_range(merged[-1], r, selected):
            last = merged.pop()
            r = Range(last.start, max(last.end, r.end), last.name)
        merged.append(r)
    return selected, merged


def _same_range(a: Range, b: Range, selected: list[Range]) -> bool:
    return any(s.contains(Range(a.start, a.start + 1)) and s.contains(b) for s in selected)
