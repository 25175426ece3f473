"""printk's log buffers built byte for byte in a :class:`SyntheticKernel`, for tests.

:class:`PrintkRing` is the lockless ring buffer of 5.10 and later
(kernel/printk/printk_ringbuffer.[ch]) and :class:`LogBuf` the ``log_buf`` of
``struct printk_log`` records before it (kernel/printk/printk.c, 3.11-5.9). Both write records
the way the kernel's own writers do (``prb_reserve()``/``prb_commit()``/``prb_final_commit()``,
``log_store()``), old records giving way to new ones included, and both export the VMCOREINFO
lines the kernel exports for them (``log_buf_vmcoreinfo_setup()``), with the values of an
x86_64 kernel. Nothing here reads a log: the reader is tested against what these lay out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from collector.testing.kernel import SyntheticKernel

__all__ = ["LogBuf", "PrintkRing", "Record"]

MASK64 = (1 << 64) - 1

# kernel/printk/printk_ringbuffer.h: the top two bits of a descriptor's state_var are its
# state, the rest its ID.
DESC_SV_BITS = 64
DESC_FLAGS_SHIFT = DESC_SV_BITS - 2
DESC_ID_MASK = (1 << DESC_FLAGS_SHIFT) - 1
RESERVED, COMMITTED, FINALIZED, REUSABLE = 0, 1, 2, 3
STATES = {"reserved": RESERVED, "committed": COMMITTED, "finalized": FINALIZED}
#: Special lpos values (bit 0: no data block): the text could not be stored; an empty line.
FAILED_LPOS = 0x1
EMPTY_LINE_LPOS = 0x3
#: include/linux/printk.h: a record's flags (LOG_NEWLINE, LOG_CONT).
LOG_NEWLINE = 2
LOG_CONT = 8

# The layouts of x86_64 (struct printk_ringbuffer and friends in printk_ringbuffer.h, struct
# printk_info and struct dev_printk_info in include/linux/dev_printk.h), as the VMCOREINFO of a
# Debian 6.1 and 6.12 kernel gives them.
SIZE_PRINTK_RINGBUFFER = 88
DESC_RING, TEXT_DATA_RING, FAIL = 0, 48, 80
COUNT_BITS, DESCS, INFOS, HEAD_ID, TAIL_ID = 0, 8, 16, 24, 32
SIZE_PRB_DESC, STATE_VAR, TEXT_BLK_LPOS = 24, 0, 8
SIZE_BITS, DATA, HEAD_LPOS, TAIL_LPOS = 0, 8, 16, 24
SIZE_PRINTK_INFO = 88
INFO_SEQ, INFO_TS_NSEC, INFO_TEXT_LEN, INFO_CALLER_ID, INFO_DEV_INFO = 0, 8, 16, 20, 24
SUBSYSTEM_LEN, DEVICE_LEN = 16, 48


def _desc_id(n: int) -> int:
    return n & DESC_ID_MASK


@dataclass
class Record:
    """What one printk stored: the fields of struct printk_info and the text."""

    text: bytes
    level: int = 6
    facility: int = 0
    ts_nsec: int = 0
    caller_id: int = 1
    subsystem: bytes = b""
    device: bytes = b""
    flags: int = LOG_NEWLINE


class PrintkRing:
    """A ``struct printk_ringbuffer`` in ``sk``'s memory, with ``prb`` pointing at it.

    :param count_bits: the descriptor ring holds ``2**count_bits`` records.
    :param size_bits: the text data ring holds ``2**size_bits`` bytes.
    :param fit_exactly: lay a block that ends exactly at the end of the data ring there, as
        kernels with "printk: ringbuffer: Do not wrap blocks that fit exactly" (``is_blk_wrapped``)
        do; older kernels move such a block to the start of the ring.
    :param padding: the byte the unused tail of each data block holds (the kernel leaves
        whatever was there).
    """

    def __init__(
        self,
        sk: SyntheticKernel,
        count_bits: int = 4,
        size_bits: int = 9,
        fit_exactly: bool = True,
        padding: int = 0xA5,
    ) -> None:
        self.sk = sk
        self.count_bits = count_bits
        self.size_bits = size_bits
        self.count = 1 << count_bits
        self.size = 1 << size_bits
        self.fit_exactly = fit_exactly
        self.padding = padding
        # kernel/printk/printk.c: static struct printk_ringbuffer *prb = &printk_rb_static;
        self.prb_symbol = sk.global_("prb", "u64")
        self.rb = sk.global_("printk_rb_static", "u64", SIZE_PRINTK_RINGBUFFER)
        sk.write_u64(self.prb_symbol, self.rb)
        # struct latched_seq clear_seq: seqcount_latch_t latch; u64 val[2];
        self.clear_seq_symbol = sk.global_("clear_seq", "u64", 24)
        self.descs = sk.alloc(self.count * SIZE_PRB_DESC)
        self.infos = sk.alloc(self.count * SIZE_PRINTK_INFO)
        self.data = sk.alloc(self.size, 8)
        # _DEFINE_PRINTKRB(): DESC0_ID is the ID of the last slot, one wrap back, and reusable;
        # head and tail both start there. The first seq written (0) is infos[0].seq + count.
        # DESC0_ID() negates an unsigned int (_DESCS_COUNT() is 1U << bits): 32 bits wide.
        desc0 = -(self.count + 1) & 0xFFFFFFFF
        self.head_id = self.tail_id = desc0
        blk0 = -self.size & MASK64  # BLK0_LPOS()
        self.head_lpos = self.tail_lpos = blk0
        self.state_var: dict[int, int] = {}
        self.lpos: dict[int, tuple[int, int]] = {}
        self.seqs: dict[int, int] = {0: -self.count & MASK64, self.count - 1: 0}
        self._set_state(self.count - 1, desc0, REUSABLE)
        self._set_lpos(self.count - 1, FAILED_LPOS, FAILED_LPOS)
        self._write_info_seq(0)
        self._write_info_seq(self.count - 1)
        self.clear_seq = 0
        self._flush_header()
        self.vmcoreinfo = [
            f"SYMBOL(prb)={self.prb_symbol:x}",
            f"SYMBOL(printk_rb_static)={self.rb:x}",
            f"SYMBOL(clear_seq)={self.clear_seq_symbol:x}",
            f"SIZE(printk_ringbuffer)={SIZE_PRINTK_RINGBUFFER}",
            f"OFFSET(printk_ringbuffer.desc_ring)={DESC_RING}",
            f"OFFSET(printk_ringbuffer.text_data_ring)={TEXT_DATA_RING}",
            f"OFFSET(printk_ringbuffer.fail)={FAIL}",
            "SIZE(prb_desc_ring)=48",
            f"OFFSET(prb_desc_ring.count_bits)={COUNT_BITS}",
            f"OFFSET(prb_desc_ring.descs)={DESCS}",
            f"OFFSET(prb_desc_ring.infos)={INFOS}",
            f"OFFSET(prb_desc_ring.head_id)={HEAD_ID}",
            f"OFFSET(prb_desc_ring.tail_id)={TAIL_ID}",
            f"SIZE(prb_desc)={SIZE_PRB_DESC}",
            f"OFFSET(prb_desc.state_var)={STATE_VAR}",
            f"OFFSET(prb_desc.text_blk_lpos)={TEXT_BLK_LPOS}",
            "SIZE(prb_data_blk_lpos)=16",
            "OFFSET(prb_data_blk_lpos.begin)=0",
            "OFFSET(prb_data_blk_lpos.next)=8",
            f"SIZE(printk_info)={SIZE_PRINTK_INFO}",
            f"OFFSET(printk_info.seq)={INFO_SEQ}",
            f"OFFSET(printk_info.ts_nsec)={INFO_TS_NSEC}",
            f"OFFSET(printk_info.text_len)={INFO_TEXT_LEN}",
            f"OFFSET(printk_info.caller_id)={INFO_CALLER_ID}",
            f"OFFSET(printk_info.dev_info)={INFO_DEV_INFO}",
            "SIZE(dev_printk_info)=64",
            "OFFSET(dev_printk_info.subsystem)=0",
            f"LENGTH(printk_info_subsystem)={SUBSYSTEM_LEN}",
            f"OFFSET(dev_printk_info.device)={SUBSYSTEM_LEN}",
            f"LENGTH(printk_info_device)={DEVICE_LEN}",
            "SIZE(prb_data_ring)=32",
            f"OFFSET(prb_data_ring.size_bits)={SIZE_BITS}",
            f"OFFSET(prb_data_ring.data)={DATA}",
            f"OFFSET(prb_data_ring.head_lpos)={HEAD_LPOS}",
            f"OFFSET(prb_data_ring.tail_lpos)={TAIL_LPOS}",
            "SIZE(atomic_long_t)=8",
            "OFFSET(atomic_long_t.counter)=0",
            "SIZE(latched_seq)=24",
            "OFFSET(latched_seq.val)=8",
        ]
        sk.vmcoreinfo_extra.extend(self.vmcoreinfo)

    # -- the kernel's writer ------------------------------------------------------------------

    def write(self, record: Record, state: str = "finalized") -> int:
        """Store ``record`` as ``prb_reserve()`` then ``prb_commit()`` (``"committed"``) or
        ``prb_final_commit()`` (``"finalized"``) would, or leave it ``"reserved"``; its seq."""
        index, id_ = self._desc_reserve()
        seq = self.seqs.get(index, 0)
        # prb_reserve(): the first use of a slot (other than slot 0) takes its index as seq.
        seq = index if seq == 0 and index != 0 else (seq + self.count) & MASK64
        self.seqs[index] = seq
        self._write_info_seq(index)
        begin, next_ = self._data_alloc(len(record.text), id_)
        self._set_lpos(index, begin, next_)
        if len(record.text):
            self._write_text(begin, next_, record.text)
        info = self.infos + index * SIZE_PRINTK_INFO
        self.sk.write(info + INFO_TS_NSEC, struct.pack("<Q", record.ts_nsec))
        # u16 text_len; u8 facility; u8 flags:5, level:3; u32 caller_id;
        self.sk.write(
            info + INFO_TEXT_LEN,
            struct.pack(
                "<HBBI",
                len(record.text),
                record.facility,
                (record.flags & 0x1F) | (record.level & 7) << 5,
                record.caller_id,
            ),
        )
        dev = record.subsystem.ljust(SUBSYSTEM_LEN, b"\0") + record.device.ljust(DEVICE_LEN, b"\0")
        self.sk.write(info + INFO_DEV_INFO, dev)
        self._set_state(index, id_, STATES[state])
        self._flush_header()
        return seq

    def _desc_reserve(self) -> tuple[int, int]:
        id_ = _desc_id(self.head_id + 1)
        # desc_reserve(): the slot's previous user is the tail; it must give way first.
        if _desc_id(id_ - self.count) == self.tail_id:
            self._desc_push_tail()
        # prb_reserve(): reserving finalizes the previous record if it was only committed.
        prev = _desc_id(id_ - 1) & (self.count - 1)
        if self.state_var.get(prev, 0) >> DESC_FLAGS_SHIFT == COMMITTED:
            self._set_state(prev, _desc_id(id_ - 1), FINALIZED)
        self.head_id = id_
        index = id_ & (self.count - 1)
        self._set_state(index, id_, RESERVED)
        return index, id_

    def _desc_push_tail(self) -> None:
        index = self.tail_id & (self.count - 1)
        state = self.state_var[index] >> DESC_FLAGS_SHIFT
        if state in (RESERVED, COMMITTED):
            raise ValueError("the tail record is still being written: the ring is full")
        if state == FINALIZED:
            # desc_push_tail(): invalidate its data first (data_push_tail to its next lpos).
            _, next_ = self.lpos[index]
            if not next_ & 1:
                self._data_push_tail(next_)
            self._set_state(index, self.tail_id, REUSABLE)
        self.tail_id = _desc_id(self.tail_id + 1)

    def _is_wrapped(self, begin: int, next_: int) -> bool:
        end = next_ - 1 if self.fit_exactly else next_
        return (begin >> self.size_bits) != ((end & MASK64) >> self.size_bits)

    def _data_alloc(self, text_len: int, id_: int) -> tuple[int, int]:
        if text_len == 0:
            return EMPTY_LINE_LPOS, EMPTY_LINE_LPOS
        size = (text_len + 8 + 7) & ~7  # to_blk_size(): the ID, then the text, 8-aligned
        if size > self.size // 2:
            return FAILED_LPOS, FAILED_LPOS  # data_check_size()
        begin = self.head_lpos
        next_ = (begin + size) & MASK64
        if self._is_wrapped(begin, next_):
            # get_next_lpos(): a wrapping block stores its data at the start of the ring.
            next_ = ((next_ & ~(self.size - 1)) + size) & MASK64
        self._data_push_tail((next_ - self.size) & MASK64)
        self._put(begin, struct.pack("<Q", id_))
        if self._is_wrapped(begin, next_):
            self._put(0, struct.pack("<Q", id_))
        self.head_lpos = next_
        return begin, next_

    def _data_push_tail(self, lpos: int) -> None:
        """data_push_tail(): move the data tail to ``lpos``, making the records whose blocks it
        passes reusable (data_make_reusable())."""
        # (lpos - tail_lpos) - 1 < DATA_SIZE in unsigned long: the tail is behind lpos.
        while (lpos - self.tail_lpos - 1) & MASK64 < self.size:
            at = self.tail_lpos & (self.size - 1)
            (id_,) = struct.unpack("<Q", self.sk.read(self.data + at, 8))
            index = id_ & (self.count - 1)
            state = self.state_var[index] >> DESC_FLAGS_SHIFT
            if state in (RESERVED, COMMITTED):
                raise ValueError("the oldest data block's record is still being written")
            self._set_state(index, id_, REUSABLE)
            self.tail_lpos = self.lpos[index][1]

    def _write_text(self, begin: int, next_: int, text: bytes) -> None:
        if self._is_wrapped(begin, next_):
            start, end = 0, next_ & (self.size - 1)
        else:
            start, end = begin & (self.size - 1), ((next_ - 1) & (self.size - 1)) + 1
        room = end - start - 8
        self._put(start + 8, text + bytes([self.padding]) * (room - len(text)))

    # -- raw memory ---------------------------------------------------------------------------

    def _put(self, lpos: int, data: bytes) -> None:
        self.sk.write(self.data + (lpos & (self.size - 1)), data)

    def _set_state(self, index: int, id_: int, state: int) -> None:
        value = state << DESC_FLAGS_SHIFT | _desc_id(id_)
        self.state_var[index] = value
        self.sk.write(self.descs + index * SIZE_PRB_DESC + STATE_VAR, struct.pack("<Q", value))

    def _set_lpos(self, index: int, begin: int, next_: int) -> None:
        self.lpos[index] = (begin, next_)
        where = self.descs + index * SIZE_PRB_DESC + TEXT_BLK_LPOS
        self.sk.write(where, struct.pack("<QQ", begin, next_))

    def _write_info_seq(self, index: int) -> None:
        where = self.infos + index * SIZE_PRINTK_INFO + INFO_SEQ
        self.sk.write(where, struct.pack("<Q", self.seqs[index]))

    def _flush_header(self) -> None:
        desc_ring = struct.pack(
            "<I4xQQQQ8x", self.count_bits, self.descs, self.infos, self.head_id, self.tail_id
        )
        data_ring = struct.pack(
            "<I4xQQQ", self.size_bits, self.data, self.head_lpos, self.tail_lpos
        )
        self.sk.write(self.rb + DESC_RING, desc_ring)
        self.sk.write(self.rb + TEXT_DATA_RING, data_ring)
        # clear_seq: latch sequence 0, so val[0] is the value readers take.
        self.sk.write(self.clear_seq_symbol, struct.pack("<I4xQQ", 0, self.clear_seq, 0))

    def set_clear_seq(self, seq: int) -> None:
        """What ``dmesg -C`` (SYSLOG_ACTION_CLEAR) stores: the first seq still shown."""
        self.clear_seq = seq
        self._flush_header()

    def desc_address(self, seq: int) -> int:
        """The ``struct prb_desc`` holding seq ``seq`` (its slot)."""
        return self.descs + (seq & (self.count - 1)) * SIZE_PRB_DESC

    def info_address(self, seq: int) -> int:
        """The ``struct printk_info`` of seq ``seq`` (its slot)."""
        return self.infos + (seq & (self.count - 1)) * SIZE_PRINTK_INFO


class LogBuf:
    """The pre-5.10 ``log_buf``: ``struct printk_log`` records written by ``log_store()``.

    :param buf_len: ``log_buf_len`` in bytes.
    :param caller_id: the kernel has CONFIG_PRINTK_CALLER (4.19+): each header carries a
        ``u32 caller_id`` and VMCOREINFO exports its offset.
    """

    def __init__(self, sk: SyntheticKernel, buf_len: int = 256, caller_id: bool = False) -> None:
        self.sk = sk
        self.buf_len = buf_len
        # struct printk_log { u64 ts_nsec; u16 len; u16 text_len; u16 dict_len; u8 facility;
        # u8 flags:5; u8 level:3; [u32 caller_id;] } __packed __aligned(4) on x86_64.
        self.header = 20 if caller_id else 16
        self.caller_id = caller_id
        self.log_align = 4
        self.array = sk.global_("__log_buf", "u8", buf_len)
        self.log_buf = sk.global_("log_buf", "u64")
        sk.write_u64(self.log_buf, self.array)
        self.log_buf_len = sk.global_("log_buf_len", "u32")
        self.first_idx_symbol = sk.global_("log_first_idx", "u32")
        self.next_idx_symbol = sk.global_("log_next_idx", "u32")
        self.first_seq_symbol = sk.global_("log_first_seq", "u64")
        self.next_seq_symbol = sk.global_("log_next_seq", "u64")
        self.clear_seq_symbol = sk.global_("clear_seq", "u64")
        self.clear_idx_symbol = sk.global_("clear_idx", "u32")
        self.first_idx = self.next_idx = 0
        self.first_seq = self.next_seq = 0
        self.clear_seq = 0
        self._flush()
        lines = [
            f"SYMBOL(log_buf)={self.log_buf:x}",
            f"SYMBOL(log_buf_len)={self.log_buf_len:x}",
            f"SYMBOL(log_first_idx)={self.first_idx_symbol:x}",
            f"SYMBOL(clear_idx)={self.clear_idx_symbol:x}",
            f"SYMBOL(log_next_idx)={self.next_idx_symbol:x}",
            f"SIZE(printk_log)={self.header}",
            "OFFSET(printk_log.ts_nsec)=0",
            "OFFSET(printk_log.len)=8",
            "OFFSET(printk_log.text_len)=10",
            "OFFSET(printk_log.dict_len)=12",
        ]
        if caller_id:
            lines.append("OFFSET(printk_log.caller_id)=16")
        self.vmcoreinfo = lines
        sk.vmcoreinfo_extra.extend(lines)

    def _flush(self) -> None:
        w = self.sk.write
        w(self.log_buf_len, struct.pack("<I", self.buf_len))
        w(self.first_idx_symbol, struct.pack("<I", self.first_idx))
        w(self.next_idx_symbol, struct.pack("<I", self.next_idx))
        w(self.first_seq_symbol, struct.pack("<Q", self.first_seq))
        w(self.next_seq_symbol, struct.pack("<Q", self.next_seq))
        w(self.clear_seq_symbol, struct.pack("<Q", self.clear_seq))

    def _len_at(self, idx: int) -> int:
        return struct.unpack("<H", self.sk.read(self.array + idx + 8, 2))[0]

    def _log_next(self, idx: int) -> int:
        length = self._len_at(idx)
        return self._len_at(0) if length == 0 else idx + length

    def _has_space(self, size: int, empty: bool) -> bool:
        if self.next_idx > self.first_idx or empty:
            free = max(self.buf_len - self.next_idx, self.first_idx)
        else:
            free = self.first_idx - self.next_idx
        return free >= size + self.header  # room for the wrap marker too

    def write(self, record: Record, dict_: bytes = b"") -> int:
        """Store ``record`` as ``log_store()`` does; its seq. ``dict_`` is the record's
        dictionary (``SUBSYSTEM=...\\0DEVICE=...``); ``record.subsystem``/``device`` are not
        used here."""
        size = self.header + len(record.text) + len(dict_)
        pad = -size % self.log_align
        size += pad
        # log_make_free_space(): drop the oldest records until the new one fits.
        while self.first_seq < self.next_seq and not self._has_space(size, False):
            self.first_idx = self._log_next(self.first_idx)
            self.first_seq += 1
        if self.clear_seq < self.first_seq:
            self.clear_seq = self.first_seq
        if not self._has_space(size, self.first_seq == self.next_seq):
            raise ValueError("the record does not fit in log_buf")
        if self.next_idx + size + self.header > self.buf_len:
            # An empty header (len 0) tells readers to go on at the start.
            self.sk.write(self.array + self.next_idx, bytes(self.header))
            self.next_idx = 0
        header = struct.pack(
            "<QHHHBB",
            record.ts_nsec,
            size,
            len(record.text),
            len(dict_),
            record.facility,
            (record.flags & 0x1F) | (record.level & 7) << 5,
        )
        if self.caller_id:
            header += struct.pack("<I", record.caller_id)
        self.sk.write(self.array + self.next_idx, header + record.text + dict_ + bytes(pad))
        seq = self.next_seq
        self.next_idx += size
        self.next_seq += 1
        self._flush()
        return seq

    def set_clear_seq(self, seq: int) -> None:
        self.clear_seq = seq
        self._flush()
