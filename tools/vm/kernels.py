"""Fetch Debian kernel packages through apt and unpack them into a cache outside the checkout.

Package names are resolved through Debian's meta-packages, never pinned, so the bench follows
the current stable builds.
"""

from __future__ import annotations

import fcntl
import json
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from collector.errors import CollectorError

# Each key names a meta-package whose first dependency is the current image package.
META_PACKAGES: dict[str, str] = {
    "6.1": "linux-image-amd64",
    "6.12": "linux-image-6.12-amd64",
}
KERNEL_KEYS: tuple[str, ...] = tuple(META_PACKAGES)

APT_TIMEOUT = 120
DOWNLOAD_TIMEOUT = 900
EXTRACT_TIMEOUT = 600
#: Unpacking the DWARF vmlinux means decompressing the whole -dbg package (about 860 MB of
#: .deb for 6.1, 100 s on two cores), whatever the one file wanted.
DEBUG_EXTRACT_TIMEOUT = 1200


@dataclass(frozen=True)
class Kernel:
    """One unpacked Debian kernel package.

    :param key: the bench's name for it ("6.1", "6.12").
    :param package: the Debian image package, e.g. ``linux-image-6.1.0-56-amd64``.
    :param package_version: the Debian version of that package.
    :param version: the kernel release as ``uname -r`` prints it.
    :param root: where the package was unpacked.
    """

    key: str
    package: str
    package_version: str
    version: str
    root: Path

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def config(self) -> Path:
        return self.root / "boot" / f"config-{self.version}"

    @property
    def system_map(self) -> Path:
        return self.root / "boot" / f"System.map-{self.version}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.version

    def builtin_modules(self) -> set[str]:
        """Module names compiled into the kernel image (from ``modules.builtin``)."""
        path = self.modules_dir / "modules.builtin"
        if not path.exists():
            return set()
        return {_module_name(line) for line in path.read_text().split() if line}

    def module_files(self) -> dict[str, Path]:
        """Loadable module name -> file as shipped (``.ko``, ``.ko.xz`` or ``.ko.zst``)."""
        # Debian ships no modules.dep (depmod runs at install time), so walk the tree.
        found: dict[str, Path] = {}
        for path in sorted((self.modules_dir / "kernel").rglob("*.ko*")):
            if path.name.endswith((".ko", ".ko.xz", ".ko.zst")):
                found.setdefault(_module_name(path.name), path)
        return found

    def module(self, name: str) -> Path | None:
        """The uncompressed ``.ko`` of a loadable module, or None if the kernel has no such module.

        Compressed modules are decompressed once, next to the shipped file, because busybox
        ``insmod`` takes only plain ELF objects.
        """
        shipped = self.module_files().get(_normalise(name))
        if shipped is None:
            return None
        if shipped.name.endswith(".ko"):
            return shipped
        plain = shipped.with_name(shipped.name.rsplit(".ko", 1)[0] + ".ko")
        if not plain.exists():
            _decompress(shipped, plain)
        return plain

    def config_value(self, option: str) -> str | None:
        """The value of ``CONFIG_...`` in the kernel's config, None when unset."""
        prefix = option + "="
        for line in self.config.read_text().splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :]
        return None


