"""Test support for plugin authors: synthetic kernels built from C declarations.

``from collector.testing import SyntheticKernel`` gives a real
:class:`~collector.kernel.kernel.Kernel` over made-up memory, so a plugin's test needs no
image and no hand-written fake. See docs/plugins.md.
"""

from collector.testing.cdecl import CDeclError, Layout, compile_btf
from collector.testing.kernel import SyntheticKernel

__all__ = ["CDeclError", "Layout", "SyntheticKernel", "compile_btf"]
