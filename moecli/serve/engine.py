"""The generation engine of `moecli serve`: one thread owns the model; requests wait in a FIFO queue for a KV slot,
and every admitted sequence advances by one step (a prompt chunk or one token) per round, so all streams progress
together and a cancelled one stops at its next token.

A round hands the stepper the list of (slot, tokens) to run and gets next-token logits per sequence. On the CPU
one-graph engine `BatchedStepper` runs every decoding sequence's token in ONE forward pass (continuous batching: the
weights and experts are read once per round for all of them, each sequence attending to its own slot's cache); a
prompt chunk runs as its own forward (its graph and attention are prompt-sized). Other engines decode one sequence
per forward (`SequentialStepper`). Events go back to each request's asyncio queue on the server's loop.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from moecli.errors import MoecliError
from moecli.runtime.sampling import Sampler, SamplingParams, logprobs
from moecli.serve.slots import SlotPool
from moecli.tokenizer import TextStream

PREFILL_CHUNK = 512  # prompt tokens per round: a long prompt does not stall the other streams for its whole length


@dataclass
class GenRequest:
    """What the engine needs to generate one completion (built and validated by the routes)."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    grammar: object | None = None  # serve.grammar.Grammar: masks logits, accepts chosen tokens
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: and the k most likely
    special: bool = False  # control tokens as text (harmony's markers)


@dataclass
class TokenInfo:
    id: int
    text: bytes
    logprob: float | None = None
    top: list[tuple[bytes, float]] | None = None  # the most likely tokens' bytes and log-probabilities


@dataclass
class Delta:
    text: str
    tokens: list[TokenInfo]


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    prompt_s: float  # from admission to the first sampled token
    gen_s: float  # from the first sampled token to the last
    queued_s: float  # waiting for a slot


@dataclass
class Done:
    finish_reason: str  # "stop" (end of generation, a stop string, the grammar's end) or "length"
    usage: Usage


@dataclass
class Failed:
    message: str
    status: int = 500


class Job:
    """One request in the engine: its events arrive on an asyncio queue of the loop that submitted it."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop):
        self.req = req
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = loop
        self.cancelled = threading.Event()
        self.t_submit = time.perf_counter()

    def emit(self, event) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()


class SequentialStepper:
    """Runs each sequence's step as its own forward pass (the model decodes one sequence at a time)."""

    def __init__(self, model):
        self.model = model

    def new_slot(self, n_ctx: int):
        from moecli.api import Session

        return Session(self.model, n_ctx)

    def step(self, work: list[tuple[object, list[int]]]) -> list:
        """Next-token logits after feeding each (slot, tokens); an exception in place of a sequence that failed."""
        out = []
        for slot, feed in work:
            try:
                out.append(self.model.step(slot, feed))
            except Exception as e:  # noqa: BLE001 - one sequence's failure must not end the others
                out.append(e)
        return out


class BatchedStepper(SequentialStepper):
    """Decoding sequences (one token each) in one forward pass; prompt chunks one by one (see the module's doc)."""

    def step(self, work: list[tuple[object, list[int]]]) -> list:
        decode = [i for i, (_, feed) in enumerate(work) if len(feed) == 1]
        if len(decode) < 2:
            return super().step(work)
        out: list = [None] * len(work)
        try:
            logits = self.model.step_batch([work[i] for i in decode])
        except Exception:  # noqa: BLE001 - find the sequence that fails: each on its own
            logits = super().step([work[i] for i in decode])
        for i, result in zip(decode, logits):
            out[i] = result
        rest = [i for i in range(len(work)) if out[i] is None]
        for i, result in zip(rest, super().step([work[i] for i in rest])):
            out[i] = result
        return out


def default_stepper(model) -> SequentialStepper:
    """Batched decode where the model's engine batches (`Model.batched`), one sequence per forward elsewhere."""
    return BatchedStepper(model) if getattr(model, "batched", False) else SequentialStepper(model)


