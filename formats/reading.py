"""The one way ditkit reads a JSON or text input: regular files only, with a size cap, strict UTF-8, bounded JSON.

A FIFO, a device node (a config linked to /dev/zero), a directory or a socket is refused before it is opened
(opening a FIFO blocks forever; /dev/zero never ends); a regular file larger than the cap is refused before it
is read. Every function raises FormatError (never another exception) naming the file and what it should be.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import FormatError

MAX_JSON = 64 << 20  # bytes; configs are KBs, the largest JSON beside weights (tokenizer.json) a few MBs
MAX_TEXT = 64 << 20  # bytes; a prompts file or metadata.jsonl of a million lines fits


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path, what: str = "file", limit: int | None = None) -> int:
    """The size of `path` if it is a regular file (symlinks followed) of at most `limit` bytes; else FormatError."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FormatError(f"{what} {path} does not exist")
    except OSError as e:
        raise FormatError(f"cannot read {what} {path} ({e.strerror or type(e).__name__}); check the path and "
                          "permissions")
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file; give a file")
    if limit is not None and st.st_size > limit:
        raise FormatError(f"{what} {path} is {st.st_size} bytes, more than the {limit >> 20} MB a {what} may be; "
                          "give the right file")
    return st.st_size


def read_bytes(path, what: str = "file", limit: int = MAX_TEXT) -> bytes:
    path = Path(path)
    regular_file(path, what, limit)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # a file that grew after the check is still bounded
    except OSError as e:
        raise FormatError(f"cannot read {what} {path} ({e.strerror or type(e).__name__}); check the permissions")
    if len(data) > limit:
        raise FormatError(f"{what} {path} is more than {limit >> 20} MB; give the right file")
    return data


def decode(data: bytes, where, what: str = "file") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{where} is not UTF-8 text (byte {e.start}); save the {what} as UTF-8")


def read_text(path, what: str = "file", limit: int = MAX_TEXT) -> str:
    """The file's text (UTF-8; a leading byte-order mark is dropped)."""
    return decode(read_bytes(path, what, limit), path, what).removeprefix("\ufeff")


def _unique(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"key {dup[:60]!r} appears twice")
    return dict(pairs)


def loads(data: bytes | str, where, what: str = "file"):
    """json.loads that fails only with FormatError: bad JSON, a key given twice, nesting too deep, non-UTF-8."""
    if isinstance(data, bytes):
        data = decode(data, where, what)
    try:
        return json.loads(data, object_pairs_hook=_unique)
    except RecursionError:
        raise FormatError(f"{where} is not valid JSON (nested too deeply); restore the {what}")
    except ValueError as e:  # JSONDecodeError, a duplicate key, an integer too long to convert
        raise FormatError(f"{where} is not valid JSON ({getattr(e, 'msg', e)}); restore the {what}")


def read_json(path, what: str = "config", limit: int = MAX_JSON) -> dict:
    """A JSON object from a regular file of at most `limit` bytes."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FormatError(f"{path} is missing: the {what} must sit beside the weights")
    except OSError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise FormatError(f"{path} is a directory, not a JSON file: restore the {what}")
    data = loads(read_bytes(path, what, limit), path, what)
    if not isinstance(data, dict):
        raise FormatError(f"{path} must hold a JSON object: restore the {what}")
    return data
