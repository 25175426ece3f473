"""collector.helpers.fs on synthetic kernels: a mount tree with a bind mount and nested
mounts, deleted dentries, pseudo files named by d_dname, and broken trees."""

from __future__ import annotations

import pytest

from collector.errors import BrokenStructure, NotApplicable
from collector.helpers.fs import (
    IS_ROOT,
    PathTooLong,
    d_path,
    d_unlinked,
    dentry_path,
    dentry_path_raw,
    mangle_path,
    seq_path,
)
from collector.kernel.object import Object
from collector.testing import SyntheticKernel
from collector.testing.fs import FS, new_dentry

DECLARATIONS = FS

TEXT = 0xFFFFFFFF81000000


class Tree:
    """Dentries and mounts written into a synthetic kernel, addressed by name."""

    def __init__(self) -> None:
        self.sk = SyntheticKernel(DECLARATIONS)
        self.mnt_offset = self.sk.offsetof("struct mount", "mnt")

    def dentry(
        self, name: bytes, parent: int | None = None, hashed: bool = True, **values: int
    ) -> int:
        """A dentry named ``name`` under ``parent`` (None: its own parent, a root)."""
        return new_dentry(self.sk, name, parent, hashed, **values)

    def mount(self, root: int, parent: int | None = None, mountpoint: int | None = None) -> int:
        """A mount of the tree at ``root``, on ``mountpoint`` of mount ``parent`` (None: the
        root of the mount tree, its own parent); returns its ``struct vfsmount *``."""
        sk = self.sk
        m = sk.new("struct mount", mnt__mnt_root=root)
        sk.set(m, "struct mount", "mnt_parent", m if parent is None else parent - self.mnt_offset)
        sk.set(m, "struct mount", "mnt_mountpoint", root if mountpoint is None else mountpoint)
        return m + self.mnt_offset

    def path(self, vfsmount: int, dentry: int) -> int:
        return self.sk.new("struct path", mnt=vfsmount, dentry=dentry)


def build() -> tuple[Tree, dict[str, int]]:
    """The guest's layout: an initramfs root with the host's root mounted at /host, a tmpfs
    inside that at /host/tmp, and /host/usr/bin bound again at /bin2."""
    t = Tree()
    n: dict[str, int] = {}
    n["R0"] = t.dentry(b"/", hashed=False)
    n["M0"] = t.mount(n["R0"])
    n["host"] = t.dentry(b"host", n["R0"])
    n["bin2"] = t.dentry(b"bin2", n["R0"])
    n["R1"] = t.dentry(b"/", hashed=False)
    n["M1"] = t.mount(n["R1"], n["M0"], n["host"])
    n["usr"] = t.dentry(b"usr", n["R1"])
    n["bin"] = t.dentry(b"bin", n["usr"])
    n["python"] = t.dentry(b"python3", n["bin"])
    n["tmp"] = t.dentry(b"tmp", n["R1"])
    n["R2"] = t.dentry(b"/", hashed=False)
    n["M2"] = t.mount(n["R2"], n["M1"], n["tmp"])
    n["sock"] = t.dentry(b"x.sock", n["R2"])
    n["M3"] = t.mount(n["bin"], n["M0"], n["bin2"])  # bind mount of /host/usr/bin
    n["old"] = t.dentry(b"old binary", n["R1"], hashed=False)
    return t, n


class View:
    """The kernel over a built tree; ``view["name"]`` is the named dentry or vfsmount."""

    def __init__(self, t: Tree, n: dict[str, int]) -> None:
        self.kernel = t.sk.kernel()
        self._n = n

    def __getitem__(self, name: str) -> Object:
        kind = "struct vfsmount" if name.startswith("M") else "struct dentry"
        return self.kernel.object(kind, self._n[name])

    def dentry(self, address: int) -> Object:
        return self.kernel.object("struct dentry", address)


