"""Build the guest's busybox initramfs: 9p modules, a chroot into the host's root, a command agent.

A bare initramfs (:func:`build_bare_initramfs`) has no chroot: the guest's root filesystem is
the initramfs itself, busybox and the files it is given, with only the writable share mounted.

The archive is a plain cpio (newc) written here, deterministic and cached by the hash of its
content, so a kernel and an /init that did not change reuse the same file.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from collector.errors import CollectorError
from tools.vm.kernels import Kernel, cache_dir, modinfo

# Load order that mounted 9p over virtio on Debian's 6.1 kernel. Later kernels build some of
# these in (6.12: the virtio core and virtio_pci) or drop them (6.12: fscache), so each is
# loaded only when the kernel ships it as a module; dependencies named in .modinfo come first.
NINEP_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
)
# Lets QEMU's dump-guest-memory carry the guest's VMCOREINFO note (with -device vmcoreinfo).
OPTIONAL_MODULES: tuple[str, ...] = ("qemu_fw_cfg",)

BUSYBOX = Path("/bin/busybox")

# Paths shared by /init and the host side of the agent.
HOST_MOUNT = "/host"
OUT_MOUNT = "/out"
GUEST_OUT = "/tmp/vmout"  # where the writable share appears inside the chroot
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=262144"

# What both kinds of /init do first: the kernel's own filesystems and the modules.
_BOOT = r"""export PATH=/bin:/sbin
say() { echo "vm-init: $*"; }
die() { say "FATAL: $*"; sync; sleep 1; poweroff -f; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

for m in $(cat /etc/modules.list); do
  insmod "/lib/modules/$m.ko" || say "insmod $m failed"
done

"""

# Then, the mounts done, both say they are ready and run the commands the host writes into
# the share (@RUN@: how one runs) until told to power off (@UMOUNT@: what to unmount first).
# Every command runs in the background in its own session, so the agent stays responsive: a
# later command can kill an earlier one's process group (its pid is in res/N.pid).
_SERVE = r"""{
  echo "release=$(uname -r)"
  echo "modules=$(cat /etc/modules.list | tr '\n' ' ')"
  echo "uptime=$(cut -d' ' -f1 /proc/uptime)"
} >@OUT@/ready.tmp
mv @OUT@/ready.tmp @OUT@/ready
say "ready"

start() {
  r=@OUT@/res/$1
  (
    setsid @RUN@ >"$r.stdout" 2>"$r.stderr" </dev/null &
    echo $! >"$r.pid"
    wait $!
    echo $? >"$r.rc.tmp"
    mv "$r.rc.tmp" "$r.rc"
  ) &
}

n=1
while :; do
  if [ -e @OUT@/ctl/poweroff ]; then
    break
  elif [ -e @OUT@/cmd/$n.sh ]; then
    start $n
    n=$((n + 1))
  else
    usleep 50000
  fi
done
say "powering off"
sync
umount @UMOUNT@ 2>/dev/null
poweroff -f
"""


def _serve(run: str, umount: str) -> str:
    return _SERVE.replace("@RUN@", run).replace("@UMOUNT@", umount)


INIT_SCRIPT = (
    "#!/bin/sh\n"
    "# PID 1 of the test guest: mount the host's root read-only, then run commands from the "
    "share.\n"
    + _BOOT
    + r"""mount -t 9p -o ro,cache=loose,@NINEP@ host @HOST@ || die "cannot mount the host root over 9p"
mount -t 9p -o @NINEP@ out @OUT@ || die "cannot mount the output share over 9p"
mount -t proc proc @HOST@/proc || die "cannot mount @HOST@/proc"
mount -t sysfs sysfs @HOST@/sys || die "cannot mount @HOST@/sys"
mount -t devtmpfs devtmpfs @HOST@/dev || die "cannot mount @HOST@/dev"
mount -t securityfs securityfs @HOST@/sys/kernel/security || say "no securityfs: lockdown unknown"
mkdir -p @HOST@/dev/shm @HOST@/dev/pts
mount -t tmpfs tmpfs @HOST@/dev/shm
# The guest gets its own writable /tmp and /run; the host's stay reachable so that paths
# the host names with vm.keep= (a checkout under /tmp, say) can be bound back into place.
mkdir -p /host-tmp /host-run
mount -o bind @HOST@/tmp /host-tmp
mount -o bind @HOST@/run /host-run
mount -t tmpfs -o mode=1777 tmpfs @HOST@/tmp || die "cannot mount @HOST@/tmp"
mount -t tmpfs -o mode=755 tmpfs @HOST@/run || die "cannot mount @HOST@/run"
for keep in $(sed -n 's/.*vm\.keep=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' '); do
  case "$keep" in
    /tmp/*) from=/host-tmp/${keep#/tmp/} ;;
    /run/*) from=/host-run/${keep#/run/} ;;
    *) continue ;;
  esac
  mkdir -p @HOST@$keep && mount -o bind "$from" @HOST@$keep || die "cannot keep $keep"
done
mkdir -p @HOST@@GUEST_OUT@
mount -o bind @OUT@ @HOST@@GUEST_OUT@ || die "cannot bind the output share into the chroot"
mkdir -p @OUT@/cmd @OUT@/res @OUT@/ctl

"""
    + _serve("chroot @HOST@ /bin/sh @GUEST_OUT@/cmd/$1.sh", "@HOST@@GUEST_OUT@ @OUT@")
)


# PID 1 of a bare guest: nothing from the host but the writable share; commands run in the
# initramfs itself, so what they leave behind there can be listed.
BARE_INIT_SCRIPT = (
    "#!/bin/sh\n"
    + _BOOT
    + r"""mount -t 9p -o @NINEP@ out @OUT@ || die "cannot mount the output share over 9p"
mkdir -p @OUT@/cmd @OUT@/res @OUT@/ctl

"""
    + _serve("/bin/sh @OUT@/cmd/$1.sh", "@OUT@")
)
# Applets a bare guest's commands may use (the chrooted guest has the host's tools instead).
BARE_APPLETS: tuple[str, ...] = (
    "ls",
    "find",
    "sort",
    "grep",
    "head",
    "wc",
    "kill",
    "ps",
    "rm",
    "cp",
    "stat",
    "sha256sum",
    "test",
    "[",
    "true",
    "false",
    "env",
    "id",
)


@dataclass(frozen=True)
class Initramfs:
    """A built initramfs and what went into it.

    :param path: the cpio archive.
    :param modules: modules loaded by /init, in order.
    :param builtin: wanted modules the kernel has built in.
    :param absent: wanted modules the kernel has neither built in nor as a module.
    """

    path: Path
    modules: tuple[str, ...]
    builtin: tuple[str, ...]
    absent: tuple[str, ...]


def init_script(bare: bool = False) -> str:
    """The guest's /init, with the bench's paths filled in."""
    text = BARE_INIT_SCRIPT if bare else INIT_SCRIPT
    for key, value in {
        "@NINEP@": NINEP_OPTIONS,
        "@HOST@": HOST_MOUNT,
        "@OUT@": OUT_MOUNT,
        "@GUEST_OUT@": GUEST_OUT,
    }.items():
        text = text.replace(key, value)
    return text


def plan_modules(kernel: Kernel) -> tuple[list[str], list[str], list[str]]:
    """Modules to insmod (dependencies first), wanted ones built in, wanted ones missing."""
    builtin = kernel.builtin_modules()
    files = kernel.module_files()
    order: list[str] = []
    built: list[str] = []
    absent: list[str] = []

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in order or name in trail:
            return
        if name in builtin:
            if name not in built:
                built.append(name)
            return
        if name not in files:
            if name not in absent:
                absent.append(name)
            return
        ko = kernel.module(name)
        assert ko is not None
        for values in modinfo(ko).get("depends", []):
            for dep in filter(None, values.split(",")):
                visit(dep.replace("-", "_"), (*trail, name))
        order.append(name)

    for name in NINEP_MODULES + OPTIONAL_MODULES:
        visit(name, ())
    if "9p" not in order and "9p" not in builtin:
        raise CollectorError(f"kernel {kernel.version} has no 9p filesystem; cannot share files")
    return order, built, absent


def build_initramfs(kernel: Kernel) -> Initramfs:
    """Build (or reuse) the initramfs for ``kernel``."""
    archive, order, built, absent = _archive(kernel, bare=False)
    data = archive.finish()

    digest = hashlib.sha256(data).hexdigest()[:16]
    target_dir = cache_dir() / "initramfs"
    target_dir.mkdir(parents=True, exist_ok=True)
    path = target_dir / f"{kernel.version}-{digest}.cpio"
    if not path.exists():
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        _prune(target_dir, kernel.version, keep=path)
    return Initramfs(path, tuple(order), tuple(built), tuple(absent))


def build_bare_initramfs(kernel: Kernel, files: dict[str, Path], directory: Path) -> Initramfs:
    """A bare initramfs for ``kernel`` in ``directory``, holding ``files`` (archive path ->
    host file, mode 0755) besides busybox: the guest's whole root filesystem. Not cached: the
    files are the thing under test."""
    archive, order, built, absent = _archive(kernel, bare=True)
    for name, source in files.items():
        archive.file(name.lstrip("/"), source.read_bytes(), 0o755)
    path = directory / f"{kernel.version}-bare.cpio"
    path.write_bytes(archive.finish())
    return Initramfs(path, tuple(order), tuple(built), tuple(absent))


def _archive(kernel: Kernel, bare: bool) -> tuple[_Cpio, list[str], list[str], list[str]]:
    if not BUSYBOX.is_file():
        raise CollectorError(f"{BUSYBOX} is missing: install busybox-static")
    order, built, absent = plan_modules(kernel)
    archive = _Cpio()
    directories = ["bin", "sbin", "dev", "etc", "proc", "sys", "tmp", "lib", "lib/modules"]
    directories += [OUT_MOUNT[1:]] if bare else [HOST_MOUNT[1:], OUT_MOUNT[1:]]
    for directory in directories:
        archive.directory(directory)
    archive.device("dev/console", stat.S_IFCHR | 0o600, 5, 1)
    archive.device("dev/null", stat.S_IFCHR | 0o666, 1, 3)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    applets = [
        "sh",
        "mount",
        "umount",
        "insmod",
        "mkdir",
        "cat",
        "tr",
        "cut",
        "mv",
        "echo",
        "setsid",
        "chroot",
        "usleep",
        "sleep",
        "sync",
        "poweroff",
        "uname",
    ]
    for applet in applets + (list(BARE_APPLETS) if bare else []):
        archive.symlink(f"bin/{applet}", "busybox")
    for name in order:
        ko = kernel.module(name)
        assert ko is not None
        archive.file(f"lib/modules/{name}.ko", ko.read_bytes(), 0o644)
    archive.file("etc/modules.list", "".join(f"{m}\n" for m in order).encode(), 0o644)
    archive.file("init", init_script(bare).encode(), 0o755)
    return archive, order, built, absent


def _prune(directory: Path, version: str, keep: Path) -> None:
    for old in directory.glob(f"{version}-*.cpio"):
        if old != keep:
            old.unlink(missing_ok=True)


class _Cpio:
    """A cpio archive in the "newc" format the kernel unpacks, with fixed owners and times."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, b"", nlink=2)

    def file(self, name: str, data: bytes, perm: int) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def device(self, name: str, mode: int, major: int, minor: int) -> None:
        self._entry(name, mode, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", ino=0, nlink=1)
        return b"".join(self._parts)

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        ino: int | None = None,
    ) -> None:
        if ino is None:
            ino, self._ino = self._ino, self._ino + 1
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08x" % value for value in fields)
        self._parts.append(header + encoded + _pad(len(header) + len(encoded)))
        self._parts.append(data + _pad(len(data)))


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)
