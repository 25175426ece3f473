"""Run inside a test guest: read /proc/iomem, /dev/mem and /proc/kcore, print JSON.

Standard library only, and written apart from the collector so the tests check the collector's
claims against an independent reader. Usage: ``python probe.py COMMAND ARGS...``.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import sys

PT_LOAD = 1
PT_NOTE = 4


def iomem() -> list[dict[str, object]]:
    """Every /proc/iomem line: depth (indent / 2), start, end (inclusive), name."""
    entries = []
    with open("/proc/iomem") as fh:
        for line in fh:
            indent = len(line) - len(line.lstrip(" "))
            span, _, name = line.strip().partition(" : ")
            start, _, end = span.partition("-")
            entries.append(
                {"depth": indent // 2, "start": int(start, 16), "end": int(end, 16), "name": name}
            )
    return entries


def devmem(addresses: list[int], size: int = 4096) -> dict[str, dict[str, object]]:
    """pread ``size`` bytes of /dev/mem at each address (never mmap)."""
    results: dict[str, dict[str, object]] = {}
    fd = os.open("/dev/mem", os.O_RDONLY)
    try:
        for addr in addresses:
            try:
                data = os.pread(fd, size, addr)
            except OSError as exc:
                results[hex(addr)] = {"ok": False, "errno": errno.errorcode.get(exc.errno, "?")}
            else:
                results[hex(addr)] = {
                    "ok": True,
                    "length": len(data),
                    "all_zero": data == bytes(len(data)),
                }
    finally:
        os.close(fd)
    return results


def kcore_headers() -> dict[str, object]:
    """The ELF header facts and every program header of /proc/kcore."""
    with open("/proc/kcore", "rb") as fh:
        ehdr = fh.read(64)
        if ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
            raise SystemExit("kcore: not a 64-bit little-endian ELF")
        e_type, e_machine = struct.unpack_from("<HH", ehdr, 16)
        e_phoff = struct.unpack_from("<Q", ehdr, 32)[0]
        e_phentsize, e_phnum = struct.unpack_from("<HH", ehdr, 54)
        fh.seek(e_phoff)
        table = fh.read(e_phentsize * e_phnum)
        phdrs = []
        for i in range(e_phnum):
            p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _p_align = (
                struct.unpack_from("<IIQQQQQQ", table, i * e_phentsize)
            )
            phdrs.append(
                {
                    "type": p_type,
                    "flags": p_flags,
                    "offset": p_offset,
                    "vaddr": p_vaddr,
                    "paddr": p_paddr,
                    "filesz": p_filesz,
                    "memsz": p_memsz,
                }
            )
        notes = []
        for ph in phdrs:
            if ph["type"] == PT_NOTE:
                fh.seek(ph["offset"])
                notes = _notes(fh.read(min(ph["filesz"], 1 << 20)))
    return {"e_type": e_type, "e_machine": e_machine, "phdrs": phdrs, "notes": notes}


def _notes(blob: bytes) -> list[dict[str, object]]:
    notes = []
    pos = 0
    while pos + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
        pos += 12
        name = blob[pos : pos + namesz].rstrip(b"\0").decode(errors="replace")
        pos += (namesz + 3) & ~3
        notes.append({"name": name, "type": ntype, "descsz": descsz})
        pos += (descsz + 3) & ~3
    return notes


def kcore_read(paddr: int, size: int, out: str) -> dict[str, object]:
    """Copy ``size`` bytes at physical ``paddr`` from the PT_LOAD whose p_paddr range holds them."""
    headers = kcore_headers()
    for ph in headers["phdrs"]:  # type: ignore[union-attr]
        if ph["type"] != PT_LOAD or ph["paddr"] == 0xFFFFFFFFFFFFFFFF:
            continue
        if ph["paddr"] <= paddr and paddr + size <= ph["paddr"] + ph["filesz"]:
            with open("/proc/kcore", "rb") as fh:
                data = os.pread(fh.fileno(), size, ph["offset"] + paddr - ph["paddr"])
            with open(out, "wb") as dst:
                dst.write(data)
            return {"segment": ph, "length": len(data)}
    raise SystemExit(f"kcore: no PT_LOAD holds {paddr:#x}+{size:#x}")


def main(argv: list[str]) -> None:
    command, args = argv[0], argv[1:]
    if command == "iomem":
        result: object = iomem()
    elif command == "devmem":
        result = devmem([int(a, 0) for a in args])
    elif command == "kcore-headers":
        result = kcore_headers()
    elif command == "kcore-read":
        result = kcore_read(int(args[0], 0), int(args[1], 0), args[2])
    else:
        raise SystemExit(f"unknown command {command}")
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
