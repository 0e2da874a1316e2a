"""Tool-call formats of the template families, told apart by the chat template's text (as llama.cpp's common/chat.cpp
does): how a call is written in the model's output, how to parse it back, and the grammar that forces one.

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5/3, Hermes, SmolLM3; and the fallback
  for templates that know no tools); inside the same tags Qwen3-Coder writes `<function=NAME><parameter=K>V...` and
  GLM-4.5 `NAME<arg_key>K</arg_key><arg_value>V</arg_value>`: all three parse.
- harmony (gpt-oss): a commentary message addressed `to=functions.NAME`, JSON arguments (moecli.chat.harmony).
- llama (Llama 3.x / 4): the whole answer is `{"name": ..., "parameters": {...}}` (after an optional
  `<|python_tag|>`), or Llama 4's pythonic `[name(a=1, b="x"), ...]`.
- deepseek (V3 / R1): `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```...`
  (V3.1 leaves out `function` and the code fence).
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}]` or `[TOOL_CALLS]NAME[ARGS]{...}`.
"""
from __future__ import annotations

import ast
import json
import re
import secrets
from dataclasses import dataclass

from moecli.serve import grammar as gr


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it
    id: str = ""

    def __post_init__(self):
        self.id = self.id or "call_" + secrets.token_hex(12)


def _call(name, args) -> ToolCall | None:
    if not isinstance(name, str) or not name:
        return None
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def _json_call(obj) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    args = obj.get("arguments", obj.get("parameters"))
    return _call(obj.get("name"), args)


def _value(text: str):
    """A parameter value written bare (GLM, Qwen3-Coder): JSON when it parses as JSON, else the string itself."""
    text = text.strip("\n")
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_tagged(body: str) -> list[ToolCall] | None:
    """The inside of `<tool_call>...</tool_call>` in any of its three dialects."""
    body = body.strip()
    if body.startswith("{"):
        try:
            call = _json_call(json.loads(body))
        except ValueError:
            return None
        return [call] if call else None
    m = re.fullmatch(r"<function=([^>\s]+)>(.*?)(?:</function>)?", body, re.S)
    if m:
        args = {k: _value(v) for k, v in re.findall(r"<parameter=([^>\s]+)>(.*?)</parameter>", m.group(2), re.S)}
        call = _call(m.group(1), args)
        return [call] if call else None
    m = re.fullmatch(r"([^\s<]+)\s*(.*)", body, re.S)
    if m and (not m.group(2) or m.group(2).startswith("<arg_key>")):
        pairs = re.findall(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", m.group(2), re.S)
        call = _call(m.group(1), {k.strip(): _value(v) for k, v in pairs})
        return [call] if call else None
    return None


def parse_llama(text: str) -> list[ToolCall] | None:
    """Llama 3.x JSON (one object, or several separated by ';') or Llama 4's pythonic list of calls."""
    text = text.strip()
    if text.startswith("<|python_tag|>"):
        text = text[len("<|python_tag|>"):].strip()
    if text.startswith("{"):
        calls, pos, dec = [], 0, json.JSONDecoder()
        while pos < len(text):
            try:
                obj, pos = dec.raw_decode(text, pos)
            except ValueError:
                return None
            call = _json_call(obj)
            if call is None:
                return None
            calls.append(call)
            while pos < len(text) and text[pos] in " \t\n;":
                pos += 1
        return calls
    if text.startswith("["):
        try:
            tree = ast.parse(text, mode="eval").body  # parsed, never evaluated: only literals are read
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return None
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for node in tree.elts:
            if not (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)) and not node.args):
                return None
            try:
                args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
            except (ValueError, SyntaxError, RecursionError, TypeError):
                return None
            name = ast.unparse(node.func)
            call = _call(name, args)
            if call is None:
                return None
            calls.append(call)
        return calls
    return None


_DS_CALL = re.compile(r"<｜tool▁call▁begin｜>(?:function<｜tool▁sep｜>([^\n]+)\n```(?:json)?\n(.*?)\n```"
                      r"|([^<]+?)<｜tool▁sep｜>(.*?))<｜tool▁call▁end｜>", re.S)


