"""StepGraphs (moecli.runtime.step_graphs): the decode step split into segments (attention block + router; the
device-expert group) gives the torch path's logits eagerly (the CPU device), and its capture / replay / recapture /
fall-back logic, driven by a stand-in capture backend (no CUDA here): a replay that recomputes gives the same
logits; one that computes nothing is caught by the post-capture check and that segment stays eager."""
import copy

import numpy as np
import pytest
import torch

import moecli
from conftest import tiny_gguf
from moecli.runtime import step_graphs
from moecli.runtime.step_graphs import StepGraphs

pytest.importorskip("triton")


class Rerun:
    """A capture that 'records' fn by keeping it: replay runs it again (what a correct graph does)."""

    def __init__(self):
        self.captured = []

    def capture(self, fn):
        self.captured.append(fn)
        return fn, fn()


class Nothing(Rerun):
    """A broken capture: its replay computes nothing."""

    def capture(self, fn):
        self.captured.append(fn)
        return (lambda: None), fn()


_caches = []  # kept alive: a new cache never reuses an old one's addresses


def _steps(m, graphs=None):
    tr = m.transformer
    if graphs is not None:
        tr.decode.graphs = graphs()
        tr.experts.dev.graphs = graphs()
    cache = tr.new_cache(8)
    _caches.append(cache)
    tr.forward([1, 2, 3], cache)
    return torch.cat([tr.forward([t], cache, all_logits=False) for t in (4, 5, 6)]).numpy()


@pytest.fixture(scope="module")
def model():
    mp = pytest.MonkeyPatch()
    mp.setenv("MOECLI_CPU_DENSE_KERNELS", "1")
    m = moecli.load(tiny_gguf("qwen3moe", "Q4_K"), placement="n-cpu-moe=0", expert_slots=8)
    mp.undo()
    return m


@pytest.fixture(scope="module")
def eager(model):
    """The eager segments' logits (the CPU device: no capture)."""
    tr = model.transformer
    assert not step_graphs.cuda_graphs_enabled("cpu") and not tr.decode.graphs.active
    return _steps(model)


def test_segments_eager_on_cpu_match_the_torch_path(model, eager):
    tr = model.transformer
    got = eager
    assert tr.decode.graphs.calls == {("attn", 0): 3, ("attn", 1): 3}  # decode steps only: the prompt is torch
    assert tr.experts.dev.graphs.calls == {("experts", 0): 3, ("experts", 1): 3}
    d, tr.decode = tr.decode, None
    try:
        want = _steps(model)
    finally:
        tr.decode = d
    assert np.abs(got - want).max() / want.std() < 1e-4


def test_capture_replay_and_recapture_for_a_new_cache(model, eager):
    want = eager
    backends = []

    def graphs():
        backends.append(Rerun())
        return StepGraphs("cpu", backend=backends[-1])

    got = _steps(model, graphs)
    assert np.array_equal(got, want)
    attn, experts = model.transformer.decode.graphs, model.transformer.experts.dev.graphs
    # step 1 eager, step 2 captured, step 3 replayed; per layer and segment
    assert attn.captures == experts.captures == 2 and attn.replays == experts.replays == 2
    again = _steps(model)  # same StepGraphs, a new cache: new addresses, captured again
    assert np.array_equal(again, want) and attn.captures == 4


def test_a_replay_that_computes_nothing_is_caught(model, eager, caplog):
    want = eager
    got = _steps(model, lambda: StepGraphs("cpu", backend=Nothing()))
    assert np.array_equal(got, want)
    g = model.transformer.decode.graphs
    assert g.captures == 0 and g.replays == 0 and "replayed differently" in caplog.text
