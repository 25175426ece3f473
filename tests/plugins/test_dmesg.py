"""dmesg on synthetic kernels whose log buffers collector.testing.printk lays out as the
kernel's own writers do (prb_reserve()/prb_commit(), log_store())."""

from __future__ import annotations

import re
import struct

import pytest

from collector.analyze import analyze_kernel
from collector.api import NotApplicable
from collector.errors import UsageError
from collector.kernel.kernel import Kernel
from collector.plugin_manager import PluginManager
from collector.plugins import dmesg
from collector.plugins.dmesg import kmsg_escape
from collector.testing import SyntheticKernel
from collector.testing.printk import (
    DESC_FLAGS_SHIFT,
    FINALIZED,
    INFO_TEXT_LEN,
    MASK64,
    TEXT_BLK_LPOS,
    LogBuf,
    PrintkRing,
    Record,
)

SEC = 1_000_000_000


def a_kernel() -> SyntheticKernel:
    sk = SyntheticKernel()
    sk.blobs["btf"] = b""  # VMCOREINFO alone must do
    return sk


def implausible(kernel: Kernel, match: str) -> None:
    """The run stops before any record with one line saying the metadata looks wrong."""
    records, error = run(kernel)
    assert records == []
    assert error is not None
    prefix = "dmesg: stopped after 0 records: the kernel metadata looks wrong for this image: "
    assert error.startswith(prefix)
    assert re.search(match, error), error


def run(kernel: Kernel, **options: object) -> tuple[list[dict], str | None]:
    pm = PluginManager(builtins=(), autoload=False)
    pm.register(dmesg, name="dmesg", version="test")
    result = analyze_kernel(kernel, "dmesg", options, manager=pm)
    return result.records, result.error


def shown(records: list[dict], *fields: str) -> list[tuple]:
    return [tuple(r[f] for f in fields) for r in records if r["seq"] is not None]


def closing(records: list[dict]) -> tuple[int, str] | None:
    last = records[-1] if records else None
    if last is None or last["seq"] is not None:
        return None
    return last["skipped"], last["note"]


# -- the lockless ring buffer (5.10+) ---------------------------------------------------------


def test_records_with_every_field_and_no_btf() -> None:
    sk = a_kernel()
    ring = PrintkRing(sk, count_bits=4, size_bits=10)
    ring.write(Record(b"Linux version 6.1.0-test", level=5, ts_nsec=0, caller_id=0))
    ring.write(
        Record(
            b"virtio_net virtio1 ens3: renamed from eth0",
            level=6,
            ts_nsec=2 * SEC + 123_456_789,
            caller_id=123,
            subsystem=b"virtio",
            device=b"+virtio:virtio1",
        )
    )
    ring.write(
        Record(b"random: crng init done", level=5, ts_nsec=3 * SEC + 999, caller_id=1 << 31 | 1)
    )
    ring.write(
        Record(b"hello from user space", level=4, facility=1, ts_nsec=7 * SEC, caller_id=267)
    )
    records, error = run(sk.kernel())
    assert error is None
    assert records == [
        {
            "seq": 0, "ts_usec": 0, "timestamp": "0.000000", "level": 5, "level_name": "notice",
            "facility": 0, "facility_name": "kern", "caller": "T0", "subsystem": None,
            "device": None, "text": "Linux version 6.1.0-test", "cleared": False,
            "state": "finalized", "skipped": None, "note": None,
        },
        {
            "seq": 1, "ts_usec": 2_123_456, "timestamp": "2.123456", "level": 6,
            "level_name": "info", "facility": 0, "facility_name": "kern", "caller": "T123",
            "subsystem": "virtio", "device": "+virtio:virtio1",
            "text": "virtio_net virtio1 ens3: renamed from eth0", "cleared": False,
            "state": "finalized", "skipped": None, "note": None,
        },
        {
            "seq": 2, "ts_usec": 3_000_000, "timestamp": "3.000000", "level": 5,
            "level_name": "notice", "facility": 0, "facility_name": "kern", "caller": "C1",
            "subsystem": None, "device": None, "text": "random: crng init done",
            "cleared": False, "state": "finalized", "skipped": None, "note": None,
        },
        {
            "seq": 3, "ts_usec": 7_000_000, "timestamp": "7.000000", "level": 4,
            "level_name": "warn", "facility": 1, "facility_name": "user", "caller": "T267",
            "subsystem": None, "device": None, "text": "hello from user space",
            "cleared": False, "state": "finalized", "skipped": None, "note": None,
        },
    ]  # fmt: skip


