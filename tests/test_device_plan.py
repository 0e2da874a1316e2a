"""VRAM that adds up: the plan counts what the executor allocates, per placement, and refuses what does not fit."""
import pytest

import moecli
from conftest import tiny_gguf
from moecli.errors import MoecliError
from moecli.profile import plan as P
from moecli.policy.geometry import get_geometry

QWEN3 = P.ModelFacts.from_geometry(get_geometry("qwen3-30b-a3b"), "Q4_K")
GB24 = 24_000_000_000


@pytest.mark.parametrize("placement,slots", [("lru", 3), ("hybrimoe", 1), ("n-cpu-moe=1", 0), ("n-cpu-moe", 4),
                                             ("llama-cpp", 8)])
def test_planned_slot_bytes_are_what_the_executor_allocates(placement, slots):
    path = tiny_gguf("qwen3moe", "Q8_0")
    m = moecli.load(path, placement=placement, expert_slots=slots)
    facts = P.ModelFacts.from_checkpoint(m.checkpoint, "tiny")
    planned = P.placement_device_bytes(facts, placement, slots, 256, 0)
    assert m.transformer.experts.dev.storage.numel() == planned["slots"]


def test_n_cpu_moe_counts_device_layers_only():
    # Qwen3-30B-A3B Q4_K: 48 layers x 128 experts. n-cpu-moe=40 keeps 8 layers' experts on the GPU (~2.6 GB of
    # slots), not 48 layers' (~19 GB).
    d = P.placement_device_bytes(QWEN3, "n-cpu-moe=40", 0, 4096, GB24)
    assert d["slots"] == 8 * 129 * QWEN3.expert_bytes
    assert P.placement_device_bytes(QWEN3, "llama-cpp", 0, 4096, GB24)["slots"] == 0
    assert d["total"] == d["dense"] + d["kv"] + d["slots"] + d["workspace"]


def test_a_plan_that_does_not_fit_is_one_clear_error():
    with pytest.raises(MoecliError) as e:
        P.check_fits(QWEN3, "n-cpu-moe=0", 0, 4096, 16_000_000_000, GB24, "cuda:0")  # every expert: ~18.7 GB
    msg = str(e.value)
    assert "\n" not in msg and "cuda:0" in msg and "--n-cpu-moe" in msg and "GB is free" in msg
    ok = P.check_fits(QWEN3, "n-cpu-moe=40", 0, 4096, 16_000_000_000, GB24)
    assert ok["total"] < 16_000_000_000
    # the slot count the plan offers fits by construction
    p = P.make_plan(QWEN3, _gpu(), 4096, 8)
    P.check_fits(QWEN3, "hybrimoe", p.slots_per_layer, 4096, _gpu().free_bytes, GB24)
    with pytest.raises(MoecliError):
        P.check_fits(QWEN3, "hybrimoe", p.slots_per_layer + 1, 4096, _gpu().free_bytes, GB24)


def _gpu():
    from moecli.profile.probe import GpuInfo

    return GpuInfo(0, "24 GB card, 12 GB of it free", total_bytes=GB24, free_bytes=12_000_000_000)