def test_paths_cross_mounts_up_to_the_global_root() -> None:
    t, n = build()
    o = View(t, n)
    assert d_path(o["M1"], o["python"]) == b"/host/usr/bin/python3"
    assert d_path(o["M2"], o["sock"]) == b"/host/tmp/x.sock"  # a mount inside a mount
    assert d_path(o["M3"], o["python"]) == b"/bin2/python3"  # the same file, bound elsewhere
    assert d_path(o["M0"], o["R0"]) == b"/"
    assert d_path(o["M1"], o["R1"]) == b"/host"
    assert d_path(o["M2"], o["R2"]) == b"/host/tmp"
    assert d_path(o["M3"], o["bin"]) == b"/bin2"


def test_struct_path_and_pointers_to_it() -> None:
    t, n = build()
    p = t.path(n["M2"], n["sock"])
    o = View(t, n)
    path = o.kernel.object("struct path", p)
    assert d_path(path) == b"/host/tmp/x.sock"
    assert d_path(path.address_of()) == b"/host/tmp/x.sock"
    # Pointers, as members hold them.
    assert d_path(path.mnt, path.dentry) == b"/host/tmp/x.sock"


def test_a_root_stops_the_walk_as_the_reader_s_root_does() -> None:
    t, n = build()
    root = t.path(n["M1"], n["R1"])  # chrooted into /host
    o = View(t, n)
    r = o.kernel.object("struct path", root)
    assert d_path(o["M1"], o["python"], root=r) == b"/usr/bin/python3"
    assert d_path(o["M2"], o["sock"], root=r) == b"/tmp/x.sock"
    assert d_path(o["M1"], o["R1"], root=r) == b"/"
    # Outside the root: named from the global root, as the kernel does.
    assert d_path(o["M3"], o["python"], root=r) == b"/bin2/python3"
    assert d_path(o["M0"], o["host"], root=r) == b"/host"


def test_deleted_files_are_marked_as_the_kernel_marks_them() -> None:
    t, n = build()
    o = View(t, n)
    assert d_unlinked(o["old"])
    assert not d_unlinked(o["R1"])  # a root is unhashed but not deleted
    assert d_path(o["M1"], o["old"]) == b"/host/old binary (deleted)"
    assert dentry_path(o["old"]) == b"/old binary//deleted"
    assert dentry_path_raw(o["old"]) == b"/old binary"


def test_dentry_path_stays_inside_its_file_system() -> None:
    t, n = build()
    o = View(t, n)
    assert dentry_path(o["python"]) == b"/usr/bin/python3"
    assert dentry_path(o["sock"]) == b"/x.sock"
    assert dentry_path(o["R1"]) == b"/"
    assert IS_ROOT(o["R2"]) and not IS_ROOT(o["sock"])


def test_a_dentry_that_escaped_its_mount_is_shown_as_root() -> None:
    t, n = build()
    # A tree root that is not the root of the mount the path names (a disconnected dentry).
    n["lost"] = t.dentry(b"lost", hashed=True)
    n["child"] = t.dentry(b"child", n["lost"])
    o = View(t, n)
    assert d_path(o["M1"], o["child"]) == b"/"


def test_pseudo_files_are_named_by_their_d_dname_method() -> None:
    t, _ = build()
    sk = t.sk
    for i, name in enumerate(("pipefs_dname", "sockfs_dname", "simple_dname", "ns_dname")):
        sk.symbol(name, TEXT + 0x100 * (i + 1), "t")
    ops = {
        name: sk.new("struct dentry_operations", d_dname=TEXT + 0x100 * (i + 1))
        for i, name in enumerate(("pipe", "socket", "memfd", "ns"))
    }
    inode = sk.new("struct inode", i_ino=4242)
    pipe_root = t.dentry(b"/", hashed=False)
    pipe_mount = t.mount(pipe_root)
    pipe = t.dentry(b"", pipe_root, hashed=False, d_op=ops["pipe"], d_inode=inode)
    sock = t.dentry(b"", pipe_root, hashed=False, d_op=ops["socket"], d_inode=inode)
    memfd = t.dentry(b"memfd:runc", pipe_root, hashed=False, d_op=ops["memfd"])
    ns = t.dentry(b"", pipe_root, hashed=False, d_op=ops["ns"])
    kernel = sk.kernel()
    mnt = kernel.object("struct vfsmount", pipe_mount)

    def obj(address: int) -> Object:
        return kernel.object("struct dentry", address)

    assert d_path(mnt, obj(pipe)) == b"pipe:[4242]"
    assert d_path(mnt, obj(sock)) == b"socket:[4242]"
    assert d_path(mnt, obj(memfd)) == b"/memfd:runc (deleted)"
    with pytest.raises(NotApplicable, match="ns_dname"):
        d_path(mnt, obj(ns))
    # The mounted root of such a file system is named by its place, not by d_dname.
    sk.set(pipe_root, "struct dentry", "d_op", ops["pipe"])
    assert d_path(kernel.object("struct vfsmount", pipe_mount), obj(pipe_root)) == b"/"


