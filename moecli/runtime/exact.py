"""The CPU engine's kernel choices in one place: moecli's fast default, or exact mode (`moecli.load(path,
exact=True)`, `--exact`): llama.cpp's own choices, so every architecture and type — Q4_K_M's mixes included — gives
llama.cpp's logits bit for bit (its CPU backend with an F32 KV cache and flash attention off).

What llama.cpp's CPU backend does (src/llama-model-loader.cpp `select_weight_buft`, ggml-cpu/repack.cpp):
- a weight lives in the CPU_REPACK buffer when its op is mul_mat (2-D) or mul_mat_id (3-D) and its type has an
  interleaved kernel on this CPU for its shape (x86: Q4_0, Q4_K, IQ4_NL, MXFP4 with AVX2, Q2_K with AVX-512, rows
  % 8 == 0; the buffer type itself decides, see `kernels.ggml.repack`). Routers are mul_mat weights like any other;
  token_embd is read by get_rows and keeps the file layout; a tied output head is a second copy, repacked;
- those copies serve every batch, prompt and decode;
- a layer's routed experts run as one mul_mat_id (build_moe_ffn) at every batch size;
- attention takes the non-flash path (kq, soft_max, kqv).

The fast default departs from that where it measured faster (FACTS §1): dense weights use their repacked copies for
decode only (this CPU's AVX-512 kernels on the file layout beat the interleaved gemm on prompts), experts are repacked
only for the DEFAULT_REPACK types (MOECLI_REPACK sets them), a prompt's Q8_0/F16 experts (and repacked ones from 8
tokens per expert) run per expert where that beats mul_mat_id, and prompts attend through flash attention.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

# Expert types repacked in place by default. Measured on an AVX-512 host (qwen3-30b-a3b layer, 2 threads): repacked
# MXFP4 1.35-1.6x faster at 1..512 tokens; repacked Q4_K 1.6x faster in decode and, run per expert (its gemm) from 8
# tokens per expert, as fast as the file's layout on prompts (mul_mat_id on repacked Q4_K runs a gemv per row: 1.8x
# slower there).
DEFAULT_REPACK = "MXFP4,Q4_K"


@dataclass(frozen=True)
class Kernels:
    exact: bool = False
    flash_attn: bool = True  # prompts through ggml's flash attention (never in exact mode)

    @classmethod
    def choose(cls, exact: bool, flash_attn: bool = True) -> "Kernels":
        return cls(exact, flash_attn and not exact)

    @property
    def expert_kernel(self) -> str:
        """CpuExperts' kernel: llama.cpp's one mul_mat_id, or chosen by batch shape."""
        return "id" if self.exact else "auto"

    def expert_repack_types(self) -> list[str] | None:
        """The expert stack types to repack: None for every type ggml has an interleaved kernel for (exact)."""
        if self.exact:
            return None
        types = os.environ.get("MOECLI_REPACK", DEFAULT_REPACK)
        return [x for x in types.split(",") if x and x != "none"]

    def repacks(self, key: str) -> bool:
        """Whether the dense weight under this layer-spec key gets a repacked copy: llama.cpp repacks routers too;
        the default leaves them (tiny, and F32 in every file seen)."""
        return self.exact or not key.startswith("ffn_gate_inp")

    @property
    def tied_output_repacked(self) -> bool:
        """A tied output head's own repacked copy (llama.cpp loads it twice: get_rows and mul_mat buffers)."""
        return self.exact

    @property
    def keep_file_layout(self) -> bool:
        """Whether dense weights keep their file bytes beside the repacked copy (the default's prompts read them)."""
        return not self.exact

    def dense_repacked(self, decode: bool) -> bool:
        """Whether a graph's dense matmuls read the repacked copies: always in exact mode, for decode by default."""
        return self.exact or decode

    def split_experts(self) -> bool:
        """Whether a prompt may run its experts outside the graph (per-expert matmuls): never in exact mode."""
        return not self.exact


DEFAULT = Kernels()
