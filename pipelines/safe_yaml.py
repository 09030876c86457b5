"""YAML for the job configuration files (--models, --spec), with bounded size.

`yaml.safe_load` builds no arbitrary objects, but it does not bound how big a document
is once its aliases are expanded: a 1 KB "billion laughs" file (anchors whose aliases
refer to anchors whose aliases ...) loads cheaply as shared objects, and then anything
that walks, copies, merges (`<<:`) or prints the value runs out of time and memory.

`load_yaml` composes the document with a SafeLoader that counts every node as if all
aliases were expanded and stops as soon as that count passes `MAX_NODES` (also: a
recursive alias, nesting deeper than `MAX_DEPTH`, a file over `MAX_BYTES`). Ordinary
anchors (`defaults: &d {...}` then `<<: *d`) stay well under the limit. Every problem is
an InputError with one line naming the file, the line and the limit.

`short_repr` is the only way a loaded value goes into a message: at most ~80 characters,
computed without walking more than a few elements of any container.
"""

from __future__ import annotations

import os
import reprlib
from pathlib import Path

import yaml
from yaml.events import AliasEvent

from pipelines.errors import InputError, one_line

MAX_NODES = 100_000  # nodes of the document with every alias expanded
MAX_DEPTH = 100  # nesting of sequences/mappings
MAX_BYTES = 8 << 20  # the file itself


class YAMLLimitError(yaml.YAMLError):
    """The document is bigger, deeper or more recursive than a configuration file can be."""

    def __init__(self, message: str, mark=None):
        super().__init__(message)
        self.message = message
        self.mark = mark

    def __str__(self) -> str:
        return self.message + (f" (line {self.mark.line + 1})" if self.mark is not None else "")


class BoundedSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses documents whose alias-expanded size exceeds max_nodes."""

    max_nodes = MAX_NODES
    max_depth = MAX_DEPTH

    def __init__(self, stream):
        super().__init__(stream)
        self._expanded = 0  # nodes so far, each alias counted as the full size of what it names
        self._sizes: dict[int, tuple[yaml.Node, int]] = {}  # id(node) -> (node, expanded size), complete nodes
        self._depth = 0

    def _count(self, n: int, mark) -> None:
        self._expanded += n
        if self._expanded > self.max_nodes:
            raise YAMLLimitError(
                f"more than {self.max_nodes:,} values once its aliases (*name) are expanded; a configuration "
                "file is never that big (an alias bomb?)", mark)

    def compose_node(self, parent, index):
        if self.check_event(AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)  # the anchored node (or an undefined-alias error)
            known = self._sizes.get(id(node))
            if known is None or known[0] is not node:
                raise YAMLLimitError("an alias refers to the collection that contains it (a recursive alias)", mark)
            self._count(known[1], mark)
            return node
        mark = self.peek_event().start_mark
        self._depth += 1
        if self._depth > self.max_depth:
            raise YAMLLimitError(f"nested more than {self.max_depth} levels deep", mark)
        start = self._expanded
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._count(1, mark)
        self._sizes[id(node)] = (node, self._expanded - start)
        return node


def load_yaml(path: str | os.PathLike, what: str):
    """The document in `path`, or InputError("<what> <path>: ...") in one line.

    `what` names the flag or role of the file in messages, e.g. "--models" or "--spec".
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise InputError(f"{what} {str(path)!r}: not a file")
        if size > MAX_BYTES:
            raise InputError(f"{what} {path}: {size:,} bytes; a configuration file is at most {MAX_BYTES:,} bytes "
                             "(put long prompt lists in a .txt/.csv/.jsonl/.parquet file)")
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"{what}: file {str(path)!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise InputError(f"{what} {path}: cannot read: {e.strerror or e}") from None
    try:
        return yaml.load(text, Loader=BoundedSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except YAMLLimitError as e:
        raise InputError(f"{what} {path}: refused: {e}") from None
    except yaml.YAMLError as e:
        raise InputError(f"{what} {path}: not valid YAML: {one_line(_unnamed(e), 240)}") from None
    except RecursionError:
        raise InputError(f"{what} {path}: refused: nested too deeply") from None


def _unnamed(error: yaml.YAMLError) -> str:
    return str(error).replace('in "<unicode string>", ', "")


_repr = reprlib.Repr()
_repr.maxlevel = 2
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4
_repr.maxstring = _repr.maxother = 60
_repr.maxlong = 40


def short_repr(value, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters, without expanding big or shared containers."""
    return one_line(_repr.repr(value), limit)


def type_name(value) -> str:
    """How a YAML value's type is named in messages: null, bool, int, float, str, list, mapping, ..."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def describe(value) -> str:
    """`got ...` text for a message: the value (short) and its YAML type."""
    return f"{short_repr(value)} ({type_name(value)})"