def parse_deepseek(body: str) -> list[ToolCall] | None:
    calls = []
    for m in _DS_CALL.finditer(body):
        name, args = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        call = _call(name.strip(), args.strip())
        if call is None:
            return None
        calls.append(call)
    return calls or None


def parse_mistral(body: str) -> list[ToolCall] | None:
    body = body.strip()
    if body.startswith("["):
        try:
            items = json.loads(body)
        except ValueError:
            return None
        calls = [_json_call(i) for i in items] if isinstance(items, list) else [None]
        return calls if calls and all(calls) else None
    calls = []
    for name, args in re.findall(r"([^\s\[]+)\[ARGS\](\{.*?\})(?=\[TOOL_CALLS\]|$)", body, re.S):
        call = _call(name, args)
        if call is None:
            return None
        calls.append(call)
    return calls or None


@dataclass(frozen=True)
class Family:
    name: str
    start: str | None  # the marker that opens the tool calls (None: the whole answer is the call, llama's way)
    end: str | None  # the marker that closes them (None: the end of the answer)
    parse: object  # body text -> list[ToolCall] | None
    special: bool = False  # the markers are control tokens: decode them as text


HERMES = Family("hermes", "<tool_call>", "</tool_call>", parse_tagged)
HARMONY = Family("harmony", None, None, None, special=True)
LLAMA = Family("llama", None, None, parse_llama)
DEEPSEEK = Family("deepseek", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", parse_deepseek, special=True)
MISTRAL = Family("mistral", "[TOOL_CALLS]", None, parse_mistral, special=True)


def family(template: str | None) -> Family:
    t = template or ""
    if "<|channel|>" in t:
        return HARMONY
    if "tool▁calls▁begin" in t:
        return DEEPSEEK
    if "[TOOL_CALLS]" in t:
        return MISTRAL
    if "<tool_call>" in t:
        return HERMES
    if "<|python_tag|>" in t or "<|header_start|>" in t or "<|start_header_id|>" in t:
        return LLAMA
    return HERMES


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


# --- the fallback for templates without tools: Hermes's convention, in a system message -------------------------
def tools_system_prompt(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{listing}\n</tools>\n\nFor each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


# --- forcing calls: GBNF whose root is one or more calls in the family's format ----------------------------------
def _params(tool: dict) -> dict:
    p = tool["function"].get("parameters")
    return p if isinstance(p, dict) and p else {"type": "object"}


def forced_grammar(fam: Family, tools: list[dict], parallel: bool) -> str:
    """A grammar (root) that only admits calls of `tools` in the family's syntax."""
    key = "parameters" if fam is LLAMA else "arguments"
    conv = gr.converter(["name", key])
    if fam is HARMONY:
        alts = []
        for i, t in enumerate(tools):
            args = gr.visit(conv, _params(t), f"args-{i}")
            alts.append(f"{gr.literal('<|channel|>commentary to=functions.' + t['function']['name'])} "
                        f"{gr.literal(' <|constrain|>json<|message|>')} {args}")
        return gr.finish(conv, "root ::= " + " | ".join(f"({a})" for a in alts) + "\n")
    schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]}, key: _params(t)},
                         "required": ["name", key], "additionalProperties": False} for t in tools]}
    call = gr.visit(conv, schema, "call")
    if fam is LLAMA:
        root = f"root ::= {call}" + (f' (";" space {call})*' if parallel else "")
    else:  # hermes, and the families whose own syntax we parse but do not force (their models read Hermes too)
        one = f'"<tool_call>\\n" {call} "\\n</tool_call>"'
        root = f"root ::= {one}" + (f' ("\\n" {one})*' if parallel else "")
    return gr.finish(conv, root + "\n")


def lazy_trigger(fam: Family) -> str | None:
    """The text after which `tool_choice: auto` output is held to the tool-call grammar (llama.cpp's lazy grammars):
    the families whose calls open with a marker of their own."""
    return fam.start if fam is HERMES else None
