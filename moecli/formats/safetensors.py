"""Hugging Face checkpoints (config.json + safetensors shards), memory-mapped; never unpickles anything.

The safetensors format is an 8-byte header length, a JSON header and raw little-endian tensors, so a numpy memmap of
each shard gives zero-copy views in every dtype we need (bf16 included, which numpy cannot name).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from moecli.errors import MoecliError, UnsupportedError
from moecli.formats.files import open_regular, read_json
from moecli.formats.tensor import TensorData, check_size

T = GGMLQuantizationType
_DTYPES = {"F32": T.F32, "F16": T.F16, "BF16": T.BF16, "U8": T.I8}  # U8: raw bytes (gpt-oss MXFP4 blocks/scales)


def _read_shard(path: Path) -> dict[str, TensorData]:
    with open_regular(path, "safetensors file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise MoecliError(f"{path.name}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise MoecliError(f"{path.name}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise MoecliError(f"{path.name}: not a safetensors file (header is not JSON)") from None
    base = 8 + n
    entries = _check_header(path, header, size - base)
    data = np.memmap(path, dtype=np.uint8, mode="r") if entries else np.zeros(0, np.uint8)
    out = {}
    for name, dtype, shape, begin, end in entries:
        ne = tuple(reversed(shape)) or (1,)
        check_size(name, dtype, ne, end - begin)
        out[name] = TensorData(name, dtype, ne, data[base + begin:base + end])
    return out


def _check_header(path: Path, header, data_bytes: int) -> list[tuple]:
    """The header's tensors as (name, type, shape, begin, end), each field checked: an object per tensor with a
    known dtype, a list of non-negative integer dims and two integer offsets inside the data section, no two
    tensors overlapping."""
    if not isinstance(header, dict):
        raise MoecliError(f"{path.name}: bad safetensors header (a JSON {type(header).__name__}, not an object)")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise MoecliError(f"{path.name}: bad safetensors header (__metadata__ is not an object)")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        what = f"{path.name}: tensor {name[:80]}"
        if not isinstance(info, dict):
            raise MoecliError(f"{what}: header entry is {type(info).__name__}, not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise UnsupportedError(f"{what} has unsupported dtype {str(dtype)[:20]}")
        # up to 8 dims: a multimodal checkpoint's vision tower (Qwen3.5's Conv3d patch embedding is 5-D) is read
        # past, not refused
        if not isinstance(shape, list) or len(shape) > 8 or \
                any(type(x) is not int or not 0 <= x < 1 << 40 for x in shape):
            raise MoecliError(f"{what}: shape {str(shape)[:60]} is not a list of at most 8 non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or any(type(x) is not int for x in offsets) \
                or not 0 <= offsets[0] <= offsets[1]:
            raise MoecliError(f"{what}: data_offsets {str(offsets)[:60]} is not [begin, end] with 0 <= begin <= end")
        if offsets[1] > data_bytes:
            raise MoecliError(f"{path.name}: truncated (tensor {name[:80]} ends past the end of the file)")
        entries.append((name, _DTYPES[dtype], shape, *offsets))
    spans = sorted((b, e, name) for name, _, _, b, e in entries if e > b)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise MoecliError(f"{path.name}: tensors {first[:60]} and {second[:60]} overlap in the file")
    return entries


class SafetensorsModel:
    """A Hugging Face model directory: `config` (config.json), `tensors` by HF name, and the tokenizer files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MoecliError(f"{self.path}: not a model directory")
        config = self.path / "config.json"
        if not config.exists():
            raise MoecliError(f"{self.path}: no config.json (a Hugging Face model directory needs one)")
        self.config: dict = read_json(config, "config.json")
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise MoecliError(f"{index}: weight_map is not an object of shard file names")
            shards = sorted(set(weight_map.values()))
        else:
            shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not shards:
            pickles = [p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pth", ".pt")]
            hint = " (pickled .bin/.pth weights are never loaded: they can run code)" if pickles else ""
            raise MoecliError(f"{self.path}: no .safetensors weights{hint}")
        self.tensors: dict[str, TensorData] = {}
        for shard in shards:
            p = self.path / shard
            if not p.exists() or p.parent != self.path:
                raise MoecliError(f"{self.path}: missing shard {shard}")
            self.tensors.update(_read_shard(p))
        self.file_bytes = sum((self.path / s).stat().st_size for s in shards)

    @property
    def arch(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]  # types: models.validate
        return str(archs[0])
