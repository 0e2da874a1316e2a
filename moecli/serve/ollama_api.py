"""ollama's API: /api/version, /api/tags, /api/show, /api/ps (with the CPU/GPU expert split and the expert-cache hit
rate, which ollama cannot show), /api/chat and /api/generate (NDJSON streaming by default, as ollama)."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, StreamingResponse

from moecli.chat import stats as st
from moecli.serve.engine import Delta, Done, Failed
from moecli.serve.errors import APIError
from moecli.serve.schemas import (Message, OllamaChatRequest, OllamaGenerateRequest, OllamaOptions, OllamaShowRequest,
                                  parse, stop_list)

# The ollama API level these routes follow (clients compare it to enable features such as tools and thinking).
OLLAMA_API_VERSION = "0.12.0"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def _size(svc) -> int:
    return int(getattr(svc.model.checkpoint, "file_bytes", 0) or 0)


def _digest(svc) -> str:
    return hashlib.sha256(f"{svc.name}:{_size(svc)}".encode()).hexdigest()


def _details(svc) -> dict:
    c = svc.model.config
    params = getattr(c, "n_params", None)
    return {"parent_model": "", "format": "gguf" if svc.model.path.suffix == ".gguf" else "safetensors",
            "family": c.arch, "families": [c.arch],
            "parameter_size": f"{params / 1e9:.1f}B" if params else "",
            "quantization_level": _quant(svc.model)}


def _quant(model) -> str:
    """The GGUF's file type as llama.cpp names it (Q4_K_M, Q8_0...), "" when the file does not say."""
    import gguf

    get = getattr(model.checkpoint.source, "get", None)
    ftype = get("general.file_type") if callable(get) else None
    try:
        return gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_") if ftype is not None else ""
    except (ValueError, TypeError):
        return ""


def _entry(svc) -> dict:
    return {"name": svc.name, "model": svc.name, "modified_at": _iso(svc.model.path.stat().st_mtime),
            "size": _size(svc), "digest": _digest(svc), "details": _details(svc)}


async def version(request) -> JSONResponse:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    try:
        ours = pkg_version("moecli")
    except PackageNotFoundError:
        ours = "dev"
    return JSONResponse({"version": OLLAMA_API_VERSION, "moecli": ours})


async def tags(request) -> JSONResponse:
    return JSONResponse({"models": [_entry(request.app.state.service)]})


def capabilities(svc) -> list[str]:
    caps = ["completion"]
    from moecli.serve.toolcalls import HARMONY, template_knows_tools

    if template_knows_tools(svc.template) or svc.family is HARMONY:
        caps.append("tools")
    if svc.thinks or svc.family is HARMONY:
        caps.append("thinking")
    return caps


async def show(request) -> JSONResponse:
    body = parse(OllamaShowRequest, await request.body())
    svc = request.app.state.service
    svc.check_model(body.model or body.name)
    c = svc.model.config
    info = {"general.architecture": c.arch, f"{c.arch}.context_length": c.n_ctx_train,
            f"{c.arch}.embedding_length": getattr(c, "n_embd", None), f"{c.arch}.block_count": c.n_layer,
            f"{c.arch}.expert_count": getattr(c, "n_expert", None) or None,
            f"{c.arch}.expert_used_count": getattr(c, "n_expert_used", None) or None}
    d = svc.defaults
    params = "\n".join(f"{k:<15}{v}" for k, v in (("temperature", d.temperature), ("top_k", d.top_k),
                                                   ("top_p", d.top_p), ("min_p", d.min_p),
                                                   ("repeat_penalty", d.repeat_penalty), ("num_ctx", svc.n_ctx)))
    return JSONResponse({"license": "", "modelfile": f"FROM {svc.name}\n", "parameters": params,
                         "template": svc.template or "", "details": _details(svc),
                         "model_info": {k: v for k, v in info.items() if v is not None},
                         "capabilities": capabilities(svc), "modified_at": _iso(svc.model.path.stat().st_mtime)})


