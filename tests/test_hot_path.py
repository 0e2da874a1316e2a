"""The executor's decode hot path: at most two host<->device crossings per MoE layer, no other read of device memory
by the host, no host-synchronising op dispatched, the grouped experts' decode buffers static, and few torch ops per
layer (each Triton launch one op)."""
import numpy as np
import pytest
import torch

import moecli
from conftest import tiny_gguf
from moecli.kernels import device_ops as D
from moecli.runtime.op_count import HostReads, count_decode_ops
from test_decision_core import four_layer_model

TEXT = "The quick brown fox jumps over the lazy dog."
ALLOC_OPS = {"empty", "empty_like", "zeros", "zeros_like", "full", "arange", "new_empty", "new_zeros", "empty_strided"}


def _decode_steps(m, n_steps: int = 3):
    """Prefill, then `n_steps` decode forward passes (no sampling: the host reads only what the executor reads)."""
    tr = m.transformer
    ids = m.tokenize(TEXT)
    cache = tr.new_cache(len(ids) + n_steps + 1)
    tr.forward(ids, cache)
    for t in ids[:n_steps]:
        yield lambda t=t: tr.forward([t], cache, all_logits=False)


@pytest.mark.parametrize("placement,slots", [("hybrimoe", 2), ("llama-cpp", 0), ("n-cpu-moe=0", 8)])
def test_at_most_two_crossings_per_moe_layer_and_no_other_host_read(placement, slots):
    m = moecli.load(four_layer_model(), placement=placement, expert_slots=slots)
    ex = m.transformer.experts
    link = ex.link
    reads = []
    real_read, real_write = link.read, link.write
    link.read = lambda parts: reads.append("read") or real_read(parts)
    link.write = lambda y: reads.append("write") or real_write(y)
    steps = list(_decode_steps(m))
    steps[0]()  # warm-up step (embedding rows, graphs)
    reads.clear()
    syncs0 = ex.stats.syncs
    with HostReads() as host:
        for step in steps[1:]:
            step()
    layer_steps = len(ex.layers) * (len(steps) - 1)
    assert host.reads == [], f"the host read device tensors outside the executor's transfer: {host.reads}"
    assert reads.count("read") == layer_steps  # exactly one packed read per MoE layer and step
    assert len(reads) <= 2 * layer_steps
    if placement == "n-cpu-moe=0":
        assert "write" not in reads  # every expert on the device: nothing comes back from the CPU
    if placement == "llama-cpp":
        assert reads.count("write") == layer_steps
    assert ex.stats.syncs - syncs0 == len(reads)  # Stats.syncs counts every crossing
    if placement == "hybrimoe":
        assert ex.core.prefetcher is not None and ex.stats.prefetched >= 0


def test_host_reads_catches_a_sneaked_read():
    """The check above can fail: a device tensor read by the host inside a layer is caught."""
    m = moecli.load(four_layer_model(), placement="hybrimoe", expert_slots=2)
    ex = m.transformer.experts
    real = ex.dev.run

    def leaky(layer, x, ids, *a, **k):
        ids.tolist()  # what the old hot path did per expert
        return real(layer, x, ids, *a, **k)

    ex.dev.run = leaky
    steps = list(_decode_steps(m, 1))
    with HostReads() as host:
        steps[0]()
    assert "tolist" in host.reads


def test_decode_dispatches_no_sync_op_and_few_ops_per_layer(monkeypatch):
    """Every expert on the device, device kernels on for dense weights too (the count a GPU would see)."""
    monkeypatch.setenv("MOECLI_CPU_DENSE_KERNELS", "1")
    m = moecli.load(tiny_gguf("qwen3moe", "Q6_K"), placement="n-cpu-moe=0", expert_slots=8)
    r = count_decode_ops(m)
    assert r["sync_ops_per_moe_layer"] == 0, r["top"]
    assert r["syncs_per_moe_layer"] == 1
    assert r["per_moe_layer"] <= OPS_PER_LAYER, r["top"]


OPS_PER_LAYER = 13  # measured: 466 before the grouped kernels, 138 before the decode kernels (Q6_K, all on the device)


def test_grouped_experts_decode_workspace_is_static_and_exact():
    """One token: the workspace path (one-pair blocks, static buffers) gives the same bits as the sorted path and
    allocates nothing per call."""
    from moecli.runtime.op_count import _OpCounter

    m = moecli.load(tiny_gguf("qwen3moe", "Q4_K"), placement="n-cpu-moe=0", expert_slots=8)
    dev = m.transformer.experts.dev
    layer = dev.layers[0]
    g = torch.Generator().manual_seed(0)
    x = 0.05 * torch.randn(1, m.config.n_embd, generator=g)
    ids = torch.tensor([[5, 2]])
    w = torch.tensor([[0.7, 0.3]])
    want = dev.run(layer, torch.cat([x, x]), torch.cat([ids, ids]), torch.cat([w, w]), list(range(8)))[:1].clone()  # 2 tokens
    dev.run(layer, x, ids, w, list(range(8)))  # first call builds the workspace views
    counter = _OpCounter()
    with counter:
        got = dev.run(layer, x, ids, w, list(range(8)))
    ops = counter.ops["outside"]
    assert not (set(ops) & ALLOC_OPS), ops
    assert ops["gate_up"] == 1 and ops["down"] == 1
    assert torch.isfinite(want).all() and torch.equal(got, want)
    # a device expert that is not resident adds nothing (its blocks exit)
    part = dev.run(layer, x, ids, w, [5])
    only5 = dev.run(layer, x, torch.tensor([[5, 5]]), torch.tensor([[0.7, 0.0]]), [5])
    assert torch.allclose(part, only5, rtol=0, atol=1e-6)
