"""`moecli serve` with real clients: the official `openai` package and plain HTTP (httpx) against a server this module
starts on 127.0.0.1 (the CLI in a subprocess) over a tiny synthetic Qwen3-MoE GGUF. Streaming and not, tools through
the grammar, JSON schemas the unconstrained model never satisfies, prompt caching, concurrency, a client that leaves
mid-stream, each bad input of the issue (the server keeps serving), the API key, `moecli ps`."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import jsonschema
import pytest
from conftest import tiny_gguf
from serve_helpers import ROOT, Server

openai = pytest.importorskip("openai")

CTX = 2048
MESSAGES = [{"role": "user", "content": "Tell me about the sky."}]


@pytest.fixture(scope="module")
def server():
    s = Server(str(tiny_gguf("qwen3moe", "Q8_0")), "--ctx", str(CTX), "-np", "2", "--max-body-mb", "1",
               "--temperature", "0", "--alias", "tiny")
    yield s
    assert s.stop() == 0, "".join(s.stderr)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _ps(server) -> dict:
    return httpx.get(server.url + "/api/ps").json()["models"][0]


# --- OpenAI ----------------------------------------------------------------------------------------------------------
def test_models_and_chat(client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8)
    assert r.object == "chat.completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    # the file name is served too; greedy is deterministic
    again = client.chat.completions.create(model=tiny_gguf("qwen3moe", "Q8_0").name, messages=MESSAGES, max_tokens=8)
    assert again.choices[0].message.content == r.choices[0].message.content


def test_streaming_equals_whole_answer_and_reports_usage(client):
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completions_stop_logprobs_and_seed(client):
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=16, logprobs=3)
    text = r.choices[0].text
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 16 and all(1 <= len(t) <= 3 for t in lp.top_logprobs)  # keyed by text: may merge
    assert all(lp <= 0 for lp in r.choices[0].logprobs.token_logprobs)
    # a stop string cuts the text before it and ends with finish_reason stop
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=16, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:text.find(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=16, stream=True) if c.choices)
    assert streamed == text
    # sampling with a seed is reproducible; another seed gives another text
    kw = dict(model="tiny", prompt="Hello", max_tokens=24, temperature=1.5, top_p=1.0,
              extra_body={"top_k": 0, "min_p": 0.0})  # llama.cpp's knobs ride in the body
    a, b, c = (client.completions.create(seed=s, **kw).choices[0].text for s in (7, 7, 8))
    assert a == b != c
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, logprobs=True,
                                          top_logprobs=2)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == 4 and all(len(e.top_logprobs) == 2 for e in entries)


SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}, "ok": {"type": "boolean"},
                                           "color": {"enum": ["red", "green", "blue"]}},
          "required": ["answer", "ok", "color"], "additionalProperties": False}


def test_json_schema_really_constrains(client):
    free = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)  # the random model never writes JSON on its own
    for stream in (False, True):
        kw = dict(model="tiny", messages=MESSAGES, max_tokens=120,
                  response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}})
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                           if c.choices)
        else:
            r = client.chat.completions.create(**kw)
            assert r.choices[0].finish_reason == "stop"
            text = r.choices[0].message.content
        jsonschema.validate(json.loads(text), SCHEMA)
    # any object: free strings may run past max_tokens on a random model, but what comes is JSON's start
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40,
                                       response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{") and not any(ord(ch) < 0x20 for ch in text)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer"}},
                   "required": ["city", "days"]}}}


def test_tool_calls_forced_by_the_grammar(client):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=[TOOL], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=120)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), TOOL["function"]["parameters"])
    # streamed: the call arrives as delta.tool_calls
    chunks = list(client.chat.completions.create(
        model="tiny", messages=msgs, tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False, max_tokens=120, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call and its result go back into the conversation (Hermes fallback: this template knows no tools)
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    r2 = client.chat.completions.create(model="tiny", messages=follow, tools=[TOOL], max_tokens=4)
    assert r2.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_prompt_cache_reuses_an_earlier_conversation(client):
    first = [{"role": "user", "content": "A long question about rivers and mountains and the sea, " * 4}]
    r1 = client.chat.completions.create(model="tiny", messages=first, max_tokens=6)
    turn = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                    {"role": "user", "content": "And the moon?"}]
    r2 = client.chat.completions.create(model="tiny", messages=turn, max_tokens=6)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens - 2, (cached, r1.usage.prompt_tokens)
    assert cached < r2.usage.prompt_tokens


# --- ollama ----------------------------------------------------------------------------------------------------------
def test_ollama_routes(server):
    u = server.url
    tags = httpx.get(u + "/api/tags").json()["models"]
    assert tags[0]["name"] == "tiny" and tags[0]["details"]["family"] == "qwen3moe" and tags[0]["size"] > 0
    assert tags[0]["details"]["quantization_level"] == "Q8_0"
    show = httpx.post(u + "/api/show", json={"model": "tiny"}).json()
    assert show["model_info"]["general.architecture"] == "qwen3moe" and "completion" in show["capabilities"]
    assert httpx.get(u + "/api/version").json()["version"]
    body = {"model": "tiny", "messages": MESSAGES, "options": {"num_predict": 6}}
    with httpx.stream("POST", u + "/api/chat", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert not any(x["done"] for x in lines[:-1]) and lines[-1]["done"] and lines[-1]["done_reason"] == "length"
    assert lines[-1]["eval_count"] == 6 and lines[-1]["eval_duration"] > 0
    streamed = "".join(x["message"]["content"] for x in lines)
    whole = httpx.post(u + "/api/chat", json={**body, "stream": False}, timeout=60).json()
    assert whole["done"] and whole["message"]["content"] == streamed
    gen = httpx.post(u + "/api/generate", json={"model": "tiny", "prompt": "Hello", "stream": False,
                                               "options": {"num_predict": 5}}, timeout=60).json()
    assert gen["done"] and gen["eval_count"] == 5 and isinstance(gen["context"], list)
    fmt = httpx.post(u + "/api/chat", json={**body, "stream": False, "format": SCHEMA,
                                           "options": {"num_predict": 120}}, timeout=60).json()
    jsonschema.validate(json.loads(fmt["message"]["content"]), SCHEMA)
    tool = httpx.post(u + "/api/chat", json={"model": "tiny", "messages": MESSAGES, "tools": [TOOL], "stream": False,
                                            "options": {"num_predict": 3}}, timeout=60).json()
    assert tool["done"]
    loaded = httpx.post(u + "/api/generate", json={"model": "tiny"}).json()
    assert loaded["done_reason"] == "load"
    ps = _ps(server)
    assert ps["experts"]["placement"] == "100% CPU" and ps["context_length"] == CTX and ps["server"]["slots"] == 2


# --- concurrency, disconnects ----------------------------------------------------------------------------------------
def test_concurrent_requests_each_get_their_own_answer(client):
    prompts = [f"Question number {i} about stars" for i in range(5)]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=10).choices[0].text for p in prompts]
    results: dict[int, str] = {}

    def ask(i):
        results[i] = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=10, stream=True) if c.choices)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]  # 5 requests, 2 slots: 3 queue
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(5)] == alone


def test_disconnect_mid_stream_stops_the_generation(server):
    before = _ps(server)["server"]["generated_tokens"]
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                got += 1
            if got >= 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        s = _ps(server)["server"]
        if s["running"] == 0 and s["generated_tokens"] > before:
            break
        time.sleep(0.1)
    s = _ps(server)["server"]
    assert s["running"] == 0 and s["queued"] == 0
    assert before < s["generated_tokens"] < before + 400  # stopped early, not run to max_tokens


# --- bad input -------------------------------------------------------------------------------------------------------
BAD = [
    ("malformed JSON", b'{"messages": [', 400),
    ("invalid UTF-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    ("not an object", b'[1, 2]', 400),
    ("wrong type", json.dumps({"messages": MESSAGES, "max_tokens": "ten"}).encode(), 400),
    ("wrong type (bool as int)", json.dumps({"messages": MESSAGES, "max_tokens": True}).encode(), 400),
    ("NaN", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400),
    ("unknown model", json.dumps({"model": "gpt-9", "messages": MESSAGES}).encode(), 404),
    ("max_tokens beyond the context", json.dumps({"messages": MESSAGES, "max_tokens": CTX + 1}).encode(), 400),
    ("prompt longer than the context", json.dumps({"messages": [{"role": "user", "content": "word " * 5000}]}).encode(),
     400),
    ("empty messages", json.dumps({"messages": []}).encode(), 400),
    ("bad role", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
    ("n > 1", json.dumps({"messages": MESSAGES, "n": 2}).encode(), 400),
    ("image content", json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}).encode(), 400),
    ("remote $ref", json.dumps({"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "https://example.com/s.json"}}}}).encode(), 400),
    ("huge repetition", json.dumps({"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "minItems": 10 ** 9}}}}).encode(), 400),
    ("bad tool name", json.dumps({"messages": MESSAGES, "tools": [{"type": "function", "function": {
        "name": "../../etc"}}]}).encode(), 400),
    ("template kwarg override", json.dumps({"messages": MESSAGES, "chat_template_kwargs": {"messages": []}}).encode(),
     400),
    ("huge body", b'{"messages": [{"role": "user", "content": "' + b"a" * (2 * 1024 * 1024) + b'"}]}', 413),
]


@pytest.mark.parametrize("what,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_with_an_openai_error(server, what, body, status):
    r = httpx.post(server.url + "/v1/chat/completions", content=body,
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and err["type"] and "Traceback" not in r.text


def test_bad_input_on_ollama_routes_and_unknown_routes(server):
    u = server.url
    r = httpx.post(u + "/api/chat", json={"model": "nope", "messages": MESSAGES})
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = httpx.post(u + "/api/generate", content=b"\xff{", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]
    r = httpx.post(u + "/api/generate", json={"model": "tiny", "prompt": "x", "context": [10 ** 9]})
    assert r.status_code == 400
    assert httpx.get(u + "/v1/nothing").status_code == 404 and "error" in httpx.get(u + "/v1/nothing").json()
    assert httpx.get(u + "/v1/chat/completions").status_code == 405
    # and it still answers
    ok = httpx.post(u + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_moecli_ps(server):
    env_path = str(ROOT)
    run = subprocess.run([sys.executable, "-m", "moecli", "ps", "--port", str(server.port)], capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin",
                                                      "COLUMNS": "120"})
    assert run.returncode == 0, run.stderr
    assert "tiny" in run.stdout and "100% CPU" in run.stdout and str(CTX) in run.stdout


# --- API key, non-loopback warning, ps without a server ------------------------------------------------------------
def _stop_mid_stream(s: Server, sig: int, headers: dict | None = None) -> None:
    """A signal while a stream runs: the stream ends with an error event, the process exits 0, the port is free."""
    import socket

    events = []
    body = {"prompt": "Once", "max_tokens": 500, "stream": True}
    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60, headers=headers or {}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 2:
                    s.proc.send_signal(sig)
    assert s.proc.wait(30) == 0
    last = json.loads(events[-1])
    assert "error" in last and "shutting down" in last["error"]["message"]
    with socket.socket() as sock:  # nobody listens there any more (REUSEADDR: as a new server binds)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", s.port))
        sock.listen()


def test_api_key_and_sigterm_mid_stream():
    s = Server(str(tiny_gguf("qwen3moe", "Q8_0")), "--ctx", str(CTX), env={"MOECLI_API_KEY": "s3cret"})
    try:
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/api/tags", headers={"Authorization": "Bearer wrong"}).status_code == 401
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert len(good.models.list().data) == 1
        _stop_mid_stream(s, signal.SIGTERM, {"Authorization": "Bearer s3cret"})
    finally:
        s.stop()


def test_ctrl_c_mid_stream():
    s = Server(str(tiny_gguf("qwen3moe", "Q8_0")), "--ctx", str(CTX))
    try:
        _stop_mid_stream(s, signal.SIGINT)
        assert "moecli serve: stopped" in s.err_text() and "Traceback" not in s.err_text()
    finally:
        s.stop()


def test_non_loopback_warning_and_ps_without_server():
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "moecli", "serve", "/nonexistent.gguf", "--host", "0.0.0.0",
                          "--port", "0"], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 1 and "warning: listening on 0.0.0.0 without an API key" in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: ")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "moecli", "ps", "--port", str(port)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 1 and run.stderr.startswith("error: no moecli server is running")
    assert len(run.stderr.strip().splitlines()) == 1
