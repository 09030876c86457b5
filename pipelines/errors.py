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


def exception_chain(e: BaseException | None):
    """`e` and everything it wraps, outermost first: Ray's `cause` (a RayTaskError's user
    exception), then `__cause__`, then `__context__`; each exception once."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__


def innermost_cause(e: BaseException) -> str:
    """The innermost cause of a (possibly Ray-wrapped) exception, on one line."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    text = f"{type(e).__name__}: {e}"
    if "RayTaskError" in type(e).__name__ or "UserCodeException" in type(e).__name__:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]  # the traceback's last line is the cause
        text = lines[-1] if lines else text
    return one_line(text, 500)
