"""The kernel log: printk's records, read with VMCOREINFO's offsets and sizes alone.

Covers the lockless ring buffer of 5.10 and later (kernel/printk/printk_ringbuffer.[ch], "printk:
use the lockless ringbuffer") and the ``log_buf`` of ``struct printk_log`` records before it
(kernel/printk/printk.c, 3.5-5.9). No BTF is needed: the kernel exports every offset a reader
needs in VMCOREINFO (``log_buf_vmcoreinfo_setup()``), so images whose BTF is absent read too.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from collector.api import (
    Analysis,
    CollectorError,
    Field,
    Implausible,
    NotApplicable,
    Option,
    hookimpl,
)
from collector.errors import UsageError

if TYPE_CHECKING:
    from collector.api import Kernel
    from collector.kernel.vmcoreinfo import VmcoreInfo

MASK64 = (1 << 64) - 1

#: include/linux/kern_levels.h: KERN_EMERG (0) .. KERN_DEBUG (7), named as dmesg(1) names them.
LEVELS = ("emerg", "alert", "crit", "err", "warn", "notice", "info", "debug")
#: include/uapi/linux/syslog.h... the facilities of <syslog.h>, named as dmesg(1) names them
#: (12-15 are reserved there).
FACILITIES = (
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
    "authpriv", "ftp", "res0", "res1", "res2", "res3",
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
)  # fmt: skip

# kernel/printk/printk_ringbuffer.h: a descriptor's state_var holds its state in the top two
# bits and its ID in the rest.
DESC_FLAGS_SHIFT = 62
DESC_ID_MASK = (1 << DESC_FLAGS_SHIFT) - 1
DESC_RESERVED, DESC_COMMITTED, DESC_FINALIZED, DESC_REUSABLE = 0, 1, 2, 3
#: Special lpos values: bit 0 set means no data block. FAILED_LPOS: the text was not stored;
#: EMPTY_LINE_LPOS (NO_LPOS in 5.10): an empty line.
FAILED_LPOS = 0x1
EMPTY_LINE_LPOS = 0x3
#: printk_caller_id(): bit 31 set means a CPU number (printk from interrupt context).
CALLER_CPU = 0x80000000

#: LOG_BUF_LEN_MAX (kernel/printk/printk.c): log_buf_len= is capped at 2 GiB, so the data ring
#: has at most 2^31 bytes, and the descriptor ring one for each 2^PRB_AVGBITS (32) of them.
MAX_SIZE_BITS = 31
MAX_COUNT_BITS = MAX_SIZE_BITS - 5
#: Records read per batch of descriptors and infos.
BATCH = 512
#: Bytes of the data ring (or log_buf) read at a time.
WINDOW = 1 << 16
#: So many committed records in a row, from the oldest, that do not decode mean the offsets are
#: wrong for this image (a live capture tears a record or two, not a whole run).
STRICT = 8

FIELDS = (
    Field("seq", "int", "the record's sequence number, as /dev/kmsg shows it"),
    Field("ts_usec", "int", "when it was logged: microseconds since boot (ts_nsec / 1000)"),
    Field("timestamp", "str", "the same as dmesg prints it: seconds.microseconds"),
    Field("level", "int", "log level: 0 (KERN_EMERG) to 7 (KERN_DEBUG)"),
    Field("level_name", "str", "the level by name: emerg alert crit err warn notice info debug"),
    Field("facility", "int", "syslog facility: 0 (kern) for the kernel, 1 (user) for /dev/kmsg"),
    Field("facility_name", "str", "the facility by name: kern, user, daemon, local0..."),
    Field(
        "caller",
        "str",
        "who logged it: T<pid> (a task) or C<cpu> (interrupt context); /dev/kmsg shows it as"
        " caller= only when the kernel has CONFIG_PRINTK_CALLER; null when not recorded",
    ),
    Field("subsystem", "str", "dev_printk()'s SUBSYSTEM= (dev_info.subsystem); null if none"),
    Field("device", "str", "dev_printk()'s DEVICE= (dev_info.device); null if none"),
    Field(
        "text",
        "str",
        "the message; continuation fragments are already joined in the record. Newlines kept,"
        " undecodable bytes as \\xNN; with --escape escaped exactly as /dev/kmsg escapes it",
    ),
    Field(
        "cleared",
        "bool",
        "before clear_seq: 'dmesg -C' cleared it, so dmesg(1) no longer shows it"
        " (/dev/kmsg read from the start still does); null when clear_seq is unknown",
    ),
    Field(
        "state",
        "str",
        "finalized, or committed: the last record of a line still open for continuation at"
        " capture (/dev/kmsg would wait for it); null for the pre-5.10 log_buf",
    ),
    Field(
        "skipped",
        "int",
        "on a closing record only: how many records the ring held that are not shown",
    ),
    Field("note", "str", "on a closing record only: why those records are not shown"),
)

DMESG = Analysis(
    name="dmesg",
    summary="the kernel log (printk's ring buffer): seq, time, level, facility, caller, text",
    fields=FIELDS,
    options=(
        Option("level", int, None, "only records of this level or more urgent (0-7)"),
        Option("escape", bool, False, "text escaped as /dev/kmsg escapes it (\\xNN)"),
    ),
    run=lambda kernel, options: dmesg(kernel, level=options["level"], escape=options["escape"]),
)


@hookimpl
def collector_analyses() -> list[Analysis]:
    return [DMESG]


def dmesg(kernel: Kernel, level: int | None = None, escape: bool = False) -> Iterator[dict]:
    """Yield the kernel log's records, oldest first, then one closing record if some were
    not shown.

    :param level: only records whose level is at most this.
    :param escape: escape text as /dev/kmsg does.
    :raises NotApplicable: VMCOREINFO describes no log buffer.
    :raises Implausible: the buffer's header or its first records do not fit the image.
    """
    if level is not None and not 0 <= level <= 7:
        raise UsageError(f"dmesg: --level must be 0 to 7, not {level}")
    vmcoreinfo = kernel.vmcoreinfo
    if vmcoreinfo.symbol("prb") is not None:
        reader: PrintkRingbuffer | LegacyLogBuf = PrintkRingbuffer(kernel, vmcoreinfo)
    elif vmcoreinfo.symbol("log_buf") is not None:
        reader = LegacyLogBuf(kernel, vmcoreinfo)
    else:
        raise NotApplicable("VMCOREINFO has neither SYMBOL(prb) (5.10+) nor SYMBOL(log_buf)")
    decode = kmsg_escape if escape else _decode
    clear_seq = reader.clear_seq()
    for raw in reader.records():
        if level is not None and raw.level > level:
            continue
        yield {
            "seq": raw.seq,
            "ts_usec": raw.ts_nsec // 1000,
            "timestamp": f"{raw.ts_nsec // 1_000_000_000}.{raw.ts_nsec % 1_000_000_000 // 1000:06d}",
            "level": raw.level,
            "level_name": LEVELS[raw.level],
            "facility": raw.facility,
            "facility_name": FACILITIES[raw.facility] if raw.facility < len(FACILITIES) else None,
            "caller": None if raw.caller_id is None else caller_name(raw.caller_id),
            "subsystem": decode(raw.subsystem) if raw.subsystem else None,
            "device": decode(raw.device) if raw.device else None,
            "text": decode(raw.text),
            "cleared": None if clear_seq is None or raw.seq is None else raw.seq < clear_seq,
            "state": raw.state,
        }
    if reader.skipped:
        yield {"skipped": sum(reader.skipped.values()), "note": reader.skipped_note()}


def caller_name(caller_id: int) -> str:
    """``T<pid>`` or ``C<cpu>``, as /dev/kmsg's ``caller=`` (info_print_ext_header())."""
    kind = "C" if caller_id & CALLER_CPU else "T"
    return f"{kind}{caller_id & ~CALLER_CPU & 0xFFFFFFFF}"


