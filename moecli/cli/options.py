"""Options shared by the commands that load a model (chat, serve): one definition each, and the load itself."""
from __future__ import annotations

from typing import Optional

import typer

CTX = typer.Option(4096, "-c", "--ctx", min=16, help="Context length in tokens")
DEVICE = typer.Option("cpu", "--device", help="torch device for everything but CPU experts")
THREADS = typer.Option(None, "-t", "--threads", min=1, help="CPU threads for the ggml engine")
PLACEMENT = typer.Option(
    None, "--placement", help="Expert placement for MoE models: hybrimoe, lru, ktransformers, llama-cpp, "
    "n-cpu-moe=N... (default: all experts on the CPU engine without a GPU, hybrimoe with one)")
EXPERT_SLOTS = typer.Option(
    None, "--expert-slots", min=0, help="Device expert-cache slots per layer (default: from the host profile)")
FLASH_ATTN = typer.Option(True, "--flash-attn/--no-flash-attn", "-fa/-no-fa",
                          help="Prompts attend through ggml's flash attention (ggml engine); off: "
                               "llama.cpp's non-flash path, logits bit-identical to it")


def load_model(path, ctx: int, device: str, threads: Optional[int], placement: Optional[str],
               expert_slots: Optional[int], flash_attn: bool):
    import moecli

    return moecli.load(path, device=device, n_ctx=ctx, threads=threads, flash_attn=flash_attn,
                       **placement_options(device, placement, expert_slots))


def placement_options(device: str, placement: str | None, expert_slots: int | None) -> dict:
    """`load()` options for the placement flags: a GPU gets HybriMoE with the profile's slots by default."""
    if placement is None and expert_slots is None and not device.startswith("cuda"):
        return {}
    slots = expert_slots
    if slots is None:
        from moecli.profile import find_profile, no_profile_message

        found = find_profile()
        slots = _profile_slots(found) if found else None
        if slots is None:
            typer.echo(no_profile_message(), err=True)
            slots = 0
    return {"placement": placement or "hybrimoe", "expert_slots": slots}


def _profile_slots(path) -> int | None:
    from moecli.policy.cost import load_profile

    plan = load_profile(path).section("plan")
    value = plan.get("slots_per_layer")
    return int(value) if isinstance(value, (int, float)) else None
