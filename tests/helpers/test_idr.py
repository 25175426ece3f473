"""IDR helpers: IDs offset by idr_base over an xarray built in synthetic memory."""

from __future__ import annotations

from collector.helpers.idr import idr_find, idr_for_each
from collector.testing import SyntheticKernel
from collector.testing.trees import XARRAY, xa_build


def make(base: int, ids: list[int]) -> tuple[SyntheticKernel, int, dict[int, int]]:
    sk = SyntheticKernel(XARRAY)
    idr = sk.new("struct idr", idr_base=base)
    ptrs = {i: sk.alloc(16) for i in ids}
    xa_build(sk, idr + sk.offsetof("struct idr", "idr_rt"), {i - base: p for i, p in ptrs.items()})
    return sk, idr, ptrs


def test_idr_find_and_for_each_honour_idr_base() -> None:
    ids = [1, 2, 3, 64, 65, 300, 5000]
    sk, idr, ptrs = make(1, ids)
    obj = sk.kernel().object("struct idr", idr).address_of()
    assert [(i, e.value()) for i, e in idr_for_each(obj)] == sorted(ptrs.items())
    for i in ids:
        assert idr_find(obj, i).value() == ptrs[i]
    assert idr_find(obj, 0).value() == 0  # below idr_base
    assert idr_find(obj, 4).value() == 0
    assert idr_find(obj, 1 << 40).value() == 0


def test_zero_based_idr() -> None:
    sk, idr, ptrs = make(0, [0, 7])
    obj = sk.kernel().object("struct idr", idr)
    assert dict((i, e.value()) for i, e in idr_for_each(obj)) == ptrs
    assert idr_find(obj, 0).value() == ptrs[0]
