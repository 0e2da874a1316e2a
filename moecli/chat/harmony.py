"""OpenAI's harmony chat format (gpt-oss): a fallback template, and a parser that splits the streamed completion into
channels, so the chat shows the reasoning ("analysis") apart from the answer ("final") and keeps only the answer in
the conversation (harmony drops earlier turns' reasoning from the prompt).

A completion after the generation prompt `<|start|>assistant` looks like
    <|channel|>analysis<|message|>...thinking...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>
where `<|return|>` (and `<|call|>` for a tool call) ends generation; llama.cpp's vocabulary marks both end-of-
generation and takes `<|end|>` off that list when they exist, so the chat runs through the analysis to the answer.
"""
from __future__ import annotations

import re

SPECIAL_TOKENS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")

# Used for gpt-oss files without a template of their own (synthetic ones). A system message in the conversation
# becomes harmony's developer instructions; `reasoning_effort` (low / medium / high) and `tools` (OpenAI's function
# list: rendered in the functions namespace, the parameters as JSON schema) may be passed to render(); assistant
# `tool_calls` and `tool` results (with the function's `name`) render as harmony's commentary messages.
TEMPLATE = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: {{ strftime_now('%Y-%m-%d') }}\n\n"
    "Reasoning: {{ reasoning_effort | default('medium') }}\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
    "{% set instructions = messages | selectattr('role', 'in', ['system', 'developer']) | map(attribute='content')"
    " | join('\n') %}"
    "{% if instructions or tools %}<|start|>developer<|message|>"
    "{% if instructions %}# Instructions\n\n{{ instructions }}{% endif %}"
    "{% if tools %}{% if instructions %}\n\n{% endif %}# Tools\n\n## functions\n\nnamespace functions {\n\n"
    "{% for t in tools %}{% set f = t.function if t.function is defined else t %}"
    "{% if f.description %}// {{ f.description }}\n{% endif %}"
    "type {{ f.name }} = (_: {{ (f.parameters or {}) | tojson }}) => any;\n\n{% endfor %}"
    "} // namespace functions{% endif %}<|end|>{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'user' %}<|start|>user<|message|>{{ m.content }}<|end|>"
    "{% elif m.role == 'assistant' %}"
    "{% if m.content %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>{% endif %}"
    "{% for c in m.tool_calls or [] %}<|start|>assistant<|channel|>commentary to=functions.{{ c.function.name }}"
    " <|constrain|>json<|message|>{{ c.function.arguments if c.function.arguments is string"
    " else c.function.arguments | tojson }}<|call|>{% endfor %}"
    "{% elif m.role == 'tool' %}<|start|>functions.{{ m.name }} to=assistant<|channel|>commentary<|message|>"
    "{{ m.content }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)

_MARKER = re.compile(r"<\|[a-z_]+\|>")
_ENDS = ("<|end|>", "<|return|>", "<|call|>")


def is_harmony(template: str | None) -> bool:
    return bool(template) and "<|channel|>" in template


class HarmonyParser:
    """Streaming split of a harmony completion into (channel, text) pieces of message bodies.

    Headers (`assistant<|channel|>analysis`, `assistant to=functions.f<|channel|>commentary json`) are consumed;
    text outside any header (a model that ignores the format) counts as "final". A marker split across two pushes
    is held back until it is complete.
    """

    def __init__(self):
        self._buf = ""
        self._state = "between"  # "header" | "body" | "between" (after an end marker, or before anything)
        self._header = ""
        self.channel = "final"
        self.recipient: str | None = None  # `to=functions.NAME` in the header: the body is a tool call's arguments
        self._message = 0  # count of message bodies begun: pieces of different messages are never merged

    @property
    def in_message(self) -> bool:
        """Inside a message body (no end marker yet)."""
        return self._state == "body"

    def push(self, text: str) -> list[tuple[str, str]]:
        return _by_channel(self.push_messages(text))

    def flush(self) -> list[tuple[str, str]]:
        return _by_channel(self.flush_messages())

    def push_messages(self, text: str) -> list[tuple[str, str | None, str, int]]:
        """As push, with each piece's recipient and message number: (channel, recipient, text, message)."""
        self._buf += text
        out: list = []
        while True:
            m = _MARKER.search(self._buf)
            if m is None:
                keep = self._partial_marker_start()
                self._text(self._buf[:keep], out)
                self._buf = self._buf[keep:]
                return out
            self._text(self._buf[:m.start()], out)
            self._marker(m.group(), out)
            self._buf = self._buf[m.end():]

    def flush_messages(self) -> list[tuple[str, str | None, str, int]]:
        out: list = []
        self._text(self._buf, out)
        self._buf = ""
        return out

    def _partial_marker_start(self) -> int:
        i = self._buf.rfind("<")
        if i >= 0 and len(self._buf) - i < 16 and re.fullmatch(r"<(\|[a-z_]*\|?)?", self._buf[i:]):
            return i
        return len(self._buf)

    def _text(self, text: str, out: list) -> None:
        if not text:
            return
        if self._state == "header":
            self._header += text
            return
        if self._state == "between":  # text with no header: not harmony-shaped, show it as the answer
            self._state, self.channel, self.recipient = "body", "final", None
            self._message += 1
        if out and out[-1][3] == self._message:
            out[-1] = out[-1][:2] + (out[-1][2] + text, self._message)
        else:
            out.append((self.channel, self.recipient, text, self._message))

    def _marker(self, marker: str, out: list) -> None:
        if marker in ("<|start|>", "<|channel|>", "<|constrain|>") and self._state != "body":
            if marker == "<|start|>":
                self._header = ""
            else:
                self._header += marker
            self._state = "header"
        elif marker == "<|message|>" and self._state == "header":
            ch = re.search(r"<\|channel\|>\s*([A-Za-z_]+)", self._header)
            to = re.search(r"\bto=([^\s<]+)", self._header)
            self.channel = ch.group(1) if ch else "final"
            self.recipient = to.group(1) if to else None
            self._state = "body"
            self._message += 1
        elif marker in _ENDS:
            self._state = "between"
        else:  # a marker where the format puts none: it is text
            self._text(marker, out)


def _by_channel(pieces: list[tuple]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for channel, _, text, _ in pieces:
        if out and out[-1][0] == channel:
            out[-1] = (channel, out[-1][1] + text)
        else:
            out.append((channel, text))
    return out
