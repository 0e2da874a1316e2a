"""Named placements: the same names in the simulator and the executor.

  llama-cpp          all routed experts on the CPU, everything else on the device (llama.cpp --cpu-moe); as in
                     llama.cpp, a batch of >= 32 tokens copies a CPU layer's whole expert tensors to the device
  n-cpu-moe=N        llama.cpp's layer split: experts of the first N layers on the CPU, of the others on the device
                     (plain `n-cpu-moe` takes N from the cache ratio: the device holds the same expert bytes)
  ktransformers      N static device experts per layer (most popular in a calibration profile), the rest on the CPU
  lru                device cache with LRU; experts run where they are; a missed expert is copied in when the copy
                     engine is idle (every dynamic cache below keeps this background admission; prefetch goes first)
  hybrimoe           HybriMoE: intra-layer scheduling (paper's rules) + impact-driven prefetch + MRS caching
  hybrimoe-sched     lru + scheduling          (ablations: one mechanism each)
  hybrimoe-prefetch  lru + prefetch
  hybrimoe-cache     lru with MRS instead of LRU
  hybrimoe-exact     hybrimoe with the exact scheduler instead of the greedy one
  oracle             Belady's MIN cache with bypass + exact scheduling + prefetch from true routing (a bound)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from moecli.errors import MoecliError


@dataclass(frozen=True)
class Placement:
    name: str
    mode: str = "cache"                 # "cache" | "layer-split"
    cache: str | None = None            # lru | lfu | mrs | static | belady
    scheduler: str | None = None        # greedy | exact | None: experts run where they are
    prefetch: bool = False
    background_admit: bool = False      # copy a missed expert in when the copy engine is idle
    n_cpu_moe: int | None = None        # layer-split: CPU layers (None: from the cache ratio)
    perfect_prediction: bool = False
    offload_min_batch: int = 32         # llama.cpp op offload threshold for CPU-layer experts


PLACEMENTS: dict[str, Placement] = {p.name: p for p in [
    Placement("llama-cpp", mode="layer-split", n_cpu_moe=-1),
    Placement("n-cpu-moe", mode="layer-split"),
    Placement("ktransformers", cache="static"),
    Placement("lru", cache="lru", background_admit=True),
    Placement("hybrimoe", cache="mrs", scheduler="greedy", prefetch=True, background_admit=True),
    Placement("hybrimoe-sched", cache="lru", scheduler="greedy", background_admit=True),
    Placement("hybrimoe-prefetch", cache="lru", prefetch=True, background_admit=True),
    Placement("hybrimoe-cache", cache="mrs", background_admit=True),
    Placement("hybrimoe-exact", cache="mrs", scheduler="exact", prefetch=True, background_admit=True),
    Placement("oracle", cache="belady", scheduler="exact", prefetch=True, background_admit=True,
              perfect_prediction=True),
]}

DEFAULT_POLICIES = ["llama-cpp", "n-cpu-moe", "ktransformers", "lru", "hybrimoe", "hybrimoe-sched",
                    "hybrimoe-prefetch", "hybrimoe-cache", "hybrimoe-exact", "oracle"]
ONLINE_BASELINES = ["llama-cpp", "n-cpu-moe", "ktransformers", "lru"]


def get_placement(name: str) -> Placement:
    key = name.strip().lower()
    if key.startswith("n-cpu-moe="):
        try:
            n = int(key.split("=", 1)[1])
        except ValueError:
            raise MoecliError(f"bad placement {name!r}: n-cpu-moe=N needs an integer N") from None
        if n < 0:
            raise MoecliError(f"bad placement {name!r}: N must be >= 0")
        return replace(PLACEMENTS["n-cpu-moe"], name=key, n_cpu_moe=n)
    if key not in PLACEMENTS:
        raise MoecliError(f"unknown placement {name!r} (known: {', '.join(PLACEMENTS)}, n-cpu-moe=N)")
    return PLACEMENTS[key]
