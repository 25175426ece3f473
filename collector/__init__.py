"""collector: capture the physical memory of a live Linux machine, analyse it offline."""

__version__ = "0.1.0"
