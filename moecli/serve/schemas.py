"""Request bodies of the OpenAI and ollama routes, strictly typed (a string where a number belongs is a 400, as
OpenAI answers), unknown fields ignored (clients send many). `parse(model, body)` turns pydantic's complaint into one
APIError naming the field."""
from __future__ import annotations

import json
import math
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moecli.serve.errors import APIError

MAX_STOP = 16  # stop strings per request (OpenAI allows 4; llama-server more)
MAX_STOP_LEN = 1024  # characters of one stop string (each token's check looks back that far)


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


# --- shared pieces -------------------------------------------------------------------------------------------------
class FunctionDef(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class CalledFunction(Strict):
    name: str
    arguments: Union[str, dict, None] = None


class MessageToolCall(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ContentPart(Strict):
    type: str
    text: str | None = None


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    tool_name: str | None = None  # ollama's name for the function a tool result answers
    reasoning_content: str | None = None
    thinking: str | None = None  # ollama's name for it
    images: list | None = None  # ollama


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchemaFormat(Strict):
    name: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class Sampling(Strict):
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    stop: Union[str, list[str], None] = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=100.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's way) -> bias in [-100, 100]


# --- OpenAI ----------------------------------------------------------------------------------------------------------
class ChatRequest(Sampling):
    model: str | None = None
    messages: list[Message]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = 1
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict | None = None


class CompletionRequest(Sampling):
    model: str | None = None
    prompt: Union[str, list[str], list[int], list[list[int]]]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = 1
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    response_format: ResponseFormat | None = None


# --- ollama ----------------------------------------------------------------------------------------------------------
class OllamaOptions(Sampling):
    num_predict: int | None = Field(None, ge=-2)
    num_ctx: int | None = Field(None, ge=1)
    repeat_last_n: int | None = Field(None, ge=-1)


class OllamaTool(Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class OllamaChatRequest(Strict):
    model: str | None = None
    messages: list[Message]
    stream: bool = True
    format: Union[Literal["", "json"], dict, None] = None
    options: OllamaOptions | None = None
    tools: list[OllamaTool] | None = None
    think: Union[bool, Literal["low", "medium", "high"], None] = None
    keep_alive: Union[str, int, float, None] = None


class OllamaGenerateRequest(Strict):
    model: str | None = None
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    raw: bool = False
    stream: bool = True
    format: Union[Literal["", "json"], dict, None] = None
    options: OllamaOptions | None = None
    images: list | None = None
    think: Union[bool, Literal["low", "medium", "high"], None] = None
    keep_alive: Union[str, int, float, None] = None
    context: list[int] | None = None


class OllamaShowRequest(Strict):
    model: str | None = None
    name: str | None = None  # older clients
    verbose: bool = False


# --- parsing ---------------------------------------------------------------------------------------------------------
def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:20]} is out of range")
    return v


def load_json(body: bytes) -> Any:
    """The body as JSON: strict UTF-8, no NaN/Infinity, numbers finite; errors as a 400."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise APIError(400, "the request body is empty: expected a JSON object")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise APIError(400, "invalid JSON: nested too deeply") from None
    except ValueError as e:
        raise APIError(400, f"invalid JSON: {e}") from None


def parse(model: type[Strict], body: bytes) -> Strict:
    data = load_json(body)
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"] if _field(p))
        raise APIError(400, f"{where or 'body'}: {err['msg']}", param=where or None) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None


_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _field(part) -> bool:
    """A field name or index in pydantic's error location (not one of the union branch tags it adds)."""
    return isinstance(part, int) or (isinstance(part, str) and part.isidentifier() and part not in _TAGS
                                     and not part[:1].isupper())


def stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} stop strings", param="stop")
    if any(len(s) > MAX_STOP_LEN for s in stops):
        raise APIError(400, f"stop: a stop string is longer than {MAX_STOP_LEN} characters", param="stop")
    return [s for s in stops if s]
