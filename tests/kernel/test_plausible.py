"""Plausibility checks: the values they accept, and the one line they end with otherwise."""

from __future__ import annotations

import pytest

from collector.api import ImageError, Implausible, plausible_int, plausible_text


def test_plausible_int_bounds() -> None:
    assert plausible_int(0, 0, 4194304, "pid") == 0
    assert plausible_int(4194304, 0, 4194304, "pid") == 4194304
    with pytest.raises(Implausible) as caught:
        plausible_int(-5, 0, 4194304, "task 0xffff888000001000 pid")
    assert str(caught.value) == (
        "the kernel metadata looks wrong for this image: task 0xffff888000001000 pid is -5,"
        " outside 0..4194304 (are the image's BTF and symbols those of the captured kernel?)"
    )
    assert isinstance(caught.value, ImageError)


def test_plausible_text() -> None:
    assert plausible_text(b"systemd\0\0\0garbage", "comm") == "systemd"
    assert plausible_text(b"\0", "comm", allow_empty=True) == ""
    with pytest.raises(Implausible, match="comm is empty"):
        plausible_text(b"\0abc", "comm")
    with pytest.raises(Implausible, match=r"comm is not text: 01ff41"):
        plausible_text(b"\x01\xffA\0", "comm")
    with pytest.raises(Implausible, match="is not text"):
        plausible_text(b"a\nb", "comm")
