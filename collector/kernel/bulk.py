"""numpy views of arrays of kernel structs (such as the struct page array).

The numpy dtype is derived from a construct definition (normally a CStruct built from BTF),
so a layout is described once and read either one object at a time or millions at once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import construct
import numpy as np
from construct import Array, Bytes, BytesInteger, FormatField

from collector.errors import ImageError
from collector.kernel.constructs import CBitField, CStruct

# construct.FormatField codes and the numpy kinds of the same width.
_NUMPY_CODES = {
    "B": "u1",
    "b": "i1",
    "H": "u2",
    "h": "i2",
    "L": "u4",
    "l": "i4",
    "I": "u4",
    "i": "i4",
    "Q": "u8",
    "q": "i8",
    "e": "f2",
    "f": "f4",
    "d": "f8",
    "?": "?",
}


class BitFieldInfo(NamedTuple):
    """Where a bitfield sits in the raw storage unit a dtype field holds (see :func:`bitfield`)."""

    shift: int
    bits: int
    signed: bool
    byteorder: str


def dtype_for(defn: construct.Construct) -> np.dtype:
    """The numpy dtype that reads the same bytes as ``defn``, with itemsize == sizeof(defn).

    Fields keep their explicit offsets, so overlapping union members coexist; a nested struct
    becomes a nested dtype; an array a sub-array; ``char[]`` (Bytes) an ``S`` string; a bitfield
    its raw storage unit, whose dtype metadata lets :func:`bitfield` extract the value.
    Supports what collector.kernel.constructs builds plus construct's FormatField, Bytes,
    BytesInteger (as raw ``V`` bytes), Array, Renamed and sequential Struct (with Padding).
    """
    if isinstance(defn, CStruct):
        if defn._dtype is None:
            try:
                defn._dtype = _struct_dtype(defn)
            except (ValueError, OverflowError) as e:
                what = f"{defn.kind} {defn.typename or '(anonymous)'}"
                raise ImageError(f"{what}: no numpy layout: {e}".splitlines()[0]) from None
        return defn._dtype
    if isinstance(defn, FormatField):
        return np.dtype(defn.fmtstr[0] + _NUMPY_CODES[defn.fmtstr[1]])
    if isinstance(defn, Bytes) and isinstance(defn.length, int):
        return np.dtype(f"S{defn.length}") if defn.length else np.dtype("V0")
    if isinstance(defn, BytesInteger) and isinstance(defn.length, int):
        return np.dtype(f"V{defn.length}")
    if isinstance(defn, Array) and isinstance(defn.count, int):
        elem = dtype_for(defn.subcon)
        if elem.itemsize == 0:  # numpy has no sub-array of zero-sized elements
            return elem
        return np.dtype((elem.base, (defn.count, *elem.shape)))
    if isinstance(defn, construct.Renamed):
        return dtype_for(defn.subcon)
    if isinstance(defn, construct.Struct):
        return _sequential_dtype(defn)
    raise TypeError(f"no numpy equivalent for {type(defn).__name__}")


def _bitfield_dtype(f: CBitField, byteorder: str) -> np.dtype:
    meta = {"bitfield": BitFieldInfo(f.shift, f.bits, f.signed, byteorder)}
    if f.storage in (1, 2, 4, 8):
        return np.dtype(f"{byteorder}u{f.storage}", metadata=meta)
    return np.dtype(f"V{f.storage}", metadata=meta)


def _struct_dtype(defn: CStruct) -> np.dtype:
    names, formats, offsets = [], [], []
    for f in defn.fields:
        names.append(f.name)
        offsets.append(f.offset)
        if isinstance(f, CBitField):
            formats.append(_bitfield_dtype(f, defn.byteorder))
        else:
            formats.append(dtype_for(f.subcon))
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": defn.size})


def _sequential_dtype(defn: construct.Struct) -> np.dtype:
    names, formats, offsets = [], [], []
    offset = 0
    for sub in defn.subcons:
        # construct keeps only named subcons in its result; unnamed ones (Padding) are gaps.
        if sub.name:
            names.append(sub.name)
            formats.append(dtype_for(sub))
            offsets.append(offset)
        offset += sub.sizeof()
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": offset})


def bulk_view(
    data: bytes | bytearray | memoryview, defn: construct.Construct, count: int, offset: int = 0
) -> np.ndarray:
    """A read-only numpy array of ``count`` consecutive ``defn`` records in ``data``.

    :raises ImageError: when ``data`` holds fewer than ``count`` records at ``offset``.
    """
    dt = dtype_for(defn)
    need = count * dt.itemsize
    if count < 0 or offset < 0 or len(data) - offset < need:
        raise ImageError(
            f"{count} records of {dt.itemsize} bytes at offset {offset} need {need} bytes, "
            f"only {max(0, len(data) - offset)} available"
        )
    arr = np.frombuffer(data, dtype=dt, count=count, offset=offset)
    arr.flags.writeable = False
    return arr


def bitfield(array: np.ndarray, field: str) -> np.ndarray:
    """The values of bitfield ``field`` (a dotted path such as ``"a.b"``) of a bulk view.

    :returns: int64 values for a signed bitfield, uint64 for an unsigned one.
    """
    *outer, last = field.split(".")
    for name in outer:
        array = array[name]
    fields = array.dtype.fields or {}
    if last not in fields:
        raise KeyError(f"no field {field!r}")
    dt = fields[last][0]
    info = (dt.metadata or {}).get("bitfield")
    if info is None:
        raise TypeError(f"field {field!r} is not a bitfield")
    raw = array[last]
    if dt.kind == "u":
        values = raw.astype(np.uint64)
    else:  # storage wider than 8 bytes (packed structs): combine bytes one record at a time
        order = "little" if info.byteorder == "<" else "big"
        flat = [int.from_bytes(bytes(v), order) >> info.shift for v in raw.reshape(-1)]
        mask = (1 << info.bits) - 1
        values = np.array([v & mask for v in flat], dtype=np.uint64).reshape(raw.shape)
        return _sign(values, info) if info.signed else values
    values = (values >> np.uint64(info.shift)) & np.uint64((1 << info.bits) - 1)
    return _sign(values, info) if info.signed else values


def _sign(values: np.ndarray, info: Any) -> np.ndarray:
    signed = values.astype(np.int64)
    if info.bits < 64:
        signbit = np.int64(1 << (info.bits - 1))
        signed = (signed ^ signbit) - signbit
    return signed
