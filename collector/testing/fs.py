"""The VFS structures path helpers read (fs/mount.h, include/linux/dcache.h), as C declarations
for a :class:`~collector.testing.SyntheticKernel`, and dentries written into one."""

from __future__ import annotations

from typing import Any

from collector.testing.kernel import SyntheticKernel

#: dentries, mounts, paths and fs_struct: what d_path() and dentry_path() follow.
FS = """
struct hlist_bl_node { struct hlist_bl_node *next, **pprev; };
struct hlist_node { struct hlist_node *next, **pprev; };
struct qstr {
    union { struct { u32 hash; u32 len; }; u64 hash_len; };
    const unsigned char *name;
};
struct inode { unsigned int i_mode; unsigned long i_ino; };
struct dentry;
struct dentry_operations {
    int (*d_revalidate)(struct dentry *, unsigned int);
    char *(*d_dname)(struct dentry *, char *, int);
};
struct dentry {
    unsigned int d_flags;
    struct hlist_bl_node d_hash;
    struct dentry *d_parent;
    struct qstr d_name;
    struct inode *d_inode;
    unsigned char d_iname[40];
    const struct dentry_operations *d_op;
};
struct vfsmount { struct dentry *mnt_root; void *mnt_sb; int mnt_flags; };
struct mount {
    struct hlist_node mnt_hash;
    struct mount *mnt_parent;
    struct dentry *mnt_mountpoint;
    struct vfsmount mnt;
    void *mnt_ns;
};
struct path { struct vfsmount *mnt; struct dentry *dentry; };
struct fs_struct { int users; struct path root, pwd; };
"""


def new_dentry(
    sk: SyntheticKernel, name: bytes, parent: int | None = None, hashed: bool = True, **values: Any
) -> int:
    """A ``struct dentry`` named ``name`` under ``parent`` (None: its own parent, a root);
    ``hashed`` puts it in the dcache hash (``d_hash.pprev`` set), so it is not deleted."""
    d = sk.new("struct dentry", **values)
    text = sk.alloc(len(name) + 1, 1)
    sk.write(text, name + b"\0")
    sk.set(d, "struct dentry", "d_parent", d if parent is None else parent)
    sk.set(d, "struct dentry", "d_name.len", len(name))
    sk.set(d, "struct dentry", "d_name.name", text)
    if hashed:
        sk.set(d, "struct dentry", "d_hash.pprev", d)
    return d
