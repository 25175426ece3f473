"""Text from images and hosts made safe for a terminal: one escaping rule for every command."""

from __future__ import annotations


def escape_text(text: str, keep_newlines: bool = False) -> str:
    """Make untrusted text safe for a terminal: control characters (escape sequences among
    them) become ``\\x1b``-style escapes; newlines stay when ``keep_newlines``."""
    if keep_newlines:
        return "\n".join(escape_text(line) for line in text.split("\n"))
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)