def test_a_dentry_cycle_is_a_broken_structure() -> None:
    t, n = build()
    a = t.dentry(b"a", n["R1"])
    b = t.dentry(b"b", a)
    t.sk.set(a, "struct dentry", "d_parent", b)
    o = View(t, n)
    with pytest.raises(BrokenStructure, match="cycle"):
        d_path(o["M1"], o.dentry(b))
    with pytest.raises(BrokenStructure, match="cycle"):
        dentry_path(o.dentry(b))


def test_a_mount_cycle_is_a_broken_structure() -> None:
    t, n = build()
    # Two mounts, each mounted on the other's root.
    r1 = t.dentry(b"/", hashed=False)
    r2 = t.dentry(b"/", hashed=False)
    m1 = t.sk.new("struct mount", mnt__mnt_root=r1, mnt_mountpoint=r2)
    m2 = t.sk.new("struct mount", mnt__mnt_root=r2, mnt_mountpoint=r1, mnt_parent=m1)
    t.sk.set(m1, "struct mount", "mnt_parent", m2)
    f = t.dentry(b"f", r1)
    o = View(t, n)
    with pytest.raises(BrokenStructure, match="cycle"):
        d_path(o.kernel.object("struct vfsmount", m1 + t.mnt_offset), o.dentry(f))


def test_null_links_are_broken_structures() -> None:
    t, n = build()
    orphan = t.dentry(b"orphan", n["R1"])
    t.sk.set(orphan, "struct dentry", "d_parent", 0)
    o = View(t, n)
    with pytest.raises(BrokenStructure, match="NULL d_parent"):
        d_path(o["M1"], o.dentry(orphan))


def test_too_deep_and_too_long_paths() -> None:
    t, n = build()
    d = n["R1"]
    for i in range(30):
        d = t.dentry(b"d%d" % i, d)
    deep = d
    long_name = t.dentry(b"x" * 300, n["R1"])
    # 1400 levels of "ab": 4200 bytes, longer than PATH_MAX.
    d = n["R1"]
    for _ in range(1400):
        d = t.dentry(b"ab", d)
    very_long = d
    o = View(t, n)
    want = b"/host" + b"".join(b"/d%d" % i for i in range(30))
    assert d_path(o["M1"], o.dentry(deep)) == want
    with pytest.raises(BrokenStructure, match="more than 10"):
        d_path(o["M1"], o.dentry(deep), max_depth=10)
    with pytest.raises(BrokenStructure, match="more than 10"):
        dentry_path(o.dentry(deep), max_depth=10)
    with pytest.raises(PathTooLong):
        d_path(o["M1"], o.dentry(long_name), max_len=256)
    # Exactly full: the path and its NUL fill the buffer.
    assert len(d_path(o["M1"], o.dentry(long_name), max_len=307)) == 306
    with pytest.raises(PathTooLong):
        d_path(o["M1"], o.dentry(long_name), max_len=306)
    with pytest.raises(PathTooLong):
        d_path(o["M1"], o.dentry(very_long))
    with pytest.raises(PathTooLong):
        dentry_path(o.dentry(very_long))


def test_seq_path_escapes_as_proc_pid_maps_does() -> None:
    t, n = build()
    n["odd"] = t.dentry(b"two\nlines", n["R1"])
    p = t.path(n["M1"], n["odd"])
    o = View(t, n)
    path = o.kernel.object("struct path", p)
    assert seq_path(path, b"\n") == b"/host/two\\012lines"
    assert seq_path(path) == b"/host/two\nlines"
    assert mangle_path(b"a b\tc", b" \t") == b"a\\040b\\011c"
