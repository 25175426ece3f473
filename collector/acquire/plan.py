"""Decide, for every selected physical page, which source reads it and why.

The plan probes sources with a page or two per range, never more, and never touches an
address outside the selected ranges or inside an excluded one. docs/acquisition.md has the
decision table.
"""

from __future__ import annotations

import errno
import itertools
from dataclasses import dataclass, field

from collector.acquire.host import as_sysroot, kernel_config, lockdown_state
from collector.acquire.host import page_size as host_page_size
from collector.acquire.iomem import Range
from collector.acquire.sources import (
    DEV_CRASH,
    DEV_MEM,
    PROC_KCORE,
    SOURCE_NAMES,
    Kcore,
    Source,
    canonical_source_name,
    errno_name,
    open_source,
)
from collector.errors import CollectorError
from collector.memory import Fate
from collector.sysroot import Sysroot

# x86 devmem_is_allowed() (arch/x86/mm/init.c): with CONFIG_STRICT_DEVMEM, RAM in the first
# 256 page frames reads as zeros ("request that the page be shown as all zeros") and RAM
# above them is refused with EPERM.
LOW_MEM_END = 0x100000
# Ranges larger than this get a second /dev/mem probe in their middle.
SECOND_PROBE_ABOVE = 1 << 20

REASON_READABLE = "/dev/mem readable"
REASON_EPERM = "/dev/mem refused (EPERM): CONFIG_STRICT_DEVMEM"
REASON_LOW_ZEROS = (
    "/dev/mem returns fabricated zeros for RAM below 1 MiB "
    "(CONFIG_STRICT_DEVMEM: devmem_is_allowed() returns 2)"
)
REASON_KCORE_GAP = "in no /proc/kcore segment (kcore maps whole pages only)"
REASON_EXCLUDED = "excluded on request"


@dataclass(frozen=True)
class PlanEntry:
    """A stretch ``[start, end)`` of one selected range, read one way.

    ``source`` is the source's name, or None when no source reads these pages; ``fate`` is
    what the plan expects to record for them: READ, KERNEL_ZERO (``kernel_zero``: the source
    answers, but with zeros the kernel fabricates), NOT_COVERED or EXCLUDED. The capture may
    still record UNREADABLE for a page whose read fails. Boundaries inside a range are
    page-aligned, so each page belongs to one entry.
    """

    start: int
    end: int
    source: str | None
    fate: Fate
    kernel_zero: bool
    reason: str
    range_index: int = 0

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def range(self) -> Range:
        return Range(self.start, self.end)

    def to_json(self) -> dict:
        return {
            "start": self.start,
            "end": self.end,
            "range": self.range.display(),
            "source": self.source,
            "fate": self.fate.label,
            "kernel_zero": self.kernel_zero,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Probe:
    """One probing read: ``result`` is ``data``, ``zeros`` or an errno name."""

    source: str
    start: int
    size: int
    result: str

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "start": self.start,
            "size": self.size,
            "result": self.result,
        }


@dataclass
class Plan:
    """The per-page plan of a capture, with the open sources it reads from.

    ``ram_ranges`` are the selected ranges exactly as given (the image's LiME ranges);
    ``entries`` cover every byte of them once, in address order. ``sources_tried`` maps each
    source to ``available`` or why it cannot be used. ``strict_devmem`` is ``detected``,
    ``not detected`` or ``unknown``, with ``strict_devmem_evidence`` saying how it was told.
    Close the plan (or use it as a context manager) to close its sources.
    """

    entries: list[PlanEntry]
    ram_ranges: list[Range]
    excluded: list[Range]
    sources_tried: dict[str, str]
    lockdown: str
    strict_devmem: str
    strict_devmem_evidence: str
    forced_source: str | None
    page_size: int
    sources: dict[str, Source] = field(default_factory=dict, repr=False)
    probes: list[Probe] = field(default_factory=list)

    def source(self, name: str) -> Source:
        """The open source an entry names."""
        return self.sources[canonical_source_name(name)]

    @property
    def kcore(self) -> Kcore | None:
        k = self.sources.get(PROC_KCORE)
        return k if isinstance(k, Kcore) else None

    def close(self) -> None:
        for src in self.sources.values():
            src.close()

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def to_json(self) -> dict:
        """The plan as JSON-ready data, for the image header and ``collect plan``."""
        out: dict = {
            "page_size": self.page_size,
            "forced_source": self.forced_source,
            "lockdown": self.lockdown,
            "strict_devmem": self.strict_devmem,
            "strict_devmem_evidence": self.strict_devmem_evidence,
            "sources": dict(self.sources_tried),
            "ram_ranges": [r.to_json() for r in self.ram_ranges],
            "excluded": [r.to_json() for r in self.excluded],
            "entries": [e.to_json() for e in self.entries],
            "probes": [p.to_json() for p in self.probes],
        }
        k = self.kcore
        if k is not None:
            out["kcore"] = {
                "layout": k.layout,
                "page_offset_base": None
                if k.page_offset_base is None
                else f"{k.page_offset_base:#x}",
                "vmcoreinfo": k.vmcoreinfo is not None,
            }
        return out

    def lines(self) -> list[str]:
        """One line per entry, for people: range, source (or fate), reason."""
        out = []
        for e in self.entries:
            what = e.source or e.fate.label
            if e.kernel_zero:
                what += " (zeros)"
            out.append(f"{e.range.display():>37}  {what:<18} {e.reason}")
        return out


