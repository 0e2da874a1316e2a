"""Cost model: time of one routed expert on the CPU, on the device, and to copy it, from a host profile.

    cpu(n)  = a·n + b   (+ first_ms once per layer when the CPU runs any expert: thread-pool wake-up, graph)
    dev(n)  = g0 + g1·n
    copy    = quantized expert bytes / pinned host→device bandwidth + per-copy latency

b and g0 are the weight-streaming terms (bytes / achievable memory bandwidth: decode is memory-bound), a and g1 the
compute terms (FLOPs per token / achievable throughput: prefill becomes compute-bound). A profile may instead carry
measured a, b per model and quant (`[[cpu.fit]]`), which then win. Schema: profiles/README.md.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from moecli.errors import MoecliError
from moecli.policy.geometry import ModelGeometry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class HostProfile:
    name: str
    raw: dict

    def section(self, key: str) -> dict:
        return self.raw.get(key, {})

    def _num(self, sec: str, key: str, default: float | None = None) -> float:
        v = self.section(sec).get(key, default)
        if v is None:
            raise MoecliError(f"host profile {self.name!r}: missing [{sec}] {key}")
        if not isinstance(v, (int, float)) or v < 0:
            raise MoecliError(f"host profile {self.name!r}: [{sec}] {key} must be a non-negative number")
        return float(v)

    def _quant(self, sec: str, quant: str, key: str, default: float | None = None) -> float:
        q = self.section(sec).get("quant", {}).get(quant.upper(), {})
        if key in q:
            return float(q[key])
        return self._num(sec, key, default)


def load_profile(path: str | Path) -> HostProfile:
    p = Path(path)
    if not p.is_file():
        raise MoecliError(f"host profile not found: {p}")
    try:
        raw = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MoecliError(f"host profile {p} is not valid TOML: {e}") from None
    for sec in ("cpu", "gpu", "pcie"):
        if sec not in raw:
            raise MoecliError(f"host profile {p}: missing [{sec}] section")
    return HostProfile(raw.get("host", {}).get("name", p.stem), raw)


@dataclass(frozen=True)
class CostModel:
    """Per-expert costs in milliseconds; the same for every layer of one model (experts share shape and quant)."""

    cpu_a: float      # ms per token on the CPU
    cpu_b: float      # ms per expert on the CPU
    cpu_first: float  # ms once per layer if the CPU runs anything
    dev_g0: float     # ms per expert on the device
    dev_g1: float     # ms per token on the device
    copy_ms: float    # ms to copy one expert host -> device
    expert_bytes: int = 0
    dense_fixed: float = 0.0   # device ms per layer for attention/router/shared experts: weight streaming
    dense_per_tok: float = 0.0  # device ms per token per layer for the same (compute)
    head_ms: float = 0.0       # device ms per forward pass for the output head
    gpu_expert_capacity: int = 0  # experts the device could hold (memory), informational
    # Measured piecewise CPU fit ((tokens_max, a, b), ...) by increasing tokens_max: ggml's time per expert is not
    # one line in n (compute-bound for a few tokens, nearly flat up to ~16, then linear again); a, b above stay the
    # single-line fit for code that wants one.
    cpu_pieces: tuple = ()

    def cpu(self, n: int) -> float:
        for top, a, b in self.cpu_pieces:
            if n <= top:
                return a * n + b
        if self.cpu_pieces:
            _, a, b = self.cpu_pieces[-1]
            return a * n + b
        return self.cpu_a * n + self.cpu_b

    def dev(self, n: int) -> float:
        return self.dev_g0 + self.dev_g1 * n

    def dense(self, n_tokens: int) -> float:
        return self.dense_fixed + self.dense_per_tok * n_tokens

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @staticmethod
    def from_dict(d: dict) -> "CostModel":
        d = dict(d)
        d["cpu_pieces"] = tuple(tuple(p) for p in d.get("cpu_pieces", ()))
        return CostModel(**d)

    @staticmethod
    def simple(cpu_a: float, cpu_b: float, dev_g0: float, dev_g1: float, copy_ms: float,
               cpu_first: float = 0.0) -> "CostModel":
        """A cost model from bare numbers (tests, the released HybriMoE constants)."""
        return CostModel(cpu_a, cpu_b, cpu_first, dev_g0, dev_g1, copy_ms)


def build_cost_model(profile: HostProfile, geom: ModelGeometry, quant: str | None = None,
                     pageable: bool = False) -> CostModel:
    q = (quant or geom.default_quant).upper()
    nbytes = geom.expert_bytes(q)
    flops = geom.expert_flops_per_token

    cpu_bw = profile._quant("cpu", q, "mem_bandwidth_gbs") * profile._quant("cpu", q, "mem_efficiency", 0.65)
    cpu_gflops = profile._quant("cpu", q, "gflops")
    a = flops / (cpu_gflops * 1e9) * 1e3
    b = nbytes / (cpu_bw * 1e9) * 1e3
    first = profile._num("cpu", "first_expert_ms", 0.0)
    pieces = ()
    for fit in profile.section("cpu").get("fit", []):  # measured fits win over derived figures
        if str(fit.get("model", "")).lower() == geom.name and str(fit.get("quant", "")).upper() == q:
            a, b = float(fit["a_ms"]), float(fit["b_ms"])
            if fit.get("pieces"):
                pieces = tuple(sorted((float(p["tokens_max"]), float(p["a_ms"]), float(p["b_ms"]))
                                      for p in fit["pieces"]))
                first = float(fit.get("pieces_first_ms", first))

    gpu_bw = profile._num("gpu", "mem_bandwidth_gbs") * profile._num("gpu", "mem_efficiency", 0.7)
    gpu_tflops = profile._quant("gpu", q, "tflops")
    launch = profile._num("gpu", "launch_ms", 0.0)
    g0 = nbytes / (gpu_bw * 1e9) * 1e3 + launch
    g1 = flops / (gpu_tflops * 1e12) * 1e3

    h2d = profile._num("pcie", "h2d_pageable_gbs" if pageable else "h2d_pinned_gbs")
    copy = nbytes / (h2d * 1e9) * 1e3 + profile._num("pcie", "copy_latency_ms", 0.0)

    # Non-expert work per layer on the device: its weights stream once per pass (assumed 4.5 bits/weight like
    # the experts' K-quants), plus a fixed per-layer overhead (kernel launches, norms, sync).
    dense_bytes = geom.dense_params_per_layer * 4.5 / 8
    dense_fixed = dense_bytes / (gpu_bw * 1e9) * 1e3 + profile._num("gpu", "layer_overhead_ms", 0.0)
    dense_per_tok = 2.0 * geom.dense_params_per_layer / (gpu_tflops * 1e12) * 1e3
    head_ms = geom.head_params * 4.5 / 8 / (gpu_bw * 1e9) * 1e3
    mem = profile._num("gpu", "memory_gb", 0.0) * 1e9
    return CostModel(a, b, first, g0, g1, copy, nbytes, dense_fixed, dense_per_tok, head_ms,
                     int(mem // nbytes) if nbytes else 0, pieces)
