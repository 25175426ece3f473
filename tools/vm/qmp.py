"""A small QMP client: QEMU's own view of guest RAM, taken from outside the guest.

JSON over QEMU's unix socket; asynchronous events are read and dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from collector.errors import CollectorError


class QMPError(CollectorError):
    """QEMU answered a command with an error, or the monitor went away."""


class QMP:
    """One QMP connection.

    :param path: the unix socket QEMU listens on (``-qmp unix:PATH,server=on,wait=off``).
    :param timeout: seconds to wait for the socket to appear and for each answer.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 30.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._sock = _connect(self.path, timeout)
        self._buffer = b""
        greeting = self._read_message()
        if "QMP" not in greeting:
            raise QMPError(f"{self.path}: not a QMP greeting: {greeting!r}")
        self.version = greeting["QMP"].get("version", {})
        self.execute("qmp_capabilities")

    # -- the protocol -------------------------------------------------------------------------

    def execute(self, command: str, timeout: float | None = None, **arguments: Any) -> Any:
        """Run a QMP command and return its ``return`` value; events in between are skipped.

        Argument names use ``_`` where QMP uses ``-`` (``command_line`` for ``command-line``).
        """
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = {k.replace("_", "-"): v for k, v in arguments.items()}
        self._sock.sendall(json.dumps(message).encode() + b"\n")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            answer = self._read_message(deadline)
            if "event" in answer:
                continue
            if "error" in answer:
                error = answer["error"]
                raise QMPError(f"QMP {command}: {error.get('class')}: {error.get('desc')}")
            if "return" in answer:
                return answer["return"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Pause the guest's CPUs (RAM stays as it is until ``cont``)."""
        self.execute("stop")

    def cont(self) -> None:
        """Resume the guest's CPUs."""
        self.execute("cont")

    def status(self) -> str:
        """The run state (``running``, ``paused``, ...)."""
        return str(self.execute("query-status")["status"])

    def pmemsave(self, paddr: int, size: int, host_path: str | os.PathLike[str]) -> Path:
        """Write ``size`` bytes of guest-physical memory at ``paddr`` to a host file."""
        path = Path(host_path).resolve()
        self.execute(
            "pmemsave", timeout=max(self.timeout, 600.0), val=paddr, size=size, filename=str(path)
        )
        return path

    def read_physical(self, paddr: int, size: int, scratch_dir: str | os.PathLike[str]) -> bytes:
        """Guest-physical bytes via ``pmemsave`` into a scratch file that is removed after."""
        path = Path(scratch_dir) / f"pmem-{paddr:x}-{size:x}.bin"
        try:
            self.pmemsave(paddr, size, path)
            return path.read_bytes()
        finally:
            path.unlink(missing_ok=True)

    def human(self, command_line: str) -> str:
        """Run a human-monitor (HMP) command and return its text output."""
        return str(self.execute("human-monitor-command", command_line=command_line))

    def gva2gpa(self, vaddr: int) -> int | None:
        """Translate a guest-virtual address with the page tables the CPU has loaded (CR3).

        Stop the guest first. An idle guest stops in the kernel's idle loop (CPL 0), where every
        kernel address translates. Stopped in user mode (CPL 3) with page table isolation on
        (Intel CPU models), the direct map is unmapped and only kernel text translates; the
        bench's default AMD-vendor CPU has no isolation, so kernel addresses always translate.
        Returns None when QEMU says the address is unmapped.
        """
        text = self.human(f"gva2gpa {vaddr:#x}")
        found = re.search(r"gpa:\s*(0x[0-9a-fA-F]+)", text)
        if found:
            return int(found.group(1), 16)
        if "Unmapped" in text:
            return None
        raise QMPError(f"gva2gpa {vaddr:#x}: unexpected answer {text.strip()!r}")

    def dump_guest_memory(self, host_path: str | os.PathLike[str], paging: bool = False) -> Path:
        """Write all guest RAM to an ELF core on the host (synchronously)."""
        path = Path(host_path).resolve()
        self.execute(
            "dump-guest-memory",
            timeout=max(self.timeout, 900.0),
            paging=paging,
            protocol=f"file:{path}",
        )
        return path

    def quit(self) -> None:
        """Ask QEMU to exit; the connection closes with it."""
        with contextlib.suppress(QMPError, OSError):
            self.execute("quit", timeout=10.0)

    # -- plumbing -----------------------------------------------------------------------------

    def _read_message(self, deadline: float | None = None) -> dict[str, Any]:
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QMPError(f"QMP {self.path}: no answer in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise QMPError(f"QMP {self.path}: {exc}") from None
            if not chunk:
                raise QMPError(f"QMP {self.path}: QEMU closed the connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            raise QMPError(f"QMP {self.path}: not JSON: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise QMPError(f"QMP {self.path}: not a JSON object: {line[:200]!r}")
        return message


def _connect(path: str, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise QMPError(f"QMP socket {path} did not open in {timeout:.0f} s") from None
            time.sleep(0.05)
