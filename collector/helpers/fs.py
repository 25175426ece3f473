"""The virtual file system: path names of dentries and mounts, as the kernel prints them.

Mirrors fs/d_path.c (``d_path``, ``prepend_path``, ``dentry_path``), include/linux/dcache.h
(``struct dentry``, ``d_unlinked``), include/linux/mount.h (``struct vfsmount``) and
fs/mount.h (``struct mount``, which holds a ``struct vfsmount`` as its member ``mnt``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collector.errors import BrokenStructure, ImageError, NotApplicable
from collector.kernel.btf import Kind
from collector.kernel.object import Object

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel

#: ``PATH_MAX`` (include/uapi/linux/limits.h): the buffer /proc/PID/exe and /proc/PID/fd/N
#: give ``d_path``, its terminating NUL included.
PATH_MAX = 4096
#: The most steps (one per dentry or mount crossed) a path walk takes: a path that fits in
#: PATH_MAX has at most PATH_MAX / 2 components, and a mount is crossed at most once each.
MAX_DEPTH = 2 * PATH_MAX
#: The longest path :func:`seq_path` gives: MAX_DEPTH names of NAME_MAX (255) bytes each.
SEQ_PATH_MAX = MAX_DEPTH * 256

_DELETED = b" (deleted)"


class PathTooLong(ImageError):
    """A path name does not fit in the buffer the kernel would give it (``ENAMETOOLONG``)."""


def _address(obj: Object, tag: str) -> int:
    """The address of the ``struct tag`` that ``obj`` (a pointer to one, or one) names."""
    r = obj.type.resolved()
    if r.kind is Kind.PTR and r.pointee.resolved().tag == tag:
        return obj.value()
    if r.kind is Kind.STRUCT and r.tag == tag:
        return obj.address
    raise ImageError(f"{obj.type} is not a struct {tag} or a pointer to one")


def _tag(obj: Object) -> str:
    r = obj.type.resolved()
    if r.kind is Kind.PTR:
        r = r.pointee.resolved()
    return r.tag if r.kind is Kind.STRUCT else ""


def _dentry(kernel: Kernel, address: int, what: str) -> Object:
    if not address:
        raise BrokenStructure(f"{what} is NULL")
    return kernel.object("struct dentry", address)


def IS_ROOT(dentry: Object) -> bool:
    """``IS_ROOT()``: whether a dentry is the root of its tree (its own parent).

    :param dentry: ``struct dentry *``.
    """
    address = _address(dentry, "dentry")
    return dentry.kernel.object("struct dentry", address).d_parent.value() == address


def d_unhashed(dentry: Object) -> bool:
    """``d_unhashed()``: whether a dentry is out of the dcache hash (``d_hash.pprev`` NULL).

    :param dentry: ``struct dentry *``.
    """
    d = dentry.kernel.object("struct dentry", _address(dentry, "dentry"))
    return d.d_hash.pprev.value() == 0


def d_unlinked(dentry: Object) -> bool:
    """``d_unlinked()``: whether a dentry was deleted (unhashed and not a root), which
    ``d_path`` shows with `` (deleted)`` after the name.

    :param dentry: ``struct dentry *``.
    """
    return d_unhashed(dentry) and not IS_ROOT(dentry)


def _name(d: Object, budget: int) -> bytes:
    """``d->d_name`` (a ``struct qstr``: ``len`` bytes at ``name``), or PathTooLong when it
    would not fit in ``budget`` bytes."""
    qstr = d.d_name
    length = int(qstr.len)
    if length > budget:
        raise PathTooLong(f"a name of {length} bytes at dentry {d.address:#x} does not fit")
    if not length:
        return b""
    return d.kernel.read_virt(qstr.member("name").value(), length)


def _walk(
    kernel: Kernel,
    dentry: int,
    mount: int,
    root: tuple[int, int] | None,
    budget: int,
    max_depth: int,
) -> tuple[list[bytes], int]:
    """``__prepend_path()``: the names from ``dentry`` up to ``root`` (``(vfsmount *,
    dentry *)``) or the global root, leaf first, crossing mounts; and how the walk ended:
    0 at ``root``, 1 at the root of the mount tree, 3 at a dentry that is its own parent
    without being its mount's root (escaped)."""
    parts: list[bytes] = []
    seen: set[tuple[int, int]] = set()
    m = kernel.object("struct mount", mount)
    d = _dentry(kernel, dentry, "path->dentry")
    for _ in range(max_depth):
        if root is not None and (m.mnt.address, d.address) == root:
            return parts, 0
        key = (d.address, m.address)
        if key in seen:
            raise BrokenStructure(
                f"d_path: dentry {d.address:#x} in mount {m.address:#x} is reached twice: a cycle"
            )
        seen.add(key)
        parent = d.d_parent.value()
        if d.address == m.mnt.mnt_root.value():
            up = m.mnt_parent.value()
            if not up:
                raise BrokenStructure(f"d_path: mount {m.address:#x} has a NULL mnt_parent")
            if up == m.address:
                return parts, 1  # the global root (or the top of a detached tree)
            d = _dentry(kernel, m.mnt_mountpoint.value(), f"mount {m.address:#x}'s mountpoint")
            m = kernel.object("struct mount", up)
            continue
        if not parent:
            raise BrokenStructure(f"d_path: dentry {d.address:#x} has a NULL d_parent")
        if parent == d.address:
            return parts, 3
        name = _name(d, budget - 1)
        budget -= len(name) + 1
        parts.append(name)
        d = kernel.object("struct dentry", parent)
    raise BrokenStructure(f"d_path: more than {max_depth} dentries and mounts on the way up")