def test_an_empty_ring_has_no_record() -> None:
    sk = a_kernel()
    PrintkRing(sk)
    assert run(sk.kernel()) == ([], None)


@pytest.mark.parametrize("fit_exactly", [True, False])
def test_a_block_that_wraps_to_the_start_of_the_data_ring(fit_exactly: bool) -> None:
    sk = a_kernel()
    ring = PrintkRing(sk, count_bits=4, size_bits=8, fit_exactly=fit_exactly)
    # Blocks of 8 (ID) + 40 (text) = 48 bytes: five fill 240 of 256 bytes; the sixth wraps.
    texts = [b"message %02d " % i + b"x" * 29 for i in range(6)]
    for i, text in enumerate(texts):
        ring.write(Record(text, ts_nsec=i * SEC))
    begin, next_ = ring.lpos[5]
    assert (begin % 256, next_ % 256) == (240, 48)  # laid at the start: a wrapping block
    records, error = run(sk.kernel())
    # The wrapping block took the first block's bytes: that record is gone, its slot reusable.
    assert shown(records, "seq", "text") == [(i, t.decode()) for i, t in enumerate(texts)][1:]
    assert closing(records) == (
        1,
        "1 record not shown: 1 overwritten (their text given up to newer records)",
    )
    assert error is None


@pytest.mark.parametrize(("fit_exactly", "where"), [(True, (208, 0)), (False, (208, 48))])
def test_a_block_that_ends_exactly_at_the_end_of_the_ring(
    fit_exactly: bool, where: tuple[int, int]
) -> None:
    sk = a_kernel()
    ring = PrintkRing(sk, count_bits=4, size_bits=8, fit_exactly=fit_exactly)
    texts = [b"%02d" % i + b"y" * 38 for i in range(5)]  # 4 x 48 = 192 bytes, then 16 + 48
    ring.write(Record(b"z" * 8))  # 16 bytes, so the fifth 48-byte block ends at 256
    for text in texts:
        ring.write(Record(text))
    begin, next_ = ring.lpos[5]
    assert (begin % 256, next_ % 256) == where
    records, _ = run(sk.kernel())
    assert [r["text"] for r in records if r["seq"] is not None][-1] == texts[-1].decode()
    assert [r["seq"] for r in records if r["seq"] is not None][-1] == 5


def test_records_overwritten_by_newer_ones_are_counted_not_shown() -> None:
    sk = a_kernel()
    ring = PrintkRing(sk, count_bits=4, size_bits=8)
    # Twelve records of 48-byte blocks in a 256-byte ring: the data ring holds the last five;
    # the other seven descriptors are still in the descriptor ring, reusable.
    for i in range(12):
        ring.write(Record(b"record %02d " % i + b"." * 30))
    records, error = run(sk.kernel())
    assert [r["seq"] for r in records if r["seq"] is not None] == [7, 8, 9, 10, 11]
    assert closing(records) == (
        7,
        "7 records not shown: 7 overwritten (their text given up to newer records)",
    )
    assert error is None


def test_the_descriptor_ring_wraps_too() -> None:
    sk = a_kernel()
    ring = PrintkRing(sk, count_bits=3, size_bits=10)
    for i in range(21):  # eight slots; the last eight seqs are in them, each in slot seq % 8
        ring.write(Record(b"short %d" % i, ts_nsec=i * 1000))
    records, error = run(sk.kernel())
    # desc_reserve() pushes the tail only when the head needs its slot: all eight are there.
    assert shown(records, "seq", "text", "ts_usec") == [(s, f"short {s}", s) for s in range(13, 21)]
    assert closing(records) is None
    assert error is None


def test_a_reserved_record_is_skipped_and_a_committed_one_shown() -> None:
    sk = a_kernel()
    ring = PrintkRing(sk)
    ring.write(Record(b"done"))
    ring.write(Record(b"a line still open"), state="committed")
    ring.write(Record(b"being written"), state="reserved")
    records, _ = run(sk.kernel())
    assert shown(records, "seq", "text", "state") == [
        (0, "done", "finalized"),
        (1, "a line still open", "finalized"),  # reserving the next one finalized it
    ]
    assert closing(records) == (
        1,
        "1 record not shown: 1 reserved (still being written at capture)",
    )
    sk = a_kernel()
    ring = PrintkRing(sk)
    ring.write(Record(b"done"))
    ring.write(Record(b"KERN_CONT fragments may still come"), state="committed")
    records, _ = run(sk.kernel())
    assert shown(records, "seq", "state") == [(0, "finalized"), (1, "committed")]
    assert closing(records) is None


