"""Helpers named after the kernel's own macros and functions, one module per subsystem.

Each walker is bounded: it stops with :class:`~collector.errors.BrokenStructure` on a cycle,
a NULL or poisoned link, or more entries than ``max_count`` (on by default), because an
image may be corrupt or hostile and a list that never closes must not hang an analysis.
A page the image lacks raises :class:`~collector.memory.PageNotCaptured` naming its fate.

The helpers are also reachable from :mod:`collector.api`.
"""
