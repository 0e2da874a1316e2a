"""Bad input: one clear `error:` line, a non-zero exit, never a traceback."""
import json
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from moecli.errors import MoecliError
from moecli.models.loader import load_checkpoint


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "moecli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc, pattern):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert pattern in lines[0], lines[0]


def rewrite_gguf(src, dst, edit_metadata=None, edit_tensor=None):
    """Copy a GGUF, changing metadata (dict -> dict) or tensors ((name, array) -> array)."""
    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(dst, arch)
    meta = {k: (f.types, f.contents()) for k, f in r.fields.items()
            if not k.startswith("GGUF.") and k != "general.architecture"}
    if edit_metadata:
        meta = edit_metadata(meta)
    for k, (types, value) in meta.items():
        w.add_key_value(k, value, types[0], sub_type=types[-1] if len(types) > 1 else None)
    for t in r.tensors:
        data = np.array(t.data)
        if edit_tensor:
            data = edit_tensor(t.name, data)
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_missing_file(tmp_path):
    assert_one_line_error(run_cli("chat", tmp_path / "nope.gguf", "-p", "hi"), "no such file")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"this is a text file, not a model\n" * 10)
    assert_one_line_error(run_cli("chat", p, "-p", "hi"), "not a GGUF file")


def test_truncated_gguf(tmp_path, tiny_llama_f32):
    p = tmp_path / "cut.gguf"
    data = tiny_llama_f32.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    assert_one_line_error(run_cli("chat", p, "-p", "hi"), "truncated")
    p.write_bytes(data[:200])  # cut inside the header
    assert_one_line_error(run_cli("chat", p, "-p", "hi"), "GGUF")


def test_unsupported_architecture(tmp_path, tiny_llama_f32):
    p = tmp_path / "arch.gguf"

    def rename(meta):
        return {k.replace("llama.", "mamba9."): v for k, v in meta.items()}

    rewrite_gguf(tiny_llama_f32, p, edit_metadata=rename)
    # GGUFWriter takes the architecture from its constructor: patch the value in place (same length).
    raw = bytearray(p.read_bytes())
    i = raw.index(b"general.architecture") + len(b"general.architecture") + 4 + 8
    assert raw[i:i + 5] == b"llama"
    raw[i:i + 5] = b"nope5"
    p.write_bytes(bytes(raw))
    assert_one_line_error(run_cli("chat", p, "-p", "hi"), "unsupported architecture 'nope5'")


def test_unsupported_tensor_type(tmp_path, tiny_llama_f32):
    p = tmp_path / "type.gguf"
    raw = bytearray(tiny_llama_f32.read_bytes())
    name = b"blk.0.attn_q.weight"
    i = raw.index(name) + len(name)
    n_dims = int.from_bytes(raw[i:i + 4], "little")
    t = i + 4 + 8 * n_dims
    raw[t:t + 4] = (99).to_bytes(4, "little")  # no such ggml type
    p.write_bytes(bytes(raw))
    assert_one_line_error(run_cli("chat", p, "-p", "hi"), "unsupported tensor type")


def test_wrong_shape(tmp_path, tiny_llama_f32):
    p = tmp_path / "shape.gguf"
    rewrite_gguf(tiny_llama_f32, p,
                 edit_tensor=lambda name, a: a[:-8] if name == "blk.1.attn_k.weight" else a)
    with pytest.raises(MoecliError, match=r"tensor blk.1.attn_k.weight has shape"):
        load_checkpoint(p)
    assert_one_line_error(run_cli("chat", p, "-p", "hi"), "blk.1.attn_k.weight")


def test_safetensors_without_config(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\x00" * 16)
    assert_one_line_error(run_cli("chat", d, "-p", "hi"), "no config.json")


def test_pickled_weights_are_never_loaded(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert_one_line_error(run_cli("chat", d, "-p", "hi"), "never loaded")


def test_bad_flag_value():
    proc = run_cli("chat", "-p", "hi", "--top-p", "7")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "top-p" in proc.stderr


def test_not_enough_memory_is_said_before_loading(tiny_llama_f32):
    import psutil

    from moecli import limits

    total = psutil.virtual_memory().total
    with pytest.raises(MoecliError, match=r"not enough memory: the weights need about .* GiB; this host has"):
        limits.check_weights(total * 2, "the weights")
    limits.check_weights(total // 4, "the weights")  # fits: no error