_NEEDS_ESCAPE = re.compile(rb"[^\x20-\x5b\x5d-\x7e]")
_ESCAPES = [chr(c) if 0x20 <= c < 0x7F and c != 0x5C else f"\\x{c:02x}" for c in range(256)]


def kmsg_escape(raw: bytes) -> str:
    """``raw`` as /dev/kmsg gives it (msg_add_ext_text()): every byte below 0x20, from 0x7f
    up, and the backslash as ``\\xNN``."""
    if _NEEDS_ESCAPE.search(raw) is None:
        return raw.decode("ascii")
    return "".join([_ESCAPES[c] for c in raw])


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class RawRecord:
    """One record as the buffer holds it."""

    seq: int | None
    ts_nsec: int
    level: int
    facility: int
    caller_id: int | None
    subsystem: bytes
    device: bytes
    text: bytes
    state: str | None


# -- VMCOREINFO ------------------------------------------------------------------------------


class _Layout:
    """Offsets and sizes from VMCOREINFO, each checked to lie inside its struct."""

    def __init__(self, vmcoreinfo: VmcoreInfo, what: str) -> None:
        self.vmcoreinfo = vmcoreinfo
        self.what = what

    def get(self, kind: str, name: str) -> int:
        if not self._has(kind, name):
            raise NotApplicable(f"VMCOREINFO has {self.what} but no {kind}({name})")
        return self.vmcoreinfo.require(kind, name)

    def _has(self, kind: str, name: str) -> bool:
        return f"{kind}({name})" in self.vmcoreinfo

    def size(self, name: str, limit: int = 4096) -> int:
        value = self.get("SIZE", name)
        if not 0 < value <= limit:
            raise Implausible(f"VMCOREINFO SIZE({name})", f"is {value}, outside 1..{limit}")
        return value

    def offset(self, struct_name: str, member: str, width: int, size: int) -> int:
        """OFFSET(struct.member) for a member ``width`` bytes wide in a struct of ``size``."""
        value = self.get("OFFSET", f"{struct_name}.{member}")
        if not 0 <= value <= size - width:
            raise Implausible(
                f"VMCOREINFO OFFSET({struct_name}.{member})",
                f"is {value}, outside a {size}-byte struct {struct_name}",
            )
        return value

    def optional_offset(self, struct_name: str, member: str, width: int, size: int) -> int | None:
        if not self._has("OFFSET", f"{struct_name}.{member}"):
            return None
        return self.offset(struct_name, member, width, size)


