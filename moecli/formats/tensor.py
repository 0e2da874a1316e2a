"""One tensor of a checkpoint as it lies in the file: its ggml type, its ggml shape and a zero-copy byte view."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from moecli.errors import MoecliError

T = GGMLQuantizationType
# Types whose bytes numpy can view directly (no block structure).
PLAIN_DTYPES = {T.F32: np.float32, T.F16: np.float16, T.I32: np.int32}


@dataclass(frozen=True)
class TensorData:
    """A checkpoint tensor. `ne` is ggml's order (ne[0] is the contiguous row); `shape` is numpy/torch order.

    `raw` is a 1-D uint8 view of the memory-mapped file: quantized bytes untouched, nothing copied.
    """

    name: str
    type: GGMLQuantizationType
    ne: tuple[int, ...]
    raw: np.ndarray
    # the ggml engine's repacked copy of this tensor (moecli.kernels.ggml.repack), owned with the checkpoint
    repacked: object = field(default=None, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.ne))

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        return self.ne[0] // block * size

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def expert(self, e: int) -> "TensorData":
        """Expert e's 2-D slice of a 3-D `*_exps` tensor (zero-copy)."""
        if len(self.ne) != 3 or not 0 <= e < self.ne[2]:
            raise IndexError(f"{self.name}: no expert {e}")
        per = self.row_bytes * self.ne[1]
        return TensorData(f"{self.name}[{e}]", self.type, self.ne[:2], self.raw[e * per:(e + 1) * per])

    def numpy(self) -> np.ndarray:
        """Float32 values in numpy order (dequantized when the type is quantized; a copy)."""
        from moecli.kernels.dequant import dequantize_numpy

        return dequantize_numpy(self)


def check_size(name: str, ttype: GGMLQuantizationType, ne: tuple[int, ...], nbytes: int) -> None:
    """Refuse tensors whose byte size disagrees with their type and shape (corrupt or truncated files)."""
    if ttype not in GGML_QUANT_SIZES:
        raise MoecliError(f"tensor {name}: unsupported tensor type {ttype!r}")
    block, size = GGML_QUANT_SIZES[ttype]
    if ne[0] % block:
        raise MoecliError(f"tensor {name}: row of {ne[0]} values is not a multiple of the {ttype.name} block ({block})")
    want = int(np.prod(ne)) // block * size
    if want != nbytes:
        raise MoecliError(f"tensor {name}: {nbytes} bytes where {ttype.name} {list(ne)} needs {want} (corrupt file?)")