def test_a_block_overwritten_while_the_capture_ran() -> None:
    """A descriptor still finalized whose block already holds a newer record's ID (the data
    ring was read after the kernel reused it): the text is not the record's."""
    sk = a_kernel()
    ring = PrintkRing(sk)
    for i in range(3):
        ring.write(Record(b"line %d" % i))
    begin, _ = ring.lpos[1]
    sk.write(ring.data + begin % ring.size, struct.pack("<Q", 0x7777))
    records, _ = run(sk.kernel())
    assert [r["seq"] for r in records if r["seq"] is not None] == [0, 2]
    assert closing(records) == (
        1,
        "1 record not shown: 1 overwritten (their text given up to newer records)",
    )


def test_a_record_whose_text_was_not_stored_and_an_empty_line() -> None:
    sk = a_kernel()
    ring = PrintkRing(sk, size_bits=8)
    ring.write(Record(b"x" * 200))  # larger than half the ring: FAILED_LPOS, text lost
    ring.write(Record(b""))  # EMPTY_LINE_LPOS
    ring.write(Record(b"after"))
    records, _ = run(sk.kernel())
    assert shown(records, "seq", "text") == [(1, ""), (2, "after")]
    assert closing(records) == (
        1,
        "1 record not shown: 1 lost (the kernel could not store their text)",
    )


def test_a_multi_line_record_and_how_kmsg_escapes_it() -> None:
    sk = a_kernel()
    ring = PrintkRing(sk)
    text = "Call Trace:\n <TASK>\n\tdump_stack+0x10 \\ caf\u00e9 \x7f".encode() + b"\xff"
    ring.write(Record(text, subsystem=b"pci", device=b"+pci:0000:00:01.0"))
    records, _ = run(sk.kernel())
    assert records[0]["text"] == "Call Trace:\n <TASK>\n\tdump_stack+0x10 \\ caf\u00e9 \x7f\\xff"
    records, _ = run(sk.kernel(), escape=True)
    assert records[0]["text"] == (
        "Call Trace:\\x0a <TASK>\\x0a\\x09dump_stack+0x10 \\x5c caf\\xc3\\xa9 \\x7f\\xff"
    )
    assert (records[0]["subsystem"], records[0]["device"]) == ("pci", "+pci:0000:00:01.0")


def test_kmsg_escape_matches_msg_add_ext_text() -> None:
    assert kmsg_escape(bytes(range(256))) == "".join(
        chr(c) if 32 <= c < 127 and c != 92 else f"\\x{c:02x}" for c in range(256)
    )


def test_facilities_levels_and_the_level_filter() -> None:
    sk = a_kernel()
    ring = PrintkRing(sk, count_bits=5, size_bits=11)
    for level in range(8):
        ring.write(Record(b"level %d" % level, level=level, facility=level * 3))
    ring.write(Record(b"odd facility", level=0, facility=200))
    records, _ = run(sk.kernel())
    assert shown(records, "level", "level_name", "facility", "facility_name") == [
        (0, "emerg", 0, "kern"),
        (1, "alert", 3, "daemon"),
        (2, "crit", 6, "lpr"),
        (3, "err", 9, "cron"),
        (4, "warn", 12, "res0"),
        (5, "notice", 15, "res3"),
        (6, "info", 18, "local2"),
        (7, "debug", 21, "local5"),
        (0, "emerg", 200, None),
    ]
    records, _ = run(sk.kernel(), level=3)
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 8]
    with pytest.raises(UsageError, match="--level must be 0 to 7, not 9"):
        run(sk.kernel(), level=9)


def test_records_before_clear_seq_are_marked_cleared() -> None:
    sk = a_kernel()
    ring = PrintkRing(sk)
    for i in range(4):
        ring.write(Record(b"line %d" % i))
    ring.set_clear_seq(2)
    records, _ = run(sk.kernel())
    assert shown(records, "seq", "cleared") == [(0, True), (1, True), (2, False), (3, False)]
    # The other copy of the latch is the one to read while the latch sequence is odd.
    sk.write(ring.clear_seq_symbol, struct.pack("<I4xQQ", 1, 2, 3))
    records, _ = run(sk.kernel())
    assert shown(records, "seq", "cleared") == [(0, True), (1, True), (2, True), (3, False)]


# -- hostile rings ---------------------------------------------------------------------------


