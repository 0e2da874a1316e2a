"""OpenAI's API: GET /v1/models, POST /v1/chat/completions and /v1/completions, streamed as server-sent events
(`data: {...}` chunks, then `data: [DONE]`) or answered whole."""
from __future__ import annotations

import json
import secrets
import time

from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from moecli.serve.engine import Delta, Done, Failed, TokenInfo, Usage
from moecli.serve.errors import APIError
from moecli.serve.schemas import ChatRequest, CompletionRequest, ResponseFormat, parse, stop_list
from moecli.serve.toolcalls import ToolCall

SHUTDOWN_GRACE_S = 5.0  # a stream's time to send its error event when the server stops


def _usage(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _failure(ev: Failed) -> APIError:
    return APIError(ev.status, ev.message, code="server_shutting_down" if ev.status == 503 else None)


def response_schema(fmt: ResponseFormat | None):
    """The JSON schema output must follow (None: free text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format.json_schema.schema is required for type json_schema",
                       param="response_format")
    return fmt.json_schema.schema_


def tool_setup(body: ChatRequest) -> tuple[list[dict] | None, str]:
    """(tools for the template, mode) from `tools` and `tool_choice`."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    choice = body.tool_choice
    if not tools:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None, "none"
    if choice == "none":
        return None, "none"
    if choice in (None, "auto"):
        return tools, "auto"
    if choice == "required":
        return tools, "required"
    named = [t for t in tools if t["function"]["name"] == choice.function.name]
    if not named:
        raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools", param="tool_choice")
    return named, "required"


def _logprob_entry(t: TokenInfo) -> dict:
    return {"token": t.text.decode("utf-8", "replace"), "logprob": t.logprob, "bytes": list(t.text),
            "top_logprobs": [{"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b)}
                             for b, lp in (t.top or [])]}


def _tool_delta(i: int, c: ToolCall) -> dict:
    return {"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


def _check_n(n: int) -> None:
    if n != 1:
        raise APIError(400, "n: only n=1 is supported", param="n")


async def list_models(request) -> JSONResponse:
    svc = request.app.state.service
    return JSONResponse({"object": "list", "data": [
        {"id": svc.name, "object": "model", "created": int(svc.loaded_at), "owned_by": "moecli"}]})


# --- chat ----------------------------------------------------------------------------------------------------------
async def chat_completions(request):
    body = parse(ChatRequest, await request.body())
    svc = request.app.state.service
    name = svc.check_model(body.model)
    _check_n(body.n)

    def prepare():
        tools, mode = tool_setup(body)
        kwargs = dict(body.chat_template_kwargs or {})
        if body.reasoning_effort:
            kwargs.setdefault("reasoning_effort", body.reasoning_effort)
        text = svc.chat_text(body.messages, tools, kwargs)
        tokens = svc.tokenize(text)
        max_tokens = svc.max_tokens(len(tokens), body.max_completion_tokens or body.max_tokens, strict=True)
        return svc.prepare(
            tokens, text, max_tokens=max_tokens, stop=stop_list(body.stop), tools=tools, tool_mode=mode,
            parallel=body.parallel_tool_calls, schema=response_schema(body.response_format),
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            sampling=svc.sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                  min_p=body.min_p, seed=body.seed, presence_penalty=body.presence_penalty,
                                  frequency_penalty=body.frequency_penalty, repeat_penalty=body.repeat_penalty,
                                  logit_bias=body.logit_bias))

    prep = await run_in_threadpool(prepare)
    rid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(_chat_stream(svc, prep, request, rid, created, name, usage, body.logprobs))
    parser = prep.parser()
    content, reasoning, calls, tokens = [], [], [], []
    done = None
    async for ev in svc.events(prep, request):
        if isinstance(ev, Failed):
            raise _failure(ev)
        parts = parser.push(ev.text) if isinstance(ev, Delta) else parser.flush()
        for kind, value in parts:
            (content if kind == "content" else reasoning if kind == "reasoning" else calls).append(value)
        if isinstance(ev, Delta):
            tokens += ev.tokens
        else:
            done = ev
    message = {"role": "assistant", "content": "".join(content) if content or not calls else None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = [_tool_delta(i, c) for i, c in enumerate(calls)]
        for c in message["tool_calls"]:
            del c["index"]
    choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if calls else done.finish_reason,
              "logprobs": {"content": [_logprob_entry(t) for t in tokens]} if body.logprobs else None}
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": name,
                         "choices": [choice], "usage": _usage(done.usage), "system_fingerprint": "moecli"})


