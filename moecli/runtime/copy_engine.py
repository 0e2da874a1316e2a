"""Host -> device expert copies: a priority queue (DEMAND > PREFETCH > BACKGROUND, FIFO within a priority), completion
known from events, back-pressure on prefetch, and per-slot ordering.

    job = engine.submit(slot, dst, parts, priority, need_by=..., now=...)   # None: refused (back-pressure)
    engine.wait(job)         # the compute stream (the caller, without CUDA) waits for this copy only
    engine.mark_read(slots)  # compute queued so far reads these slots: their next copy waits for that read only
    engine.arrivals(jobs, now)  # when each of these copies ends: absent once its event fired (an estimate until then)
    engine.drain_ms(now)     # when the queued and in-flight copies end (events say which are done; the measured
                             # copy time estimates the rest)

A slot's copy waits for the slot's last read and its previous copy, nothing else (not all compute queued so far).
A queued copy whose slot is given to another expert is cancelled. Back-pressure: a PREFETCH copy that would not end
by `need_by` (when the layer that needs it starts) is refused, so prefetch never queues more than the engine can
finish in time; demand copies always go ahead of queued prefetch and background copies.

`CopyEngine` is the host implementation: a copy runs synchronously when submitted (torch's copy on the CPU device),
unless `hold()` is active, when jobs queue and run in priority order as the hold ends or a `wait` needs one: the
scheduling is the CUDA engine's, so tests exercise it here. `CudaCopyEngine` runs the queue on `workers` staging
threads, each with a pinned buffer and its own stream (the bus serialises the transfers; the threads overlap the
memcpy out of the memory map); with MOECLI_HOST_REGISTER=1 the map itself is registered with the driver
(cudaHostRegister) and copies go straight from it, no staging memcpy.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger("moecli")
DEMAND, PREFETCH, BACKGROUND = 0, 1, 2
PRIORITIES = ("demand", "prefetch", "background")
EMA = 0.2  # weight of a new copy-time measurement
_PAGE = 4096


@dataclass(eq=False)
class CopyJob:
    slot: tuple  # (layer index, slot index): where the bytes go
    dst: torch.Tensor
    parts: list
    nbytes: int
    priority: int
    seq: int
    need_by: float | None = None
    after_read: object = None  # the slot's last read marker (a CUDA event): the copy waits for it
    after_write: "CopyJob | None" = None  # the slot's previous copy, if it may still be in flight
    state: str = "queued"  # queued -> issued -> done, or cancelled
    event: object = None  # CUDA: recorded after the copy on the worker's stream
    start_event: object = None
    issued: threading.Event = field(default_factory=threading.Event)
    t_issue: float = 0.0

    def __lt__(self, other: "CopyJob") -> bool:  # heap order: priority, then submission order
        return (self.priority, self.seq) < (other.priority, other.seq)


def _host(a: np.ndarray) -> torch.Tensor:
    """A CPU tensor over a read-only mmap view; torch warns about non-writable arrays, but we only read it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


