"""Untrusted record text made safe to show to a person (terminal and HTML alike)."""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: str) -> str:
    """``text`` with control and bidi-override characters shown as ``\\uXXXX``.

    Record content is untrusted: this keeps terminal escape sequences and text-direction
    tricks out of what people read (tabs are kept).
    """
    return "".join(f"\\u{ord(ch):04x}" if _hidden(ch) else ch for ch in text)


def _hidden(ch: str) -> bool:
    code = ord(ch)
    return (code < 32 and ch != "\t") or 0x7F <= code <= 0x9F or 0x200B <= code <= 0x200F \
        or 0x202A <= code <= 0x202E or 0x2066 <= code <= 0x2069
