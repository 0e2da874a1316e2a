"""Context length and memory, checked before anything is allocated.

The KV cache is preallocated for the whole context (float32 K and V on every layer, as both engines keep it), so
a context the host cannot hold must be refused up front: one `error:` line at once, not minutes of swapping and an
allocation failure. Without `-c` the model's trained length is the default, shortened (and said so) when its cache
would not fit; a context beyond the trained length runs, with a warning, as llama.cpp does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from moecli.errors import MoecliError

KV_BYTES = 4              # float32 K/V elements (KVCache, GgmlKVCache)
RAM_SHARE = 0.9           # of the RAM available now: the rest stays for the OS, activations and page cache
TOTAL_SHARE = 0.95        # weights + KV cache against all of RAM (the weights are memory-mapped)
MIN_CTX = 256             # the smallest context worth running (one KV padding block)
ROUND = 1024              # a shortened default context is a multiple of this


def fmt_gib(n: float) -> str:
    for unit, scale in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.0f} KiB"


def kv_bytes_per_token(c, elem_bytes: int = KV_BYTES) -> int:
    """K + V bytes one token takes in the cache over its attention layers (the layouts of KVCache, GgmlKVCache,
    MLACache) at `elem_bytes` per element, plus its row of the RoPE tables. Recurrent layers (Gated DeltaNet) hold a
    fixed-size state instead, whatever the context."""
    from moecli.models.loader import GGUF_ARCHS

    kv_heads, k_dims, v_dims = GGUF_ARCHS[c.arch].kv_shape(c)  # the family's cache layout
    per_layer = kv_heads * (k_dims + v_dims)
    return (c.n_layer - len(c.recurrent_layers)) * per_layer * elem_bytes + 2 * c.rope_dim * 4


@dataclass
class Budget:
    """Bytes the KV cache may take on one device, and how output names that memory."""

    free: int
    where: str

    @classmethod
    def for_device(cls, device: str, resident_bytes: int) -> "Budget":
        """What is left for the KV cache after `resident_bytes` of weights on the same memory."""
        if str(device).startswith("cuda"):
            import torch

            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return cls(int(free * RAM_SHARE) - resident_bytes, f"{device} has {fmt_gib(free)} free")
        import psutil

        vm = psutil.virtual_memory()
        free = min(int(vm.available * RAM_SHARE), int(vm.total * TOTAL_SHARE) - resident_bytes)
        return cls(free, f"this host has {fmt_gib(vm.available)} of RAM available")


@dataclass
class ContextPlan:
    n_ctx: int
    kv_bytes: int
    notes: list[str] = field(default_factory=list)  # one line each: what was chosen or risked, for stderr


def fit_context(n_ctx: int | None, n_ctx_train: int, per_token: int, budget: Budget,
                flag: str = "-c") -> ContextPlan:
    """The context to allocate: `n_ctx` if its cache fits (warning beyond the trained length), else an error;
    None -> the trained length, or the largest multiple of ROUND tokens that fits, said in a note."""
    if n_ctx is not None and n_ctx < 1:
        raise MoecliError(f"{flag} {n_ctx}: the context must be at least 1 token")
    fits = max(budget.free, 0) // max(per_token, 1)
    if n_ctx is None:
        if n_ctx_train * per_token <= budget.free:
            return ContextPlan(n_ctx_train, n_ctx_train * per_token)
        ctx = fits // ROUND * ROUND or fits
        if ctx < MIN_CTX:
            raise MoecliError(f"not enough memory for a KV cache: {budget.where}, {MIN_CTX} tokens need "
                              f"{fmt_gib(MIN_CTX * per_token)}")
        return ContextPlan(ctx, ctx * per_token, [
            f"context {ctx} tokens: the model's trained {n_ctx_train} would need {fmt_gib(n_ctx_train * per_token)}"
            f" of KV cache and {budget.where} ({flag} N sets it)"])
    need = n_ctx * per_token
    if need > budget.free:
        hint = (f"use {flag} {min(fits // ROUND * ROUND or fits, n_ctx_train)} or less" if fits >= MIN_CTX
                else "the weights alone fill it")
        raise MoecliError(f"{flag} {n_ctx}: a {n_ctx}-token context needs {fmt_gib(need)} of KV cache "
                          f"({fmt_gib(per_token)} per token) and {budget.where}: {hint}")
    notes = []
    if n_ctx > n_ctx_train:
        notes.append(f"warning: {flag} {n_ctx} is beyond the model's trained context of {n_ctx_train} tokens: "
                     f"answers past {n_ctx_train} tokens may degrade")
    return ContextPlan(n_ctx, need, notes)


def check_weights(weight_bytes: int, what: str) -> None:
    """Refuse before loading what this host cannot hold: memory-mapped weights must fit in RAM to run at speed."""
    import psutil

    total = psutil.virtual_memory().total
    if weight_bytes > TOTAL_SHARE * total:
        raise MoecliError(f"not enough memory: {what} need about {fmt_gib(weight_bytes)}; this host has "
                          f"{fmt_gib(total)} of RAM")
