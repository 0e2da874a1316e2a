"""GGUF checkpoints on a memory map: metadata as plain Python values, tensors as zero-copy byte views."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from moecli.errors import MoecliError, UnsupportedError
from moecli.formats.tensor import TensorData, check_size

_SHARD = re.compile(r"^(?P<stem>.*)-(?P<idx>\d{5})-of-(?P<n>\d{5})\.gguf$")


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


def _open(path: Path) -> GGUFReader:
    if not path.exists():
        raise MoecliError(f"{path}: no such file")
    if path.is_dir():
        raise MoecliError(f"{path}: is a directory, not a GGUF file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise MoecliError(f"{path}: not a GGUF file (bad magic)")
    try:
        return GGUFReader(path, "r")
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):
            raise UnsupportedError(f"{path.name}: unsupported tensor type ({e})") from None
        raise MoecliError(f"{path.name}: corrupt or truncated GGUF ({e})") from None
    except (IndexError, OverflowError, KeyError, UnicodeDecodeError) as e:
        raise MoecliError(f"{path.name}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from None


class GGUFFile:
    """A GGUF model (one file or all shards of a split one), memory-mapped read-only."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.paths = shard_paths(self.path)
        self._fields: dict[str, object] = {}
        self._values: dict[str, object] = {}
        self.tensors: dict[str, TensorData] = {}
        for p in self.paths:
            reader = _open(p)
            size = reader.data.nbytes
            for key, field in reader.fields.items():
                if not key.startswith("GGUF."):
                    self._fields.setdefault(key, field)
            for t in reader.tensors:
                ne = tuple(int(x) for x in t.shape)
                if t.data_offset + t.n_bytes > size:
                    raise MoecliError(f"{p.name}: truncated GGUF (tensor {t.name} ends past the end of the file)")
                check_size(t.name, t.tensor_type, ne, t.n_bytes)
                raw = reader.data[t.data_offset:t.data_offset + t.n_bytes]
                self.tensors[t.name] = TensorData(t.name, GGMLQuantizationType(t.tensor_type), ne, raw)
        self.file_bytes = sum(p.stat().st_size for p in self.paths)

    def keys(self):
        return self._fields.keys()

    def get(self, key: str, default=None):
        """A metadata value, converted on first use (big arrays like the vocabulary cost time)."""
        if key not in self._values:
            field = self._fields.get(key)
            if field is None:
                return default
            self._values[key] = _value(field)
        return self._values[key]

    @property
    def arch(self) -> str:
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise MoecliError(f"{self.path.name}: GGUF has no general.architecture")
        return arch

    def arch_get(self, key: str, default=None):
        """`{arch}.key` from the metadata."""
        return self.get(f"{self.arch}.{key}", default)

    def require(self, key: str):
        value = self.arch_get(key)
        if value is None:
            raise MoecliError(f"{self.path.name}: GGUF metadata lacks {self.arch}.{key}")
        return value


def _value(field):
    """A GGUF field as a plain Python value (str, int, float, bool or list of those)."""
    value = field.contents()
    if isinstance(value, np.generic):
        return value.item()
    return value