async def _chat_stream(svc, prep, request, rid, created, name, include_usage, want_logprobs):
    def chunk(delta: dict, finish=None, logprobs=None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        return json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                           "system_fingerprint": "moecli", "choices": [choice]}, ensure_ascii=False)

    parser = prep.parser()
    n_calls = 0
    yield chunk({"role": "assistant", "content": ""})
    async for ev in svc.events(prep, request):
        if isinstance(ev, Failed):
            yield json.dumps(_failure(ev).openai())
            return
        parts = parser.push(ev.text) if isinstance(ev, Delta) else parser.flush()
        lp = {"content": [_logprob_entry(t) for t in ev.tokens]} if want_logprobs and isinstance(ev, Delta) else None
        for kind, value in parts:
            if kind == "tool":
                yield chunk({"tool_calls": [_tool_delta(n_calls, value)]})
                n_calls += 1
            else:
                yield chunk({"content" if kind == "content" else "reasoning_content": value}, logprobs=lp)
                lp = None
        if lp is not None and ev.tokens:
            yield chunk({"content": ""}, logprobs=lp)
        if isinstance(ev, Done):
            yield chunk({}, "tool_calls" if n_calls else ev.finish_reason)
            if include_usage:
                yield json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                                  "choices": [], "usage": _usage(ev.usage)})
            yield "[DONE]"


def _sse(gen) -> EventSourceResponse:
    return EventSourceResponse(gen, sep="\n", ping=15, shutdown_grace_period=SHUTDOWN_GRACE_S,
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --- completions ---------------------------------------------------------------------------------------------------
def _prompt_tokens(svc, prompt) -> tuple[list[int], str]:
    if isinstance(prompt, list):
        if len(prompt) != 1 and (not prompt or not isinstance(prompt[0], int)):
            raise APIError(400, "prompt: one prompt per request (a string or a list of token ids)", param="prompt")
        if prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt: empty", param="prompt")
        return svc.tokenize(prompt), prompt
    n_vocab = svc.model.config.n_vocab
    if not prompt:
        raise APIError(400, "prompt: empty", param="prompt")
    bad = [t for t in prompt if not 0 <= t < n_vocab]
    if bad:
        raise APIError(400, f"prompt: token id {bad[0]} out of range [0, {n_vocab})", param="prompt")
    return list(prompt), ""


async def completions(request):
    body = parse(CompletionRequest, await request.body())
    svc = request.app.state.service
    name = svc.check_model(body.model)
    _check_n(body.n)
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")

    def prepare():
        tokens, text = _prompt_tokens(svc, body.prompt)
        max_tokens = svc.max_tokens(len(tokens), 16 if body.max_tokens is None else body.max_tokens, strict=True)
        return svc.prepare(tokens, text, max_tokens=max_tokens, stop=stop_list(body.stop), reasoning=False,
                           schema=response_schema(body.response_format), logprobs=body.logprobs,
                           sampling=svc.sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                                 min_p=body.min_p, seed=body.seed,
                                                 presence_penalty=body.presence_penalty,
                                                 frequency_penalty=body.frequency_penalty,
                                                 repeat_penalty=body.repeat_penalty,
                                                 logit_bias=body.logit_bias)), text

    prep, text = await run_in_threadpool(prepare)
    rid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
    echo = text if body.echo else ""
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(_completion_stream(svc, prep, request, rid, created, name, usage, echo, body.logprobs))
    pieces, tokens, done = [echo], [], None
    async for ev in svc.events(prep, request):
        if isinstance(ev, Failed):
            raise _failure(ev)
        if isinstance(ev, Delta):
            pieces.append(ev.text)
            tokens += ev.tokens
        else:
            done = ev
    choice = {"index": 0, "text": "".join(pieces), "finish_reason": done.finish_reason,
              "logprobs": _legacy_logprobs(tokens, len(echo)) if body.logprobs is not None else None}
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": name,
                         "choices": [choice], "usage": _usage(done.usage)})


def _legacy_logprobs(tokens: list[TokenInfo], offset: int) -> dict:
    texts = [t.text.decode("utf-8", "replace") for t in tokens]
    offsets, pos = [], offset
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{b.decode("utf-8", "replace"): lp for b, lp in (t.top or [])} for t in tokens],
            "text_offset": offsets}


async def _completion_stream(svc, prep, request, rid, created, name, include_usage, echo, want_logprobs):
    def chunk(text: str, finish=None, tokens=None) -> str:
        choice = {"index": 0, "text": text, "finish_reason": finish,
                  "logprobs": _legacy_logprobs(tokens or [], 0) if want_logprobs is not None and tokens else None}
        return json.dumps({"id": rid, "object": "text_completion", "created": created, "model": name,
                           "choices": [choice]}, ensure_ascii=False)

    if echo:
        yield chunk(echo)
    async for ev in svc.events(prep, request):
        if isinstance(ev, Failed):
            yield json.dumps(_failure(ev).openai())
            return
        if isinstance(ev, Delta):
            yield chunk(ev.text, tokens=ev.tokens)
        else:
            yield chunk("", ev.finish_reason)
            if include_usage:
                yield json.dumps({"id": rid, "object": "text_completion", "created": created, "model": name,
                                  "choices": [], "usage": _usage(ev.usage)})
            yield "[DONE]"


ROUTES = [("/v1/models", list_models, ["GET"]), ("/v1/chat/completions", chat_completions, ["POST"]),
          ("/v1/completions", completions, ["POST"])]
