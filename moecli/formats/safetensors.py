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
from moecli.formats.tensor import TensorData, check_size

T = GGMLQuantizationType
_DTYPES = {"F32": T.F32, "F16": T.F16, "BF16": T.BF16, "U8": T.I8}  # U8: raw bytes (gpt-oss MXFP4 blocks/scales)


def _read_shard(path: Path) -> dict[str, TensorData]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MoecliError(f"{path.name}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise MoecliError(f"{path.name}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MoecliError(f"{path.name}: not a safetensors file (header is not JSON)") from None
    data = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise UnsupportedError(f"{path.name}: tensor {name} has unsupported dtype {info.get('dtype')}")
        begin, end = info["data_offsets"]
        if base + end > size:
            raise MoecliError(f"{path.name}: truncated (tensor {name} ends past the end of the file)")
        ne = tuple(reversed([int(x) for x in info["shape"]])) or (1,)
        check_size(name, dtype, ne, end - begin)
        out[name] = TensorData(name, dtype, ne, data[base + begin:base + end])
    return out


class SafetensorsModel:
    """A Hugging Face model directory: `config` (config.json), `tensors` by HF name, and the tokenizer files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MoecliError(f"{self.path}: not a model directory")
        config = self.path / "config.json"
        if not config.exists():
            raise MoecliError(f"{self.path}: no config.json (a Hugging Face model directory needs one)")
        try:
            self.config: dict = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise MoecliError(f"{config}: invalid JSON ({e})") from None
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return str(archs[0])