def expert_summary(model) -> dict:
    """Where the experts ran and how often the device cache had them (the hybrid executor's counters)."""
    s = st.snapshot(model) or {}
    out = {"placement": st.format_experts(model)}
    if s.get("active"):
        out["cache_hit_rate"] = s.get("hits", 0) / s["active"]
    n = s.get("cpu_experts", 0) + s.get("device_experts", 0)
    if n:
        out["cpu_share"] = s.get("cpu_experts", 0) / n
        out["device_share"] = s.get("device_experts", 0) / n
    out.update({k: v for k, v in s.items()})
    return out


async def ps(request) -> JSONResponse:
    svc = request.app.state.service
    entry = _entry(svc)
    entry.update({"expires_at": "2318-11-18T00:00:00Z", "size_vram": 0, "context_length": svc.n_ctx,
                  "device": str(svc.model.device), "engine": svc.model.engine,
                  "experts": expert_summary(svc.model), "server": svc.engine.status()})
    return JSONResponse({"models": [entry]})


# --- generation ----------------------------------------------------------------------------------------------------
def _sampling(svc, o: OllamaOptions | None):
    o = o or OllamaOptions()
    extra = {}
    if o.repeat_last_n is not None:
        extra["repeat_last_n"] = svc.n_ctx if o.repeat_last_n == -1 else o.repeat_last_n
    return svc.sampling(temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, min_p=o.min_p, seed=o.seed,
                        presence_penalty=o.presence_penalty, frequency_penalty=o.frequency_penalty,
                        repeat_penalty=o.repeat_penalty, **extra)


def _schema(fmt):
    if fmt in (None, ""):
        return None
    return {"type": "object"} if fmt == "json" else fmt


def _think_kwargs(svc, think) -> tuple[dict, bool | None]:
    """Template switches for ollama's `think` (Qwen3's enable_thinking, harmony's reasoning effort)."""
    if think is None:
        return {}, None
    if isinstance(think, str):
        return {"reasoning_effort": think}, True
    return ({} if think else {"enable_thinking": False}), think


def _timings(done: Done) -> dict:
    u = done.usage
    ns = 1_000_000_000
    return {"done_reason": done.finish_reason, "total_duration": int((u.queued_s + u.prompt_s + u.gen_s) * ns),
            "load_duration": 0, "prompt_eval_count": u.prompt_tokens - u.cached_tokens,
            "prompt_eval_duration": int(u.prompt_s * ns), "eval_count": u.completion_tokens,
            "eval_duration": int(u.gen_s * ns)}


def _calls(calls) -> list[dict]:
    return [{"function": {"index": i, "name": c.name, "arguments": json.loads(c.arguments)}}
            for i, c in enumerate(calls)]


def _loaded(name: str, key: str) -> JSONResponse:
    """ollama's answer to a request without a prompt: the model is (already) loaded."""
    body = {"model": name, "created_at": _now(), "done": True, "done_reason": "load"}
    body[key] = {"role": "assistant", "content": ""} if key == "message" else ""
    return JSONResponse(body)


async def chat(request):
    body = parse(OllamaChatRequest, await request.body())
    svc = request.app.state.service
    name = svc.check_model(body.model)
    if not body.messages:
        return _loaded(name, "message")
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None

    def prepare():
        kwargs, reasoning = _think_kwargs(svc, body.think)
        text = svc.chat_text(body.messages, tools, kwargs)
        tokens = svc.tokenize(text)
        o = body.options or OllamaOptions()
        return svc.prepare(tokens, text, max_tokens=svc.max_tokens(len(tokens), o.num_predict, strict=False),
                           sampling=_sampling(svc, o), stop=stop_list(o.stop), tools=tools,
                           tool_mode="auto" if tools else "none", schema=_schema(body.format), reasoning=reasoning)

    prep = await run_in_threadpool(prepare)
    return await _respond(svc, prep, request, name, body.stream, "message")


