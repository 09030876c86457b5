"""Short, one-line pieces of the warnings and errors evaluation prints.

A results directory can hold thousands of bad files or rows; a message names the first few
and counts the rest, and quotes each cause in a few words, so it stays one readable line.
"""

from __future__ import annotations

import re

SHOWN = 5  # files or rows named in one warning or error line


def reason(e: BaseException) -> str:
    """The exception's message on one line, at most 120 characters (PIL names its BytesIO
    object in its messages; that address is dropped)."""
    text = re.sub(r" ?<[^<>]* object at 0x[0-9a-f]+>", "", " ".join(str(e).split()))
    return text[:120] or type(e).__name__


def listing(items: list[str]) -> str:
    """The first SHOWN items, comma-separated, and how many more there are."""
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more
