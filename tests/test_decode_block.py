"""The dense decode block (moecli.models.decode: one-token steps through the decode kernels, results staged in the
executor's packed buffer) gives the torch path's logits, step after step, for every shared-decoder variant: per-head
q/k norm (Qwen3), whole-projection q/k norm (OLMoE), q/k/v biases + gated shared expert (Qwen2-MoE), a dense
leading layer + shared expert (GLM-4.5), a dense model, NoPE and sliding-window layers (SmallThinker), sinks and
windows that bite (gpt-oss, window 8); an F16 cache (OLMoE)."""
import copy

import numpy as np
import pytest
import torch

import moecli
from conftest import tiny_gguf

pytest.importorskip("triton")


def _decode_both_ways(m, n_steps=2, dtype=None, prompt=(1, 2, 3)):
    """Logits of `n_steps` decode steps after one prompt, through the decode block and through the torch path,
    each from its own copy of the same prefilled cache."""
    tr = m.transformer
    cache = tr.new_cache(len(prompt) + n_steps, dtype=dtype)
    tr.forward(list(prompt), cache)
    out = []
    for d in (tr.decode, None):
        c = copy.deepcopy(cache)
        tr.decode = d
        out.append(torch.cat([tr.forward([t], c, all_logits=False) for t in (4, 5)[:n_steps]]).numpy())
    return out


@pytest.mark.parametrize("arch,placement", [("qwen3moe", "n-cpu-moe=0"), ("olmoe", "torch"), ("qwen2moe", "torch"),
                                            ("smallthinker", "n-cpu-moe=0"), ("gpt-oss", "torch"),
                                            ("glm4moe", "torch"), ("llama-dense", "torch")])
def test_decode_block_matches_the_torch_path(monkeypatch, arch, placement):
    monkeypatch.setenv("MOECLI_CPU_DENSE_KERNELS", "1")
    opts = dict(engine="torch") if placement == "torch" else dict(placement=placement, expert_slots=8)
    m = moecli.load(tiny_gguf(arch, "Q4_K"), **opts)
    d = m.transformer.decode
    assert d is not None and d.attention and d.routing == m.config.is_moe
    got, want = _decode_both_ways(m, dtype=torch.float16 if arch == "olmoe" else None,
                                  prompt=range(1, 11) if arch == "gpt-oss" else (1, 2, 3))  # past its window of 8
    assert np.abs(got - want).max() / want.std() < (2e-3 if arch == "olmoe" else 1e-4)
    if placement == "n-cpu-moe=0":  # the routing went to the host from where the kernels wrote it
        ex = m.transformer.experts
        assert ex.staging(1).ids.data_ptr() == ex.link._dev.data_ptr()


def test_host_link_reads_staged_parts_in_place_and_copies_the_rest():
    from moecli.runtime.host_link import HostLink

    link = HostLink("cpu", floats=16)
    a, b = link.staged(((1, 2), (1, 3)))
    a.copy_(torch.tensor([[1.0, 2.0]]))
    b.copy_(torch.tensor([[3.0, 4.0, 5.0]]))
    tail = torch.tensor([[6, 7]])  # ids (int64): converted, after the staged parts
    assert link.read([a, b, tail]).tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert link.read([b, a]).tolist() == [3, 4, 5, 1, 2]  # not in place (overlapping): copied out, concatenated
    big = torch.arange(40, dtype=torch.float32)
    assert link.read([big]).tolist() == big.tolist()  # grows


def test_no_decode_block_without_dense_kernels():
    """The CPU device's default (fp32 dense weights, the oracle tests' path) keeps the torch decode."""
    m = moecli.load(tiny_gguf("qwen3moe", "Q4_K"), placement="n-cpu-moe=0", expert_slots=8)
    assert m.transformer.decode is None