def d_path(
    path_or_vfsmnt: Object,
    dentry: Object | None = None,
    *,
    root: Object | None = None,
    max_len: int = PATH_MAX,
    max_depth: int = MAX_DEPTH,
) -> bytes:
    """``d_path()``: the path name of a file, as /proc/PID/exe or /proc/PID/fd/N show it.

    Walks ``dentry->d_parent`` up to the root of each mount and crosses into the parent mount
    at its mountpoint (``container_of(vfsmnt, struct mount, mnt)``, ``mnt_parent``,
    ``mnt_mountpoint``), up to ``root`` or else the root of the mount tree. A deleted file
    (``d_unlinked``) gets `` (deleted)`` after its name; a dentry that is its own parent
    without being the root of its mount gives ``/``, as the kernel does.

    Files of file systems that are never mounted (pipes, sockets, anonymous inodes, memfd)
    are named by the dentry's ``d_op->d_dname``; the common ones are rendered here
    (``pipe:[ino]``, ``socket:[ino]``, ``anon_inode:name``, ``/name (deleted)``).

    :param path_or_vfsmnt: ``struct path *`` (or ``struct path``), or ``struct vfsmount *``
        with ``dentry``.
    :param dentry: ``struct dentry *`` when the first argument is a vfsmount.
    :param root: ``struct path`` to stop at, as the kernel stops at the reader's root
        (``task->fs->root``; a path outside it is named from the global root, as the kernel
        does). None: the root of the mount tree.
    :param max_len: the buffer's size, its NUL included (PATH_MAX as /proc uses).
    :param max_depth: the most dentries and mounts walked.
    :raises PathTooLong: the name does not fit in ``max_len`` (the kernel's ENAMETOOLONG).
    :raises BrokenStructure: a cycle, a NULL link, or more than ``max_depth`` steps.
    :raises NotApplicable: the dentry is named by a ``d_dname`` method not rendered here.
    """
    kernel = path_or_vfsmnt.kernel
    if dentry is None:
        if _tag(path_or_vfsmnt) != "path":
            raise ImageError(f"d_path of a {path_or_vfsmnt.type} needs a dentry")
        vfsmnt = path_or_vfsmnt.mnt.value()
        dentry_address = path_or_vfsmnt.dentry.value()
    else:
        vfsmnt = _address(path_or_vfsmnt, "vfsmount")
        dentry_address = _address(dentry, "dentry")
    if not vfsmnt:
        raise BrokenStructure("d_path: the path's vfsmount is NULL")
    d = _dentry(kernel, dentry_address, "the path's dentry")
    mount = kernel.object("struct vfsmount", vfsmnt).container_of("struct mount", "mnt")

    d_op = d.d_op.value()
    if d_op:
        d_dname = kernel.object("struct dentry_operations", d_op).d_dname.value()
        mounted_root = IS_ROOT(d) and d.address == mount.mnt.mnt_root.value()
        if d_dname and not mounted_root:
            return _d_dname(d, d_dname, max_len)

    stop = None
    if root is not None:
        stop = (root.mnt.value(), root.dentry.value())
    deleted = d_unlinked(d)
    budget = max_len - (len(_DELETED) + 1 if deleted else 1)
    if budget < 0:
        raise PathTooLong(f"d_path: a buffer of {max_len} bytes holds no path")
    parts, how = _walk(kernel, d.address, mount.address, stop, budget, max_depth)
    if how == 3:
        parts = []  # "Escaped?": the kernel keeps nothing of the walk
    out = b"".join(b"/" + p for p in reversed(parts)) or b"/"
    if len(out) > budget:
        raise PathTooLong(f"d_path: ...{out[-64:]!r} does not fit in {max_len} bytes")
    return out + _DELETED if deleted else out


