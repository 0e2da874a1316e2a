"""Measured costs reach the executor (host profile -> cost model for this checkpoint) and are refitted online."""
import pytest

import moecli
from conftest import tiny_gguf
from moecli.policy.cost import CostModel
from moecli.policy.refit import CostRefit
from moecli.profile.costs import host_costs
from moecli.profile.store import resolve_profile

TEXT = "The quick brown fox jumps over the lazy dog."


def test_refit_converges_to_measured_costs_from_a_wrong_prior():
    prior = CostModel(cpu_a=0.01, cpu_b=5.0, cpu_first=0.0, dev_g0=3.0, dev_g1=0.0, copy_ms=9.0)
    fit = CostRefit(prior)
    for m, n in [(2, 2), (3, 3), (1, 40), (4, 100), (2, 2)] * 20:  # truth: cpu 0.1 + 0.02 n + 0.3 m
        fit.cpu(m, n, 0.1 + 0.02 * n + 0.3 * m)
        fit.dev(m, n, 0.05 * m + 0.001 * n)
        fit.copy(m, 0.4 * m)
    c = fit.model()
    assert c.cpu_first == pytest.approx(0.1, abs=0.03) and c.cpu_a == pytest.approx(0.02, rel=0.1)
    assert c.cpu_b == pytest.approx(0.3, rel=0.1) and c.copy_ms == pytest.approx(0.4, rel=0.05)
    assert c.dev_g0 == pytest.approx(0.05, rel=0.2) and c.dev(8) == pytest.approx(0.05 + 0.008, rel=0.2)
    assert CostRefit(prior).model() == prior  # nothing measured: the prior itself


def test_refit_follows_costs_that_move():
    """The prompt's copies read cold pages (slow), decode's warm ones: the fit is decode's once decode has run."""
    prior = CostModel(cpu_a=0.01, cpu_b=5.0, cpu_first=0.0, dev_g0=3.0, dev_g1=0.0, copy_ms=9.0)
    fits = CostRefit(prior), CostRefit(prior, forget=1.0)
    for fit in fits:
        for _ in range(60):
            fit.copy(3, 3 * 40.0)
        for _ in range(200):  # 50 decode steps of 4 layers, one copy each
            fit.copy(1, 2.0)
    assert fits[0].model().copy_ms == pytest.approx(2.0, rel=0.1)
    assert fits[1].model().copy_ms > 20  # a cumulative mean: still mostly the prompt's 40 ms


def test_prompts_and_decode_are_fitted_apart():
    """A prompt's CPU layer (many tokens per expert) and decode's (one) follow other laws: each regime recovers its
    own, and decode's measurements never move the prompt's model (nor the other way round)."""
    prior = CostModel(cpu_a=0.01, cpu_b=5.0, cpu_first=0.0, dev_g0=3.0, dev_g1=0.0, copy_ms=9.0)
    fit = CostRefit(prior)
    fit.begin_pass(40)
    for m, n in [(8, 40), (6, 120), (8, 300)] * 5:  # prompt truth: 0.5 + 0.01 n + 0.2 m
        fit.cpu(m, n, 0.5 + 0.01 * n + 0.2 * m)
    fit.copy(1, 30.0)  # cold pages
    prompt = fit.model()
    fit.begin_pass(1)
    assert fit.model().cpu_b == prior.cpu_b  # nothing measured in decode yet: its prior
    for m in (4, 6, 8) * 20:  # decode truth: 0.1 + 0.3 per expert (one token each)
        fit.cpu(m, m, 0.1 + 0.3 * m)
        fit.copy(1, 2.0)
    fit.cpu(8, 300, 0.5 + 0.01 * 300 + 0.2 * 8, prompt=True)  # a prompt's span timed late, fitted as the prompt's
    d, p = fit.model(), fit.model(prompt=True)
    assert d.cpu_first + 8 * d.cpu(1) == pytest.approx(0.1 + 2.4, rel=0.05) and d.copy_ms == pytest.approx(2.0, rel=0.05)
    assert p.cpu_a == pytest.approx(0.01, rel=0.1) and p.cpu_b == pytest.approx(0.2, rel=0.1)
    assert p.copy_ms == prompt.copy_ms == pytest.approx(30.0, rel=0.05)
    fit.begin_pass(64)
    assert fit.model() == p


def test_refit_terms_are_non_negative_by_refitting_not_clipping():
    """Spans 0.5 n - 1 (decode: tokens = experts): the unconstrained fit wants first = -1; fixed at 0, the per-expert
    term is refitted to the data (clipping would keep 0.5 and overshoot every span by 1 ms)."""
    prior = CostModel(cpu_a=0.0, cpu_b=0.5, cpu_first=0.0, dev_g0=0.0, dev_g1=0.0, copy_ms=1.0)
    fit = CostRefit(prior)
    for n in (4, 8, 16) * 10:
        fit.cpu(n, n, 0.5 * n - 1.0)
    c = fit.model()
    assert min(c.cpu_first, c.cpu_a, c.cpu_b) >= 0.0
    assert c.cpu_first + 8 * c.cpu(1) == pytest.approx(3.0, abs=0.5)


def test_host_profile_costs_reach_the_executor_and_are_refitted():
    path = tiny_gguf("qwen3moe", "Q8_0")
    m0 = moecli.load(path)
    want, source = host_costs(m0.checkpoint, path, profile="desktop-4090")
    assert want is not None and "desktop-4090" in source
    m = moecli.load(path, placement="hybrimoe", expert_slots=2, host_profile="desktop-4090")
    ex = m.transformer.experts
    assert ex.refit.prior == want and m.cost_source == source
    list(m.generate(m.tokenize(TEXT), max_tokens=6, stop_at_eog=False))
    got = ex.core.costs
    assert got != want  # refitted from this executor's own timings
    assert ex.refit.measurements > 0 and all(t.n for t in ex.refit._terms.values())  # the prompt's and decode's
    s = m.stats.as_dict()
    assert s["cost_model_error"] is not None and s["syncs"] > 0
    if ex.dev.triton:  # grouped kernels: 2 launches per layer step with device experts (+2 per scratch expert)
        assert 0 < s["launches"] <= 2 * s["device_experts"]
    else:  # the torch fallback: one computation per expert
        assert s["launches"] == s["device_experts"]
    per = m.stats.per_layer()
    assert set(per) == set(ex.layers) and all(v["measured_ms"] > 0 for v in per.values())


def test_no_profile_means_default_costs_said_so(tmp_path, monkeypatch):
    from moecli.runtime.executor import default_costs

    monkeypatch.setenv("MOECLI_PROFILES", str(tmp_path))
    m = moecli.load(tiny_gguf("qwen3moe", "F32"), placement="lru", expert_slots=2)
    assert m.cost_source.startswith("no host profile")
    assert m.transformer.experts.refit.prior == default_costs(m.checkpoint)
    with pytest.raises(moecli.api.MoecliError, match="not found"):
        moecli.load(tiny_gguf("qwen3moe", "F32"), placement="lru", host_profile=tmp_path / "missing.toml")
