"""Dequantization of checkpoint tensors to float32 on the host."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, quants

from moecli.formats.tensor import PLAIN_DTYPES, TensorData

T = GGMLQuantizationType


def dequantize_numpy(t: TensorData) -> np.ndarray:
    """Float32 copy of `t` in numpy order. Uses ggml's own `to_float` when the binding is available (fast and
    bit-identical to what llama.cpp computes with), else the pure-numpy reference from the gguf package."""
    if t.type in PLAIN_DTYPES:
        return t.raw.view(PLAIN_DTYPES[t.type]).reshape(t.shape).astype(np.float32)
    if t.type == T.BF16:
        return (t.raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(t.shape)
    try:
        from moecli.kernels.ggml import to_float
    except ImportError:
        to_float = None
    if to_float is not None:
        return to_float(t)
    rows = t.raw.reshape(-1, t.row_bytes)
    return quants.dequantize(rows, t.type).reshape(t.shape).astype(np.float32, copy=False)