def mangle_path(path: bytes, esc: bytes) -> bytes:
    """``mangle_path()`` (fs/seq_file.c): each byte of ``esc`` in ``path`` written as a
    backslash and three octal digits, as /proc/PID/maps writes a newline (``\\012``)."""
    if not esc:
        return path
    return b"".join(b"\\%03o" % c if c in esc else bytes((c,)) for c in path)


def seq_path(
    path: Object,
    esc: bytes = b"",
    *,
    root: Object | None = None,
    max_len: int = SEQ_PATH_MAX,
    max_depth: int = MAX_DEPTH,
) -> bytes:
    """``seq_path()``/``seq_file_path()`` (fs/seq_file.c): :func:`d_path` with the bytes of
    ``esc`` escaped (:func:`mangle_path`), as /proc/PID/maps (``esc`` ``"\\n"``) and
    /proc/PID/mountinfo print paths.

    A seq_file grows its buffer until the line fits, so such a path is not held to PATH_MAX;
    ``max_len`` bounds it (a path that could not fit in memory is a broken one).

    :param path: ``struct path *`` (``&file->f_path``) or ``struct path``.
    :param root: as :func:`d_path`.
    """
    return mangle_path(d_path(path, root=root, max_len=max_len, max_depth=max_depth), esc)


def _d_dname(d: Object, function: int, max_len: int) -> bytes:
    """What the dentry's ``d_op->d_dname`` method prints, for the methods known here."""
    kernel = d.kernel
    hit = kernel.symbols.address_to_symbol(function, max_offset=0)
    name = hit[0] if hit else f"{function:#x}"
    if name == "simple_dname":
        # fs/d_path.c: "/" name " (deleted)", for files that were never linked (memfd, shm).
        out = b"/" + _name(d, max_len) + _DELETED
    elif name in ("pipefs_dname", "sockfs_dname"):
        # fs/pipe.c "pipe:[%lu]", net/socket.c "socket:[%lu]": the inode number.
        kind = b"pipe" if name == "pipefs_dname" else b"socket"
        out = kind + b":[%d]" % int(d.d_inode.i_ino)
    elif name == "anon_inodefs_dname":
        # fs/anon_inodes.c: "anon_inode:%s" with the dentry's name.
        out = b"anon_inode:" + _name(d, max_len)
    else:
        raise NotApplicable(
            f"dentry {d.address:#x} is named by its d_op->d_dname method {name}, which is"
            " code, not data: it is not rendered offline"
        )
    if len(out) + 1 > max_len:
        raise PathTooLong(f"d_path: {out[:64]!r}... does not fit in {max_len} bytes")
    return out


def dentry_path_raw(dentry: Object, max_len: int = PATH_MAX, max_depth: int = MAX_DEPTH) -> bytes:
    """``dentry_path_raw()``: the path of a dentry from the root of its file system (not of
    the mount tree), without the deleted marker.

    :param dentry: ``struct dentry *``.
    :raises PathTooLong: the path does not fit in ``max_len`` bytes (NUL included).
    :raises BrokenStructure: a cycle, a NULL ``d_parent``, or more than ``max_depth`` levels.
    """
    return _dentry_path(dentry, max_len - 1, max_depth)


def dentry_path(dentry: Object, max_len: int = PATH_MAX, max_depth: int = MAX_DEPTH) -> bytes:
    """``dentry_path()``: as :func:`dentry_path_raw`, with ``//deleted`` after a deleted
    dentry's path as the kernel writes it.

    :param dentry: ``struct dentry *``.
    """
    deleted = d_unlinked(dentry)
    budget = max_len - (len(b"//deleted") + 1 if deleted else 1)
    out = _dentry_path(dentry, budget, max_depth)
    return out + b"//deleted" if deleted else out


def _dentry_path(dentry: Object, budget: int, max_depth: int) -> bytes:
    """``__dentry_path()``: names up to the first dentry that is its own parent."""
    kernel = dentry.kernel
    d = _dentry(kernel, _address(dentry, "dentry"), "the dentry")
    parts: list[bytes] = []
    seen: set[int] = set()
    room = budget
    for _ in range(max_depth):
        parent = d.d_parent.value()
        if not parent:
            raise BrokenStructure(f"dentry_path: dentry {d.address:#x} has a NULL d_parent")
        if parent == d.address:
            out = b"".join(b"/" + p for p in reversed(parts)) or b"/"
            if len(out) > room:
                raise PathTooLong(f"dentry_path: ...{out[-64:]!r} does not fit")
            return out
        if d.address in seen:
            raise BrokenStructure(f"dentry_path: dentry {d.address:#x} is reached twice: a cycle")
        seen.add(d.address)
        name = _name(d, budget - 1)
        budget -= len(name) + 1
        parts.append(name)
        d = kernel.object("struct dentry", parent)
    raise BrokenStructure(f"dentry_path: more than {max_depth} levels of dentries")
