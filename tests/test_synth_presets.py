"""Synthetic models of real geometries: every type written in one pass (no F32 temporary), tensor by tensor equal to
what llama.cpp's own quantizer makes of the F32 file; the presets' sizes; the bench writer's space check and bar."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
from gguf import GGUFReader

from conftest import TINY
from moecli import synth
from moecli.errors import MoecliError

ROOT = Path(__file__).resolve().parents[1]
_LLAMA_FTYPE = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # pure K types: llama.cpp's ftype + pure

# a 9-layer qwen3moe with 4 experts: llama.cpp's "more bits" layers and its non-8-expert rules all appear
NINE = ("qwen3moe", dataclasses.replace(TINY["qwen3moe"][1], n_layer=9, n_expert=4, n_expert_used=2))
CASES = [
    ("nine", "Q4_K_M"), ("nine", "Q5_K_M"), ("nine", "Q3_K_M"), ("nine", "Q4_K_S"), ("nine", "Q3_K_L"),
    ("nine", "Q5_K_S"), ("nine", "Q4_K"), ("nine", "Q6_K"), ("nine", "IQ4_XS"), ("nine", "Q2_K"),
    ("mixtral", "Q4_K_M"),        # 8 experts: attn_k / attn_v to Q8_0, attn_output Q5_K
    ("glm4moe", "Q4_K_M"),        # dense layer, shared expert, NextN layer counted in block_count
    ("smallthinker", "Q4_K_M"),   # tied embedding: quantized as the output head
    ("deepseek2-lite", "Q3_K_M"),  # attn_kv_b counts as attention-v
    ("llama-dense", "Q5_K_M"),
]


def _model(name):
    return NINE if name == "nine" else TINY[name]


def _tensors(path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("name,ftype", CASES)
def test_direct_write_equals_llama_quantize(tmp_path, name, ftype):
    """The one-pass writer gives every tensor llama.cpp's type and llama.cpp's bytes (same ggml quantizer, same
    per-tensor choice), and the same general.file_type."""
    arch, dims = _model(name)
    direct = synth.write_gguf(tmp_path / "direct.gguf", arch, dims, 3, ftype)
    f32 = synth.write_gguf(tmp_path / "f32.gguf", arch, dims, 3, "F32")
    ref = tmp_path / "ref.gguf"
    synth.llama_quantize(f32, ref, _LLAMA_FTYPE.get(ftype, ftype), pure=ftype in synth._PURE)
    got, want = _tensors(direct), _tensors(ref)
    assert got.keys() == want.keys()
    types = {n: (got[n].tensor_type.name, want[n].tensor_type.name) for n in got}
    assert {n: a for n, (a, b) in types.items() if a != b} == {}, "types differ from llama.cpp's"
    assert len({a for a, _ in types.values()}) >= 2  # F32 norms/router beside the quantized weights
    for n in got:
        assert got[n].data.tobytes() == want[n].data.tobytes(), n
    ft = {p: int(GGUFReader(p).fields["general.file_type"].contents()) for p in (direct, ref)}
    assert ft[direct] == ft[ref]
    assert synth.tensor_types(arch, dims, ftype) == {n: a for n, (a, _) in types.items()}


def test_file_type_ids_are_llama_cpps():
    import llama_cpp.llama_cpp as L

    for name, v in synth.FILE_TYPE.items():
        key = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{_LLAMA_FTYPE.get(name, name)}"
        assert getattr(L, key) == v, name


def test_one_pass_no_temporary_and_progress_adds_up(tmp_path):
    """Nothing but the output file appears while writing; progress reports exactly the tensor bytes."""
    arch, dims = TINY["qwen3moe"]
    out = tmp_path / "m.gguf"
    seen, steps = set(), []

    def step(n):
        steps.append(n)
        seen.update(p.name for p in tmp_path.iterdir())

    synth.write_gguf(out, arch, dims, 0, "Q4_K_M", progress=step, threads=2)
    assert seen == {"m.gguf"}
    assert sum(steps) == synth.tensor_bytes(arch, dims, "Q4_K_M")
    assert sum(steps) < out.stat().st_size < sum(steps) * 1.1 + (1 << 20)  # + metadata (tokenizer) and padding


def test_threads_do_not_change_the_bytes(tmp_path):
    arch, dims = TINY["qwen2moe"]
    a = synth.write_gguf(tmp_path / "a.gguf", arch, dims, 1, "Q4_K_M", threads=1)
    b = synth.write_gguf(tmp_path / "b.gguf", arch, dims, 1, "Q4_K_M", threads=3)
    assert a.read_bytes() == b.read_bytes()


def test_big_tensors_are_written_in_bounded_slices():
    """An embedding larger than one slice is cut into row blocks; expert stacks into experts: RAM stays at a few
    slices whatever the geometry."""
    shape = (151936, 2560)
    sl = synth._slices("token_embd.weight", shape)
    assert len(sl) > 1 and sum(s[0] for _, s in sl) == shape[0]
    assert max(s[0] * s[1] for _, s in sl) <= synth._CHUNK
    assert [s for _, s in synth._slices("blk.0.ffn_up_exps.weight", (64, 768, 2560))] == [(768, 2560)] * 64


def test_presets_have_real_sizes():
    """Full-depth presets weigh what the published Q4_K_M files do (Qwen3-30B-A3B: 18.6 GB), and every preset on
    this build gives a tensor plan; a few layers make a benchmark that fits this machine."""
    from moecli.models.loader import GGUF_ARCHS
    from moecli.policy.geometry import REAL_MODELS

    q = REAL_MODELS["qwen3-30b-a3b"]
    full = synth.tensor_bytes(q.arch, synth.geometry("qwen3-30b-a3b", q.dims["n_layer"]), "Q4_K_M")
    assert abs(full / 18.6e9 - 1) < 0.02, full
    for name, r in REAL_MODELS.items():
        if r.arch not in GGUF_ARCHS:
            continue
        few = synth.tensor_bytes(r.arch, synth.geometry(name, 2), "Q4_K_M")
        assert 0 < few < 13e9, (name, few)  # llama4-maverick's one MoE layer (128 experts of 5120 x 8192): 9.7 GB


def test_preset_unknown_names_are_one_clear_error():
    with pytest.raises(KeyError, match="unknown geometry 'nope'"):
        synth.geometry("nope")
    with pytest.raises(ValueError, match="ftype must be one of"):
        synth.tensor_types(*TINY["qwen3moe"], "Q9_X")


# ---------------------------------------------------------------------------------------------- bench --synthetic

def test_synthetic_estimate_and_free_space_check(tmp_path):
    """The free-space check's estimate against a file synth really writes, and the refusal."""
    from moecli.bench import synthetic as S

    arch, dims = TINY["qwen3moe"]
    for ftype in ("Q8_0", "Q4_K_M"):
        need = S.estimate_bytes(synth, arch, dims, ftype)
        real = synth.write_gguf(tmp_path / f"t-{ftype}.gguf", arch, dims, 0, ftype).stat().st_size
        assert real <= need <= 1.1 * real + (2 << 20), (ftype, real, need)
    with pytest.raises(MoecliError, match=r"not enough disk space for the test: about .* needed, .* free in"):
        S.check_space(tmp_path, 1 << 60, "the test")


def test_synthetic_writer_shows_progress_on_a_terminal(tmp_path):
    """The bar follows the bytes the writer reports (through a real pseudo-terminal), and a failing writer's error
    reaches the caller."""
    pexpect = pytest.importorskip("pexpect")
    script = tmp_path / "w.py"
    script.write_text("""
import time
from moecli.bench.synthetic import _write_watched
def write(step):
    for _ in range(8):
        step(1 << 20); time.sleep(0.2)
_write_watched(write, 8 << 20, True)
print("done")
""")
    env = dict(os.environ, TERM="xterm", PYTHONPATH=str(ROOT))
    c = pexpect.spawn(sys.executable, [str(script)], env=env, encoding="utf-8", timeout=60, dimensions=(24, 120))
    c.expect("writing weights")
    c.expect("MB")
    c.expect("done")
    c.expect(pexpect.EOF)

    from moecli.bench.synthetic import _write_watched

    def broken(step):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        _write_watched(broken, 1, False)
