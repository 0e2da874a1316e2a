"""The hybrid executor's only traffic between the device and the host in a step, two crossings per MoE layer:

  `read(parts)`  every device tensor the host needs for a layer's decisions (routing ids, weights, scores, the
                 CPU experts' input, the predicted experts of the next layers) packed on the device into one float32
                 buffer by one op, then ONE copy into pinned memory and one wait for it: sync 1;
  `write(array)` the CPU experts' result through a pinned buffer to the device, non-blocking: the device joins it
                 in stream order, the host does not wait for the device: sync 2.
A layer whose router reads the layer input (SmallThinker) reads its ids once more, before attention, when the
executor prefetches on them (`HybridExperts.known`): three crossings on those layers.

The dense decode kernels can write their results straight into the packed buffer (`staged`): `read` then finds
those parts already in place and copies only what is not (nothing, in decode without prefetch).

On the CPU device there is nothing to cross: the packed buffer is read in place. `reads` and `writes` count the
calls; the executor's `Stats.syncs` is their sum, and tests check that nothing else reads device memory.
"""
from __future__ import annotations

import numpy as np
import torch


class HostLink:
    def __init__(self, device, floats: int = 1 << 12, rows: int = 1, width: int = 1):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.reads = self.writes = 0
        self._grow_read(floats)
        self._out = None
        self._grow_write(rows * width)
        self._written = torch.cuda.Event() if self.cuda else None  # the last write's copy left the pinned buffer

    def _grow_read(self, n: int) -> None:
        self._dev = torch.empty(n, dtype=torch.float32, device=self.device)
        if self.cuda:
            self._host = torch.empty(n, dtype=torch.float32, pin_memory=True)
            self._done = torch.cuda.Event()
        else:
            self._host = self._dev
        self._host_np = self._host.numpy()
        self._staged: dict[tuple, list[torch.Tensor]] = {}

    def staged(self, shapes: tuple[tuple[int, ...], ...]) -> list[torch.Tensor]:
        """Consecutive float32 views of the device buffer from its start, of these shapes (made once per buffer and
        shapes): writing a layer's parts there makes its `read` copy nothing on the device."""
        sizes = [int(np.prod(s)) for s in shapes]
        if sum(sizes) > self._dev.numel():
            self._grow_read(2 * sum(sizes))
        v = self._staged.get(shapes)
        if v is None:
            offs = np.cumsum([0] + sizes).tolist()
            v = self._staged[shapes] = [self._dev[a:b].view(s) for a, b, s in zip(offs, offs[1:], shapes)]
        return v

    def _in_place(self, parts: list[torch.Tensor]) -> tuple[int, int]:
        """(parts, floats) of the leading `parts` that already lie in the device buffer where `read` puts them."""
        base, off = self._dev.data_ptr(), 0
        for i, p in enumerate(parts):
            if p.dtype != torch.float32 or not p.is_contiguous() or p.data_ptr() != base + 4 * off:
                return i, off
            off += p.numel()
        return len(parts), off

    def _grow_write(self, n: int) -> None:
        if self.cuda:
            self._out = torch.empty(n, dtype=torch.float32, pin_memory=True)
            self._out_np = self._out.numpy()

    def read(self, parts: list[torch.Tensor]) -> np.ndarray:
        """The concatenation of `parts` (flattened, as float32: ids up to 2^24 are exact) on the host, as a numpy
        view valid until the next `read`."""
        n = sum(p.numel() for p in parts)
        if n > self._dev.numel():  # a longer prompt than any before: grows once per new size, never in decode
            self._grow_read(max(n, 2 * self._dev.numel()))
        i, o = self._in_place(parts)
        if i < len(parts):
            lo, hi = self._dev.data_ptr(), self._dev.data_ptr() + 4 * self._dev.numel()
            # a part inside the buffer but not in its place would be overwritten while read: copied out first
            rest = [p.reshape(-1).clone() if lo <= p.data_ptr() < hi else p.reshape(-1) for p in parts[i:]]
            if len(rest) == 1:
                self._dev[o:n].copy_(rest[0])
            else:
                torch.cat(rest, out=self._dev[o:n])
        if self.cuda:
            self._host[:n].copy_(self._dev[:n], non_blocking=True)
            self._done.record()
            self._done.synchronize()
        self.reads += 1
        return self._host_np[:n]

    def write(self, y: np.ndarray) -> torch.Tensor:
        """`y` (float32, host) as a device tensor, ordered after everything queued on the current stream; the
        host returns at once. Valid until the next `write`'s copy is queued."""
        self.writes += 1
        if not self.cuda:
            return torch.from_numpy(y)
        n = y.size
        self._written.synchronize()  # the previous write has left the pinned buffer (long done: a layer ago)
        if n > self._out.numel():
            self._grow_write(n)
        self._out_np[:n] = y.reshape(-1)
        dev = self._out[:n].view(y.shape).to(self.device, non_blocking=True)
        self._written.record()
        return dev

    @property
    def syncs(self) -> int:
        return self.reads + self.writes
