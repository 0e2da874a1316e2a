"""ggml linears and experts for the layer-by-layer CPU path: every weight matmul through ggml on the quantized
weights in place (as llama.cpp computes them), torch doing the glue (norms, RoPE, attention, routing).

The ggml engine runs most checkpoints as one ggml graph instead (runtime/ggml_forward.py); this path serves the
ones it does not take (see `ggml_forward.supported`) and the hybrid executor's CPU side. `repack_weights` gives
weights llama.cpp's repacked layout for either."""
from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from moecli.errors import MoecliError
from moecli.formats.tensor import TensorData
from moecli.kernels import ggml
from moecli.models.config import Checkpoint
from moecli.models.layers import to_torch
from moecli.runtime.cpu_experts import CpuExperts


def repack_weights(ckpt: Checkpoint, types) -> int:
    """Repack the expert stacks of these ggml types (None: of every type ggml has an interleaved kernel for on this
    CPU, as llama.cpp) for llama.cpp's interleaved CPU kernels, in place of the file pages they were read from
    (released). Returns the bytes repacked."""
    try:
        if types is not None:
            types = {T[n.strip().upper()] if isinstance(n, str) else n for n in types}
    except KeyError as e:
        raise MoecliError(f"MOECLI_REPACK: unknown ggml type {e.args[0]} (e.g. Q4_K,MXFP4 or none)") from None
    done = 0
    for s in ckpt.experts.values():
        if s.stacked is not None and (types is None or s.stacked.type in types) and ggml.repack(s.stacked):
            done += s.stacked.nbytes
    return done


def hybrid_threads(device_type: str, cores: int | None = None) -> int:
    """ggml threads in hybrid mode: every core on the CPU device (the main thread waits while ggml runs); with an
    accelerator one core stays for the thread that launches its kernels and the copy engine's staging workers
    (short memcpys), so ggml's spinning workers do not take turns with them."""
    n = cores or ggml.physical_cores()
    return n if device_type == "cpu" else max(1, n - 1)


class GgmlLinear:
    """y = x W^T (+ b) with W read by ggml straight from the memory map."""

    def __init__(self, weight: TensorData, bias: TensorData | None = None):
        self.weight = weight
        self.bias = to_torch(bias, "cpu") if bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = ggml.matmul(self.weight, x)
        return y + self.bias if self.bias is not None else y

    def swiglu(self, up: "GgmlLinear", down: "GgmlLinear", x: torch.Tensor) -> torch.Tensor:
        """down(silu(self x) * up x) as one ggml graph (llama.cpp's fused swiglu), this linear being the gate."""
        if self.bias is not None or up.bias is not None or down.bias is not None:
            return down(torch.nn.functional.silu(self(x)) * up(x))
        return ggml.swiglu_ffn(self.weight, up.weight, down.weight, x)


class GgmlExperts:
    """The experts seam on the CPU engine: all (token, expert) pairs of a layer in one ggml graph."""

    def __init__(self, ckpt: Checkpoint, kernel: str = "auto"):
        layers, biases = {}, {}
        for l in range(ckpt.config.n_layer):
            stacks = [ckpt.experts.get(f"blk.{l}.ffn_{p}_exps") for p in ("gate", "up", "down")]
            if all(stacks):
                layers[l] = tuple(s.stacked if s.stacked is not None else [s.expert(e) for e in range(s.n)]
                                  for s in stacks)
                if any(s.bias is not None for s in stacks):
                    biases[l] = tuple(s.bias for s in stacks)
        self.engine = CpuExperts(layers, kernel=kernel, biases=biases, act=ckpt.config.expert_act)

    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 scores: torch.Tensor | None = None) -> torch.Tensor:
        n, k = ids.shape
        # Token-major pair order: each token's experts are summed in slot order, exactly like llama.cpp.
        tokens = torch.arange(n, dtype=torch.int32).repeat_interleave(k)
        return self.engine.run(layer, hidden.contiguous(), tokens, ids.reshape(-1).to(torch.int32),
                               weights.reshape(-1).contiguous())