class CopyEngine:
    """The host implementation (and the scheduling every implementation shares)."""

    asynchronous = False
    cuda = False

    def __init__(self, device, max_bytes: int, copy_ms: float = 0.0):
        self.device = torch.device(device)
        self.max_bytes = max_bytes
        self.copy_ms = copy_ms  # estimate per copy (ms), refined from measurements
        self.bytes_copied = 0
        self.copies = 0
        self.refused = 0  # prefetch copies refused by back-pressure
        self.order: list[tuple[int, tuple]] = []  # (priority, slot) of each copy as it ran (tests, diagnostics)
        self._queue: list[CopyJob] = []
        self._lock = threading.Condition()
        self._seq = itertools.count()
        self._last_read: dict[tuple, object] = {}  # slot -> marker of its last read
        self._last_write: dict[tuple, CopyJob] = {}  # slot -> its latest copy
        self._inflight: list[CopyJob] = []  # issued, completion not yet seen
        self._times: list[tuple[int, float]] = []  # (bytes, ms) measured, not yet taken by the refit
        self._held = 0
        self._reads = 0
        self.clock = lambda: time.perf_counter() * 1e3  # ms; the executor sets its own clock


    # -- the interface ------------------------------------------------------------------------------------------
    def submit(self, slot: tuple, dst: torch.Tensor, parts: list, priority: int = DEMAND,
               need_by: float | None = None, now: float | None = None) -> CopyJob | None:
        """Queue the concatenation of `parts` (host uint8 arrays) into `dst`. A PREFETCH job with `need_by` that
        would not end by then is refused (None)."""
        n = sum(p.nbytes for p in parts)
        with self._lock:
            if priority == PREFETCH and need_by is not None:
                t = self._now() if now is None else now
                if self._finish_locked(t, priority) > need_by:
                    self.refused += 1
                    return None
            prev = self._last_write.get(slot)
            if prev is not None and prev.state == "queued":  # never started: the slot now belongs to this copy
                prev.state = "cancelled"
                prev.issued.set()
                prev = prev.after_write
            job = CopyJob(slot, dst, parts, n, priority, next(self._seq), need_by,
                          after_read=self._last_read.get(slot),
                          after_write=prev if prev is not None and prev.state != "done" else None)
            self._last_write[slot] = job
            heapq.heappush(self._queue, job)
            self._lock.notify()
        self._queued()
        return job

    def cancel(self, job: CopyJob | None) -> bool:
        """Drop a copy that has not started (its slot went to another expert). Returns whether it was dropped."""
        if job is None:
            return False
        with self._lock:
            if job.state != "queued":
                return False
            job.state = "cancelled"
            job.issued.set()
            return True

    def wait(self, job: CopyJob | None) -> None:
        """Order the compute after `job` (host: run the queue, in priority order, until it is done)."""
        if job is None or job.state in ("done", "cancelled"):
            return
        while job.state == "queued":
            if not self._run_next():
                break

    def ready(self, job: CopyJob | None) -> bool:
        return job is None or job.state in ("done", "cancelled")

    def mark_read(self, slots) -> None:
        """Compute queued so far reads `slots`: a later copy into one of them waits for this read (and only that)."""
        marker = self._marker()
        with self._lock:
            for s in slots:
                self._last_read[s] = marker

    def drain_ms(self, now: float, priority: int = BACKGROUND) -> float:
        """When every copy at or above `priority` that is queued or in flight has ended (estimate, ms)."""
        with self._lock:
            return self._drain_locked(now, priority)

    def arrivals(self, jobs: dict, now: float) -> dict:
        """key -> when that copy ends (estimate, ms) for the `jobs` (key -> CopyJob) not yet done: issued ones from
        their issue time, queued ones behind everything ahead of them in priority order. Done (its event fired) or
        cancelled ones are absent: those experts are there."""
        with self._lock:
            self._poll_locked()
            live = {k: j for k, j in jobs.items() if j is not None and j.state in ("queued", "issued")}
            if not live:
                return {}
            end = {id(j): max(now, j.t_issue + self._est(j.nbytes)) for j in self._inflight}
            t = max(end.values(), default=now)
            for j in sorted(q for q in self._queue if q.state == "queued"):
                t += self._est(j.nbytes)
                end[id(j)] = t
            # issued but not yet on a stream's in-flight list: from now
            return {k: end.get(id(j), now + self._est(j.nbytes)) for k, j in live.items()}

    def finish_ms(self, now: float, priority: int) -> float:
        """When a copy submitted now at `priority` would end (estimate, ms)."""
        with self._lock:
            return self._finish_locked(now, priority)

    def take_times(self) -> list[tuple[int, float]]:
        """Measured (bytes, ms) of copies completed since the last call (for the cost refit)."""
        self._poll()
        with self._lock:
            out, self._times = self._times, []
        return out

    @contextlib.contextmanager
    def hold(self):
        """Copies queue instead of running (a busy engine): they run in priority order when the hold ends."""
        self._held += 1
        try:
            yield self
        finally:
            self._held -= 1
            if not self._held:
                while self._run_next():
                    pass

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(1 for j in self._queue if j.state == "queued") + len(self._inflight)

    def close(self) -> None:
        pass

    # -- shared mechanics ---------------------------------------------------------------------------------------
    def _now(self) -> float:
        return self.clock()

    def _est(self, job_bytes: int) -> float:
        return self.copy_ms * (job_bytes / self.max_bytes if self.max_bytes else 1.0)

    def _drain_locked(self, now: float, priority: int) -> float:
        self._poll_locked()
        t = now
        for j in self._inflight:  # issued: on the bus, or soon
            t = max(t, j.t_issue + self._est(j.nbytes))
        return t + sum(self._est(j.nbytes) for j in self._queue if j.state == "queued" and j.priority <= priority)

    def _finish_locked(self, now: float, priority: int) -> float:
        # A synchronous engine runs a new copy in the caller's time, before the caller goes on: only what is
        # queued ahead of it can make it late.
        t = self._drain_locked(now, priority)
        return t + (self._est(self.max_bytes) if self.asynchronous else 0.0)

    def _record_time(self, nbytes: int, ms: float) -> None:
        per_copy = ms * (self.max_bytes / nbytes) if nbytes and self.max_bytes else ms
        # no prior (0): the first measurement; else blended in (the cost model's copy time is the prior)
        self.copy_ms = per_copy if self.copy_ms <= 0 else (1 - EMA) * self.copy_ms + EMA * per_copy
        self.copies += 1
        self._times.append((nbytes, ms))

    def _pop_locked(self) -> CopyJob | None:
        while self._queue:
            job = heapq.heappop(self._queue)
            if job.state == "queued":
                return job
        return None

    # -- host implementation ------------------------------------------------------------------------------------
    def _queued(self) -> None:
        if not self._held:
            while self._run_next():
                pass

    def _run_next(self) -> bool:
        with self._lock:
            job = self._pop_locked()
            if job is None:
                return False
            job.state = "issued"
        t0 = time.perf_counter()
        off = 0
        for p in job.parts:
            job.dst[off:off + p.nbytes].copy_(_host(p))
            off += p.nbytes
        ms = (time.perf_counter() - t0) * 1e3
        with self._lock:
            job.state = "done"
            job.issued.set()
            self.bytes_copied += job.nbytes
            self.order.append((job.priority, job.slot))
            self._record_time(job.nbytes, ms)
        return True

    def _marker(self):
        self._reads += 1
        return self._reads

    def _poll(self) -> None:
        pass

    def _poll_locked(self) -> None:
        pass


