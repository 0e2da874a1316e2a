from pathlib import Path

import pytest

from moecli.errors import MoecliError
from moecli.policy.cost import build_cost_model, load_profile
from moecli.policy.geometry import BITS_PER_WEIGHT, GEOMETRIES, get_geometry

PROFILES = Path(__file__).resolve().parents[1] / "moecli" / "profiles"


def test_quant_block_sizes():
    assert BITS_PER_WEIGHT["Q4_K"] == 4.5 and BITS_PER_WEIGHT["Q8_0"] == 8.5 and BITS_PER_WEIGHT["F16"] == 16
    assert 4.8 < BITS_PER_WEIGHT["Q4_K_M"] < 4.9


def test_mixtral_on_paper_testbed_matches_published_figures():
    g = get_geometry("mixtral-8x7b")
    assert g.expert_bytes("Q4_K") == pytest.approx(99.1e6, rel=0.01)  # ≈100 MB
    cm = build_cost_model(load_profile(PROFILES / "hybrimoe-testbed.toml"), g)
    assert cm.copy_ms == pytest.approx(8.3, rel=0.03)                  # ≈8 ms over PCIe 3.0
    assert cm.cpu(1) == pytest.approx(1.44, rel=0.05)                   # ≈1.4 ms on the CPU
    assert cm.dev(1) < cm.cpu(1) < cm.copy_ms


def test_all_reference_profiles_load_for_all_geometries():
    for p in PROFILES.glob("*.toml"):
        prof = load_profile(p)
        for g in GEOMETRIES.values():
            cm = build_cost_model(prof, g)
            assert cm.cpu_a > 0 and cm.cpu_b > 0 and cm.copy_ms > 0 and cm.dev_g0 > 0


def test_measured_fit_overrides_derivation(tmp_path):
    text = (PROFILES / "hybrimoe-testbed.toml").read_text()
    text = text.replace("[gpu]", '[[cpu.fit]]\nmodel = "mixtral-8x7b"\nquant = "Q4_K"\na_ms = 0.5\nb_ms = 2.0\n\n[gpu]')
    (tmp_path / "h.toml").write_text(text)
    cm = build_cost_model(load_profile(tmp_path / "h.toml"), get_geometry("mixtral-8x7b"))
    assert (cm.cpu_a, cm.cpu_b) == (0.5, 2.0)


def test_bad_profiles_are_one_line_errors(tmp_path):
    with pytest.raises(MoecliError):
        load_profile(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[cpu\n")
    with pytest.raises(MoecliError):
        load_profile(tmp_path / "bad.toml")
    (tmp_path / "nopcie.toml").write_text("[cpu]\n[gpu]\n")
    with pytest.raises(MoecliError):
        load_profile(tmp_path / "nopcie.toml")
    with pytest.raises(MoecliError):
        get_geometry("nope")
