"""Token counts and rates of chat answers, and the expert placement line (`--verbose`, `/stats`).

The expert line reads the model's `stats` attribute when it has one (the hybrid executor's counters: activations,
device-cache hits, experts run on the CPU and on the device) and reports "100% CPU" otherwise (every expert runs on
the ggml CPU engine), like ollama's PROCESSOR column.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TurnStats:
    """One answer: the prompt (all its tokens, and those actually computed, the rest came from the KV cache)."""

    prompt_tokens: int = 0
    prompt_new: int = 0
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0  # from the first generated token to the last one: gen_tokens - 1 decode steps

    @property
    def prompt_rate(self) -> float | None:
        return self.prompt_new / self.prompt_s if self.prompt_s > 0 and self.prompt_new else None

    @property
    def gen_rate(self) -> float | None:
        return (self.gen_tokens - 1) / self.gen_s if self.gen_s > 0 and self.gen_tokens > 1 else None


@dataclass
class Totals(TurnStats):
    """The whole session: sums of the answers' counts and times."""

    answers: int = 0
    decode_steps: int = 0

    def add(self, t: TurnStats) -> None:
        self.answers += 1
        self.prompt_tokens += t.prompt_tokens
        self.prompt_new += t.prompt_new
        self.prompt_s += t.prompt_s
        self.gen_tokens += t.gen_tokens
        self.decode_steps += max(t.gen_tokens - 1, 0)
        self.gen_s += t.gen_s

    @property
    def gen_rate(self) -> float | None:
        return self.decode_steps / self.gen_s if self.gen_s > 0 and self.decode_steps else None


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _rate(r: float | None) -> str:
    return f"{r:.1f} tok/s" if r is not None else "- tok/s"


def format_turn(t: TurnStats) -> str:
    cached = t.prompt_tokens - t.prompt_new
    prompt = f"prompt {t.prompt_tokens} tokens" + (f" ({cached} cached)" if cached > 0 else "")
    return f"{prompt}, {_rate(t.prompt_rate)} | generated {t.gen_tokens} tokens, {_rate(t.gen_rate)}"


def format_totals(t: Totals) -> str:
    return (f"{t.answers} answer{'s' if t.answers != 1 else ''} | prompt {t.prompt_new} tokens computed, "
            f"{_rate(t.prompt_rate)} | generated {t.gen_tokens} tokens, {_rate(t.gen_rate)}")


def format_context(used: int, size: int) -> str:
    return f"{used} / {size} tokens ({100.0 * used / size:.0f}%)" if size else f"{used} tokens"


def dense_line(info: dict) -> str | None:
    """The device bytes of the dense weights against their file bytes (the kernels read them in place: ~1.0x)."""
    dev, file = info.get("dense_device_bytes"), info.get("dense_file_bytes")
    if not dev or not file:
        return None
    return f"dense weights on the device: {_gb(dev)} = {dev / file:.2f}x their file bytes ({_gb(file)})"


# --- experts -------------------------------------------------------------------------------------------------------
_COUNTERS = ("active", "hits", "cpu_experts", "device_experts")
_HOT_PATH = ("syncs", "launches", "calls")  # host<->device synchronisations, device kernels, forward passes


def snapshot(model) -> dict | None:
    """The model's expert counters now (a dict), or None when it exposes none."""
    s = getattr(model, "stats", None)
    if s is None:
        return None
    if hasattr(s, "as_dict"):
        s = s.as_dict()
    elif not isinstance(s, dict):
        s = vars(s)
    return {k: s[k] for k in _COUNTERS + _HOT_PATH if isinstance(s.get(k), (int, float))} or None


def device_name(model) -> str:
    """'GPU' for CUDA, else torch's name for the device ('cpu'): never 'GPU' for a device that is not one."""
    from moecli.devices import label

    return label(getattr(model, "device", "cpu"))


def format_experts(model, before: dict | None = None, after: dict | None = None) -> str:
    """'expert cache hit rate 87.5% | 48%/52% CPU/GPU | 2.0 syncs, 36.0 launches per token' for the counters
    between two snapshots, else '100% CPU'. On torch's CPU device the split reads 'CPU/torch-cpu': the ggml CPU
    engine and torch's cpu device (no GPU). Syncs and launches are per forward pass: per token in decode (a
    prompt is one pass too)."""
    after = after if after is not None else snapshot(model)
    dev = device_name(model)
    if not after:
        # No placement counters: the ggml engine runs everything on the CPU; the torch engine on its device.
        on_gpu = getattr(model, "engine", "ggml") == "torch" and dev == "GPU"
        return "100% GPU" if on_gpu else "100% CPU"
    d = {k: after.get(k, 0) - (before or {}).get(k, 0) for k in _COUNTERS + _HOT_PATH}
    if d["cpu_experts"] + d["device_experts"] <= 0 and d["active"] <= 0:
        d = {k: after.get(k, 0) for k in _COUNTERS + _HOT_PATH}  # nothing ran in between: the cumulative picture
    parts = []
    if d["active"] > 0:
        parts.append(f"expert cache hit rate {100.0 * d['hits'] / d['active']:.1f}%")
    n = d["cpu_experts"] + d["device_experts"]
    host, device = "CPU", ("GPU" if dev == "GPU" else f"torch-{dev}")
    if n > 0:
        cpu = round(100.0 * d["cpu_experts"] / n)
        parts.append(f"100% {host}" if cpu == 100 else f"100% {device}" if cpu == 0
                     else f"{cpu}%/{100 - cpu}% {host}/{device}")
    if d["calls"] > 0 and "syncs" in after:
        parts.append(f"{d['syncs'] / d['calls']:.1f} syncs, {d['launches'] / d['calls']:.1f} launches per token")
    return " | ".join(parts) or "100% CPU"