def cache_dir() -> Path:
    """The download cache: ``$COLLECTOR_VM_CACHE`` or ``~/.cache/collector/vm``."""
    env = os.environ.get("COLLECTOR_VM_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "collector" / "vm"
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_package(key: str) -> str:
    """The image package the meta-package for ``key`` currently depends on."""
    meta = _meta_package(key)
    out = _run(["apt-cache", "depends", meta], APT_TIMEOUT, f"apt-cache depends {meta}")
    for line in out.splitlines():
        field, _, value = line.strip().lstrip("|").partition(":")
        value = value.strip()
        if field == "Depends" and value.startswith("linux-image-"):
            return value
    raise CollectorError(
        f"apt-cache depends {meta} names no linux-image package (run .ci/install-debian-packages or apt-get update)"
    )


def fetch_kernel(key: str) -> Kernel:
    """Download (once) and unpack the current Debian kernel for ``key``; return its paths."""
    cache = cache_dir()
    pointer = cache / f"kernel-{key}.json"
    try:
        package = resolve_package(key)
    except CollectorError:
        # Without apt lists the last kernel fetched for this key still boots.
        cached = _load_pointer(pointer)
        if cached is not None:
            return cached
        raise
    cached = _load_pointer(pointer)
    if cached is not None and cached.package == package:
        return cached
    with _locked(cache / ".lock"):
        cached = _load_pointer(pointer)
        if cached is not None and cached.package == package:
            return cached
        deb = _download(package, cache / "debs")
        kernel = _extract(key, package, deb, cache / "kernels")
        pointer.write_text(
            json.dumps(
                {
                    "key": kernel.key,
                    "package": kernel.package,
                    "package_version": kernel.package_version,
                    "version": kernel.version,
                    "root": str(kernel.root),
                },
                indent=1,
            )
        )
    return kernel


def debug_package(kernel: Kernel) -> str:
    """Debian's package holding ``kernel``'s vmlinux with DWARF (``linux-image-...-dbg``)."""
    return f"{kernel.package}-dbg"


def fetch_debug_vmlinux(kernel: Kernel) -> Path:
    """Download (once) the -dbg package of exactly ``kernel``'s build and keep only its
    ``vmlinux`` (DWARF); return its path.

    The package is asked for at the image package's version and its Version is checked again
    once downloaded: a vmlinux from another build of the same release has other addresses
    and structure layouts, and crash refuses it. Only the extracted file is cached (about
    650 MB); the .deb is deleted once unpacked.
    """
    cache = cache_dir() / "debug"
    target = cache / f"vmlinux-{kernel.version}_{kernel.package_version}"
    if target.is_file():
        return target
    package = debug_package(kernel)
    with _locked(cache_dir() / ".lock"):
        if target.is_file():
            return target
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
            wanted = f"{package}={kernel.package_version}"
            _run(
                ["apt-get", "download", wanted],
                DOWNLOAD_TIMEOUT,
                f"apt-get download {wanted}",
                cwd=tmp,
            )
            debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
            if len(debs) != 1:
                raise CollectorError(f"apt-get download {wanted} left {len(debs)} .debs behind")
            deb = debs[0]
            got = _run(
                ["dpkg-deb", "-f", str(deb), "Package", "Version"],
                APT_TIMEOUT,
                f"dpkg-deb -f {deb.name}",
            )
            fields = dict(line.split(": ", 1) for line in got.splitlines() if ": " in line)
            if (fields.get("Package"), fields.get("Version")) != (package, kernel.package_version):
                raise CollectorError(
                    f"{deb.name} is {fields.get('Package')} {fields.get('Version')}, not "
                    f"{package} {kernel.package_version}: its vmlinux would not match the kernel"
                )
            member = f"./usr/lib/debug/boot/vmlinux-{kernel.version}"
            # pipefail: a truncated .deb must fail here, not leave a short vmlinux behind.
            _run(
                [
                    "bash",
                    "-o",
                    "pipefail",
                    "-c",
                    'dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" "$3"',
                    "extract",
                    str(deb),
                    tmp,
                    member,
                ],
                DEBUG_EXTRACT_TIMEOUT,
                f"extracting {member} from {deb.name}",
            )
            vmlinux = Path(tmp) / member
            if not vmlinux.is_file():
                raise CollectorError(f"{deb.name} has no {member}")
            os.replace(vmlinux, target)
    return target


def _meta_package(key: str) -> str:
    try:
        return META_PACKAGES[key]
    except KeyError:
        known = ", ".join(KERNEL_KEYS)
        raise CollectorError(f"unknown kernel {key!r}; known: {known}", 2) from None


def _load_pointer(pointer: Path) -> Kernel | None:
    try:
        data = json.loads(pointer.read_text())
        kernel = Kernel(
            key=data["key"],
            package=data["package"],
            package_version=data["package_version"],
            version=data["version"],
            root=Path(data["root"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if kernel.vmlinuz.is_file() and (kernel.modules_dir / "modules.builtin").is_file():
        return kernel
    return None


def _download(package: str, debs: Path) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    existing = sorted(debs.glob(f"{package}_*.deb"))
    if existing:
        return existing[-1]
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        _run(
            ["apt-get", "download", package],
            DOWNLOAD_TIMEOUT,
            f"apt-get download {package}",
            cwd=tmp,
        )
        got = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not got:
            raise CollectorError(f"apt-get download {package} left no .deb behind")
        target = debs / got[0].name
        os.replace(got[0], target)
    return target


def _extract(key: str, package: str, deb: Path, kernels: Path) -> Kernel:
    kernels.mkdir(parents=True, exist_ok=True)
    package_version = _run(
        ["dpkg-deb", "-f", str(deb), "Version"], APT_TIMEOUT, f"dpkg-deb -f {deb.name}"
    ).strip()
    root = kernels / f"{package}_{package_version}"
    if not root.exists():
        tmp = Path(tempfile.mkdtemp(dir=kernels, prefix=".extract-"))
        try:
            _run(["dpkg", "-x", str(deb), str(tmp)], EXTRACT_TIMEOUT, f"dpkg -x {deb.name}")
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    releases = sorted(p.name for p in (root / "lib" / "modules").iterdir() if p.is_dir())
    if len(releases) != 1:
        raise CollectorError(f"{deb.name}: expected one lib/modules/<release>, found {releases}")
    kernel = Kernel(key, package, package_version, releases[0], root)
    for path in (kernel.vmlinuz, kernel.config, kernel.system_map):
        if not path.is_file():
            raise CollectorError(f"{deb.name} has no {path.relative_to(root)}")
    return kernel


def _decompress(src: Path, dst: Path) -> None:
    if src.name.endswith(".xz"):
        data = lzma.decompress(src.read_bytes())
    elif src.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdDecompressor().decompressobj().decompress(src.read_bytes())
    else:
        raise CollectorError(f"{src.name}: unknown module compression")
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dst)


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return _normalise(base.split(".ko", 1)[0])


def _normalise(name: str) -> str:
    # The kernel treats '-' and '_' in module names as the same character.
    return name.replace("-", "_")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(argv: list[str], timeout: float, what: str, cwd: str | None = None) -> str:
    try:
        proc = subprocess.run(
            ["timeout", "--kill-after=10", str(int(timeout)), *argv],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CollectorError(f"{what}: {exc.filename} is not installed") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        if proc.returncode == 124:
            detail = f"timed out after {int(timeout)} s"
        raise CollectorError(f"{what} failed: {detail}")
    return proc.stdout


def modinfo(ko: Path) -> dict[str, list[str]]:
    """The ``.modinfo`` section of an uncompressed module: key -> values, like ``modinfo``."""
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise CollectorError(f"{ko.name}: not a 64-bit little-endian ELF object")
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, e_shoff + index * e_shentsize
        )
        return name, offset, size

    _, str_off, str_size = section(e_shstrndx)
    names = data[str_off : str_off + str_size]
    info: dict[str, list[str]] = {}
    for index in range(e_shnum):
        name, offset, size = section(index)
        if names[name : names.index(b"\0", name)] != b".modinfo":
            continue
        for entry in data[offset : offset + size].split(b"\0"):
            key, sep, value = entry.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info