@dataclass(frozen=True)
class _Verdict:
    """What /dev/mem did over one piece of RAM: ``kind`` is ``data``, ``zeros``, ``eperm``,
    ``error`` (another errno) or ``kernel_zero`` (zeros it fabricates); ``paddr`` is where."""

    kind: str
    errno: int = 0
    paddr: int = 0


class _Planner:
    def __init__(
        self,
        sysroot: Sysroot,
        ranges: list[Range],
        excluded: list[Range],
        forced: str | None,
        page_size: int | None,
    ) -> None:
        self.root = sysroot
        self.ranges = ranges
        self.excluded = excluded
        self.forced = forced
        self.lockdown = lockdown_state(sysroot)
        self.tried: dict[str, str] = {}
        self.opened: dict[str, Source] = {}
        self.probes: list[Probe] = []
        self._probe_cache: dict[_Verdict, tuple[bytes | None, int]] = {}
        self.strict: str = "unknown"
        self.strict_evidence = ""
        self._probed = False
        self.entries: list[PlanEntry] = []
        self._open_sources()
        try:
            kcore = self.opened.get(PROC_KCORE)
            self.page_size = page_size or (
                kcore.page_size if kcore is not None else host_page_size(sysroot)
            )
            for src in self.opened.values():
                src.page_size = self.page_size
            self._strict_from_config()
        except BaseException:  # a signal, or a config file that cannot be read
            self.close()
            raise

    # -- sources ------------------------------------------------------------------------

    def _open_sources(self) -> None:
        for name in SOURCE_NAMES:
            if self.forced and name != self.forced:
                self.tried[name] = f"not tried (forced source {self.forced})"
                continue
            try:
                self.opened[name] = open_source(name, self.root)
                self.tried[name] = "available"
            except CollectorError as exc:
                self.tried[name] = str(exc).removeprefix(f"{name}: ")
            except BaseException:  # a signal while opening: close what is open
                self.close()
                raise
        if self.forced and self.forced not in self.opened:
            raise CollectorError(f"{self.forced}: {self.tried[self.forced]}")
        if not self.opened:
            raise CollectorError(
                "no readable source: " + "; ".join(f"{n}: {self.tried[n]}" for n in SOURCE_NAMES)
            )

    def close(self) -> None:
        for src in self.opened.values():
            src.close()

    # -- strict devmem evidence -----------------------------------------------------------

    def _strict_from_config(self) -> None:
        found = kernel_config(self.root)
        if found is None:
            return
        options, where = found
        value = options.get("CONFIG_STRICT_DEVMEM")
        if value == "y":
            self.strict, self.strict_evidence = "detected", f"CONFIG_STRICT_DEVMEM=y in {where}"
        elif value == "n":
            self.strict = "not detected"
            self.strict_evidence = f"CONFIG_STRICT_DEVMEM is not set in {where}"

    def _evidence(self, strict: bool, why: str) -> None:
        # What the kernel does outranks what its configuration file says, and one refusal
        # outranks any number of successful reads.
        if self._probed and (self.strict == "detected" or not strict):
            return
        self._probed = True
        self.strict = "detected" if strict else "not detected"
        self.strict_evidence = why

    # -- probing ------------------------------------------------------------------------

    def _probe(self, src: Source, paddr: int, end: int) -> tuple[bytes | None, int]:
        """Read the page holding ``paddr``, clipped to ``[paddr, end)``."""
        stop = min(paddr - paddr % self.page_size + self.page_size, end)
        key = (src.name, paddr, stop)
        if key in self._probe_cache:
            return self._probe_cache[key]
        try:
            data: bytes | None = src.read(paddr, stop - paddr)
            code = 0
            result = "zeros" if not any(data) else "data"
        except OSError as exc:
            data, code = None, exc.errno or errno.EIO
            result = errno_name(code)
        self.probes.append(Probe(src.name, paddr, stop - paddr, result))
        self._probe_cache[key] = (data, code)
        return data, code

    def _probe_points(self, piece: Range) -> list[int]:
        points = [piece.start]
        if piece.size > SECOND_PROBE_ABOVE:
            mid = piece.start + piece.size // 2
            mid -= mid % self.page_size
            if mid > piece.start:
                points.append(mid)
        return points

    def _devmem_state(self, piece: Range) -> _Verdict:
        """Probe /dev/mem over a RAM piece: (``data`` | ``zeros`` | ``eperm`` | ``error``,
        errno, address)."""
        devmem = self.opened[DEV_MEM]
        state = _Verdict("data", 0, piece.start)
        all_zero = True
        for paddr in self._probe_points(piece):
            data, code = self._probe(devmem, paddr, piece.end)
            if code == errno.EPERM:
                return _Verdict("eperm", code, paddr)
            if code:
                state = _Verdict("error", code, paddr)
            elif data is not None and any(data):
                all_zero = False
        if state.kind == "data" and all_zero:
            return _Verdict("zeros", 0, piece.start)
        return state

    # -- building -----------------------------------------------------------------------

    def _emit(
        self,
        idx: int,
        r: Range,
        source: str | None,
        fate: Fate,
        reason: str,
        kernel_zero: bool = False,
    ) -> None:
        if r.start >= r.end:
            return
        entry = PlanEntry(r.start, r.end, source, fate, kernel_zero, reason, idx)
        if self.entries:
            last = self.entries[-1]
            if (
                last.end == entry.start
                and last.range_index == idx
                and (last.source, last.fate, last.kernel_zero, last.reason)
                == (source, fate, kernel_zero, reason)
            ):
                self.entries[-1] = PlanEntry(
                    last.start, entry.end, source, fate, kernel_zero, reason, idx
                )
                return
        self.entries.append(entry)

    def _pieces(self) -> list[tuple[int, Range, bool]]:
        """Split every range into excluded and wanted pieces, RAM cut at LOW_MEM_END.

        :returns: ``(range index, piece, excluded)`` in address order.
        """
        out: list[tuple[int, Range, bool]] = []
        for idx, r in enumerate(self.ranges):
            cuts = [c for e in self.excluded if (c := e.intersect(r)) is not None]
            marks = [(c, True) for c in cuts] + [(p, False) for p in r.subtract(cuts)]
            for piece, is_excluded in sorted(marks, key=lambda m: m[0].start):
                piece = Range(piece.start, piece.end, r.name)
                if not is_excluded and r.is_ram and piece.start < LOW_MEM_END < piece.end:
                    out.append((idx, Range(piece.start, LOW_MEM_END, r.name), False))
                    out.append((idx, Range(LOW_MEM_END, piece.end, r.name), False))
                else:
                    out.append((idx, piece, is_excluded))
        return out

    def build(self) -> list[PlanEntry]:
        pieces = self._pieces()
        devmem = self.opened.get(DEV_MEM)
        states: dict[tuple[int, int], _Verdict] = {}
        wanted_ram = [(i, p) for i, p, ex in pieces if not ex and p.is_ram]
        # The /dev/mem verdict above 1 MiB tells how to read the zeros below it, so probe
        # high RAM first.
        if devmem is not None and self.forced in (None, DEV_MEM):
            for _i, p in sorted(wanted_ram, key=lambda t: t[1].start < LOW_MEM_END):
                state = self._devmem_state(p)
                if p.start >= LOW_MEM_END:
                    if state.kind == "eperm":
                        self._evidence(True, f"EPERM reading RAM at {state.paddr:#x}")
                    elif state.kind in ("data", "zeros"):
                        # A strict /dev/mem never answers RAM above 1 MiB, zeros or not.
                        state = _Verdict("data", 0, p.start)
                        self._evidence(False, f"/dev/mem read RAM at {p.start:#x}")
                else:
                    state = self._low_verdict(p, state)
                states[(p.start, p.end)] = state

        for idx, piece, is_excluded in pieces:
            if is_excluded:
                self._emit(idx, piece, None, Fate.EXCLUDED, REASON_EXCLUDED)
            elif self.forced:
                self._plan_forced(idx, piece, states.get((piece.start, piece.end)))
            else:
                self._plan_auto(idx, piece, states.get((piece.start, piece.end)))
        return self.entries

    def _low_verdict(self, piece: Range, state: _Verdict) -> _Verdict:
        """Tell real zeros below 1 MiB from the ones a strict /dev/mem fabricates."""
        if state.kind != "zeros":
            if state.kind == "eperm":
                self._evidence(True, f"EPERM reading RAM at {state.paddr:#x}")
            return state
        kcore = self.opened.get(PROC_KCORE)
        if kcore is not None and self.forced is None:
            stop = min(piece.start - piece.start % self.page_size + self.page_size, piece.end)
            covered = kcore.coverage(piece.start, stop)
            if covered and covered[0] == Range(piece.start, stop):
                data, code = self._probe(kcore, piece.start, piece.end)
                if not code and data is not None and any(data):
                    self._evidence(
                        True, f"/dev/mem zeros at {piece.start:#x} where /proc/kcore has data"
                    )
                    return _Verdict("kernel_zero", 0, piece.start)
        if self.strict == "detected":
            return _Verdict("kernel_zero", 0, piece.start)
        return state

    def _why_not_devmem(self, state: _Verdict | None) -> str:
        if DEV_MEM not in self.opened:
            return f"/dev/mem {self.tried[DEV_MEM]}"
        if state is None:
            return "/dev/mem not probed"
        kind, code, paddr = state.kind, state.errno, state.paddr
        if kind == "eperm":
            return REASON_EPERM
        if kind == "kernel_zero":
            return REASON_LOW_ZEROS
        if kind == "zeros":
            return "/dev/mem returned zeros that may be fabricated (strict /dev/mem unknown)"
        return f"/dev/mem failed ({errno_name(code)}) at {paddr:#x}"

    def _plan_auto(self, idx: int, piece: Range, state: _Verdict | None) -> None:
        devmem = self.opened.get(DEV_MEM)
        if not piece.is_ram:
            if devmem is not None:
                self._emit(
                    idx, piece, DEV_MEM, Fate.READ, "named range outside System RAM: /dev/mem"
                )
            else:
                why = f"named range outside System RAM; /dev/mem {self.tried[DEV_MEM]}"
                self._emit(idx, piece, None, Fate.NOT_COVERED, why)
            return
        if devmem is not None and state is not None and state.kind == "data":
            self._emit(idx, piece, DEV_MEM, Fate.READ, REASON_READABLE)
            return
        why = self._why_not_devmem(state)
        kcore = self.opened.get(PROC_KCORE)
        cursor = piece.start
        for part in kcore.coverage(piece.start, piece.end) if kcore is not None else []:
            self._gap(idx, Range(cursor, part.start), state, why)
            self._emit(idx, part, PROC_KCORE, Fate.READ, why)
            cursor = part.end
        self._gap(idx, Range(cursor, piece.end), state, why)

    def _gap(self, idx: int, gap: Range, state: _Verdict | None, why: str) -> None:
        if gap.start >= gap.end:
            return
        where = (
            REASON_KCORE_GAP
            if PROC_KCORE in self.opened
            else f"/proc/kcore {self.tried[PROC_KCORE]}"
        )
        if DEV_CRASH in self.opened:
            self._emit(idx, gap, DEV_CRASH, Fate.READ, f"{where}; {why}")
        elif DEV_MEM in self.opened and state is not None and state.kind == "kernel_zero":
            self._emit(
                idx,
                gap,
                DEV_MEM,
                Fate.KERNEL_ZERO,
                f"{where}; {REASON_LOW_ZEROS}",
                kernel_zero=True,
            )
        elif DEV_MEM in self.opened and state is not None and state.kind == "zeros":
            # Nothing else reads it and nothing says the zeros are fabricated: they may be real.
            self._emit(idx, gap, DEV_MEM, Fate.READ, f"{where}; {why}")
        else:
            self._emit(idx, gap, None, Fate.NOT_COVERED, f"{where}; {why}")

    def _plan_forced(self, idx: int, piece: Range, state: _Verdict | None) -> None:
        name = self.forced
        assert name is not None
        reason = f"forced source {name}"
        if name == PROC_KCORE:
            kcore = self.opened[PROC_KCORE]
            cursor = piece.start
            for part in kcore.coverage(piece.start, piece.end):
                self._emit(
                    idx,
                    Range(cursor, part.start),
                    None,
                    Fate.NOT_COVERED,
                    f"{reason}; {REASON_KCORE_GAP}",
                )
                self._emit(idx, part, PROC_KCORE, Fate.READ, reason)
                cursor = part.end
            self._emit(
                idx,
                Range(cursor, piece.end),
                None,
                Fate.NOT_COVERED,
                f"{reason}; {REASON_KCORE_GAP}",
            )
            return
        fabricated = (state is not None and state.kind == "kernel_zero") or (
            self.strict == "detected" and (state is None or state.kind == "zeros")
        )
        if name == DEV_MEM and piece.is_ram and piece.start < LOW_MEM_END and fabricated:
            self._emit(
                idx,
                piece,
                DEV_MEM,
                Fate.KERNEL_ZERO,
                f"{reason}; {REASON_LOW_ZEROS}",
                kernel_zero=True,
            )
            return
        if name == DEV_MEM and state is not None and state.kind == "eperm":
            reason += f"; {REASON_EPERM}: its pages will be recorded unreadable"
        self._emit(idx, piece, name, Fate.READ, reason)

    def check_readable(self) -> None:
        if any(e.source is not None and not e.kernel_zero for e in self.entries):
            return
        if self.forced and any(e.source is not None for e in self.entries):
            return
        if self.forced:
            raise CollectorError(
                f"{self.forced} can read none of the selected ranges ({self.entries[0].reason})"
            )
        parts = []
        for name in SOURCE_NAMES:
            why = self.tried[name]
            if why == "available":
                if name == DEV_MEM:
                    why = f"refused for every RAM page probed ({self.strict_evidence or 'EPERM'})"
                else:
                    why = "covers none of the selected ranges"
            parts.append(f"{name}: {why}")
        raise CollectorError("no readable source: " + "; ".join(parts))


