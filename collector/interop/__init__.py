"""Bridges from collector images to other memory-analysis tools: drgn programs, Volatility 3
symbol tables."""
