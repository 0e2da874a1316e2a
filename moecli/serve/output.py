"""Splits a streamed completion into answer text, reasoning and tool calls, as llama-server's `reasoning_content` and
`tool_calls` (and ollama's `thinking`): `<think>...</think>` for thinking models, harmony's channels for gpt-oss, the
family's tool-call markers (moecli.serve.toolcalls). Text that may be the start of a marker is held back until it is
told apart; a call that does not parse is given back as text, as llama-server does.

Events: ("content", text), ("reasoning", text), ("tool", ToolCall).
"""
from __future__ import annotations

from moecli.chat.harmony import HarmonyParser
from moecli.serve.toolcalls import HARMONY, Family, ToolCall, _call

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _partial(buf: str, marker: str) -> int:
    """Length of the longest end of `buf` that begins `marker` (kept back: the marker may be completing)."""
    for k in range(min(len(marker) - 1, len(buf)), 0, -1):
        if buf.endswith(marker[:k]):
            return k
    return 0


def thinks(template: str | None) -> bool:
    return bool(template) and THINK_CLOSE in template


def opens_thinking(prompt: str) -> bool:
    """The generation prompt already opened the reasoning (DeepSeek-R1's, Qwen3's templates with `<think>\\n`)."""
    i = prompt.rfind(THINK_OPEN)
    return i >= 0 and THINK_CLOSE not in prompt[i:]


class OutputParser:
    def __init__(self, fam: Family, tools: bool, reasoning: bool, in_reasoning: bool = False):
        self.fam, self.tools, self.reasoning = fam, tools, reasoning
        self._harmony = HarmonyParser() if fam is HARMONY else None
        self._in_think = in_reasoning
        self._think_buf = ""
        self._after_think = False
        self._buf = ""  # content not yet given out: it may begin a tool-call marker
        self._in_call = False
        self._whole = fam.start is None  # llama's way: a call is the whole answer, so wait for its first character
        self.calls: list[ToolCall] = []
        self._pending: list | None = None  # harmony: [function name, message number, arguments so far]

    # --- entry points -----------------------------------------------------------------------------------------
    def push(self, text: str) -> list[tuple[str, object]]:
        if self._harmony is not None:
            return self._harmony_events(self._harmony.push_messages(text), final=False)
        return self._think(text, final=False)

    def flush(self) -> list[tuple[str, object]]:
        if self._harmony is not None:
            return self._harmony_events(self._harmony.flush_messages(), final=True)
        return self._think("", final=True)

    # --- <think> ----------------------------------------------------------------------------------------------
    def _think(self, text: str, final: bool) -> list:
        if not self.reasoning:
            return self._content(text, final)
        out: list = []
        buf = self._think_buf + text
        while buf:
            marker = THINK_CLOSE if self._in_think else THINK_OPEN
            i = buf.find(marker)
            if i >= 0:
                self._emit_think(buf[:i], out, final=False)
                self._in_think = not self._in_think
                self._after_think = not self._in_think
                buf = buf[i + len(marker):]
                continue
            keep = 0 if final else _partial(buf, marker)
            self._emit_think(buf[:len(buf) - keep], out, final)
            buf = buf[len(buf) - keep:]
            break
        self._think_buf = buf
        if final:
            out += self._content("", True)
        return out

    def _emit_think(self, text: str, out: list, final: bool) -> None:
        if self._in_think:
            if text:
                out.append(("reasoning", text))
        else:
            if self._after_think:  # the blank lines templates put between the reasoning and the answer
                text = text.lstrip("\n")
                self._after_think = not text
            out += self._content(text, final)

    # --- tool calls -------------------------------------------------------------------------------------------
    def _content(self, text: str, final: bool) -> list:
        if not self.tools:
            return [("content", text)] if text else []
        fam, out = self.fam, []
        self._buf += text
        if self._whole:
            if not final and (not self._buf.strip() or self._buf.lstrip()[:1] in ("{", "[", "<")):
                return out  # only blanks yet, or maybe a call: it is the whole answer, so wait for the end
            calls = fam.parse(self._buf) if final else None
            if calls:
                return self._calls(calls, out)
            text, self._buf, self._whole = self._buf, "", False
            self.tools = False  # the answer is text: no call follows (llama's calls are the whole answer)
            return [("content", text)] if text else []
        while self._buf:
            if not self._in_call:
                i = self._buf.find(fam.start)
                if i < 0:
                    keep = 0 if final else _partial(self._buf, fam.start)
                    if len(self._buf) - keep:
                        out.append(("content", self._buf[:len(self._buf) - keep]))
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                if i:
                    out.append(("content", self._buf[:i]))
                self._buf, self._in_call = self._buf[i:], True
            j = self._buf.find(fam.end, len(fam.start)) if fam.end else -1
            if j < 0 and not final:
                break
            end = j + len(fam.end) if j >= 0 else len(self._buf)
            raw, self._buf, self._in_call = self._buf[:end], self._buf[end:], False
            calls = fam.parse(raw[len(fam.start):j if j >= 0 else len(raw)])
            if calls:
                self._calls(calls, out)
            else:
                out.append(("content", raw))
        return out

    def _calls(self, calls: list[ToolCall], out: list) -> list:
        for c in calls:
            self.calls.append(c)
            out.append(("tool", c))
        return out

    # --- harmony ----------------------------------------------------------------------------------------------
    def _harmony_events(self, pieces, final: bool) -> list:
        """analysis -> reasoning, final -> content, a message to=functions.NAME -> a call once it is complete."""
        out: list = []
        for channel, recipient, text, message in pieces:
            if recipient and recipient.startswith("functions.") and self.tools:
                if self._pending is not None and self._pending[1] != message:
                    self._close_harmony_call(out)
                if self._pending is None:
                    self._pending = [recipient[len("functions."):], message, ""]
                self._pending[2] += text
                continue
            self._close_harmony_call(out)
            if channel == "final" or (channel == "commentary" and not recipient):
                out.append(("content", text))
            else:
                out.append(("reasoning", text))
        if final or not self._harmony.in_message:  # the call's message ended (<|call|>, <|end|>)
            self._close_harmony_call(out)
        return out

    def _close_harmony_call(self, out: list) -> None:
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        call = _call(pending[0], pending[2].strip() or "{}")
        if call is not None:
            self._calls([call], out)
        else:
            out.append(("content", pending[2]))