def _ring_with(count: int = 3) -> tuple[SyntheticKernel, PrintkRing]:
    sk = a_kernel()
    ring = PrintkRing(sk)
    for i in range(count):
        ring.write(Record(b"line %d" % i))
    return sk, ring


@pytest.mark.parametrize(
    ("at", "value", "message"),
    [
        (0, 40, r"prb->desc_ring.count_bits is 40, outside 1..26"),
        (0, 0, r"prb->desc_ring.count_bits is 0, outside 1..26"),
        (48, 63, r"prb->text_data_ring.size_bits is 63, outside 1..31"),
    ],
)
def test_absurd_ring_sizes_are_implausible(at: int, value: int, message: str) -> None:
    sk, ring = _ring_with()
    sk.write(ring.rb + at, struct.pack("<I", value))
    implausible(sk.kernel(), message)


def test_head_and_tail_too_far_apart_are_implausible() -> None:
    sk, ring = _ring_with()
    sk.write_u64(ring.rb + 24, ring.tail_id + 1000)  # head_id
    implausible(sk.kernel(), "are more than the ring's 16 records apart")
    sk, ring = _ring_with()
    sk.write_u64(ring.rb + 48 + 16, ring.tail_lpos + 4096)  # head_lpos
    implausible(sk.kernel(), "are more than the ring's 512 bytes apart")


def test_a_null_ring_pointer_is_implausible() -> None:
    sk, ring = _ring_with()
    sk.write_u64(ring.rb + 16, 0)  # desc_ring.infos
    implausible(sk.kernel(), r"prb->desc_ring.infos is NULL")


def _corrupt_lpos(sk: SyntheticKernel, ring: PrintkRing, seq: int, begin: int, next_: int) -> None:
    sk.write(ring.desc_address(seq) + TEXT_BLK_LPOS, struct.pack("<QQ", begin, next_))


def test_one_record_pointing_outside_the_ring_is_skipped() -> None:
    sk, ring = _ring_with(4)
    _corrupt_lpos(sk, ring, 1, 0x1234560, 0x1234500)  # next before begin, different wraps
    begin, next_ = ring.lpos[2]
    _corrupt_lpos(
        sk, ring, 2, (begin + 0x10000) & MASK64, (next_ + 0x10000) & MASK64
    )  # past the head
    records, error = run(sk.kernel())
    assert [r["seq"] for r in records if r["seq"] is not None] == [0, 3]
    assert closing(records) == (
        2,
        "2 records not shown: 1 overwritten (their text given up to newer records),"
        " 1 invalid (text block outside the ring or shorter than the text)",
    )
    assert error is None


def test_text_len_past_its_block_is_skipped() -> None:
    sk, ring = _ring_with(3)
    sk.write(ring.info_address(1) + INFO_TEXT_LEN, struct.pack("<H", 60000))
    records, _ = run(sk.kernel())
    assert [r["seq"] for r in records if r["seq"] is not None] == [0, 2]
    assert closing(records)[1] == (
        "1 record not shown: 1 invalid (text block outside the ring or shorter than the text)"
    )


def test_a_ring_where_nothing_decodes_is_implausible() -> None:
    sk, ring = _ring_with(12)
    for seq in range(12):
        sk.write(ring.info_address(seq) + INFO_TEXT_LEN, struct.pack("<H", 60000))
    implausible(sk.kernel(), "has 8 records before any that decodes")


def test_a_data_ring_page_not_captured_is_one_error() -> None:
    sk, ring = _ring_with(3)
    sk.drop(ring.data)
    records, error = run(sk.kernel())
    assert records == []
    assert error is not None
    assert error.startswith("dmesg: stopped after 0 records: physical page")
    assert error.endswith("was not captured: excluded")


def test_a_torn_descriptor_is_skipped() -> None:
    sk, ring = _ring_with(3)
    # The slot of seq 1 already names another ID (it was reused while the capture ran).
    state = FINALIZED << DESC_FLAGS_SHIFT | 0x1234
    sk.write(ring.desc_address(1), struct.pack("<Q", state))
    records, _ = run(sk.kernel())
    assert [r["seq"] for r in records if r["seq"] is not None] == [0, 2]
    assert closing(records)[0] == 1


def test_vmcoreinfo_without_a_log_buffer_does_not_apply() -> None:
    with pytest.raises(
        NotApplicable, match=r"neither SYMBOL\(prb\) \(5.10\+\) nor SYMBOL\(log_buf\)"
    ):
        run(a_kernel().kernel())


