"""Options shared by the commands that load a model (chat, serve): one definition each, and the load itself.

How a command loads a model: device (`auto` by default), engine, placement and expert slots, from the flags users
of llama.cpp already type (`-c/--ctx-size`, `-t`, `-ngl`, `--cpu-moe`, `--n-cpu-moe N`, `-fa`) and moecli's own
(`--device`, `--placement`, `--expert-slots`).

- No GPU (or `-ngl 0`): the CPU engine, every expert through ggml; a placement runs the hybrid executor on torch's
  CPU device (for tests and traces).
- A GPU: Mixture-of-Experts models get HybriMoE with the expert slots of this host's profile, or, without one, the
  slots the plan estimates from the probe (what `moecli profile --estimate-only` prints), said in one line; a
  dense model runs wholly on the GPU when its weights (as stored) and f16 KV cache fit, else on the CPU, said in one line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer

from moecli.errors import MoecliError

VRAM_SHARE = 0.9  # of the free VRAM a dense model may fill: the CUDA context and activations need the rest

CTX = typer.Option(None, "-c", "--ctx-size", "--ctx", min=1, show_default=False,
                   help="Context length in tokens (default: the model's trained length, shortened to what fits "
                        "in memory)")
DEVICE = typer.Option("auto", "--device", help="auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N")
N_GPU_LAYERS = typer.Option(None, "-ngl", "--n-gpu-layers", "--gpu-layers", show_default=False,
                            help="llama.cpp's flag: 0 runs everything on the CPU, any N > 0 the GPU (moecli keeps "
                                 "every dense layer there; experts go by the placement)")
THREADS = typer.Option(None, "-t", "--threads", min=1, help="CPU threads for the ggml engine (default: what this "
                                                            "host's profile measured fastest, else all cores)")
PLACEMENT = typer.Option(
    None, "--placement", help="Expert placement for MoE models: hybrimoe, lru, ktransformers, llama-cpp, "
    "n-cpu-moe=N... (default: all experts on the CPU engine without a GPU, hybrimoe with one)")
CPU_MOE = typer.Option(False, "--cpu-moe", "-cmoe", help="llama.cpp's flag: every routed expert on the CPU "
                                                          "(= --placement llama-cpp)")
N_CPU_MOE = typer.Option(None, "--n-cpu-moe", "-ncmoe", show_default=False,
                         help="llama.cpp's flag: the experts of the first N layers on the CPU (= --placement "
                              "n-cpu-moe=N)")
EXPERT_SLOTS = typer.Option(
    None, "--expert-slots", min=0, help="Device expert-cache slots per layer (default: from the host profile, "
    "else estimated from the free VRAM)")
FLASH_ATTN = typer.Option(True, "--flash-attn/--no-flash-attn", "-fa/-no-fa",
                          help="Prompts attend through ggml's flash attention (ggml engine); off: "
                               "llama.cpp's non-flash path, logits bit-identical to it")

EXACT = typer.Option(False, "--exact", help="llama.cpp's own kernel choices, layouts and non-flash attention: "
                                            "logits bit-identical to llama.cpp's CPU backend (F32 KV, flash "
                                            "attention off), every type (the default's kernels are chosen for speed instead)")


def _stderr(line: str) -> None:
    typer.echo(line, err=True)


def load_model(path, ctx: Optional[int], device: str, threads: Optional[int], placement: Optional[str],
               expert_slots: Optional[int], flash_attn: bool, *, n_gpu_layers: Optional[int] = None,
               cpu_moe: bool = False, n_cpu_moe: Optional[int] = None, model_name: Optional[str] = None,
               say: Callable[[str], None] = _stderr, exact: bool = False):
    """moecli.load with every flag above resolved; what was chosen or risked is said in one line each."""
    import moecli

    placement = placement_from_flags(placement, cpu_moe, n_cpu_moe)
    dev = device_from_flags(exact_device(exact, device, n_gpu_layers), n_gpu_layers, say)
    threads = threads or profile_threads(path, model_name)
    if exact and (placement is not None or expert_slots is not None or dev != "cpu"):
        raise MoecliError("--exact runs llama.cpp's CPU kernels: use it without --placement, --cpu-moe, "
                          "--n-cpu-moe, --expert-slots, a GPU device or -ngl N > 0")
    m = moecli.load(path, n_ctx=ctx, threads=threads, flash_attn=flash_attn, exact=exact,
                    **load_options(Path(path), dev, ctx, placement, expert_slots, say, model_name))
    for note in m.notes:
        say(note)
    return m


def exact_device(exact: bool, device: str, n_gpu_layers: int | None) -> str:
    """--exact is llama.cpp's CPU backend: `auto` means the CPU there, GPU or not."""
    return "cpu" if exact and device == "auto" and n_gpu_layers is None else device


def placement_from_flags(placement: str | None, cpu_moe: bool, n_cpu_moe: int | None) -> str | None:
    """llama.cpp's expert flags as moecli placements: --cpu-moe = llama-cpp, --n-cpu-moe N = n-cpu-moe=N."""
    given = [p for p in (placement, "llama-cpp" if cpu_moe else None,
                         f"n-cpu-moe={n_cpu_moe}" if n_cpu_moe is not None else None) if p]
    if len(given) > 1:
        raise MoecliError(f"--placement, --cpu-moe and --n-cpu-moe choose the same thing: give one "
                          f"(got {', '.join(given)})")
    if n_cpu_moe is not None and n_cpu_moe < 0:
        raise MoecliError(f"--n-cpu-moe {n_cpu_moe}: must be >= 0")
    if given:
        from moecli.policy.placement import get_placement

        get_placement(given[0])  # an unknown name is refused before the model loads
    return given[0] if given else None


