"""rbtree helpers on real kernels: sysfs's /sys/module directory is a kernfs node whose
children sit in a red-black tree ordered by (hash, namespace, name); its in-order walk must
be sorted by that key and hold exactly the names `ls /sys/module` shows in the guest."""

from __future__ import annotations

import pytest

from collector.helpers.rbtree import (
    rb_first,
    rb_last,
    rb_next,
    rb_prev,
    rbtree_inorder_for_each_entry,
)
from collector.kernel.kernel import Kernel
from tests.vm.conftest import Capture

pytestmark = pytest.mark.vm


def test_sys_module_children_in_order(capture: Capture, kernel: Kernel) -> None:
    listing = capture.guest.run("ls -1 /sys/module").check().stdout.split()
    directory = kernel.variable("module_kset").kobj.sd
    assert directory.name.text() == "module"
    root = directory.member("dir.children").address_of()
    children = list(rbtree_inorder_for_each_entry("struct kernfs_node", root, "rb"))
    keys = [(int(kn.hash), kn.ns.value(), kn.name.string()) for kn in children]
    assert keys == sorted(keys)  # kernfs_name_compare(): hash, then ns, then name
    assert sorted(name.decode() for _, _, name in keys) == sorted(listing)
    forward, node = [], rb_first(root)
    while not node.is_null():
        forward.append(node.value())
        node = rb_next(node)
    assert forward == [kn.rb.address for kn in children]
    backward, node = [], rb_last(root)
    while not node.is_null():
        backward.append(node.value())
        node = rb_prev(node)
    assert backward == forward[::-1]
    print(f"{kernel.release}: {len(children)} kernfs children of /sys/module in order")
