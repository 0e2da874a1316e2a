"""GGUF checkpoints on a memory map: metadata as plain Python values, tensors as zero-copy byte views.

The header is parsed here rather than with `gguf.GGUFReader`, which builds numpy objects for every token of the
vocabulary (1.7 s and ~270 MB of RSS for a 150k vocabulary); big arrays are only located, and decoded on request.
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from moecli.errors import MoecliError, UnsupportedError
from moecli.formats.files import open_regular
from moecli.formats.tensor import TensorData, check_size

_SHARD = re.compile(r"^(?P<stem>.*)-(?P<idx>\d{5})-of-(?P<n>\d{5})\.gguf$")
V = GGUFValueType
_SCALARS = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
            V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}
_NUMPY = {V.UINT8: np.uint8, V.INT8: np.int8, V.UINT16: np.uint16, V.INT16: np.int16, V.UINT32: np.uint32,
          V.INT32: np.int32, V.FLOAT32: np.float32, V.BOOL: np.bool_, V.UINT64: np.uint64, V.INT64: np.int64,
          V.FLOAT64: np.float64}

_KINDS = {**{t: "int" for t in (V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64)},
          V.FLOAT32: "float", V.FLOAT64: "float", V.BOOL: "bool", V.STRING: "str", V.ARRAY: "array"}


def shard_paths(path: Path) -> list[Path]:
    """All files of a split GGUF (`name-00001-of-00003.gguf`), in order; just [path] for a single file."""
    m = _SHARD.match(path.name)
    if not m:
        return [path]
    n = int(m["n"])
    paths = [path.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise MoecliError(f"{path.name}: split GGUF is missing {', '.join(missing)}")
    return paths


class _Cursor:
    """Little-endian reads over the mapped header; running past the end means a truncated file."""

    def __init__(self, buf: mmap.mmap, name: str):
        self.buf, self.pos, self.name = buf, 0, name

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise MoecliError(f"{self.name}: truncated GGUF (header ends early)")
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise MoecliError(f"{self.name}: truncated GGUF (header ends early)")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", "replace")


class _LazyArray:
    """An array value located in the file; decoded the first time it is asked for."""

    def __init__(self, path: Path, vtype: GGUFValueType, count: int, offset: int):
        self.path, self.vtype, self.count, self.offset = path, vtype, count, offset

    def decode(self, buf) -> list:
        if self.vtype in _NUMPY:
            return np.frombuffer(buf, _NUMPY[self.vtype], self.count, self.offset).tolist()
        cur = _Cursor(buf, self.path.name)
        cur.pos = self.offset
        return [_read_value(cur, self.vtype, self.path) for _ in range(self.count)]  # strings


MAX_NESTING = 8  # arrays of arrays: valid GGUF (llama.cpp itself refuses them), never deeper than this here


def _read_value(cur: _Cursor, vtype: GGUFValueType, path: Path, depth: int = 0):
    if vtype in _SCALARS:
        return cur.unpack(_SCALARS[vtype])
    if vtype == V.STRING:
        return cur.string()
    if vtype == V.ARRAY:
        sub = _value_type(cur.unpack("<I"), path)
        count = cur.unpack("<Q")
        # every element takes at least this many bytes: a count the rest of the file cannot hold is corrupt
        least = np.dtype(_NUMPY[sub]).itemsize if sub in _NUMPY else 8 if sub == V.STRING else 12
        if count * least > len(cur.buf) - cur.pos:
            raise MoecliError(f"{path.name}: truncated GGUF (an array of {count} values runs past the end)")
        lazy = _LazyArray(path, sub, count, cur.pos)
        if sub in _NUMPY:
            cur.pos += count * least
        elif sub == V.STRING:
            for _ in range(count):  # walk the length prefixes without decoding the strings
                n = cur.unpack("<Q")  # (not `cur.pos += cur.unpack(...)`: that reads pos before unpack moves it)
                cur.pos += n
        else:  # nested arrays: rare and small; read in place so the cursor moves past them
            if depth >= MAX_NESTING:
                raise MoecliError(f"{path.name}: corrupt GGUF (arrays nested more than {MAX_NESTING} deep)")
            items = [_read_value(cur, sub, path, depth + 1) for _ in range(count)]
            return [v.decode(cur.buf) if isinstance(v, _LazyArray) else v for v in items]
        if cur.pos > len(cur.buf):
            raise MoecliError(f"{path.name}: truncated GGUF (header ends early)")
        return lazy
    raise MoecliError(f"{path.name}: corrupt GGUF (unknown value type {vtype})")


def _value_type(raw: int, path: Path) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise MoecliError(f"{path.name}: corrupt GGUF (unknown value type {raw})") from None


def _parse(path: Path):
    """-> (metadata {key: value or _LazyArray}, tensors {name: TensorData}, mmap kept alive by the views).

    The layout is checked as llama.cpp's gguf reader checks it, so both read a file the same way: unique keys and
    tensor names, 1-4 dimensions, tensors one after the other from the aligned data start (each at the previous
    one's end rounded up to `general.alignment`, a power of two), the last one inside the file and nothing after it
    (a header whose n_tensors is too low leaves tensors there).
    """
    with open_regular(path, "GGUF file") as f:
        if f.read(4) != b"GGUF":
            raise MoecliError(f"{path}: not a GGUF file (bad magic)")
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise MoecliError(f"{path.name}: truncated GGUF (header ends early)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf, path.name)
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise UnsupportedError(f"{path.name}: GGUF version {version} is not supported (2 and 3 are; a big-endian "
                               "file reads as a huge version)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    # a key/value takes at least 13 bytes, a tensor info 24: counts the file cannot hold are corrupt
    if n_tensors > 1 << 24 or n_kv > 1 << 24 or 13 * n_kv + 24 * n_tensors > len(buf):
        raise MoecliError(f"{path.name}: corrupt GGUF (implausible counts: {n_tensors} tensors, {n_kv} keys)")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        if key in meta:
            raise MoecliError(f"{path.name}: corrupt GGUF (duplicate key {key})")
        meta[key] = _read_value(cur, _value_type(cur.unpack("<I"), path), path)
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if not 1 <= n_dims <= 4:
            raise MoecliError(f"{path.name}: corrupt GGUF (tensor {name} has {n_dims} dimensions)")
        ne = tuple(cur.unpack("<Q") for _ in range(n_dims))
        raw_type, offset = cur.unpack("<I"), cur.unpack("<Q")
        try:
            ttype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise UnsupportedError(f"{path.name}: tensor {name} has unsupported tensor type {raw_type}") from None
        if any(n < 1 for n in ne) or math.prod(ne) >= 1 << 60:
            raise MoecliError(f"{path.name}: corrupt GGUF (tensor {name} has shape {list(ne)})")
        infos.append((name, ne, ttype, offset))
    align = meta.get("general.alignment", 32)
    if type(align) is not int or align <= 0 or align & (align - 1):
        raise MoecliError(f"{path.name}: corrupt GGUF (general.alignment = {align!r}: not a power of two)")
    data_start = (cur.pos + align - 1) // align * align
    data = np.frombuffer(buf, dtype=np.uint8)
    tensors = {}
    expected = 0  # where the next tensor starts, relative to the data section
    for name, ne, ttype, offset in infos:
        if ttype not in GGML_QUANT_SIZES:
            raise UnsupportedError(f"{path.name}: tensor {name} has unsupported tensor type {ttype.name}")
        if name in tensors:
            raise MoecliError(f"{path.name}: corrupt GGUF (duplicate tensor name {name})")
        block, size = GGML_QUANT_SIZES[ttype]
        nbytes = int(np.prod(ne, dtype=np.int64)) // block * size
        begin = data_start + offset
        if begin + nbytes > len(buf):
            raise MoecliError(f"{path.name}: truncated GGUF (tensor {name} ends past the end of the file)")
        if offset != expected:
            raise MoecliError(f"{path.name}: corrupt GGUF (tensor {name} at data offset {offset}, expected "
                              f"{expected}: tensors follow each other, aligned to {align} bytes)")
        check_size(name, ttype, ne, nbytes)
        tensors[name] = TensorData(name, ttype, ne, data[begin:begin + nbytes])
        expected = (offset + nbytes + align - 1) // align * align
    if len(buf) > data_start + expected:
        raise MoecliError(f"{path.name}: corrupt GGUF ({len(buf) - data_start - expected} bytes after the last "
                          f"tensor: the header's n_tensors = {n_tensors} is lower than the tensors in the file)")
    return meta, tensors, buf


class GGUFFile:
    """A GGUF model (one file or all shards of a split one), memory-mapped read-only."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.paths = shard_paths(self.path)
        self._meta: dict[str, object] = {}
        self._bufs: dict[Path, mmap.mmap] = {}
        self.tensors: dict[str, TensorData] = {}
        for p in self.paths:
            meta, tensors, buf = _parse(p)
            self._bufs[p] = buf
            for key, value in meta.items():
                self._meta.setdefault(key, value)
            self.tensors.update(tensors)
        self.file_bytes = sum(p.stat().st_size for p in self.paths)

    def keys(self):
        return self._meta.keys()

    def get(self, key: str, default=None):
        """A metadata value; big arrays (the vocabulary) are decoded on first use."""
        value = self._meta.get(key, default)
        if isinstance(value, _LazyArray):
            value = self._meta[key] = value.decode(self._bufs[value.path])
        return value

    @property
    def arch(self) -> str:
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise MoecliError(f"{self.path.name}: GGUF has no general.architecture")
        return arch

    def kind(self, key: str) -> str | None:
        """The value's type, without decoding a big array: "int", "float", "bool", "str", "array of <kind>"
        (nested arrays: "array of array"), or None when the key is absent."""
        value = self._meta.get(key)
        if value is None:
            return None
        if isinstance(value, _LazyArray):
            return "array of " + _KINDS[value.vtype]
        if isinstance(value, list):
            return "array of array"
        return {bool: "bool", int: "int", float: "float", str: "str"}[type(value)]

    def array_len(self, key: str) -> int:
        value = self._meta.get(key)
        return value.count if isinstance(value, _LazyArray) else len(value)

    def arch_get(self, key: str, default=None):
        """`{arch}.key` from the metadata."""
        return self.get(f"{self.arch}.{key}", default)

    def require(self, key: str):
        value = self.arch_get(key)
        if value is None:
            raise MoecliError(f"{self.path.name}: GGUF metadata lacks {self.arch}.{key}")
        return value
