"""Opening model files as untrusted input: regular files only, opened without blocking.

A FIFO or a device named `model.gguf` or `config.json` must not stall a command: the file is opened with
O_NONBLOCK (a FIFO without a writer then opens at once) and refused unless fstat says it is a regular file, so there
is no window between the check and the open.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from moecli.errors import MoecliError


def open_regular(path: str | os.PathLike, what: str = "model file"):
    """A binary file object for `path`, refused (MoecliError) unless it is a regular file."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise MoecliError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MoecliError(f"{path}: is a directory, not a {what}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) \
                else "not a regular file"
            raise MoecliError(f"{path}: is {kind}, not a {what} (only regular files are read)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_text(path: str | os.PathLike, what: str = "file", limit: int = 256 << 20) -> str:
    """A regular file's text (UTF-8, at most `limit` bytes)."""
    with open_regular(path, what) as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise MoecliError(f"{path}: {what} is larger than {limit >> 20} MiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MoecliError(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file", expect: type = dict):
    """A regular file's JSON value, which must be a `expect` (dict by default)."""
    try:
        value = json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise MoecliError(f"{path}: invalid JSON ({e})") from None
    except RecursionError:
        raise MoecliError(f"{path}: invalid JSON (nested too deeply)") from None
    if not isinstance(value, expect):
        raise MoecliError(f"{path}: {what} must be a JSON {'object' if expect is dict else expect.__name__}, "
                          f"not {type(value).__name__}")
    return value
