"""The server's pure parts without HTTP: splitting completions into answer, reasoning and tool calls for every
template family (whatever the chunking), grammars from hostile schemas refused, the lazy tool-call grammar of
llama.cpp taking hold only after its trigger, and the KV slot choice for prompt caching."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_gguf

from moecli.errors import MoecliError
from moecli.serve import grammar as gr
from moecli.serve import toolcalls as tc
from moecli.serve.output import OutputParser, opens_thinking


def _run(fam, text, chunk, tools=True, reasoning=False, in_reasoning=False):
    p, events = OutputParser(fam, tools, reasoning, in_reasoning), []
    for i in range(0, len(text), chunk):
        events += p.push(text[i:i + chunk])
    events += p.flush()
    merged = []
    for kind, v in events:
        if kind != "tool" and merged and merged[-1][0] == kind:
            merged[-1] = (kind, merged[-1][1] + v)
        else:
            merged.append((kind, v if kind != "tool" else (v.name, v.arguments)))
    return merged


CASES = [
    (tc.HERMES, 'Sure.<tool_call>\n{"name": "get", "arguments": {"city": "Paris"}}\n</tool_call>', {},
     [("content", "Sure."), ("tool", ("get", '{"city": "Paris"}'))]),
    (tc.HERMES, '<tool_call>\nget_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n'
                '<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>', {},
     [("tool", ("get_weather", '{"city": "Paris", "days": 3}'))]),  # GLM-4.5
    (tc.HERMES, '<tool_call>\n<function=get>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>', {},
     [("tool", ("get", '{"city": "Paris"}'))]),  # Qwen3-Coder
    (tc.HERMES, 'a <tool_call>not json</tool_call> b', {}, [("content", "a <tool_call>not json</tool_call> b")]),
    (tc.HERMES, '<think>hmm <tool\n</think>\n\nOK <tool_c', {"reasoning": True},
     [("reasoning", "hmm <tool\n"), ("content", "OK <tool_c")]),
    (tc.HERMES, 'plan</think>answer', {"reasoning": True, "in_reasoning": True},
     [("reasoning", "plan"), ("content", "answer")]),
    (tc.HERMES, '<tool_call>{"name": "x"}</tool_call>', {"tools": False},
     [("content", '<tool_call>{"name": "x"}</tool_call>')]),
    (tc.LLAMA, '  {"name": "get", "parameters": {"x": 1}}', {}, [("tool", ("get", '{"x": 1}'))]),
    (tc.LLAMA, '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"y": 2}}', {},
     [("tool", ("a", "{}")), ("tool", ("b", '{"y": 2}'))]),
    (tc.LLAMA, '[get(x=1, y="a"), f()]', {}, [("tool", ("get", '{"x": 1, "y": "a"}')), ("tool", ("f", "{}"))]),
    (tc.LLAMA, '[__import__("os").system("x")]', {}, [("content", '[__import__("os").system("x")]')]),
    (tc.LLAMA, 'Hello {x}', {}, [("content", "Hello {x}")]),
    (tc.HARMONY, '<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>commentary '
                 'to=functions.get <|constrain|>json<|message|>{"a": 1}', {},
     [("reasoning", "think"), ("tool", ("get", '{"a": 1}'))]),
    (tc.HARMONY, '<|channel|>analysis<|message|>hm<|end|><|start|>assistant<|channel|>final<|message|>Hi!', {},
     [("reasoning", "hm"), ("content", "Hi!")]),
    (tc.DEEPSEEK, 'x<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get\n```json\n{"a": 1}\n```'
                  '<｜tool▁call▁end｜><｜tool▁calls▁end｜>', {}, [("content", "x"), ("tool", ("get", '{"a": 1}'))]),
    (tc.MISTRAL, '[TOOL_CALLS][{"name": "get", "arguments": {"a": 1}}]', {}, [("tool", ("get", '{"a": 1}'))]),
    (tc.MISTRAL, '[TOOL_CALLS]get[ARGS]{"a": 1}', {}, [("tool", ("get", '{"a": 1}'))]),
]


@pytest.mark.parametrize("chunk", [1, 3, 1000])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_output_split_whatever_the_chunking(case, chunk):
    fam, text, kw, expected = CASES[case]
    assert _run(fam, text, chunk, **kw) == expected


def test_families_from_templates():
    from moecli.chat.harmony import TEMPLATE

    assert tc.family(TEMPLATE) is tc.HARMONY and tc.family(None) is tc.HERMES
    assert tc.family("{% if tools %}<tool_call>{% endif %}") is tc.HERMES
    assert tc.family("<|start_header_id|>{{ tools }}") is tc.LLAMA
    assert tc.family("<｜tool▁calls▁begin｜>") is tc.DEEPSEEK and tc.family("[TOOL_CALLS]") is tc.MISTRAL
    assert opens_thinking("<|im_start|>assistant\n<think>\n") and not opens_thinking("<think>x</think>\n")


@pytest.mark.parametrize("schema,what", [
    ({"type": "array", "minItems": 100000}, "minItems"),
    ({"type": "string", "pattern": "a{99999}"}, "pattern"),
    ({"$ref": "https://example.com/x.json"}, "only local"),
    ({"$ref": "file:///etc/passwd"}, "only local"),
])
def test_hostile_schemas_are_refused(schema, what):
    with pytest.raises(MoecliError, match=what):
        gr.schema_gbnf(schema)
    deep = {"type": "object"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(MoecliError, match="nested"):
        gr.schema_gbnf(deep)
    with pytest.raises(MoecliError):
        gr.schema_gbnf("not a schema")


@pytest.fixture(scope="module")
def tiny():
    import moecli

    return moecli.load(tiny_gguf("qwen3moe", "Q8_0"))


def _allowed(g, n) -> list[int]:
    logits = torch.zeros(n)
    g(logits)
    return torch.nonzero(torch.isfinite(logits)).flatten().tolist()


def test_lazy_tool_grammar_takes_hold_after_its_trigger(tiny):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    tok = tiny.tokenizer
    gbnf = tc.forced_grammar(tc.HERMES, tools, False)
    g = gr.LazyGrammar(lambda: gr.Grammar(tok.llama_vocab, tok.n_vocab, gbnf), tc.lazy_trigger(tc.HERMES), tok)
    assert len(_allowed(g, tok.n_vocab)) == tok.n_vocab  # free text before the trigger
    for t in tiny.tokenize("Let me check. <tool_call>", add_special=False):
        g.accept(t)
    allowed = _allowed(g, tok.n_vocab)
    assert 0 < len(allowed) < tok.n_vocab
    assert all("\n{".startswith(tok.token_bytes(t).decode("utf-8", "replace")) for t in allowed)


def test_a_refused_token_is_an_error_not_an_abort(tiny):
    tok = tiny.tokenizer
    g = gr.Grammar(tok.llama_vocab, tok.n_vocab, 'root ::= "ab"')
    bad = tiny.tokenize("zz", add_special=False)[0]
    assert not g.allows(bad)
    with pytest.raises(MoecliError, match="refuses"):
        g.accept(bad)  # llama.cpp itself would abort the process here
    # a trigger completed by a token whose rest the grammar refuses: the call stays free, nothing aborts
    lazy = gr.LazyGrammar(lambda: gr.Grammar(tok.llama_vocab, tok.n_vocab, 'root ::= "abc"'), "a", tok)
    for t in tiny.tokenize("the man and more", add_special=False):  # "a" arrives inside "man": "an" is refused
        lazy.accept(t)
    assert len(_allowed(lazy, tok.n_vocab)) == tok.n_vocab


def test_slots_keep_conversations_apart_and_reuse_the_longest_prefix(tiny):
    from moecli.api import Session
    from moecli.serve.slots import SlotPool

    pool = SlotPool(lambda: Session(tiny, 256), 2)
    a, b = list(range(10, 40)), list(range(50, 70))
    sa, feed = pool.acquire(a)
    assert feed == a
    tiny.step(sa, feed)
    pool.release(sa)
    sb, feed = pool.acquire(b)  # shares nothing with slot 0: a new slot, slot 0 keeps its tokens
    assert sb is not sa and feed == b
    tiny.step(sb, feed)
    pool.release(sb)
    s2, feed = pool.acquire(a + [1, 2])  # extends conversation a: its slot, only the new tokens
    assert s2 is sa and feed == [1, 2]
    s3, _ = pool.acquire([5])  # the other idle slot
    assert s3 is sb and pool.acquire([6]) is None  # both busy: the request waits
    pool.release(s2, keep=False)
    assert sa.cached == 0


def test_json_schema_on_a_safetensors_model_through_a_vocabulary_built_from_tokenizer_json():
    import json

    import jsonschema
    from conftest import tiny_hf

    import moecli
    from moecli.api import Session
    from moecli.runtime.sampling import Sampler, SamplingParams

    m = moecli.load(tiny_hf("qwen3moe"))
    vocab = gr.hf_vocab(m.path)
    assert all(vocab.token_bytes(t, True) == m.tokenizer.token_bytes(t, True) for t in range(vocab.n_vocab))
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"]}
    g = gr.Grammar(vocab.llama_vocab, vocab.n_vocab, gr.schema_gbnf(schema))
    s, sample, out = Session(m, 256), Sampler(SamplingParams(temperature=0.0)), []
    feed = s.reuse(m.tokenize("Tell me about the sky."))
    for _ in range(80):
        t = sample(m.step(s, feed), s.tokens, g)
        if m.tokenizer.is_eog(t) or g.ends(t):
            break
        g.accept(t)
        out.append(t)
        feed = [t]
    jsonschema.validate(json.loads(m.detokenize(out)), schema)


def test_conversation_as_templates_expect_it():
    from moecli.serve.errors import APIError
    from moecli.serve.schemas import Message
    from moecli.serve.service import conversation, hermes_fallback

    msgs = [Message.model_validate(m) for m in [
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_name": "get", "content": "rainy"},  # ollama's way
    ]]
    conv = conversation(msgs)
    assert conv[0] == {"role": "system", "content": "Be brief."}
    assert conv[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert [c.get("name") for c in conv[3:]] == ["get", "get"]
    fb = hermes_fallback(conv, [{"type": "function", "function": {"name": "get"}}])
    assert fb[0]["role"] == "system" and "<tools>" in fb[0]["content"] and fb[0]["content"].startswith("Be brief.")
    assert '<tool_call>\n{"name": "get", "arguments": {"city": "Paris"}}\n</tool_call>' in fb[2]["content"]
    assert fb[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    with pytest.raises(APIError, match="not supported"):
        conversation([Message.model_validate({"role": "user", "content": [{"type": "image_url"}]})])