def make_plan(
    sysroot: Sysroot | str | None,
    ranges: list[Range],
    excluded: list[Range],
    forced_source: str | None = None,
    *,
    page_size: int | None = None,
) -> Plan:
    """Choose a source for every selected page, probing a page or two per range.

    :param sysroot: the host's root (``/`` live, a directory for a fake host).
    :param ranges: the selected ranges (System RAM from iomem plus named includes), which
        become the image's LiME ranges unchanged.
    :param excluded: pages inside ``ranges`` the user excluded (recorded, never read).
    :param forced_source: use only this source (``/dev/mem``, ``/proc/kcore``, ``/dev/crash``
        or a short name), with no fallback.
    :param page_size: defaults to VMCOREINFO's PAGESIZE, else the host's.
    :raises CollectorError: when no source can read anything, or the forced one cannot open.
    """
    root = as_sysroot(sysroot)
    ordered = sorted(ranges, key=lambda r: r.start)
    if not ordered:
        raise CollectorError("no physical ranges selected")
    for a, b in itertools.pairwise(ordered):
        if b.start < a.end:
            raise CollectorError(f"selected ranges {a} and {b} overlap")
    if any(r.size == 0 for r in ordered):
        raise CollectorError("an empty range was selected")
    forced = canonical_source_name(forced_source) if forced_source else None
    planner = _Planner(root, ordered, sorted(excluded, key=lambda r: r.start), forced, page_size)
    try:
        entries = planner.build()
        planner.check_readable()
    except BaseException:
        planner.close()
        raise
    return Plan(
        entries=entries,
        ram_ranges=ordered,
        excluded=sorted(excluded, key=lambda r: r.start),
        sources_tried=planner.tried,
        lockdown=planner.lockdown,
        strict_devmem=planner.strict,
        strict_devmem_evidence=planner.strict_evidence,
        forced_source=forced,
        page_size=planner.page_size,
        sources=planner.opened,
        probes=planner.probes,
    )