def device_from_flags(device: str, n_gpu_layers: int | None, say: Callable[[str], None]) -> str:
    """--device with llama.cpp's -ngl: 0 keeps everything on the CPU; N > 0 asks for the GPU (moecli keeps every
    dense layer there, so N only chooses the device); without a GPU -ngl is ignored with a warning, as llama.cpp."""
    from moecli.devices import resolve_device

    if n_gpu_layers is None:
        return resolve_device(device)
    if n_gpu_layers < 0:
        raise MoecliError(f"-ngl {n_gpu_layers}: must be >= 0")
    if n_gpu_layers == 0:
        if device not in ("auto", "cpu"):
            raise MoecliError(f"-ngl 0 keeps every layer on the CPU, but --device {device} asks for another device")
        return "cpu"
    chosen = resolve_device(device)  # a GPU asked for by name and absent: its one-line error
    if chosen == "cpu":
        why = "no GPU found (torch sees no CUDA device)" if device == "auto" else "--device cpu"
        say(f"warning: -ngl {n_gpu_layers}: {why}: running on the CPU")
    return chosen


def load_options(path: Path, device: str, n_ctx: int | None, placement: str | None, expert_slots: int | None,
                 say: Callable[[str], None], model_name: str | None = None) -> dict:
    """Keyword arguments for `moecli.load` on the resolved `device` ('cpu' or 'cuda[:N]')."""
    if device == "cpu":
        if placement is None and expert_slots is None:
            return {"device": "cpu"}
        slots = expert_slots if expert_slots is not None else _slots(path, None, n_ctx, say, model_name)
        return {"device": "cpu", "placement": placement or "hybrimoe", "expert_slots": slots,
                "host_profile": _host_profile(path, model_name)}
    from moecli.models.loader import load_checkpoint

    ckpt = load_checkpoint(path)  # the metadata decides; the weights stay memory-mapped, untouched
    if not ckpt.config.is_moe:
        if placement is not None or expert_slots is not None:
            say("note: placements and expert slots apply to Mixture-of-Experts models; this one is dense")
        return _dense_on_gpu(ckpt, device, n_ctx, say)
    slots = expert_slots if expert_slots is not None else _slots(path, ckpt, n_ctx, say, model_name, device)
    return {"device": device, "placement": placement or "hybrimoe", "expert_slots": slots,
            "host_profile": _host_profile(path, model_name)}


def _host_profile(path: Path, model_name: str | None) -> Path | None:
    """This host's profile for this model (its cost model reaches the executor), None without one."""
    from moecli.profile import store

    return store.find_profile(model_name or path)


def _dense_on_gpu(ckpt, device: str, n_ctx: int | None, say) -> dict:
    """The torch engine on the GPU when its weights (kept as the file stores them: the device kernels read GGUF
    bytes in place) and f16 KV cache fit in its free memory, else the CPU engine."""
    import torch

    from moecli import limits

    c = ckpt.config
    weights = sum(t.nbytes for t in ckpt.tensors.values())
    kv = limits.kv_bytes_per_token(c, elem_bytes=2) * min(n_ctx or c.n_ctx_train, c.n_ctx_train)
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    if weights + kv <= VRAM_SHARE * free:
        return {"device": device, "engine": "torch"}
    say(f"note: this dense model needs {limits.fmt_gib(weights + kv)} on {device} (weights + f16 KV cache) "
        f"and {limits.fmt_gib(free)} is free: running it on the CPU")
    return {"device": "cpu"}


def profile_threads(path: Path, model_name: str | None = None) -> int | None:
    """The CPU thread count this host's profile measured to be the fastest (`moecli profile` says the runtime will
    use it), None without a profile."""
    from moecli.policy.cost import load_profile
    from moecli.profile import store

    found = store.find_profile(model_name or path)
    value = load_profile(found).section("cpu").get("threads") if found is not None else None
    return value if isinstance(value, int) and value > 0 else None


def _slots(path: Path, ckpt, n_ctx: int | None, say, model_name: str | None, device: str | None = None) -> int:
    """Expert slots per layer: this host's profile, else the plan estimated from the probe, said in one line."""
    from moecli.policy.cost import load_profile
    from moecli.profile import store

    found = store.find_profile(model_name or path)
    hp = load_profile(found) if found is not None else None
    # A profile's plan is for the model it was measured with: another model's slots would not fit or waste memory.
    if hp is not None and store.model_key(hp.section("host").get("model")) == store.model_key(model_name or path):
        value = hp.section("plan").get("slots_per_layer")
        if isinstance(value, (int, float)) and value >= 0:
            return int(value)
    if device is None:  # torch's CPU device: a device cache would sit in the same RAM
        say("no profile for this host: 0 expert slots per layer (no GPU); `--expert-slots N` sets them, "
            "`moecli profile` measures this host")
        return 0
    from moecli.profile import plan as P, probe

    gpus = probe.probe_gpus()
    index = int(device.split(":")[1]) if ":" in device else 0
    gpu = gpus[index] if index < len(gpus) else None
    c = ckpt.config
    ctx = min(n_ctx or c.n_ctx_train, c.n_ctx_train)
    p = P.make_plan(P.ModelFacts.from_checkpoint(ckpt, store.model_key(model_name or path) or "model"), gpu, ctx, 1)
    where = f"{gpu.free_bytes / 1e9:.1f} GB of {gpu.name} free" if gpu else "no GPU"
    say(f"no profile for this host: {p.slots_per_layer} of {p.n_expert} expert slots per layer, estimated from the "
        f"probe ({where}, {ctx} tokens of context); `moecli profile` measures this host")
    return p.slots_per_layer