class _Window:
    """Reads a ring of ``size`` bytes at ``base`` through aligned windows of at most
    :data:`WINDOW` bytes, so a record costs a slice, not a page-table walk."""

    def __init__(self, kernel: Kernel, base: int, size: int) -> None:
        self.kernel = kernel
        self.base = base
        self.size = size
        self.step = min(size, WINDOW)
        self._at = -1
        self._bytes = b""

    def read(self, index: int, length: int) -> bytes:
        """``length`` bytes from ``index``; the caller keeps ``index + length <= size``."""
        out = bytearray()
        while length > 0:
            start = index - index % self.step
            if start != self._at:
                step = min(self.step, self.size - start)
                self._bytes = self.kernel.read_virt(self.base + start, step)
                self._at = start
            piece = self._bytes[index - start : index - start + length]
            if not out and len(piece) == length:
                return piece
            out += piece
            index += len(piece)
            length -= len(piece)
        return bytes(out)


# -- 5.10 and later: the lockless ring buffer ---------------------------------------------


class PrintkRingbuffer:
    """``*prb``: a descriptor ring (``struct prb_desc`` and ``struct printk_info`` arrays, one
    slot per record) and a text data ring of blocks, each the record's ID and its text."""

    def __init__(self, kernel: Kernel, vmcoreinfo: VmcoreInfo) -> None:
        self.kernel = kernel
        self.vmcoreinfo = vmcoreinfo
        self.skipped: Counter[str] = Counter()
        v = _Layout(vmcoreinfo, "SYMBOL(prb)")
        rb_size = v.size("printk_ringbuffer")
        desc_ring = v.offset("printk_ringbuffer", "desc_ring", 40, rb_size)
        data_ring = v.offset("printk_ringbuffer", "text_data_ring", 32, rb_size)
        dr_size = v.size("prb_desc_ring")
        count_bits = v.offset("prb_desc_ring", "count_bits", 4, dr_size)
        descs = v.offset("prb_desc_ring", "descs", 8, dr_size)
        infos = v.offset("prb_desc_ring", "infos", 8, dr_size)
        head_id = v.offset("prb_desc_ring", "head_id", 8, dr_size)
        tail_id = v.offset("prb_desc_ring", "tail_id", 8, dr_size)
        data_size = v.size("prb_data_ring")
        size_bits = v.offset("prb_data_ring", "size_bits", 4, data_size)
        data = v.offset("prb_data_ring", "data", 8, data_size)
        head_lpos = v.offset("prb_data_ring", "head_lpos", 8, data_size)
        tail_lpos = v.offset("prb_data_ring", "tail_lpos", 8, data_size)
        counter = v.offset("atomic_long_t", "counter", 8, v.size("atomic_long_t"))
        self.desc_size = v.size("prb_desc")
        self.state_var = v.offset("prb_desc", "state_var", 8, self.desc_size) + counter
        lpos = v.offset("prb_desc", "text_blk_lpos", 16, self.desc_size)
        lpos_size = 16
        self.begin = lpos + v.offset("prb_data_blk_lpos", "begin", 8, lpos_size)
        self.next = lpos + v.offset("prb_data_blk_lpos", "next", 8, lpos_size)
        self.info_size = v.size("printk_info")
        self.seq = v.offset("printk_info", "seq", 8, self.info_size)
        self.ts_nsec = v.offset("printk_info", "ts_nsec", 8, self.info_size)
        self.text_len = v.offset("printk_info", "text_len", 2, self.info_size)
        self.caller_id = v.offset("printk_info", "caller_id", 4, self.info_size)
        # VMCOREINFO exports no offset for facility, flags and level: struct printk_info has
        # had "u16 text_len; u8 facility; u8 flags:5; u8 level:3; u32 caller_id;" since 5.10,
        # so they are the two bytes between text_len and caller_id (crash reads level the same
        # way: the byte after facility, shifted right by 5).
        if self.caller_id != self.text_len + 4:
            raise NotApplicable(
                "struct printk_info is not laid out as 5.10+ lays it out (caller_id does not"
                " follow text_len, facility and level), so facility and level are unknown"
            )
        self.facility = self.text_len + 2
        self.level_byte = self.text_len + 3
        dev_info = v.optional_offset("printk_info", "dev_info", 1, self.info_size)
        self.subsystem: tuple[int, int] | None = None
        self.device: tuple[int, int] | None = None
        if dev_info is not None:
            dev_size = v.size("dev_printk_info")
            room = self.info_size - dev_info
            sub_len = vmcoreinfo.length("printk_info_subsystem") or 16
            dev_len = vmcoreinfo.length("printk_info_device") or 48
            sub = v.offset("dev_printk_info", "subsystem", sub_len, min(dev_size, room))
            dev = v.offset("dev_printk_info", "device", dev_len, min(dev_size, room))
            self.subsystem = (dev_info + sub, sub_len)
            self.device = (dev_info + dev, dev_len)

        rb = kernel.read_pointer(vmcoreinfo.require("SYMBOL", "prb"))
        if rb == 0:
            raise Implausible("prb", "is NULL")
        header = kernel.read_virt(rb, rb_size)

        def u32(at: int) -> int:
            return int.from_bytes(header[at : at + 4], "little")

        def u64(at: int) -> int:
            return int.from_bytes(header[at : at + 8], "little")

        self.count_bits = u32(desc_ring + count_bits)
        self.size_bits = u32(data_ring + size_bits)
        if not 0 < self.count_bits <= MAX_COUNT_BITS:
            raise Implausible(
                "prb->desc_ring.count_bits", f"is {self.count_bits}, outside 1..{MAX_COUNT_BITS}"
            )
        if not 0 < self.size_bits <= MAX_SIZE_BITS:
            raise Implausible(
                "prb->text_data_ring.size_bits",
                f"is {self.size_bits}, outside 1..{MAX_SIZE_BITS}",
            )
        self.count = 1 << self.count_bits
        # DESC0_ID(): DESC_ID(-(_DESCS_COUNT(bits) + 1)) where _DESCS_COUNT() is an unsigned
        # int, so the negation happens in 32 bits: 0xffffefff for 4096 descriptors.
        self.desc0_id = -(self.count + 1) & 0xFFFFFFFF
        self.data_size = 1 << self.size_bits
        self.descs = u64(desc_ring + descs)
        self.infos = u64(desc_ring + infos)
        self.data = u64(data_ring + data)
        for name, pointer in (
            ("desc_ring.descs", self.descs),
            ("desc_ring.infos", self.infos),
            ("text_data_ring.data", self.data),
        ):
            if pointer == 0:
                raise Implausible(f"prb->{name}", "is NULL")
        self.head_id = u64(desc_ring + head_id + counter) & DESC_ID_MASK
        self.tail_id = u64(desc_ring + tail_id + counter) & DESC_ID_MASK
        if (self.head_id - self.tail_id) & DESC_ID_MASK >= self.count:
            raise Implausible(
                "prb->desc_ring head_id and tail_id",
                f"({self.head_id:#x}, {self.tail_id:#x}) are more than the ring's"
                f" {self.count} records apart",
            )
        self.head_lpos = u64(data_ring + head_lpos + counter)
        self.tail_lpos = u64(data_ring + tail_lpos + counter)
        self.window_size = (self.head_lpos - self.tail_lpos) & MASK64
        if self.window_size > self.data_size:
            raise Implausible(
                "prb->text_data_ring head_lpos and tail_lpos",
                f"({self.head_lpos:#x}, {self.tail_lpos:#x}) are more than the ring's"
                f" {self.data_size} bytes apart",
            )
        self.ring = _Window(kernel, self.data, self.data_size)

    def clear_seq(self) -> int | None:
        """``clear_seq``: a ``struct latched_seq`` since 5.13 ("printk: use seqcount_latch for
        clear_seq"), whose latch sequence's low bit picks the copy to read; a u64 before."""
        symbol = self.vmcoreinfo.symbol("clear_seq")
        if symbol is None:
            return None
        val = self.vmcoreinfo.offset("latched_seq.val")
        if val is None:
            return self.kernel.read_u64(symbol)
        latch = self.kernel.read_u32(symbol)  # seqcount_latch_t's sequence comes first
        return self.kernel.read_u64(symbol + val + 8 * (latch & 1))

    def records(self) -> Iterator[RawRecord]:
        """Every record from the tail to the head that a reader may read, oldest first; those
        it may not are counted in :attr:`skipped` (as prb_read_valid() skips them)."""
        total = ((self.head_id - self.tail_id) & DESC_ID_MASK) + 1
        mask = self.count - 1
        good = done = 0
        while done < total:
            first = (self.tail_id + done) & DESC_ID_MASK
            index = first & mask
            n = min(BATCH, total - done, self.count - index)
            descs = self.kernel.read_virt(self.descs + index * self.desc_size, n * self.desc_size)
            infos = self.kernel.read_virt(self.infos + index * self.info_size, n * self.info_size)
            for i in range(n):
                id_ = (first + i) & DESC_ID_MASK
                record = self._record(
                    id_, index + i, descs, i * self.desc_size, infos, i * self.info_size
                )
                if record is None:
                    bad = self.skipped["invalid"] + self.skipped["torn"]
                    if good == 0 and bad >= STRICT:
                        raise Implausible(
                            "the printk ring buffer",
                            f"has {bad} records before any that decodes whose descriptor,"
                            " sequence number or text block does not fit the ring",
                        )
                    continue
                good += 1
                yield record
            done += n

    def _record(
        self, id_: int, index: int, descs: bytes, d: int, infos: bytes, i: int
    ) -> RawRecord | None:
        state_var = int.from_bytes(descs[d + self.state_var : d + self.state_var + 8], "little")
        state = state_var >> DESC_FLAGS_SHIFT
        if state_var & DESC_ID_MASK != id_:
            # desc_miss: the slot holds another record (torn between reads).
            self.skipped["torn"] += 1
            return None
        if state == DESC_RESERVED:
            self.skipped["reserved"] += 1
            return None
        if state == DESC_REUSABLE:
            if id_ == self.desc0_id:
                # _DEFINE_PRINTKRB() and prb_init() start the ring with head and tail at this
                # placeholder, reusable and data-less: it never held a record.
                return None
            # data_make_reusable() gave its text up to newer records.
            self.skipped["overwritten"] += 1
            return None
        (seq,) = struct.unpack_from("<Q", infos, i + self.seq)
        if seq & (self.count - 1) != index:
            # Seq and ID advance together, so a record's seq always maps to its own slot.
            self.skipped["torn"] += 1
            return None
        begin, next_ = (
            int.from_bytes(descs[d + at : d + at + 8], "little") for at in (self.begin, self.next)
        )
        text_len, facility, level_byte, caller_id = struct.unpack_from(
            "<HBBI", infos, i + self.text_len
        )
        text = self._text(id_, begin, next_, text_len)
        if text is None:
            return None
        subsystem = device = b""
        if self.subsystem is not None and self.device is not None:
            at, length = self.subsystem
            subsystem = infos[i + at : i + at + length].split(b"\0", 1)[0]
            at, length = self.device
            device = infos[i + at : i + at + length].split(b"\0", 1)[0]
        (ts_nsec,) = struct.unpack_from("<Q", infos, i + self.ts_nsec)
        return RawRecord(
            seq=seq,
            ts_nsec=ts_nsec,
            level=level_byte >> 5,
            facility=facility,
            caller_id=caller_id,
            subsystem=subsystem,
            device=device,
            text=text,
            state="finalized" if state == DESC_FINALIZED else "committed",
        )

    def _text(self, id_: int, begin: int, next_: int, text_len: int) -> bytes | None:
        """get_data() and copy_data(): the record's text, or None (counted) when a reader
        could not have it."""
        if begin & 1 and next_ & 1:
            if begin == EMPTY_LINE_LPOS and next_ == EMPTY_LINE_LPOS and text_len == 0:
                return b""
            self.skipped["lost"] += 1  # FAILED_LPOS: the text never made it into the ring
            return None
        size_bits, size = self.size_bits, self.data_size
        # lpos values count up from BLK0_LPOS (2^64 - size) and wrap at 2^64: all modulo 2^64.
        last_wrap = ((next_ - 1) & MASK64) >> size_bits
        # Regular block: one wrap holds it all (next - 1: a block may end exactly at the end,
        # since "printk: ringbuffer: Do not wrap blocks that fit exactly"). Wrapping block: its
        # data sits at the start of the ring, and next lies in the wrap after begin's.
        if 0 < (next_ - begin) & MASK64 <= size and begin >> size_bits == last_wrap:
            start, data_size = begin & (size - 1), (next_ - begin) & MASK64
        elif ((begin + size) & MASK64) >> size_bits == last_wrap:
            start, data_size = 0, next_ & (size - 1)
        else:
            self.skipped["invalid"] += 1
            return None
        if begin % 8 or next_ % 8 or data_size < 8 or data_size - 8 < text_len:
            self.skipped["invalid"] += 1
            return None
        # The text is valid only while the block lies between the data ring's tail and head,
        # and the block still starts with its record's ID (data_make_reusable() checks it).
        from_tail = (begin - self.tail_lpos) & MASK64
        if not from_tail < (next_ - self.tail_lpos) & MASK64 <= self.window_size:
            self.skipped["overwritten"] += 1
            return None
        block = self.ring.read(start, 8 + text_len)
        if int.from_bytes(block[:8], "little") & DESC_ID_MASK != id_:
            self.skipped["overwritten"] += 1
            return None
        return block[8:]

    def skipped_note(self) -> str:
        return _skipped_note(self.skipped)


