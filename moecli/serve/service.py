"""What both APIs share: the served model and its names, the engine, and the way from a request to a job — the
conversation rendered by the model's template (tools and reasoning switches included), tokens checked against the
context, sampling defaults filled in, a grammar when the output is constrained — then the job's events."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable

from moecli.errors import MoecliError
from moecli.runtime.sampling import SamplingParams
from moecli.serve import grammar as gr
from moecli.serve import toolcalls as tc
from moecli.serve.engine import Done, Engine, Failed, GenRequest, Job
from moecli.serve.errors import APIError
from moecli.serve.output import OutputParser, opens_thinking, thinks
from moecli.serve.schemas import Message

# keys a client may not set through chat_template_kwargs: the renderer's own
_RESERVED = {"messages", "add_generation_prompt", "bos_token", "eos_token", "tools"}


@dataclass
class Prepared:
    req: GenRequest
    parser: Callable[[], OutputParser]
    prompt_tokens: int


class Service:
    def __init__(self, model, name: str, n_slots: int, n_ctx: int, defaults: SamplingParams,
                 aliases: tuple[str, ...] = (), engine: Engine | None = None):
        self.model = model
        self.name = name
        self.names = {n.lower() for n in (name, *aliases) if n}
        self.engine = engine or Engine(model, n_slots, n_ctx)
        self.n_ctx = n_ctx
        self.defaults = defaults
        self.template = model.chat_template
        self.family = tc.family(self.template)
        self.thinks = thinks(self.template)
        self.loaded_at = time.time()
        self._grammar_vocab = None
        self._vocab_lock = threading.Lock()

    # --- names ------------------------------------------------------------------------------------------------
    def check_model(self, requested: str | None) -> str:
        """The served name for a request's `model` (none given: the loaded one); others are a 404."""
        if not requested or requested.lower() in self.names or requested.lower().removesuffix(":latest") in self.names:
            return self.name
        hint = ""
        try:
            from moecli import hub

            if any(m.name.lower() == requested.lower() for m in hub.local_models()):
                hint = f" (it is pulled but not loaded: run `moecli serve {requested}`)"
        except Exception:  # noqa: BLE001 - a broken cache must not turn a 404 into a 500
            pass
        raise APIError(404, f"model '{requested[:200]}' not found: this server serves '{self.name}'{hint}",
                       param="model", code="model_not_found")

    # --- prompts ----------------------------------------------------------------------------------------------
    def chat_text(self, messages: list[Message], tools: list[dict] | None, template_kwargs: dict) -> str:
        if not messages:
            raise APIError(400, "messages: at least one message is required", param="messages")
        msgs = conversation(messages)
        extra = {k: v for k, v in (template_kwargs or {}).items()}
        bad = [k for k in extra if not isinstance(k, str) or not k.isidentifier() or k in _RESERVED]
        if bad:
            raise APIError(400, f"chat_template_kwargs: {str(bad[0])[:40]!r} cannot be set", param="chat_template_kwargs")
        if tools:
            if tc.template_knows_tools(self.template):
                extra["tools"] = tools
            else:  # the template knows no tools: Hermes's convention in a system message, calls as text
                msgs = hermes_fallback(msgs, tools)
        try:
            return self.model.chat_prompt(msgs, **extra)
        except MoecliError as e:  # the template refused this conversation (roles out of order...)
            raise APIError(400, str(e), param="messages") from None

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        try:
            return self.model.tokenize(text, add_special)
        except MoecliError as e:
            raise APIError(400, str(e)) from None

    def grammar(self, gbnf: str, trigger: str | None = None):
        """A grammar over the model's vocabulary; with a trigger, one that holds only from the trigger on."""
        try:
            vocab = self._vocab()
            make = lambda: gr.Grammar(vocab.llama_vocab, vocab.n_vocab, gbnf)  # noqa: E731
            first = make()  # a bad grammar is refused now, not when the trigger comes
            return gr.LazyGrammar(make, trigger, vocab) if trigger else first
        except MoecliError as e:
            raise APIError(400, str(e)) from None

    def _vocab(self):
        """llama.cpp's vocabulary for the grammar sampler: the GGUF's own, or one built from tokenizer.json."""
        with self._vocab_lock:
            if self._grammar_vocab is None:
                tok = self.model.tokenizer
                self._grammar_vocab = tok if hasattr(tok, "llama_vocab") else gr.hf_vocab(self.model.path)
            return self._grammar_vocab

    def schema_grammar(self, schema) -> gr.Grammar:
        try:
            return self.grammar(gr.schema_gbnf(schema))
        except MoecliError as e:
            raise APIError(400, str(e), param="response_format") from None

    # --- a request to a job -----------------------------------------------------------------------------------
    def sampling(self, **given) -> SamplingParams:
        """The server's defaults with the request's values (None: not given) on top."""
        values = {k: v for k, v in given.items() if v is not None}
        if "logit_bias" in values:
            values["logit_bias"] = self._bias(values["logit_bias"]) or None
        if "seed" in values:
            values["seed"] = values["seed"] % (2 ** 63)
        return replace(self.defaults, **values)

    def _bias(self, bias: dict) -> dict[int, float]:
        n_vocab, out = self.model.config.n_vocab, {}
        for k, v in bias.items():
            if not (k.strip().isdigit() and int(k) < n_vocab) or not -100.0 <= v <= 100.0:
                raise APIError(400, f"logit_bias: {k[:20]!r}: {v} (token ids in [0, {n_vocab}), biases in "
                                    "[-100, 100])", param="logit_bias")
            out[int(k)] = float(v)
        return out

    def max_tokens(self, n_prompt: int, asked: int | None, strict: bool) -> int:
        """Tokens to generate: checked against the context (OpenAI's routes refuse what does not fit; ollama's
        generate until the context is full, as ollama does)."""
        if n_prompt >= self.n_ctx:
            raise APIError(400, f"the prompt is {n_prompt} tokens, the context is {self.n_ctx} tokens "
                                f"(start the server with a larger --ctx)", param="messages",
                           code="context_length_exceeded")
        room = self.n_ctx - n_prompt
        if asked is None or asked < 0:
            return room
        if strict and asked > room:
            raise APIError(400, f"max_tokens {asked} does not fit: the context is {self.n_ctx} tokens and the prompt "
                                f"takes {n_prompt}", param="max_tokens", code="context_length_exceeded")
        return min(asked, room)

    def prepare(self, tokens: list[int], prompt_text: str, *, max_tokens: int, sampling: SamplingParams,
                stop: list[str], tools: list[dict] | None = None, tool_mode: str = "none", parallel: bool = True,
                schema=None, reasoning: bool | None = None, logprobs: int | None = None) -> Prepared:
        """A job for `tokens`. tool_mode: "none" (tools absent or refused), "auto" (parsed, held to their
        grammar once a call starts, where the family allows), "required" (the grammar forces calls)."""
        fam = self.family
        grammar = None
        if tool_mode == "required":
            grammar = self.grammar(self._tool_grammar(fam, tools, parallel))
        elif schema is not None:
            grammar = self.schema_grammar(schema)
        elif tool_mode == "auto" and tc.lazy_trigger(fam):
            grammar = self.grammar(self._tool_grammar(fam, tools, parallel), tc.lazy_trigger(fam))
        with_tools = tool_mode != "none"
        split = self.thinks if reasoning is None else (reasoning and self.thinks)
        in_reasoning = split and opens_thinking(prompt_text)
        req = GenRequest(tokens, max_tokens, sampling, stop, grammar, logprobs,
                         special=fam.special and (with_tools or fam is tc.HARMONY))
        return Prepared(req, lambda: OutputParser(fam, with_tools, split or fam is tc.HARMONY, in_reasoning),
                        len(tokens))

    def _tool_grammar(self, fam, tools, parallel) -> str:
        try:
            return tc.forced_grammar(fam, tools, parallel)
        except MoecliError as e:
            raise APIError(400, f"tools: {e}", param="tools") from None

    async def events(self, prep: Prepared, request) -> AsyncIterator:
        """The job's events until Done or Failed; the job is cancelled when the client goes away."""
        job = Job(prep.req, asyncio.get_running_loop())
        self.engine.submit(job)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, self.engine, job))
        try:
            while True:
                ev = await job.events.get()
                yield ev
                if isinstance(ev, (Done, Failed)):
                    return
        finally:
            watcher.cancel()
            self.engine.cancel(job)


