"""Experts on the accelerator: fixed slots per layer holding experts in the QUANTIZED form they were copied in
(3-4x less PCIe traffic than fp16). `run` computes all of a layer's device pairs through the grouped Triton kernels
(moecli.kernels.device_ops.grouped_experts: two launches, the weights read in place); where Triton cannot run, each
expert is dequantized by torch right before it computes (the fallback, logged once).

The copy engine is the only CUDA-specific piece: on CUDA a host thread stages the mmap'ed bytes into pinned memory and
issues the copy on its own stream, recording an event the compute stream waits on, so compute waits only for the
expert it needs. On any other device the same interface copies synchronously, so tests exercise the same code.
"""
from __future__ import annotations

import logging
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGMLQuantizationType

from moecli.kernels import device_ops
from moecli.models.config import Checkpoint
from moecli.runtime.experts import expert_biases, expert_ffn
from moecli.runtime.step_graphs import StepGraphs

log = logging.getLogger("moecli")
T = GGMLQuantizationType
_PARTS = ("gate", "up", "down")


def _host(a: np.ndarray) -> torch.Tensor:
    """A CPU tensor over a read-only mmap view; torch warns about non-writable arrays, but we only read it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


class CopyEngine:
    """Host -> device byte copies. `copy()` returns a handle; `wait(handle)` orders the compute stream after it."""

    def __init__(self, device: torch.device, max_bytes: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.bytes_copied = 0
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            # Two pinned staging buffers: stage the next expert while the previous one crosses the bus.
            self._pinned = [torch.empty(max_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self._free = [torch.cuda.Event() for _ in range(2)]
            self._turn = 0
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="moecli-copy")
            self._lock = threading.Lock()

    def copy(self, dst: torch.Tensor, parts: list[np.ndarray]):
        """Copy the concatenation of `parts` (host uint8 views) into `dst` (device uint8)."""
        n = sum(p.nbytes for p in parts)
        self.bytes_copied += n
        if not self.cuda:
            off = 0
            for p in parts:
                dst[off:off + p.nbytes].copy_(_host(p))
                off += p.nbytes
            return None
        # The slot may still be read by kernels queued on the compute stream (the expert it held): the copy waits.
        slot_free = torch.cuda.Event()
        slot_free.record(torch.cuda.current_stream(self.device))
        return self._thread.submit(self._stage_and_copy, dst, parts, n, slot_free)

    def _stage_and_copy(self, dst, parts, n, slot_free) -> torch.cuda.Event:
        with self._lock:
            i = self._turn
            self._turn ^= 1
            self._free[i].synchronize()  # the previous copy out of this staging buffer is done
            buf = self._pinned[i]
            off = 0
            for p in parts:
                buf[off:off + p.nbytes].numpy()[:] = p
                off += p.nbytes
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(slot_free)
                dst[:n].copy_(buf[:n], non_blocking=True)
                self._free[i].record(self.stream)
                done = torch.cuda.Event()
                done.record(self.stream)
            return done

    def wait(self, handle) -> None:
        if handle is None:
            return
        event = handle.result() if isinstance(handle, Future) else handle
        torch.cuda.current_stream(self.device).wait_event(event)

    @staticmethod
    def ready(handle) -> bool:
        if handle is None:
            return True
        if isinstance(handle, Future):
            return handle.done() and handle.result().query()
        return handle.query()


class DeviceExpertCache:
    """`slots` experts per MoE layer resident on `device` as raw GGUF bytes (gate|up|down in one uint8 row)."""

    def __init__(self, ckpt: Checkpoint, device, slots: int, dtype=torch.float32, layers: list[int] | None = None):
        """`layers`: the MoE layers that get slots (default: all); the others' experts never come to the device."""
        from moecli.kernels import torch_dequant

        self.ckpt, self.device, self.slots, self.dtype = ckpt, torch.device(device), slots, dtype
        self._dq = torch_dequant
        c = ckpt.config
        moe = [l for l in range(c.n_layer) if f"blk.{l}.ffn_gate_exps" in ckpt.experts]
        self.layers = moe if layers is None else [l for l in moe if l in set(layers)]
        # Layout of one slot per layer: each part's type, numpy shape, byte offset and size. Types may differ between
        # layers (a Q4_K_M file has Q6_K down projections in some layers), so slots are sized for the largest.
        self.parts: dict[int, list] = {}
        self.host_bf16 = set()
        self.triton = device_ops.use_triton(self.device.type)
        readable = device_ops.TRITON_TYPES if self.triton else torch_dequant.SUPPORTED
        for l in self.layers:
            layout, off = [], 0
            for p in _PARTS:
                t = ckpt.experts[f"blk.{l}.ffn_{p}_exps"].expert(0)
                if t.type not in readable:
                    # No device kernel for this type: dequantize on the host and ship bf16 (2x the bytes of Q8).
                    if t.type not in self.host_bf16:
                        log.warning("expert type %s has no device kernel: experts are dequantized to bf16 when "
                                    "copied in", t.type.name)
                    self.host_bf16.add(t.type)
                    nbytes, ttype = t.n_elements * 2, T.BF16
                else:
                    nbytes, ttype = t.nbytes, t.type
                layout.append((p, t.type, ttype, t.shape, off, nbytes))
                off += nbytes
            self.parts[l] = layout
        off = max((sum(part[-1] for part in lay) for lay in self.parts.values()), default=0)
        self.slot_bytes = off
        n = len(self.layers)
        rows = slots + 1 if slots and n else 0  # + the scratch slot; nothing at all without slots
        self.storage = torch.empty((n, rows, off), dtype=torch.uint8, device=self.device)
        self._index = {l: i for i, l in enumerate(self.layers)}
        self.resident: dict[int, dict[int, int]] = {l: {} for l in self.layers}  # layer -> expert -> slot
        self.pending: dict[tuple[int, int], object] = {}  # (layer, expert) -> copy handle
        self.copy_engine = CopyEngine(self.device, off)
        # The grouped kernels' slot tables (expert -> slot, -1: not on the device in this call), one row per layer,
        # written on the host and copied without a sync (pinned on CUDA). A row is rewritten only in the layer's
        # next step, after that step's router result came back to the host (a stream sync), so its last copy is done.
        E = c.n_expert
        self._tables = torch.full((max(n, 1), E), -1, dtype=torch.int32, pin_memory=self.copy_engine.cuda)
        self._dev_tables = self._tables.to(self.device) if self.copy_engine.cuda else self._tables
        self._tables_np = self._tables.numpy()
        self._scratch_table = torch.full((E,), -1, dtype=torch.int32, device=self.device)
        self._rows = [(self._dev_tables[i], self.storage[i]) for i in range(n)]  # per layer, views made once
        self.top_k = c.n_expert_used
        self._workspaces: dict[tuple[int, int], device_ops.GroupedWorkspace] = {}
        self.graphs = StepGraphs(self.device)  # CUDA: the decode expert group of a layer as one graph replay
        # gpt-oss: every expert's biases stay on the device (a few KB per expert), and its clamped SwiGLU
        self.act = c.expert_act
        bias_dtype = torch.float32 if self.triton else dtype
        self.biases = {l: tuple(t.to(bias_dtype).contiguous() for t in b) for l in self.layers
                       if (b := expert_biases(ckpt, l, self.device)) is not None}
        self.layouts = {l: device_ops.ExpertLayout([(ttype, shape, o) for _, _, ttype, shape, o, _ in lay], off)
                        for l, lay in self.parts.items()}

    @property
    def nbytes(self) -> int:
        return self.storage.numel()

    def _host_parts(self, layer: int, e: int) -> list[np.ndarray]:
        out = []
        for p, file_type, ttype, shape, _, _ in self.parts[layer]:
            t = self.ckpt.experts[f"blk.{layer}.ffn_{p}_exps"].expert(e)
            if ttype != file_type:  # bf16: the top half of the float32 bits, rounded to nearest even
                f = t.numpy().view(np.uint32)
                bf = ((f + 0x7FFF + ((f >> 16) & 1)) >> 16).astype(np.uint16)
                out.append(bf.view(np.uint8).reshape(-1))
            else:
                out.append(t.raw)
        return out

    def load(self, layer: int, e: int, evict: int | None = None) -> None:
        """Copy expert e of `layer` into a free slot, or into `evict`'s slot. Asynchronous on CUDA."""
        res = self.resident[layer]
        if e in res:
            return
        if evict is not None and evict in res:
            slot = res.pop(evict)
            self.pending.pop((layer, evict), None)
        else:
            used = set(res.values())
            slot = next(s for s in range(self.slots) if s not in used)
        res[e] = slot
        dst = self.storage[self._index[layer], slot]
        self.pending[(layer, e)] = self.copy_engine.copy(dst, self._host_parts(layer, e))

    def load_scratch(self, layer: int, e: int) -> None:
        """Bring a non-resident expert into the layer's scratch slot for one use (a policy bypass)."""
        dst = self.storage[self._index[layer], self.slots]
        self.pending[(layer, -1)] = self.copy_engine.copy(dst, self._host_parts(layer, e))

    def weights(self, layer: int, e: int, scratch: bool = False) -> list[torch.Tensor]:
        """Dequantized gate, up, down of a resident (or scratch) expert, waiting only for its own copy."""
        key = (layer, -1) if scratch else (layer, e)
        handle = self.pending.pop(key, None)
        self.copy_engine.wait(handle)
        slot = self.slots if scratch else self.resident[layer][e]
        row = self.storage[self._index[layer], slot]
        return [self._dq.dequantize(row[off:off + n], ttype, shape, dtype=self.dtype)
                for _, _, ttype, shape, off, n in self.parts[layer]]

    def compute(self, layer: int, e: int, x: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        gate, up, down = self.weights(layer, e, scratch)
        biases = self.biases.get(layer)
        b = None if biases is None else tuple(t[e] for t in biases)
        return expert_ffn(x.to(self.dtype), gate, up, down, b, self.act).float()

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: list[int],
            scratch: set[int] = frozenset()) -> torch.Tensor:
        """sum_k weights[:, k] * expert_{ids[:, k]}(x) over the pairs whose expert is in `experts` (resident, or in
        `scratch`: brought into the scratch slot for this one use) -> float32 [n, d]. Pairs of other experts (the
        CPU's) add nothing; no host sync, no loop over pairs. In decode the result may be a workspace buffer,
        valid until the next call."""
        resident = {e: self.resident[layer][e] for e in experts if e not in scratch}
        out = self._compute(layer, x, ids, weights, resident)
        for e in experts:
            if e in scratch:  # one scratch slot per layer: one expert at a time
                self.load_scratch(layer, e)
                out = out + self._compute(layer, x, ids, weights, {e: self.slots}, scratch=True)
        return out

    def launches(self, n_experts: int, n_scratch: int) -> int:
        """Device expert computations `run` issues for that many experts (scratch ones included)."""
        if not self.triton:
            return n_experts
        return 2 * (n_experts > n_scratch) + 2 * n_scratch

    def workspace(self, layer: int) -> device_ops.GroupedWorkspace:
        """The decode buffers of the grouped kernels, one per expert shape (shared by the layers: one call at a
        time), allocated on first use."""
        lay = self.layouts[layer]
        ws = self._workspaces.get((lay.ff, lay.d))
        if ws is None:
            ws = self._workspaces[(lay.ff, lay.d)] = device_ops.GroupedWorkspace(self.device, self.top_k, lay.ff,
                                                                                 lay.d)
        return ws

    def _compute(self, layer, x, ids, weights, slot_of: dict[int, int], scratch: bool = False) -> torch.Tensor:
        if self.pending:  # each expert waits for its own copy only (an event wait on CUDA, never the host)
            for e in slot_of:
                self.copy_engine.wait(self.pending.pop((layer, -1) if scratch else (layer, e), None))
        if not slot_of or not self.triton:
            out = torch.zeros((x.shape[0], x.shape[1]), dtype=torch.float32, device=x.device)  # experts map d -> d
            for e in slot_of:  # the torch fallback: one expert at a time
                tok, k = torch.nonzero(ids == e, as_tuple=True)
                y = self.compute(layer, e, x[tok], scratch=scratch)
                out.index_add_(0, tok, y * weights[tok, k, None].float())
            return out
        i = self._index[layer]
        if scratch:  # device-side writes, ordered on the stream: no host data, no race with the previous scratch use
            (e,) = slot_of
            table = self._scratch_table.fill_(-1)
            table[e] = self.slots
        else:
            host = self._tables_np[i]
            host.fill(-1)
            host[list(slot_of)] = list(slot_of.values())
            table = self._rows[i][0]
            if self.copy_engine.cuda:
                table.copy_(self._tables[i], non_blocking=True)
        n, k = ids.shape
        ws = None if scratch else self.workspace(layer)  # scratch adds to the resident result: its own buffers
        pair_tok = None if ws is not None and n == 1 else \
            torch.arange(n, device=x.device, dtype=torch.int32).repeat_interleave(k)

        def group():
            return device_ops.grouped_experts(x, pair_tok, ids, weights, table, self._rows[i][1],
                                              self.layouts[layer], self.biases.get(layer), self.act, ws=ws)

        if ws is None or n != 1:
            return group()
        # decode: one token, k pairs, the workspace's buffers: a CUDA graph (the slot table is read, not baked in)
        return self.graphs.run(("experts", layer), group, check=(ws.out,),
                               tag=(x.data_ptr(), x.stride(0), ids.data_ptr(), ids.dtype, weights.data_ptr()))

    def evict(self, layer: int, e: int) -> None:
        self.resident[layer].pop(e, None)
        self.pending.pop((layer, e), None)
