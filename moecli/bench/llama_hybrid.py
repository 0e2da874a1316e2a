"""llama.cpp's own hybrid for `bench --vs-llama-cpp`: `-ngl 99` with the routed experts of some layers kept on the
CPU, built the way llama.cpp's `--n-cpu-moe N` / `-ot` build it (common/arg.cpp, common/common.h): one tensor
buffer-type override per CPU layer, pattern `blk\\.<i>` + LLM_FFN_EXPS_REGEX, buffer type = the CPU's
(`ggml_backend_cpu_buffer_type()`: llama.cpp then still picks its repacked CPU layouts for those tensors). The list
reaches the loader through `llama_model_params.tensor_buft_overrides`, a NULL-terminated array of
`{const char *pattern; ggml_backend_buffer_type_t buft}` that llama-cpp-python leaves as a bare pointer.

Which layers: the same expert bytes on the device as moecli's placement. A layer split keeps its own CPU layers
(`llama-cpp`: all, `n-cpu-moe=N`: the first N MoE layers); a cache of K slots per layer holds K·L experts, so
llama.cpp gets floor(K·L / E) whole device layers, the last ones (policy.core.cpu_layer_count, as plain `n-cpu-moe`).
"""
from __future__ import annotations

import ctypes

from moecli.errors import MoecliError

EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"  # llama.cpp's LLM_FFN_EXPS_REGEX
ALL_LAYERS_NGL = 99  # llama-bench's "-ngl 99": every layer's dense weights on the GPU


class BuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override (include/llama.h)."""
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def cpu_layer_patterns(layers) -> list[str]:
    """`-ot` patterns that keep the routed experts of `layers` (layer indices) on the CPU, one per layer as
    llama.cpp's --n-cpu-moe writes them."""
    return [rf"blk\.{int(l)}{EXPS_REGEX}" for l in layers]


def cpu_layers_for(placement: str, moe_layers: list[int], slots: int, n_expert: int) -> list[int]:
    """The MoE layers whose experts llama.cpp keeps on the CPU for the same expert bytes on the device as
    `placement` with `slots` per layer (layer indices, ascending)."""
    from moecli.policy.core import cpu_layer_count
    from moecli.policy.placement import get_placement

    p = get_placement(placement)
    L = len(moe_layers)
    if p.mode == "layer-split":
        n = cpu_layer_count(p, L, slots, n_expert)
    else:
        n = L - min(slots, n_expert) * L // max(n_expert, 1)
    return list(moe_layers[:n])


class Overrides:
    """The NULL-terminated override array and the pattern strings it points to, alive as long as this object (the
    loader reads them during `llama_model_load_from_file`)."""

    def __init__(self, patterns: list[str], buft: int | None = None):
        import llama_cpp as L

        limit = int(L.llama_max_tensor_buft_overrides())
        if len(patterns) >= limit:  # the terminator takes one entry
            raise MoecliError(f"llama.cpp takes at most {limit - 1} tensor overrides, {len(patterns)} asked for")
        if buft is None:
            from moecli.kernels import ggml  # the same libggml-base as libllama: the same CPU buffer type object

            buft = ggml.ggml_backend_cpu_buffer_type()
        self.patterns = list(patterns)
        self._bytes = [p.encode() for p in patterns]
        self.array = (BuftOverride * (len(patterns) + 1))()
        for i, p in enumerate(self._bytes):
            self.array[i].pattern, self.array[i].buft = p, buft
        self.array[len(patterns)].pattern, self.array[len(patterns)].buft = None, None

    def apply(self, model_params) -> None:
        """Point `llama_model_params.tensor_buft_overrides` at the array (NULL when there is nothing to override)."""
        model_params.tensor_buft_overrides = ctypes.cast(self.array, ctypes.c_void_p) if self.patterns else None


def flags(cpu_layers: list[int], n_moe_layers: int) -> str:
    """The llama.cpp command-line flags this configuration equals (for the report)."""
    if not cpu_layers:
        return f"-ngl {ALL_LAYERS_NGL}"
    if len(cpu_layers) == n_moe_layers:
        return f"-ngl {ALL_LAYERS_NGL} --cpu-moe"
    if cpu_layers == list(range(cpu_layers[-1] + 1)):
        return f"-ngl {ALL_LAYERS_NGL} --n-cpu-moe {len(cpu_layers)}"
    return f'-ngl {ALL_LAYERS_NGL} -ot "blk\\.({"|".join(map(str, cpu_layers))}){EXPS_REGEX}=CPU"'
