"""Experts on the accelerator: fixed slots per layer holding experts in the QUANTIZED form they were copied in
(3-4x less PCIe traffic than fp16). `run` computes all of a layer's device pairs through the grouped Triton kernels
(moecli.kernels.device_ops.grouped_experts: two launches, the weights read in place); where Triton cannot run, each
expert is dequantized by torch right before it computes (the fallback, logged once).

The copy engine (runtime/copy_engine.py) is the only CUDA-specific piece: copies by priority, each waiting only for
its slot's last read (`mark_read` at every read) and compute waiting only for the copy it needs. An expert read in
the current step (`new_step()` starts one) is never evicted: trying raises `InUseError`.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from gguf import GGMLQuantizationType

from moecli.kernels import device_ops
from moecli.models.config import Checkpoint
from moecli.runtime.copy_engine import DEMAND, make_copy_engine
from moecli.runtime.experts import expert_biases, expert_ffn
from moecli.runtime.step_graphs import StepGraphs

log = logging.getLogger("moecli")
T = GGMLQuantizationType
_PARTS = ("gate", "up", "down")


class InUseError(RuntimeError):
    """An expert read in the current step was to be evicted (its slot may still be read)."""


class DeviceExpertCache:
    """`slots` experts per MoE layer resident on `device` as raw GGUF bytes (gate|up|down in one uint8 row)."""

    def __init__(self, ckpt: Checkpoint, device, slots: int, dtype=torch.float32, layers: list[int] | None = None,
                 copy_ms: float = 0.0):
        """`layers`: the MoE layers that get slots (default: all); the others' experts never come to the device.
        `copy_ms`: the copy engine's first estimate of one copy (then measured)."""
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
        self.pending: dict[tuple[int, int], object] = {}  # (layer, expert) -> copy job
        self._read_now: set[tuple[int, int]] = set()  # (layer, expert) read in the current step
        ranges = self._host_ranges() if self.device.type == "cuda" and os.environ.get("MOECLI_HOST_REGISTER") == "1" \
            and rows else None
        self.copy_engine = make_copy_engine(self.device, off, copy_ms, ranges)
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

    def _host_ranges(self) -> list[tuple[int, int]]:
        """(address, bytes) of the expert tensors in the memory map (for cudaHostRegister)."""
        out = []
        for l in self.layers:
            for p in _PARTS:
                s = self.ckpt.experts[f"blk.{l}.ffn_{p}_exps"]
                raws = [s.stacked.raw] if s.stacked is not None else [s.expert(e).raw for e in range(s.n)]
                out += [(r.ctypes.data, r.nbytes) for r in raws]
        return out

    def new_step(self) -> None:
        """A forward pass begins: experts read in the previous one may be evicted again."""
        self._read_now.clear()

    def mark_read(self, layer: int, slot_of: dict[int, int]) -> None:
        """Compute queued so far reads these experts' slots: their next copy waits for this read, and the experts
        stay resident for the rest of the step."""
        i = self._index[layer]
        self.copy_engine.mark_read([(i, s) for s in slot_of.values()])
        self._read_now.update((layer, e) for e in slot_of if e >= 0)

    def arrivals(self, layer: int, now: float) -> dict[int, float]:
        """expert -> when its copy into `layer`'s slots ends, for those still being copied (from the copy engine's
        events; the others are there)."""
        pending = self.pending
        if not pending:
            return {}
        jobs = {e: j for e in self.resident.get(layer, ()) if (j := pending.get((layer, e))) is not None}  # this layer only
        return self.copy_engine.arrivals(jobs, now)

    def _check_evictable(self, layer: int, e: int) -> None:
        if (layer, e) in self._read_now:
            raise InUseError(f"expert {e} of layer {layer} was read in this step: it cannot be evicted before the "
                             "next step (new_step)")

    def load(self, layer: int, e: int, evict: int | None = None, priority: int = DEMAND,
             need_by: float | None = None, now: float | None = None) -> bool:
        """Copy expert e of `layer` into a free slot, or into `evict`'s slot. Asynchronous on CUDA. Returns False
        when the copy engine refused it (a prefetch that could not arrive by `need_by`): nothing changed then."""
        res = self.resident[layer]
        if e in res:
            return True
        if evict is not None and evict in res:
            self._check_evictable(layer, evict)
            slot = res[evict]
        else:
            evict = None
            used = set(res.values())
            slot = next(s for s in range(self.slots) if s not in used)
        dst = self.storage[self._index[layer], slot]
        job = self.copy_engine.submit((self._index[layer], slot), dst, self._host_parts(layer, e), priority,
                                      need_by, now)
        if job is None:
            return False
        if evict is not None:
            del res[evict]
            self.copy_engine.cancel(self.pending.pop((layer, evict), None))
        res[e] = slot
        self.pending[(layer, e)] = job
        return True

    def load_scratch(self, layer: int, e: int) -> None:
        """Bring a non-resident expert into the layer's scratch slot for one use (a policy bypass)."""
        i = self._index[layer]
        dst = self.storage[i, self.slots]
        self.pending[(layer, -1)] = self.copy_engine.submit((i, self.slots), dst, self._host_parts(layer, e))

    def weights(self, layer: int, e: int, scratch: bool = False) -> list[torch.Tensor]:
        """Dequantized gate, up, down of a resident (or scratch) expert, waiting only for its own copy."""
        key = (layer, -1) if scratch else (layer, e)
        handle = self.pending.pop(key, None)
        self.copy_engine.wait(handle)
        slot = self.slots if scratch else self.resident[layer][e]
        row = self.storage[self._index[layer], slot]
        out = [self._dq.dequantize(row[off:off + n], ttype, shape, dtype=self.dtype)
               for _, _, ttype, shape, off, n in self.parts[layer]]
        self.mark_read(layer, {-1 if scratch else e: slot})
        return out

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
            out = group()
        else:  # decode: one token, k pairs, the workspace's buffers: a CUDA graph (the slot table is read, not baked in)
            out = self.graphs.run(("experts", layer), group, check=(ws.out,),
                                  tag=(x.data_ptr(), x.stride(0), ids.data_ptr(), ids.dtype, weights.data_ptr()))
        self.mark_read(layer, {-1: self.slots} if scratch else slot_of)
        return out

    def evict(self, layer: int, e: int) -> None:
        self._check_evictable(layer, e)
        self.resident[layer].pop(e, None)
        self.copy_engine.cancel(self.pending.pop((layer, e), None))
