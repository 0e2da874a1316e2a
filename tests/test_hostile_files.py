"""Regression tests: each crash class a hostile model file caused (issue #16) fails cleanly now.

Before the validation pass these aborted the process through ctypes (SIGABRT/SIGFPE), hung, printed a traceback or
an internal error, or were silently accepted. Now each is one MoecliError / one `error:` line naming the field and
its value. Anything that can reach llama.cpp runs in a subprocess, so a regression fails the test instead of killing
the run.
"""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hostile_gguf as H
from moecli.errors import MoecliError
from moecli.models.loader import load_checkpoint

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def base(workdir) -> Path:
    return H.base_gguf(workdir)


@pytest.fixture(scope="module")
def base_hf(workdir) -> Path:
    return H.base_hf(workdir)


def edited(base: Path, out: Path, edit) -> Path:
    g = H.RawGGUF.read(base)
    edit(g)
    return g.write(out)


def refused(path, match: str):
    with pytest.raises(MoecliError, match=match):
        load_checkpoint(path)


def isolated(code: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Python code in a fresh process (a native abort there fails the test, not the run)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode >= 0, f"killed by signal {-p.returncode}: {p.stderr[-2000:]}"
    return p


def cli(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "moecli", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    assert p.returncode >= 0, f"killed by signal {-p.returncode}: {p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr[-2000:]
    return p


def one_error(p: subprocess.CompletedProcess, match: str) -> None:
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], p.stderr[-2000:]


A = "llama"  # the base file's architecture


# ---------------------------------------------------------------------------------------------- native aborts

@pytest.mark.parametrize("key", ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"])
def test_special_token_id_beyond_vocabulary(base, tmp_path, key):
    p = edited(base, tmp_path / "m.gguf", lambda g: g.set(key, H.UINT32, 100000))
    refused(p, f"{key} = 100000 is outside the vocabulary of 400 tokens")


@pytest.mark.parametrize("n", [0, 1])
def test_empty_or_short_token_list(base, tmp_path, n):
    def edit(g):
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
            sub, items = g.get(key)
            g.set(key, H.ARRAY, (sub, items[:n]))

    p = edited(base, tmp_path / "m.gguf", edit)
    if n == 0:
        refused(p, "tokenizer.ggml.tokens has 0 tokens")
    else:  # one token (the specials' id 0): valid, so it must run or fail in one line, never abort
        proc = cli("chat", p, "-p", "hi", "-n", "2", "-c", "64")
        assert proc.returncode == 0 or len([l for l in proc.stderr.splitlines() if l.startswith("error:")]) == 1


def test_token_type_shorter_than_tokens(base, tmp_path):
    p = edited(base, tmp_path / "m.gguf", lambda g: g.set("tokenizer.ggml.token_type", H.ARRAY,
                                                         (H.INT32, g.get("tokenizer.ggml.token_type")[1][:10])))
    refused(p, "token_type has 10 entries for 400 tokens")


def test_vocabulary_shorter_than_embedding_rows_decodes_padding_as_empty(base, tmp_path):
    """A realistic padded file: 400 embedding rows, 390 tokens. Sampling may pick a padding row."""
    def edit(g):
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
            sub, items = g.get(key)
            g.set(key, H.ARRAY, (sub, items[:390]))

    p = edited(base, tmp_path / "padded.gguf", edit)
    r = isolated(f"""
import moecli
m = moecli.load({str(p)!r}, n_ctx=64)
assert m.config.n_vocab == 400 and m.tokenizer.n_vocab == 390
assert m.detokenize([395, 399]) == '' and not m.tokenizer.is_eog(399) and not m.tokenizer.is_eog(-1)
assert m.tokenizer.token_bytes(10 ** 9) == b''
ids = m.tokenize('Hello')
assert m.detokenize(ids) == 'Hello'
print('ok')
""")
    assert r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_sentencepiece_model_on_a_gpt2_vocabulary(base, tmp_path):
    p = edited(base, tmp_path / "m.gguf", lambda g: g.set("tokenizer.ggml.model", H.STRING, "llama"))
    refused(p, "llama .SentencePiece. vocabulary has no token for byte 0x")
    one_error(cli("chat", p, "-p", "hi", "-n", "2"), "no token for byte")


def test_unknown_tokenizer_model(base, tmp_path):
    p = edited(base, tmp_path / "m.gguf", lambda g: g.set("tokenizer.ggml.model", H.STRING, "bert"))
    refused(p, "tokenizer.ggml.model 'bert' is not supported")
    refused(edited(base, tmp_path / "n.gguf", lambda g: g.set("tokenizer.ggml.model", H.UINT8, 2)),
            "tokenizer.ggml.model is int 2, expected str")


@pytest.mark.parametrize("value", [48, 33, 0])
def test_rope_dimension_count_beyond_or_odd(base, tmp_path, value):
    p = edited(base, tmp_path / "m.gguf", lambda g: g.set(f"{A}.rope.dimension_count", H.UINT32, value))
    if value == 0:  # 0 means "all of head_dim" (llama.cpp's default too)
        load_checkpoint(p)
        return
    refused(p, f"rope.dimension_count = {value} must be even and within the head dimension 32")


@pytest.mark.parametrize("value", [-1e-5, math.nan, math.inf, 0.0])
def test_rms_epsilon_negative_nan_or_zero(base, tmp_path, value):
    p = edited(base, tmp_path / "m.gguf",
               lambda g: g.set(f"{A}.attention.layer_norm_rms_epsilon", H.FLOAT32, value))
    refused(p, "layer_norm_rms_epsilon = .* must be a finite number in")


def test_expert_used_count_above_expert_count(base, tmp_path):
    p = edited(base, tmp_path / "m.gguf", lambda g: g.set(f"{A}.expert_used_count", H.UINT32, 5))
    refused(p, "expert_used_count = 5 must be between 1 and the 4 experts")


# ---------------------------------------------------------------------------------------------- SIGFPE

def test_expert_used_count_zero(base, tmp_path):
    p = edited(base, tmp_path / "m.gguf", lambda g: g.set(f"{A}.expert_used_count", H.UINT32, 0))
    refused(p, "expert_used_count = 0 must be between 1")
    one_error(cli("chat", p, "-p", "hi", "-n", "2"), "expert_used_count = 0")


def test_hf_num_experts_per_tok_zero(base_hf, tmp_path):
    d = _hf_copy(base_hf, tmp_path)
    _edit_json(d / "config.json", lambda c: c.update(num_experts_per_tok=0))
    refused(d, "num_experts_per_tok = 0 must be between 1")


# ---------------------------------------------------------------------------------------------- hangs

def test_block_count_two_to_the_31(base, tmp_path):
    p = edited(base, tmp_path / "m.gguf", lambda g: g.set(f"{A}.block_count", H.UINT32, 1 << 31))
    refused(p, "block_count = 2147483648 but the file has tensors for 2 layers")
    one_error(cli("show", p, timeout=60), "block_count = 2147483648")


def test_fifo_named_model_safetensors(base_hf, tmp_path):
    d = _hf_copy(base_hf, tmp_path)
    (d / "model.safetensors").unlink()
    os.mkfifo(d / "model.safetensors")
    refused(d, "is a FIFO, not a safetensors file")
    one_error(cli("show", d, timeout=60), "is a FIFO")


@pytest.mark.parametrize("name", ["model.gguf", "config.json"])
def test_fifo_named_like_a_model_file(base_hf, tmp_path, name):
    if name == "config.json":
        target = _hf_copy(base_hf, tmp_path)
        (target / name).unlink()
        os.mkfifo(target / name)
    else:
        target = tmp_path / name
        os.mkfifo(target)
    refused(target, "is a FIFO")


def test_device_is_not_a_model(tmp_path):
    refused("/dev/zero", "is a device, not a GGUF file")


# ---------------------------------------------------------------------------------------------- tracebacks

@pytest.mark.parametrize("ne", [[64, 0], [0, 400]])
def test_tensor_with_a_zero_dimension(base, tmp_path, ne):
    p = edited(base, tmp_path / "m.gguf", lambda g: setattr(g.tensor("token_embd.weight"), "ne", ne))
    refused(p, r"tensor token_embd.weight has shape \[")


def test_tensor_with_fewer_dims_than_its_role(base, tmp_path):
    def edit(g):
        t = g.tensor("token_embd.weight")
        t.ne = [t.ne[0] * t.ne[1]]

    refused(edited(base, tmp_path / "m.gguf", edit), "token_embd.weight has shape .*expected 2 dimensions")


@pytest.mark.parametrize("vtype, value, kind", [(H.UINT32, 7, "int"), (H.ARRAY, (H.STRING, ["a", "b"]),
                                                                        "array of str")])
def test_chat_template_of_the_wrong_type(base, tmp_path, vtype, value, kind):
    p = edited(base, tmp_path / "m.gguf", lambda g: g.set("tokenizer.chat_template", vtype, value))
    refused(p, f"metadata tokenizer.chat_template is {kind}")


@pytest.mark.parametrize("key", ["block_count", "embedding_length", "attention.head_count", "rope.freq_base",
                                 "context_length"])
def test_string_where_a_number_belongs(base, tmp_path, key):
    p = edited(base, tmp_path / "m.gguf", lambda g: g.set(f"{A}.{key}", H.STRING, "12"))
    refused(p, f"metadata {A}.{key} is str '12', expected")


def test_nested_gguf_arrays_are_read_past(base, tmp_path):
    """An array of arrays is valid GGUF: the keys after it must read as they are written."""
    def edit(g):
        g.kv.insert(1, ("test.nested", H.ARRAY, (H.ARRAY, [(H.INT32, [1, 2]), (H.STRING, ["a", "bc"]),
                                                           (H.ARRAY, [(H.FLOAT32, [0.5])])])))

    from moecli.formats.gguf import GGUFFile

    g = GGUFFile(edited(base, tmp_path / "m.gguf", edit))
    assert g.get("test.nested") == [[1, 2], ["a", "bc"], [[0.5]]]
    assert g.get("general.name") == "moecli-synth-llama" and len(g.tensors) == 23


def test_deeply_nested_gguf_arrays(base, tmp_path):
    v = (H.INT32, [1])
    for _ in range(100):
        v = (H.ARRAY, [v])
    p = edited(base, tmp_path / "m.gguf", lambda g: g.kv.insert(1, ("test.deep", H.ARRAY, v)))
    refused(p, "arrays nested more than 8 deep")


@pytest.mark.parametrize("value", [0.0, -10000.0, math.nan])
def test_rope_freq_base_zero_negative_or_nan(base, tmp_path, value):
    p = edited(base, tmp_path / "m.gguf", lambda g: g.set(f"{A}.rope.freq_base", H.FLOAT32, value))
    refused(p, "rope.freq_base = .* must be a finite positive number")


def test_context_length_zero(base, tmp_path):
    p = edited(base, tmp_path / "m.gguf", lambda g: g.set(f"{A}.context_length", H.UINT32, 0))
    refused(p, "context_length = 0 is out of range")


def test_context_length_one(base, tmp_path):
    p = edited(base, tmp_path / "m.gguf", lambda g: g.set(f"{A}.context_length", H.UINT32, 1))
    load_checkpoint(p)  # valid, if useless: a one-token context
    proc = cli("chat", p, "-p", "hello there", "-n", "2")
    assert proc.returncode == 0 or len([l for l in proc.stderr.splitlines() if l.startswith("error:")]) == 1


def _hf_copy(base_hf: Path, tmp_path: Path) -> Path:
    import shutil

    d = tmp_path / "hf"
    shutil.copytree(base_hf, d)
    return d


def _edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    value = edit(value) or value
    path.write_text(json.dumps(value))


def _edit_header(d: Path, edit) -> None:
    shard = d / "model.safetensors"
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header = edit(header) or header
    new = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _first_tensor(header) -> str:
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize("edit, match", [
    (lambda h: [h], "bad safetensors header .a JSON list, not an object"),
    (lambda h: h.update({_first_tensor(h): [1, 2]}), "header entry is list, not an object"),
    (lambda h: h[_first_tensor(h)].update(data_offsets=[0]), r"data_offsets \[0\] is not \[begin, end\]"),
    (lambda h: h[_first_tensor(h)].update(data_offsets=["0", "8"]), "data_offsets .* is not"),
    (lambda h: h[_first_tensor(h)].update(data_offsets=[-8, 0]), "data_offsets .* is not"),
    (lambda h: h[_first_tensor(h)].update(shape=[-1, 64]), "shape .* is not a list"),
    (lambda h: h[_first_tensor(h)].update(shape="64"), "shape .* is not a list"),
    (lambda h: h.update(__metadata__=[1]), "__metadata__ is not an object"),
])
def test_malformed_safetensors_header(base_hf, tmp_path, edit, match):
    d = _hf_copy(base_hf, tmp_path)
    _edit_header(d, edit)
    refused(d, match)


def test_overlapping_safetensors_tensors(base_hf, tmp_path):
    def edit(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = h[names[0]], h[names[1]]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + b["data_offsets"][1] - b["data_offsets"][0]]

    d = _hf_copy(base_hf, tmp_path)
    _edit_header(d, edit)
    refused(d, "overlap in the file")


@pytest.mark.parametrize("edit, match", [
    (lambda c: [c], "config.json must be a JSON object, not list"),
    (lambda c: c.update(hidden_size="64"), "hidden_size is '64', expected an integer"),
    (lambda c: c.update(num_hidden_layers=[2]), "num_hidden_layers is \\[2\\], expected an integer"),
    (lambda c: c.update(rms_norm_eps=None), "rms_norm_eps is None, expected a number"),
    (lambda c: c.update(model_type=["mixtral"]), "model_type is \\['mixtral'\\], expected a string"),
    (lambda c: c.update(num_hidden_layers=0), "num_hidden_layers = 0 is out of range"),
    (lambda c: c.update(num_hidden_layers=5), "num_hidden_layers = 5 but the file has tensors for 2 layers"),
])
def test_malformed_config_json(base_hf, tmp_path, edit, match):
    d = _hf_copy(base_hf, tmp_path)
    _edit_json(d / "config.json", edit)
    refused(d, match)


@pytest.mark.parametrize("text", ["", "[]", '{"model": 1}', "\0\1garbage"])
def test_garbage_tokenizer_json(base_hf, tmp_path, text):
    d = _hf_copy(base_hf, tmp_path)
    (d / "tokenizer.json").write_text(text)
    one_error(cli("chat", d, "-p", "hi", "-n", "2", "-c", "64"), "tokenizer")


# ---------------------------------------------------------------------------------------------- silently accepted

def test_n_tensors_one_lower_than_the_tensors(base, tmp_path):
    def edit(g):
        g.n_tensors = len(g.tensors) - 1

    refused(edited(base, tmp_path / "m.gguf", edit), "bytes after the last tensor: the header's n_tensors = 22")


def test_misaligned_tensor_offset(base, tmp_path):
    def edit(g):
        g.tensors[3].offset += 4

    refused(edited(base, tmp_path / "m.gguf", edit), "at data offset .*, expected .*aligned to 32 bytes")


def test_duplicate_tensor_names(base, tmp_path):
    def edit(g):
        g.tensors[2].name = g.tensors[1].name

    refused(edited(base, tmp_path / "m.gguf", edit), "duplicate tensor name blk.0.attn_norm.weight")


def test_duplicate_metadata_keys(base, tmp_path):
    refused(edited(base, tmp_path / "m.gguf", lambda g: g.kv.append(g.kv[1])), "duplicate key general.name")


@pytest.mark.parametrize("align", [0, 24, 48])
def test_alignment_not_a_power_of_two(base, tmp_path, align):
    p = edited(base, tmp_path / "m.gguf", lambda g: g.set("general.alignment", H.UINT32, align))
    refused(p, f"general.alignment = {align}: not a power of two")


def test_huge_counts_fail_at_once(base, tmp_path):
    raw = bytearray(base.read_bytes())
    raw[16:24] = struct.pack("<Q", 1 << 23)  # n_kv: more keys than the file can hold
    p = tmp_path / "m.gguf"
    p.write_bytes(bytes(raw))
    refused(p, "implausible counts")


# ---------------------------------------------------------------------------------------------- NaN / inf logits

def test_nan_weights_are_a_model_error(base, tmp_path):
    """A file that passes validation but computes NaN: reported after the first forward, never returned."""
    g = H.RawGGUF.read(base)
    t = g.tensor("output_norm.weight")
    data = bytearray(g.data)
    data[t.offset:t.offset + 4 * t.ne[0]] = np.full(t.ne[0], np.nan, np.float32).tobytes()
    g.data = bytes(data)
    p = g.write(tmp_path / "nan.gguf")
    r = isolated(f"""
import moecli
from moecli.errors import MoecliError
m = moecli.load({str(p)!r}, n_ctx=64)
for call in (lambda: m.logits(m.tokenize('Hello')), lambda: list(m.generate('Hello', max_tokens=2))):
    try:
        call()
        print('returned')
    except MoecliError as e:
        print('error:', e)
""")
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all("NaN/inf logits" in l for l in lines), r.stdout + r.stderr[-2000:]
    one_error(cli("chat", p, "-p", "hi", "-n", "2", "-c", "64"), "NaN/inf logits")