async def generate(request):
    body = parse(OllamaGenerateRequest, await request.body())
    svc = request.app.state.service
    name = svc.check_model(body.model)
    if body.images:
        raise APIError(400, "images are not supported by this model server")
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported")
    if not body.prompt and not body.context:
        return _loaded(name, "response")

    def prepare():
        kwargs, reasoning = _think_kwargs(svc, body.think)
        if body.raw:
            text, special = body.prompt, False
        else:
            msgs = ([Message(role="system", content=body.system)] if body.system else []) + \
                [Message(role="user", content=body.prompt)]
            text, special = svc.chat_text(msgs, None, kwargs), True
        tokens = svc.tokenize(text, add_special=special or not body.context)
        if body.context:
            n_vocab = svc.model.config.n_vocab
            if any(not 0 <= t < n_vocab for t in body.context):
                raise APIError(400, f"context: token ids must be in [0, {n_vocab})")
            tokens = list(body.context) + tokens
        o = body.options or OllamaOptions()
        return svc.prepare(tokens, text, max_tokens=svc.max_tokens(len(tokens), o.num_predict, strict=False),
                           sampling=_sampling(svc, o), stop=stop_list(o.stop), schema=_schema(body.format),
                           reasoning=reasoning if not body.raw else False)

    prep = await run_in_threadpool(prepare)
    return await _respond(svc, prep, request, name, body.stream, "response")


async def _respond(svc, prep, request, name: str, stream: bool, key: str):
    """key "message" (chat) or "response" (generate): the field the text goes in."""

    def piece(content: str = "", thinking: str = "", calls=None) -> dict:
        if key == "message":
            msg = {"role": "assistant", "content": content}
            if thinking:
                msg["thinking"] = thinking
            if calls:
                msg["tool_calls"] = _calls(calls)
            return {"message": msg}
        out = {"response": content}
        if thinking:
            out["thinking"] = thinking
        return out

    def split(parts):
        text = "".join(v for k, v in parts if k == "content")
        thought = "".join(v for k, v in parts if k == "reasoning")
        return text, thought, [v for k, v in parts if k == "tool"]

    def final(done: Done, content="", thinking="", calls=None) -> dict:
        out = {"model": name, "created_at": _now(), **piece(content, thinking, calls), "done": True, **_timings(done)}
        if key == "response":
            out["context"] = list(prep.req.prompt)  # the prompt's tokens, for clients that send them back
        return out

    parser = prep.parser()
    if not stream:
        content, thinking, calls, done = [], [], [], None
        async for ev in svc.events(prep, request):
            if isinstance(ev, Failed):
                raise APIError(ev.status, ev.message)
            c, t, k = split(parser.push(ev.text) if isinstance(ev, Delta) else parser.flush())
            content.append(c)
            thinking.append(t)
            calls += k
            done = ev if isinstance(ev, Done) else None
        return JSONResponse(final(done, "".join(content), "".join(thinking), calls))

    async def lines():
        async for ev in svc.events(prep, request):
            if isinstance(ev, Failed):
                yield json.dumps({"error": ev.message}) + "\n"
                return
            c, t, k = split(parser.push(ev.text) if isinstance(ev, Delta) else parser.flush())
            if isinstance(ev, Done):
                if c or t or k:
                    yield json.dumps({"model": name, "created_at": _now(), **piece(c, t, k), "done": False},
                                     ensure_ascii=False) + "\n"
                yield json.dumps(final(ev), ensure_ascii=False) + "\n"
            elif c or t or k:
                yield json.dumps({"model": name, "created_at": _now(), **piece(c, t, k), "done": False},
                                 ensure_ascii=False) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


ROUTES = [("/api/version", version, ["GET"]), ("/api/tags", tags, ["GET"]), ("/api/show", show, ["POST"]),
          ("/api/ps", ps, ["GET"]), ("/api/chat", chat, ["POST"]), ("/api/generate", generate, ["POST"])]
