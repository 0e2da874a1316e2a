"""What this machine has: CPU (model, cores, ISA), NUMA nodes, RAM, GPUs. Reads only; measures nothing.

ISA flags matter because ggml picks its quantized-matmul kernels by them (AVX2 vs AVX-512, VNNI for int8 dot
products, BF16, AMX tiles), so two hosts with the same core count can differ several-fold per expert.
"""
from __future__ import annotations

import os
import platform
import re
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

# /proc/cpuinfo flag -> the name we report. Order is the order shown.
ISA_FLAGS = {
    "sse4_2": "SSE4.2", "avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C",
    "avx_vnni": "AVX-VNNI", "avx512f": "AVX-512F", "avx512bw": "AVX-512BW", "avx512vl": "AVX-512VL",
    "avx512_vnni": "AVX-512-VNNI", "avx512_bf16": "AVX-512-BF16", "avx512_fp16": "AVX-512-FP16",
    "amx_tile": "AMX-TILE", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16",
    # ARM (the "Features" line)
    "asimd": "NEON", "asimddp": "DOTPROD", "i8mm": "I8MM", "bf16": "BF16", "sve": "SVE", "sve2": "SVE2",
}


@dataclass
class CpuInfo:
    model: str
    physical_cores: int   # cores this process may use (ggml gains nothing from SMT siblings)
    logical_cores: int
    isa: list[str]        # the ISA_FLAGS names present
    arch: str = ""

    @property
    def best_simd(self) -> str:
        for name in ("AMX-INT8", "AVX-512-VNNI", "AVX-512F", "AVX-VNNI", "AVX2", "SVE", "NEON", "AVX"):
            if name in self.isa:
                return name
        return "scalar"


@dataclass
class NumaNode:
    node: int
    cpus: str
    mem_total_bytes: int


@dataclass
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    capability: str = ""


@dataclass
class HostInfo:
    hostname: str
    cpu: CpuInfo
    numa: list[NumaNode]
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: list[GpuInfo] = field(default_factory=list)
    os: str = ""

    @property
    def gpu(self) -> GpuInfo | None:
        """The GPU moecli uses (the first CUDA device), or None."""
        return self.gpus[0] if self.gpus else None

    def as_dict(self) -> dict:
        return asdict(self)


def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo (empty where there is none: macOS, containers that hide it)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if out:
                break
            continue
        k, _, v = line.partition(":")
        out.setdefault(k.strip().lower(), v.strip())
    return out


def probe_cpu() -> CpuInfo:
    from moecli.kernels.ggml import physical_cores

    info = _cpuinfo()
    model = info.get("model name") or info.get("hardware") or info.get("cpu model") or platform.processor() or "unknown"
    flags = set((info.get("flags") or info.get("features") or "").split())
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuInfo(model=re.sub(r"\s+", " ", model), physical_cores=physical_cores(), logical_cores=logical,
                   isa=[name for flag, name in ISA_FLAGS.items() if flag in flags], arch=platform.machine())


def probe_numa(root: Path = Path("/sys/devices/system/node")) -> list[NumaNode]:
    """One entry per NUMA node; memory per node matters because experts mmap'ed on a remote node stream slower."""
    nodes = []
    for d in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        cpus = (d / "cpulist").read_text().strip() if (d / "cpulist").exists() else ""
        mem = 0
        try:
            m = re.search(r"MemTotal:\s+(\d+)\s*kB", (d / "meminfo").read_text())
            mem = int(m.group(1)) * 1024 if m else 0
        except OSError:
            pass
        nodes.append(NumaNode(int(d.name[4:]), cpus, mem))
    return nodes


def probe_gpus() -> list[GpuInfo]:
    """CUDA devices with total and currently free memory (free is what a plan can use: other processes count)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        props = torch.cuda.get_device_properties(i)
        out.append(GpuInfo(i, props.name, int(total), int(free), f"{props.major}.{props.minor}"))
    return out


def probe() -> HostInfo:
    import psutil

    vm = psutil.virtual_memory()
    return HostInfo(hostname=socket.gethostname(), cpu=probe_cpu(), numa=probe_numa(),
                    ram_total_bytes=int(vm.total), ram_available_bytes=int(vm.available), gpus=probe_gpus(),
                    os=f"{platform.system()} {platform.release()}")
