"""The one exception family the jobs turn into exit code 2 and a one-line message.

Bad input (a manifest, a flag, a models file, a sweep spec) is the user's to fix, so
it gets a sentence naming what was wrong, not a traceback.
"""


class InputError(ValueError):
    """Bad input, found before any work was done or anything was written."""


def one_line(text: str, limit: int = 240) -> str:
    """`text` with its whitespace folded to single spaces, cut to `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
