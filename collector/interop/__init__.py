"""Bridges from collector images to other memory-analysis tools."""
