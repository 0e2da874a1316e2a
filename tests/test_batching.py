"""Continuous batching: several sequences decoded in ONE forward pass of the one-graph CPU engine, each attending only
to its own KV slot, give each sequence the logits it gets decoded alone (1, 2 and 4 sequences at different positions,
across a 256-key bucket, with multi-token feeds; sliding window, MLA); the server's engine batching its decoding
sequences gives the tokens of one-at-a-time decoding; admission is FIFO beyond the slots; a cancelled request stops at
its next token and frees its slot."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import tiny_gguf

import moecli
from moecli.api import Session
from moecli.runtime.sampling import SamplingParams
from moecli.serve.engine import BatchedStepper, Delta, Done, Engine, GenRequest, Job, SequentialStepper

TEXT = "Experts route tokens; the router picks two of eight. The quick brown fox jumps over 13 lazy dogs!"
GREEDY = SamplingParams(temperature=0.0)


def _sessions(m, prompts):
    out = []
    for p in prompts:
        s = Session(m, 512)
        m.step(s, p)
        out.append(s)
    return out


@pytest.mark.parametrize("arch", ["qwen3moe", "llama-dense", "gpt-oss", "deepseek2-lite"])
def test_batched_decode_equals_each_sequence_alone(arch):
    m = moecli.load(tiny_gguf(arch, "F32"), engine="ggml")
    assert m.batched
    ids = m.tokenize(TEXT) * 4
    prompts = [ids[:5], ids[:40], ids[3:17], ids[:254]]  # the last crosses into the 512-key bucket as it decodes
    calls = []
    for n_seq in (1, 2, 4):
        alone, batched = _sessions(m, prompts[:n_seq]), _sessions(m, prompts[:n_seq])
        feeds = [ids[7 + i:8 + i + i % 2 * 2] for i in range(n_seq)]  # one token, or three (a short prompt chunk)
        for _ in range(3):
            want = [m.step(s, f).numpy() for s, f in zip(alone, feeds)]
            m.transformer.on_router = lambda layer, probs, sel, w: calls.append((layer, probs.shape[0]))
            got = m.step_batch(list(zip(batched, feeds)))
            m.transformer.on_router = None
            n = sum(map(len, feeds))
            if m.config.is_moe:  # the routing is reported once per layer, over every token of the batch
                assert calls[0][1] == n and len(calls) == len({layer for layer, _ in calls})
            calls.clear()
            for w, g in zip(want, got):
                assert np.abs(w - g.numpy()).max() < 1e-4
            feeds = [[int(np.argmax(w))] for w in want]
        assert [s.tokens for s in alone] == [s.tokens for s in batched]
        assert [s.cache.pos for s in alone] == [len(s.tokens) for s in batched]


def test_batch_refuses_a_shared_cache_and_a_full_context():
    m = moecli.load(tiny_gguf("qwen3moe", "F32"), engine="ggml")
    s, t = Session(m, 8), Session(m, 8)
    m.step(s, [1, 2, 3])
    with pytest.raises(ValueError):
        m.transformer.forward_batch([([4], s.cache), ([5], s.cache)])
    m.step(t, list(range(1, 9)))
    with pytest.raises(moecli.errors.MoecliError):
        m.step_batch([(s, [4]), (t, [9])])
    assert s.cache.pos == 3 and len(s.tokens) == 3  # nothing was written


class _Counting(BatchedStepper):
    def __init__(self, model):
        super().__init__(model)
        self.batches = []

    def step(self, work):
        self.batches.append(sum(len(f) == 1 for _, f in work))
        return super().step(work)


def _serve(model, stepper, n_slots: int, requests: list[GenRequest], cancel_after: int | None = None):
    """Submit `requests` in order to an engine; returns per request (text, done event) and the engine."""

    async def main():
        engine = Engine(model, n_slots, 512, stepper=stepper)
        engine.start()
        loop = asyncio.get_running_loop()
        jobs = [Job(r, loop) for r in requests]
        for j in jobs:
            engine.submit(j)

        async def collect(job):
            text, n = "", 0
            while True:
                ev = await job.events.get()
                if isinstance(ev, Delta):
                    text += ev.text
                    n += len(ev.tokens)
                    if cancel_after is not None and n >= cancel_after:
                        engine.cancel(job)
                        return text, n, None
                else:
                    return text, n, ev

        out = await asyncio.gather(*(collect(j) for j in jobs))
        for _ in range(200):  # a cancelled job leaves the engine at its next round
            if engine.status()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        status = engine.status()
        engine.stop()
        engine.join(10)
        return out, status

    return asyncio.run(main())


def test_engine_batches_decoding_sequences_with_the_tokens_of_sequential_decoding():
    m = moecli.load(tiny_gguf("qwen3moe", "F32"), engine="ggml")
    ids = m.tokenize(TEXT)
    reqs = lambda: [GenRequest(ids[i:i + 9 + 3 * i], 12, GREEDY) for i in range(4)]  # noqa: E731
    want, _ = _serve(m, SequentialStepper(m), 4, reqs())
    stepper = _Counting(m)
    got, status = _serve(m, stepper, 4, reqs())
    assert [g[:2] for g in got] == [w[:2] for w in want] and all(isinstance(g[2], Done) for g in got)
    assert max(stepper.batches) == 4  # four sequences decoded in one forward pass
    assert status["generated_tokens"] == sum(g[1] for g in got)
    assert status["batched"] and status["decode_tokens"] / status["decode_forwards"] > 2


def test_requests_beyond_the_slots_are_admitted_in_order():
    m = moecli.load(tiny_gguf("qwen3moe", "F32"), engine="ggml")
    ids = m.tokenize(TEXT)
    out, _ = _serve(m, BatchedStepper(m), 1, [GenRequest(ids[i:i + 6], 4, GREEDY) for i in range(4)])
    waits = [done.usage.queued_s for _, _, done in out]
    assert waits == sorted(waits) and waits[0] < waits[1]  # one slot: each waits for all the earlier ones


def test_a_cancelled_request_stops_at_its_next_token_and_frees_its_slot():
    m = moecli.load(tiny_gguf("qwen3moe", "F32"), engine="ggml")
    ids = m.tokenize(TEXT)
    out, status = _serve(m, BatchedStepper(m), 2, [GenRequest(ids[:8], 300, GREEDY),
                                                  GenRequest(ids[3:9], 300, GREEDY)], cancel_after=3)
    received = sum(n for _, n, _ in out)
    assert status["running"] == 0 and status["queued"] == 0
    # each stream was cancelled after 3 tokens; the engine ran at most one more round for it
    assert received <= status["generated_tokens"] <= received + 2 * 2