class _Sequence:
    """An admitted job: its slot, the prompt still to feed, the tokens generated, the text held for stop strings."""

    def __init__(self, job: Job, slot, feed: list[int], tokenizer):
        self.job, self.slot = job, slot
        req = job.req
        self.pending = feed  # prompt tokens not yet computed
        self.cached = len(req.prompt) - len(feed)
        self.sampler = Sampler(req.sampling)
        self.text = TextStream(tokenizer, req.special)
        self.tokenizer = tokenizer
        self.generated: list[int] = []
        self.held = ""  # decoded text not yet sent: it may be the start of a stop string
        self.held_tokens: list[TokenInfo] = []
        self.t_admit = time.perf_counter()
        self.t_first = self.t_last = None
        self.last: int | None = None
        self.stopped = False  # by a stop string

    def next_feed(self) -> list[int]:
        if self.pending:
            feed, self.pending = self.pending[:PREFILL_CHUNK], self.pending[PREFILL_CHUNK:]
            return feed
        return [self.last]

    def advance(self, logits: torch.Tensor) -> str | None:
        """Sample after a step; returns a finish reason when the sequence is done."""
        if self.pending:
            return None  # a prompt chunk: its logits are not needed
        req = self.job.req
        token = self.sampler(logits, self.slot.tokens, req.grammar)
        now = time.perf_counter()
        self.t_first = self.t_first or now
        if self.tokenizer.is_eog(token) or (req.grammar is not None and req.grammar.ends(token)):
            return "stop"
        self.t_last = now
        if req.grammar is not None:
            req.grammar.accept(token)
        self.generated.append(token)
        self.last = token
        info = TokenInfo(token, self.tokenizer.token_bytes(token, req.special))
        if req.logprobs is not None:  # token bytes are read here: the tokenizer's buffer belongs to this thread
            info.logprob, top = logprobs(logits, token, req.logprobs)
            info.top = [(self.tokenizer.token_bytes(t, req.special), lp) for t, lp in top]
        self.held_tokens.append(info)
        if self._push(self.text.push(token)):
            self.stopped = True
            return "stop"
        if len(self.generated) >= req.max_tokens or self.slot.cached + 1 > self.slot.n_ctx:
            return "length"
        return None

    def _push(self, piece: str) -> bool:
        """Add decoded text; send what cannot be part of a stop string. True when a stop string appeared."""
        self.held += piece
        stops = self.job.req.stop
        hit = min(((i, s) for s in stops if (i := self.held.find(s)) >= 0), default=None)
        if hit is not None:
            self._send(self.held[:hit[0]])
            self.held = ""
            return True
        keep = max((k for s in stops for k in range(min(len(s) - 1, len(self.held)), 0, -1)
                    if self.held.endswith(s[:k])), default=0)
        self._send(self.held[:len(self.held) - keep])
        self.held = self.held[len(self.held) - keep:]
        return False

    def _send(self, text: str) -> None:
        if text or self.held_tokens:
            self.job.emit(Delta(text, self.held_tokens))
            self.held_tokens = []

    def finish(self, reason: str) -> None:
        if not self.stopped:  # what was held for a stop string that never came, and a last partial character
            self.held += self.text.flush()
            self._send(self.held)
            self.held = ""
        t_first = self.t_first or time.perf_counter()
        usage = Usage(len(self.job.req.prompt), len(self.generated), self.cached, t_first - self.t_admit,
                      (self.t_last or t_first) - t_first, self.t_admit - self.job.t_submit)
        self.job.emit(Done(reason, usage))


