"""Decode segments replayed as CUDA graphs: one launch of the host instead of a dozen per segment.

A decode step alternates device segments of static shape with the executor's host decisions:
  ("attn", l)     the attention block + router of layer l (models/decode.py): RMSNorm ... routing, into buffers
                  allocated once, the position read from a device tensor;
  ("experts", l)  the device-expert group of layer l (runtime/device_cache.py): the grouped kernels over the
                  decode workspace (one token, k pairs: the fixed maximum pair count).
`StepGraphs.run(key, fn, tag, check)` runs `fn` (which must read and write only tensors that live at the same
addresses at every call: static buffers, the KV cache, the weights). On CUDA the first call with a `tag` (the
addresses of the inputs that can change: the cache, the packed buffer) runs eagerly; the second captures `fn` into
a graph, overwrites the `check` tensors with NaN, replays once and compares them with the eager result it just
computed, to rounding (a mismatch: that key stays eager, said once); later calls replay. A new tag (a new cache)
captures again. On any other device, and with MOECLI_CUDA_GRAPHS=0, every call is eager: the same code, the same
segment split.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger("moecli")


def cuda_graphs_enabled(device) -> bool:
    return torch.device(device).type == "cuda" and os.environ.get("MOECLI_CUDA_GRAPHS", "1") not in ("0", "")


class CudaCapture:
    """The real backend: capture `fn` into a torch.cuda.CUDAGraph; returns (replay, fn's result)."""

    def __init__(self, device):
        self.device = torch.device(device)

    def capture(self, fn: Callable[[], Any]):
        g = torch.cuda.CUDAGraph()
        torch.cuda.current_stream(self.device).synchronize()
        # its own (small) pool: the segments allocate nothing that outlives them; thread-local capture errors:
        # the copy engine's worker keeps staging and waiting on its own stream meanwhile
        with torch.cuda.graph(g, capture_error_mode="thread_local"):
            result = fn()
        return g.replay, result


@dataclass
class _Entry:
    tag: tuple
    replay: Callable[[], None] | None = None
    result: Any = None
    eager: bool = False  # the capture failed or did not reproduce the eager result: this key stays eager


class StepGraphs:
    def __init__(self, device, backend=None, enabled: bool | None = None):
        """`backend`: how to capture (default: CUDA graphs where enabled); `enabled=False`: always eager."""
        self.device = torch.device(device)
        if enabled is False:
            backend = None
        elif backend is None and cuda_graphs_enabled(self.device):
            backend = CudaCapture(self.device)
        self.backend = backend  # None: eager everywhere
        self._entries: dict[Any, _Entry] = {}
        self.calls: dict[Any, int] = {}  # key -> calls (tests: the segments a step ran)
        self.captures = self.replays = 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    def run(self, key, fn: Callable[[], Any], tag: tuple = (), check: tuple = ()):
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.backend is None:
            return fn()
        e = self._entries.get(key)
        if e is None or e.tag != tag:  # first sight of these addresses: eager (compiles, warms up)
            self._entries[key] = _Entry(tag)
            return fn()
        if e.eager:
            return fn()
        if e.replay is None:
            return self._capture(key, e, fn, check)
        e.replay()
        self.replays += 1
        return e.result

    def _capture(self, key, e: _Entry, fn, check):
        result = fn()
        want = [t.clone() for t in check]
        try:
            e.replay, e.result = self.backend.capture(fn)
            for t in check:  # scribbled over: the replay must write them again
                t.fill_(float("nan"))
            e.replay()
        except Exception as err:  # a segment that cannot be captured runs eagerly, as before
            log.warning("decode segment %s is not captured as a CUDA graph (%s): it runs eagerly", key, err)
            e.eager, e.replay = True, None
            return fn()
        # float atomics (index_add on CUDA) may sum in another order: equal up to rounding
        if not all(torch.allclose(t, w, rtol=1e-5, atol=1e-6) for t, w in zip(check, want)):
            log.warning("decode segment %s replayed differently from its eager run: it runs eagerly", key)
            e.eager, e.replay = True, None
            return fn()
        self.captures += 1
        return e.result