async def _cancel_on_disconnect(request, engine: Engine, job: Job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            engine.cancel(job)
            job.events.put_nowait(Failed("the client disconnected", 499))
            return


# --- conversations -----------------------------------------------------------------------------------------------
def _text(content, role: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for p in content:
        if p.type in ("text", "input_text"):
            parts.append(p.text or "")
        else:
            raise APIError(400, f"content of type {p.type[:40]!r} is not supported (text only)", param="messages")
    return "".join(parts)


def conversation(messages: list[Message]) -> list[dict]:
    """OpenAI/ollama messages as templates expect them: text content, `developer` as system, tool calls with their
    arguments as objects, tool results named after the call they answer."""
    out, names = [], {}
    for i, m in enumerate(messages):
        if m.images:
            raise APIError(400, "images are not supported by this model server", param=f"messages.{i}.images")
        role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
        msg = {"role": role, "content": _text(m.content, role)}
        if role == "user" and m.content is None:
            raise APIError(400, f"messages.{i}.content: a user message needs content", param=f"messages.{i}.content")
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                args = c.function.arguments
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except ValueError:
                        pass  # kept as the client wrote it
                call = {"type": "function", "function": {"name": c.function.name, "arguments": args}}
                if c.id:
                    call["id"] = c.id
                    names[c.id] = c.function.name
                calls.append(call)
            msg["tool_calls"] = calls
        if role == "tool":
            msg["name"] = m.name or m.tool_name or names.get(m.tool_call_id or "", "")
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
        reasoning = m.reasoning_content or m.thinking
        if reasoning and role == "assistant":
            msg["reasoning_content"] = reasoning
        out.append(msg)
    return out


def hermes_fallback(msgs: list[dict], tools: list[dict]) -> list[dict]:
    """Tools for a template that knows none: their list in the system message, earlier calls and results as the
    text Hermes-style models write and read."""
    sys_text = tc.tools_system_prompt(tools)
    out = []
    if msgs and msgs[0]["role"] == "system":
        out.append({"role": "system", "content": msgs[0]["content"] + "\n\n" + sys_text})
        msgs = msgs[1:]
    else:
        out.append({"role": "system", "content": sys_text})
    for m in msgs:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                            "arguments": c["function"]["arguments"]},
                                                           ensure_ascii=False) + "\n</tool_call>"
                              for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + calls})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out