_REASONS = {
    "reserved": "reserved (still being written at capture)",
    "overwritten": "overwritten (their text given up to newer records)",
    "lost": "lost (the kernel could not store their text)",
    "torn": "torn (descriptor and record disagree: changed while captured)",
    "invalid": "invalid (text block outside the ring or shorter than the text)",
}


def _skipped_note(skipped: Counter[str]) -> str:
    parts = [f"{skipped[k]} {why}" for k, why in _REASONS.items() if skipped[k]]
    total = sum(skipped.values())
    return f"{total} record{'s' if total != 1 else ''} not shown: " + ", ".join(parts)


# -- before 5.10: log_buf ----------------------------------------------------------------------


class LegacyLogBuf:
    """``log_buf``: ``struct printk_log`` records (``struct log`` before 3.11) one after another,
    from ``log_first_idx`` to ``log_next_idx``; a header whose ``len`` is 0 sends the reader
    back to the start (log_next())."""

    def __init__(self, kernel: Kernel, vmcoreinfo: VmcoreInfo) -> None:
        self.kernel = kernel
        self.vmcoreinfo = vmcoreinfo
        self.skipped: Counter[str] = Counter()
        # 3.11 "printk: rename struct log to struct printk_log".
        name = "printk_log" if vmcoreinfo.size("printk_log") is not None else "log"
        v = _Layout(vmcoreinfo, "SYMBOL(log_buf)")
        self.header = v.size(name, 64)
        self.ts_nsec = v.offset(name, "ts_nsec", 8, self.header)
        self.len = v.offset(name, "len", 2, self.header)
        self.text_len = v.offset(name, "text_len", 2, self.header)
        # u16 text_len; u16 dict_len; u8 facility; u8 flags:5; u8 level:3; (no offsets exported
        # for the last three)
        dict_len = v.optional_offset(name, "dict_len", 2, self.header)
        self.dict_len = self.text_len + 2 if dict_len is None else dict_len
        self.facility = self.dict_len + 2
        self.level_byte = self.dict_len + 3
        if self.level_byte >= self.header:
            raise Implausible(f"VMCOREINFO SIZE({name})", f"is {self.header}, too small")
        # 4.19 "printk: Add caller information to printk() output": only with
        # CONFIG_PRINTK_CALLER, which is when VMCOREINFO exports the offset.
        self.caller_id = v.optional_offset(name, "caller_id", 4, self.header)
        self.buf = kernel.read_pointer(v.get("SYMBOL", "log_buf"))
        self.buf_len = kernel.read_u32(v.get("SYMBOL", "log_buf_len"))
        self.first_idx = kernel.read_u32(v.get("SYMBOL", "log_first_idx"))
        self.next_idx = kernel.read_u32(v.get("SYMBOL", "log_next_idx"))
        if self.buf == 0:
            raise Implausible("log_buf", "is NULL")
        if not self.header * 2 <= self.buf_len <= 1 << MAX_SIZE_BITS:
            raise Implausible("log_buf_len", f"is {self.buf_len}, outside 32..2^31")
        for what, idx in (("log_first_idx", self.first_idx), ("log_next_idx", self.next_idx)):
            if idx > self.buf_len - self.header:
                raise Implausible(what, f"is {idx}, past log_buf_len {self.buf_len}")
        self.ring = _Window(kernel, self.buf, self.buf_len)

    def _symbol(self, name: str) -> int | None:
        try:
            return self.kernel.symbols.get(name)
        except CollectorError:
            return None

    def clear_seq(self) -> int | None:
        """``clear_seq`` (u64); it and ``log_first_seq`` are not in VMCOREINFO, only in kallsyms."""
        symbol = self._symbol("clear_seq")
        return None if symbol is None else self.kernel.read_u64(symbol)

    def records(self) -> Iterator[RawRecord]:
        first_seq_at = self._symbol("log_first_seq")
        seq = None if first_seq_at is None else self.kernel.read_u64(first_seq_at)
        idx = self.first_idx
        wrapped = False
        used = 0
        while idx != self.next_idx:
            where = f"log_buf record at index {idx}"
            header = self.ring.read(idx, self.header)
            (length,) = struct.unpack_from("<H", header, self.len)
            if length == 0:
                if wrapped:
                    raise Implausible(where, "sends the reader back to the start a second time")
                wrapped = True
                idx = 0
                continue
            (text_len,) = struct.unpack_from("<H", header, self.text_len)
            (dict_len,) = struct.unpack_from("<H", header, self.dict_len)
            if self.header + text_len + dict_len > length or idx + length > self.buf_len:
                raise Implausible(
                    where,
                    f"has len {length}, text_len {text_len} and dict_len {dict_len}, which do"
                    f" not fit (log_buf_len {self.buf_len})",
                )
            used += length
            if used > self.buf_len:
                raise Implausible("log_buf", "holds more records than fit in it: no end found")
            body = self.ring.read(idx + self.header, text_len + dict_len)
            dictionary = _dict_entries(body[text_len:])
            caller_id = None
            if self.caller_id is not None:
                (caller_id,) = struct.unpack_from("<I", header, self.caller_id)
            (ts_nsec,) = struct.unpack_from("<Q", header, self.ts_nsec)
            yield RawRecord(
                seq=seq,
                ts_nsec=ts_nsec,
                level=header[self.level_byte] >> 5,
                facility=header[self.facility],
                caller_id=caller_id,
                subsystem=dictionary.get(b"SUBSYSTEM", b""),
                device=dictionary.get(b"DEVICE", b""),
                text=body[:text_len],
                state=None,
            )
            if seq is not None:
                seq += 1
            idx += length
            if idx > self.buf_len - self.header and idx != self.next_idx:
                raise Implausible(where, f"ends at {idx}, with no room for the next header")

    def skipped_note(self) -> str:
        return _skipped_note(self.skipped)


def _dict_entries(raw: bytes) -> dict[bytes, bytes]:
    """A record's dictionary (``KEY=value`` pairs separated by NULs) as a dict."""
    out = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep:
            out[key] = value
    return out


__all__ = [
    "DMESG",
    "FACILITIES",
    "LEVELS",
    "LegacyLogBuf",
    "PrintkRingbuffer",
    "RawRecord",
    "caller_name",
    "dmesg",
    "kmsg_escape",
]