class CudaCopyEngine(CopyEngine):
    """The queue on `workers` staging threads; compute waits on per-copy events."""

    asynchronous = True
    cuda = True

    def __init__(self, device, max_bytes: int, copy_ms: float = 0.0, workers: int = 2,
                 host_ranges: list[tuple[int, int]] | None = None):
        super().__init__(device, max_bytes, copy_ms)
        self.workers = max(1, workers)
        self._registered: list[tuple[int, int]] = []
        if os.environ.get("MOECLI_HOST_REGISTER") == "1" and host_ranges:
            self._registered = register_host(host_ranges)
        self._stop = False
        self._threads = []
        for i in range(self.workers):
            stream = torch.cuda.Stream(self.device)
            # staging stays for parts outside the registered map (bf16 conversions)
            staging = torch.empty(max(max_bytes, 1), dtype=torch.uint8, pin_memory=True)
            t = threading.Thread(target=self._work, args=(stream, staging), daemon=True, name=f"moecli-copy{i}")
            t.start()
            self._threads.append(t)

    def wait(self, job: CopyJob | None) -> None:
        if job is None or job.state == "cancelled":
            return
        job.issued.wait()  # the worker has put it on its stream (a demand copy is first in line)
        if job.event is not None:
            torch.cuda.current_stream(self.device).wait_event(job.event)

    def ready(self, job: CopyJob | None) -> bool:
        if job is None or job.state in ("done", "cancelled"):
            return True
        if job.state != "issued" or job.event is None or not job.event.query():
            return False
        self._poll()
        return True

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()

    def _queued(self) -> None:
        pass  # a worker picks it up

    def _marker(self):
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def _poll(self) -> None:
        with self._lock:
            self._poll_locked()

    def _poll_locked(self) -> None:
        """Copies whose events have completed are done: their measured times refine the estimate."""
        left = []
        for j in self._inflight:
            if j.event.query():
                j.state = "done"
                self._record_time(j.nbytes, j.start_event.elapsed_time(j.event))
            else:
                left.append(j)
        self._inflight = left

    def _registered_part(self, p: np.ndarray) -> bool:
        a = p.ctypes.data
        return any(lo <= a and a + p.nbytes <= hi for lo, hi in self._registered)

    def _work(self, stream, staging) -> None:
        free = None  # this worker's staging buffer is free once this event (its last copy out) has completed
        while True:
            with self._lock:
                while not self._stop and not any(j.state == "queued" for j in self._queue):
                    self._lock.wait()
                if self._stop:
                    return
                job = self._pop_locked()
                if job is None:
                    continue
                job.state = "staging"
                prev = job.after_write
            if prev is not None:
                prev.issued.wait()  # the slot's previous copy is on some stream: this one goes after it
            try:
                free = self._issue(job, stream, staging, prev, free)
            except Exception:  # a failed copy must not leave a waiter hanging; the error shows on that stream
                log.exception("expert copy failed")
                job.event = None
            with self._lock:
                job.state = "issued"
                job.t_issue = self._now()
                self.bytes_copied += job.nbytes
                self.order.append((job.priority, job.slot))
                if job.event is not None:
                    self._inflight.append(job)
                job.issued.set()

    def _issue(self, job: CopyJob, stream, staging, prev, free):
        """Stage (unless the parts lie in registered memory) and put the copy on `stream`; returns the event after
        which the staging buffer may be refilled."""
        direct = bool(self._registered) and all(self._registered_part(p) for p in job.parts)
        if not direct:
            if free is not None:
                free.synchronize()
            off = 0
            for p in job.parts:
                staging[off:off + p.nbytes].copy_(_host(p))  # torch's copy releases the GIL: workers overlap
                off += p.nbytes
        with torch.cuda.stream(stream):
            if job.after_read is not None:
                stream.wait_event(job.after_read)  # the slot's last read, not all queued compute
            if prev is not None and prev.event is not None:
                stream.wait_event(prev.event)
            job.start_event = torch.cuda.Event(enable_timing=True)
            job.start_event.record(stream)
            if direct:
                off = 0
                for p in job.parts:
                    job.dst[off:off + p.nbytes].copy_(_host(p), non_blocking=True)
                    off += p.nbytes
            else:
                job.dst[:job.nbytes].copy_(staging[:job.nbytes], non_blocking=True)
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(stream)
            job.event = ev
        return free if direct else ev


