"""The harmony chat format (gpt-oss): the streaming channel parser, the fallback template in the sandbox, the control
tokens and end-of-generation rules as llama.cpp's vocabulary gives them, and the chat loop on the tiny gpt-oss."""
import io

import pytest
from conftest import tiny_gguf

import moecli
from moecli.chat.harmony import TEMPLATE, HarmonyParser, is_harmony
from moecli.chat_template import render

COMPLETION = ("<|channel|>analysis<|message|>The user greets; answer briefly.<|end|>"
              "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?")


def _parse(text: str, chunk: int) -> list[tuple[str, str]]:
    p, out = HarmonyParser(), []
    for i in range(0, len(text), chunk):
        out += p.push(text[i:i + chunk])
    out += p.flush()
    merged: list[tuple[str, str]] = []
    for ch, t in out:
        if merged and merged[-1][0] == ch:
            merged[-1] = (ch, merged[-1][1] + t)
        else:
            merged.append((ch, t))
    return merged


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_parser_splits_channels_whatever_the_chunking(chunk):
    assert _parse(COMPLETION, chunk) == [("analysis", "The user greets; answer briefly."),
                                         ("final", "Hello! How can I help?")]


def test_parser_tool_call_and_plain_text():
    call = ("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}"
            "<|call|>")
    assert _parse(call, 5) == [("commentary", '{"city": "Paris"}')]
    assert _parse("no channels at all <b>bold</b> a<|b", 4) == [("final", "no channels at all <b>bold</b> a<|b")]
    # a marker inside an answer that the format does not expect there is kept as text
    assert _parse("<|channel|>final<|message|>x <|start|> y", 3) == [("final", "x <|start|> y")]


def test_fallback_template_renders_harmony_in_the_sandbox():
    msgs = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Salut !"}, {"role": "user", "content": "Ça va ?"}]
    text = render(TEMPLATE, msgs, True, reasoning_effort="high")
    assert is_harmony(TEMPLATE) and not is_harmony(None)
    assert text.startswith("<|start|>system<|message|>") and "Reasoning: high" in text
    assert "<|start|>developer<|message|># Instructions\n\nAnswer in French.<|end|>" in text
    assert "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Salut !<|end|>" in text
    assert text.endswith("<|start|>user<|message|>Ça va ?<|end|><|start|>assistant")


def test_tiny_gpt_oss_speaks_harmony():
    m = moecli.load(tiny_gguf("gpt-oss", "F32"))
    assert m.harmony
    pieces = [m.detokenize([i]) for i in m.tokenize("<|start|>assistant<|channel|>final<|message|>hi<|end|>")]
    assert [p for p in pieces if p.startswith("<|")] == ["<|start|>", "<|channel|>", "<|message|>", "<|end|>"]
    assert "".join(pieces) == "<|start|>assistant<|channel|>final<|message|>hi<|end|>"  # each marker one token
    tok = m.tokenizer
    eog = {t: tok.is_eog(m.tokenize(t)[0]) for t in ("<|return|>", "<|call|>", "<|end|>")}
    assert eog == {"<|return|>": True, "<|call|>": True, "<|end|>": False}  # llama.cpp's o200k_harmony rule


def test_chat_keeps_only_the_answer():
    from moecli.chat.repl import Chat, Settings

    m = moecli.load(tiny_gguf("gpt-oss", "F32"))
    out, err = io.StringIO(), io.StringIO()
    chat = Chat(m, Settings(temperature=0.0, max_tokens=24, system="Be brief."), out=out, err=err)
    prompt = m.chat_prompt(chat.conversation() + [{"role": "user", "content": "hello"}])
    assert prompt.startswith("<|start|>system") and prompt.endswith("<|start|>assistant")
    assert chat.answer("hello") == "ok"
    reply = chat.messages[-1]
    assert reply["role"] == "assistant" and "<|" not in reply["content"] and "<|" not in reply.get("thinking", "")
    assert out.getvalue().strip() == reply["content"].strip()