class Engine:
    """The scheduler thread: FIFO admission into free KV slots, one step for every admitted sequence per round."""

    def __init__(self, model, n_slots: int, n_ctx: int, stepper=None):
        self.model = model
        self.n_ctx = n_ctx
        self.stepper = stepper or default_stepper(model)
        self.pool = SlotPool(lambda: self.stepper.new_slot(n_ctx), n_slots)
        self._pending: deque[Job] = deque()
        self._active: list[_Sequence] = []
        self._cond = threading.Condition()
        self._stopping: str | None = None
        self._thread = threading.Thread(target=self._run, name="moecli-engine", daemon=True)
        self.counters = {"requests": 0, "generated_tokens": 0, "prompt_tokens": 0, "cached_tokens": 0,
                         "decode_tokens": 0, "decode_forwards": 0}  # their ratio: sequences per decode forward

    # --- the request side (any thread) ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                job.emit(Failed(self._stopping, 503))
                return
            self._pending.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        with self._cond:
            self._cond.notify()

    def stop(self, message: str = "the server is shutting down") -> None:
        """End every queued and running request with an error event, then the thread."""
        with self._cond:
            if self._stopping is None:
                self._stopping = message
            self._cond.notify()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def status(self) -> dict:
        with self._cond:
            return {"queued": len(self._pending), "running": len(self._active), "slots": self.pool.size,
                    "slots_allocated": self.pool.allocated, "cached_tokens": self.pool.cached_tokens(),
                    "n_ctx": self.n_ctx, "batched": isinstance(self.stepper, BatchedStepper), **self.counters}

    # --- the engine thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._active and not self._pending:
                    self._cond.wait()
                if self._stopping:
                    break
                self._admit()
            try:
                self._round()
            except Exception as e:  # noqa: BLE001 - the thread must live on: fail this round's sequences
                for seq in list(self._active):
                    self._end(seq, e)
        self._fail_all()

    def _admit(self) -> None:
        while self._pending:
            job = self._pending[0]
            if job.cancelled.is_set():
                self._pending.popleft()
                continue
            try:
                got = self.pool.acquire(job.req.prompt)
            except Exception as e:  # noqa: BLE001 - a slot that cannot be allocated (memory): this request fails
                self._pending.popleft()
                job.emit(Failed(f"cannot allocate a KV slot: {type(e).__name__}: {e}", 503))
                continue
            if got is None:
                return  # every slot is busy: the queue waits, in order
            self._pending.popleft()
            slot, feed = got
            seq = _Sequence(job, slot, feed, self.model.tokenizer)
            self.counters["requests"] += 1
            self.counters["prompt_tokens"] += len(job.req.prompt)
            self.counters["cached_tokens"] += seq.cached
            self._active.append(seq)

    def _round(self) -> None:
        work, seqs = [], []
        for seq in list(self._active):
            if seq.job.cancelled.is_set():
                self._end(seq, None)
            else:
                seqs.append(seq)
                work.append((seq.slot, seq.next_feed()))
        if not work:
            return
        decoding = sum(len(feed) == 1 for _, feed in work)
        self.counters["decode_tokens"] += decoding
        self.counters["decode_forwards"] += min(decoding, 1) if isinstance(self.stepper, BatchedStepper) else decoding
        for seq, result in zip(seqs, self.stepper.step(work)):
            if isinstance(result, Exception):
                self._end(seq, result)
                continue
            try:
                reason = seq.advance(result)
            except Exception as e:  # noqa: BLE001 - a constraint with no way out, a sampler error...
                self._end(seq, e)
                continue
            if reason is not None:
                self.counters["generated_tokens"] += len(seq.generated)
                seq.finish(reason)
                self._release(seq, keep=True)

    def _end(self, seq: _Sequence, error: Exception | None) -> None:
        """A cancelled (error None) or failed sequence: its slot's cache may be half-written, so forget it."""
        if error is not None:
            msg = str(error) if isinstance(error, MoecliError) else f"internal error: {type(error).__name__}: {error}"
            seq.job.emit(Failed(msg, 500))
        self.counters["generated_tokens"] += len(seq.generated)
        self._release(seq, keep=error is None)

    def _release(self, seq: _Sequence, keep: bool) -> None:
        self._active.remove(seq)
        self.pool.release(seq.slot, keep)

    def _fail_all(self) -> None:
        with self._cond:
            jobs = [s.job for s in self._active] + list(self._pending)
            for seq in self._active:
                self.pool.release(seq.slot, keep=False)
            self._active, self._pending = [], deque()
        for job in jobs:
            job.emit(Failed(self._stopping or "the server stopped", 503))