def test_a_missing_offset_is_named() -> None:
    sk = a_kernel()
    ring = PrintkRing(sk)
    sk.vmcoreinfo_extra.remove("OFFSET(printk_info.caller_id)=20")
    del ring
    with pytest.raises(NotApplicable, match=r"no OFFSET\(printk_info.caller_id\)"):
        run(sk.kernel())


def test_an_offset_outside_its_struct_is_implausible() -> None:
    sk = a_kernel()
    PrintkRing(sk)
    sk.vmcoreinfo_extra.append("OFFSET(printk_info.ts_nsec)=4000")
    implausible(sk.kernel(), r"OFFSET\(printk_info.ts_nsec\) is 4000")


# -- log_buf (before 5.10) ---------------------------------------------------------------------


@pytest.mark.parametrize("caller_id", [False, True])
def test_log_buf_records(caller_id: bool) -> None:
    sk = a_kernel()
    log = LogBuf(sk, buf_len=4096, caller_id=caller_id)
    log.write(Record(b"Linux version 5.4.0", level=5, ts_nsec=0, caller_id=0))
    log.write(
        Record(b"e1000 0000:00:03.0 eth0: link up", level=6, ts_nsec=SEC + 5000, caller_id=42),
        b"SUBSYSTEM=pci\0DEVICE=+pci:0000:00:03.0",
    )
    log.write(Record(b"two\nlines", level=3, facility=1, ts_nsec=2 * SEC, caller_id=1 << 31))
    records, error = run(sk.kernel())
    assert error is None
    assert shown(
        records, "seq", "ts_usec", "level", "facility", "caller", "subsystem", "device", "text"
    ) == [
        (0, 0, 5, 0, "T0" if caller_id else None, None, None, "Linux version 5.4.0"),
        (1, 1_000_005, 6, 0, "T42" if caller_id else None, "pci", "+pci:0000:00:03.0",
         "e1000 0000:00:03.0 eth0: link up"),
        (2, 2_000_000, 3, 1, "C0" if caller_id else None, None, None, "two\nlines"),
    ]  # fmt: skip
    assert all(r["state"] is None for r in records)
    assert closing(records) is None


def test_log_buf_that_wrapped() -> None:
    sk = a_kernel()
    log = LogBuf(sk, buf_len=256)
    # 16-byte headers + 30 bytes of text, padded to 48: five fit; older ones are dropped.
    texts = [b"log_buf record %02d " % i + b"-" * 11 for i in range(9)]
    for i, text in enumerate(texts):
        log.write(Record(text, ts_nsec=i * 1000))
    assert log.first_idx > log.next_idx  # the live records wrap around the end
    log.set_clear_seq(6)
    records, error = run(sk.kernel())
    assert shown(records, "seq", "text", "ts_usec", "cleared") == [
        (s, texts[s].decode(), s, s < 6) for s in range(log.first_seq, 9)
    ]
    assert log.first_seq == 5
    assert error is None


def test_log_buf_without_kallsyms_seq_is_unknown() -> None:
    sk = a_kernel()
    log = LogBuf(sk)
    log.write(Record(b"only one"))
    sk.symbols = [s for s in sk.symbols if s[0] not in ("log_first_seq", "clear_seq")]
    records, _ = run(sk.kernel())
    assert shown_all(records) == [(None, "only one", None)]


def shown_all(records: list[dict]) -> list[tuple]:
    return [(r["seq"], r["text"], r["cleared"]) for r in records]


def test_log_buf_hostile_headers() -> None:
    sk = a_kernel()
    log = LogBuf(sk, buf_len=256)
    for i in range(3):
        log.write(Record(b"record %d" % i))
    sk.write(log.array + 8, struct.pack("<HH", 20, 400))  # len 20, text_len 400
    implausible(sk.kernel(), "log_buf record at index 0 has len 20, text_len 400")
    sk = a_kernel()
    log = LogBuf(sk, buf_len=256)
    log.write(Record(b"record"))
    sk.write(log.first_idx_symbol, struct.pack("<I", 4000))
    implausible(sk.kernel(), "log_first_idx is 4000, past log_buf_len 256")
    sk = a_kernel()
    log = LogBuf(sk, buf_len=256)
    log.write(Record(b"record"))
    sk.write(log.next_idx_symbol, struct.pack("<I", 100))  # never reached: records run on
    sk.write(log.array + 8, struct.pack("<H", 0))  # and the first says "wrap"
    implausible(sk.kernel(), "back to the start a second time")