def page_spans(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(address, size) ranges as page-aligned [lo, hi) spans, overlapping or touching ones merged (the driver refuses
    to register a page twice)."""
    spans = sorted((a // _PAGE * _PAGE, -(-(a + n) // _PAGE) * _PAGE) for a, n in ranges if n)
    merged: list[list[int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]


def register_host(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Page-lock the (address, size) ranges of the memory map with the driver (read-only), merged and page-aligned:
    the DMA engine then reads expert bytes in place. Returns the ranges registered (none if the driver refuses)."""
    merged = page_spans(ranges)
    rt = torch.cuda.cudart()
    done = []
    for lo, hi in merged:
        err = rt.cudaHostRegister(lo, hi - lo, 0x08)  # cudaHostRegisterReadOnly: the map is read-only
        if int(getattr(err, "value", err)) != 0:
            log.warning("cudaHostRegister of %d MB failed (error %s): expert copies stage through pinned buffers",
                        (hi - lo) >> 20, err)
            for a, b in done:
                rt.cudaHostUnregister(a)
            return []
        done.append((lo, hi))
    return done


def make_copy_engine(device, max_bytes: int, copy_ms: float = 0.0, host_ranges=None) -> CopyEngine:
    device = torch.device(device)
    if device.type == "cuda":
        workers = int(os.environ.get("MOECLI_COPY_WORKERS", "2"))
        return CudaCopyEngine(device, max_bytes, copy_ms, workers, host_ranges)
    return CopyEngine(device, max_bytes, copy_ms)
