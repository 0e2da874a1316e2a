"""The chat REPL: a conversation (messages + KV cache session + settings), its slash commands, and the input loop.

Input is plain `input()` with `readline` (line editing and history); `\"\"\"` opens and closes a multi-line message
and a line ending in a backslash continues on the next one. Ctrl-C stops an answer (the partial answer stays in the
conversation, marked as interrupted); on a half-typed line it clears the line; at an empty prompt it prints a hint
and a second one exits; Ctrl-D exits. On a terminal, answers wrap at word boundaries and keys typed while an answer
streams are not echoed into it (they wait for the next prompt, as a shell's type-ahead).
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

from moecli.api import common_prefix
from moecli.chat import stats as st
from moecli.chat.harmony import HarmonyParser
from moecli.errors import MoecliError

PROMPT, MORE = ">>> ", "... "
FORMAT = "moecli-chat/1"


@dataclass
class Settings:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int | None = None
    max_tokens: int = 512
    system: str | None = None
    verbose: bool = False

    def sampling(self) -> dict:
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                    repeat_penalty=self.repeat_penalty, seed=self.seed)


def _num(kind, lo=None, hi=None):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"must be in [{lo}, {hi}]" if hi is not None else f"must be >= {lo}")
        return v
    return parse


def _seed(text):
    return None if text.lower() in ("none", "random", "-1") else _num(int)(text)


# /set NAME VALUE: each sampling setting and its parser; ollama's and llama.cpp's names work too (ALIASES).
PARAMS: dict[str, Callable] = {
    "temperature": _num(float, 0.0),
    "top_k": _num(int, 0),
    "top_p": _num(float, 0.0, 1.0),
    "min_p": _num(float, 0.0, 1.0),
    "repeat_penalty": _num(float, 0.0),
    "seed": _seed,
    "max_tokens": _num(int, 1),
}
ALIASES = {"temp": "temperature", "num_predict": "max_tokens", "n_predict": "max_tokens", "n": "max_tokens"}

HELP = """\
Available commands:
  /set                 show the settings
  /set NAME VALUE      temperature, top_k, top_p, min_p, repeat_penalty, seed (none = random), max_tokens
  /set system TEXT     set the system message (/set system alone removes it)
  /set verbose|quiet   print token counts and rates after each answer, or not
  /clear               forget the conversation (and its KV cache)
  /stats               token counts and rates of the last answer and of the session, context used
  /save FILE           save the conversation and settings as JSON
  /load FILE           load a saved conversation and go on with it
  /bye                 exit (also Ctrl-D)
  /?, /help            this help

Use \"\"\" to begin and end a multi-line message; a line ending in \\ continues on the next one.
Ctrl-C stops an answer; at an empty prompt, press it twice to exit."""


class Chat:
    """A conversation with one model: messages, settings, the KV cache session and the token statistics."""

    def __init__(self, model, settings: Settings, n_ctx: int | None = None, out=None, err=None):
        from moecli.api import Session

        self.model, self.settings = model, settings
        self.session = Session(model, n_ctx)
        self.messages: list[dict] = []  # user / assistant turns; the system message lives in settings
        self.last: st.TurnStats | None = None
        self.totals = st.Totals()
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.interactive = True  # False for one-shot -p answers: no slash commands to suggest

    # --- answering ----------------------------------------------------------------------------------------------
    def conversation(self) -> list[dict]:
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        return system + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def context_full_message(self) -> str:
        n = self.session.n_ctx
        start_over = "/clear to start a new conversation, or " if self.interactive else ""
        return f"context is full ({n} tokens): {start_over}run again with a larger context (--ctx {2 * n})"

    def answer(self, text: str) -> str:
        """Stream an answer to `text`; returns "ok", "interrupted" (Ctrl-C) or "full" (the context filled up)."""
        m, s = self.model, self.settings
        self.messages.append({"role": "user", "content": text})
        turn = st.TurnStats()
        before = st.snapshot(m) if s.verbose else None
        pieces: list[str] = []
        t_first = t_last = None

        def timed(tokens):
            nonlocal t_first, t_last
            for t in tokens:
                t_last = time.perf_counter()
                if t_first is None:
                    t_first = t_last
                turn.gen_tokens += 1
                yield t

        parser = HarmonyParser() if m.harmony else None  # gpt-oss: reasoning and answer come in channels
        thinking: list[str] = []
        shown = self.out
        if self.interactive and _is_tty(shown):
            self.out = WordWrap(shown)  # answers wrap at word boundaries on a terminal
        try:
            status, t0 = self._stream(m, s, turn, pieces, thinking, parser, timed)
            if parser is not None:
                self._show(parser.flush(), pieces, thinking)
                if thinking and not pieces:
                    self.err.write("\n")
            reply = "".join(pieces)
            if pieces:
                self.out.write("\n")
            if status == "interrupted":
                self.out.write("(answer interrupted)\n")
        finally:
            if self.out is not shown:
                self.out.end()
                self.out = shown
        self.out.flush()

        if reply or status == "ok":
            msg = {"role": "assistant", "content": reply}
            if thinking:  # kept in the saved conversation; harmony leaves earlier reasoning out of the prompt
                msg["thinking"] = "".join(thinking)
            if status != "ok":
                msg["interrupted" if status == "interrupted" else "truncated"] = True
            self.messages.append(msg)
        else:
            self.messages.pop()  # nothing answered: forget the question too (templates want alternating turns)
        if t_first is not None:
            turn.prompt_s = t_first - t0
            turn.gen_s = t_last - t_first
        self.last = turn
        self.totals.add(turn)
        if status == "full" and self.interactive:  # -p turns it into an error line and exit status 1
            self.err.write(f"{self.context_full_message()}\n")
        if s.verbose:
            self.err.write(f"{st.format_turn(turn)} | context {self.context_line()} | "
                           f"{st.format_experts(m, before)}\n")
        self.err.flush()
        return status

    def _stream(self, m, s: Settings, turn, pieces: list[str], thinking: list[str], parser, timed):
        """Generate and print one answer -> (status, when the prompt started computing); status "ok",
        "interrupted" (Ctrl-C) or "full" (the context filled up)."""
        t0 = time.perf_counter()
        try:
            ids = m.tokenize(m.chat_prompt(self.conversation()), add_special=True)
            turn.prompt_tokens = len(ids)
            turn.prompt_new = max(len(ids) - common_prefix(self.session.tokens, ids), 1)
            t0 = time.perf_counter()
            with no_echo(self.interactive):
                for piece in m.stream_text(timed(m.generate(ids, s.max_tokens, session=self.session,
                                                            **s.sampling())), special=parser is not None):
                    if parser is None:
                        pieces.append(piece)
                        self.out.write(piece)
                        self.out.flush()
                    else:
                        self._show(parser.push(piece), pieces, thinking)
        except KeyboardInterrupt:
            return "interrupted", t0
        except MoecliError:
            if turn.prompt_tokens == 0 or turn.prompt_tokens + turn.gen_tokens <= self.session.n_ctx:
                self.messages.pop()
                raise  # something else than the context filling up
            return "full", t0
        except BaseException:
            self.messages.pop()
            raise
        return "ok", t0

    def _show(self, parts: list[tuple[str, str]], answer: list[str], thinking: list[str]) -> None:
        """Harmony channels: the answer ("final") to stdout, reasoning and tool preambles dimmed on stderr."""
        for channel, text in parts:
            if channel == "final":
                if thinking and not answer:
                    self.err.write("\n")
                    self.err.flush()
                answer.append(text)
                self.out.write(text)
                self.out.flush()
            else:
                thinking.append(text)
                dim = getattr(self.err, "isatty", lambda: False)()
                self.err.write(f"\033[2m{text}\033[0m" if dim else text)
                self.err.flush()

    def context_line(self) -> str:
        return st.format_context(len(self.session.tokens), self.session.n_ctx)

    # --- slash commands -----------------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a slash command; False means exit."""
        name, _, arg = line.strip().partition(" ")
        handler = COMMANDS.get(name.lower())
        if handler is None:
            self.say(f"Unknown command '{name}'. Type /? for help")
            return True
        return handler(self, arg.strip()) is not False

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def cmd_help(self, arg: str) -> None:
        self.say(HELP)

    def cmd_bye(self, arg: str) -> bool:
        return False

    def cmd_set(self, arg: str) -> None:
        s = self.settings
        if not arg:
            for f in fields(s):
                self.say(f"  {f.name:<15} {getattr(s, f.name)!r}" if f.name == "system"
                         else f"  {f.name:<15} {getattr(s, f.name)}")
            return
        key, _, value = arg.partition(" ")
        key, value = key.lower().replace("-", "_"), value.strip()
        if key in ("verbose", "quiet"):
            s.verbose = key == "verbose"
            self.say(f"Set '{key}' mode.")
            return
        if key == "system":
            s.system = value or None
            self.say("Set system message." if value else "Removed the system message.")
            return
        if key == "parameter":  # ollama: /set parameter NAME VALUE
            key, _, value = value.partition(" ")
            key, value = key.lower().replace("-", "_"), value.strip()
        key = ALIASES.get(key, key)
        if key not in PARAMS:
            self.say(f"Unknown setting '{key}': {', '.join(PARAMS)}, system, verbose, quiet")
            return
        try:
            setattr(s, key, PARAMS[key](value))
        except ValueError as e:
            self.say(f"Bad value for {key}: {value!r} ({e})" if value else f"Usage: /set {key} VALUE")
            return
        self.say(f"Set parameter '{key}' to '{getattr(s, key)}'")

    def cmd_clear(self, arg: str) -> None:
        self.messages = []
        self.session.reset()
        self.say("Cleared session context")

    def cmd_stats(self, arg: str) -> None:
        if self.last is None:
            self.say("last answer: none yet")
        else:
            self.say(f"last answer: {st.format_turn(self.last)}")
        self.say(f"session:     {st.format_totals(self.totals)}")
        self.say(f"context:     {self.context_line()}")
        self.say(f"experts:     {st.format_experts(self.model)}")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            self.say("Usage: /save FILE")
            return
        path = Path(arg).expanduser()
        data = {"format": FORMAT, "model": str(getattr(self.model, "path", "")), "settings": asdict(self.settings),
                "messages": self.messages}
        try:
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as e:
            self.say(f"error: cannot save to {path}: {e.strerror or e}")
            return
        self.say(f"Saved {len(self.messages)} messages to {path}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            self.say("Usage: /load FILE")
            return
        path = Path(arg).expanduser()
        try:
            messages, settings, model = load_conversation(path)
        except MoecliError as e:
            self.say(f"error: {e}")
            return
        changed = [f.name for f in fields(Settings) if getattr(settings, f.name) != getattr(self.settings, f.name)]
        self.settings, self.messages = settings, messages
        self.show_history()
        saved_with = model
        if saved_with and Path(saved_with).name != Path(str(getattr(self.model, "path", ""))).name:
            self.say(f"(saved with another model: {saved_with})")
        restored = ", ".join("system message" if k == "system" and settings.system else
                             "no system message" if k == "system" else f"{k} {getattr(settings, k)}"
                             for k in changed)
        self.say(f"Loaded {len(messages)} messages from {path}; "
                 + (f"restored the saved settings: {restored}" if changed else "the saved settings equal these"))

    def show_history(self) -> None:
        if self.settings.system:
            self.say(f"(system) {self.settings.system}")
        for msg in self.messages:
            if msg["role"] == "user":
                self.say(PROMPT + msg["content"].replace("\n", "\n" + MORE))
            else:
                self.say(msg["content"] + (" (interrupted)" if msg.get("interrupted") else "") + "\n")


COMMANDS: dict[str, Callable] = {
    "/help": Chat.cmd_help, "/?": Chat.cmd_help,
    "/bye": Chat.cmd_bye, "/exit": Chat.cmd_bye, "/quit": Chat.cmd_bye,
    "/set": Chat.cmd_set, "/clear": Chat.cmd_clear, "/stats": Chat.cmd_stats,
    "/save": Chat.cmd_save, "/load": Chat.cmd_load,
}


def load_conversation(path: Path) -> tuple[list[dict], Settings, str]:
    """Messages, settings and model path from a /save file, checked."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise MoecliError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise MoecliError(f"{path} is not a saved conversation (bad JSON: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise MoecliError(f"{path} is not a saved conversation (no messages list)")
    messages = []
    for m in data["messages"]:
        if not (isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
                and isinstance(m.get("content"), str)):
            raise MoecliError(f"{path}: bad message {m!r:.60}")
        messages.append(m)
    settings = Settings()
    for f in fields(Settings):
        v = (data.get("settings") or {}).get(f.name, getattr(settings, f.name))
        if f.name in PARAMS:
            try:
                v = PARAMS[f.name](str(v))
            except ValueError:
                raise MoecliError(f"{path}: bad value for {f.name}: {v!r}") from None
        setattr(settings, f.name, v)
    # A system message saved inside the messages (another tool's file) becomes the system setting.
    if messages and messages[0]["role"] == "system":
        settings.system = messages.pop(0)["content"]
    settings.verbose = bool(settings.verbose)
    settings.system = settings.system if isinstance(settings.system, str) and settings.system else None
    return messages, settings, str(data.get("model") or "")


# --- the terminal --------------------------------------------------------------------------------------------------
def _is_tty(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def _cells(ch: str) -> int:
    """Columns a character takes on a terminal: 2 for wide (CJK) characters, 0 for combining marks."""
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


class WordWrap:
    """A text stream that breaks lines at word boundaries before the terminal's edge (which would cut words).

    The word being written waits until it ends (a space or a newline: one token of delay), so it can move to the
    next line whole; a word wider than the terminal is cut at the edge. No escape codes: the bytes stay plain text.
    """

    def __init__(self, out, width: int | None = None):
        self.out = out
        self.width = width or max(shutil.get_terminal_size((80, 24)).columns - 1, 10)
        self.col = 0       # columns used on the current line
        self.word = ""     # the word not written yet
        self.word_cells = 0
        self.space = ""    # the blank before it, written only if the word stays on this line

    def write(self, text: str) -> int:
        for ch in text:
            if ch == "\n":
                self._flush_word()
                self.out.write("\n")
                self.col, self.space = 0, ""
            elif ch in " \t":
                self._flush_word()
                if self.col:
                    self.space += ch
            else:
                self.word += ch
                self.word_cells += _cells(ch)
                if self.word_cells >= self.width:  # wider than a line: cut it
                    self._flush_word()
        return len(text)

    def _flush_word(self) -> None:
        if not self.word:
            return
        if self.col and self.col + len(self.space) + self.word_cells > self.width:
            self.out.write("\n")
            self.col = 0
        elif self.space:
            self.out.write(self.space)
            self.col += len(self.space)
        self.space = ""
        while self.col + self.word_cells > self.width:  # still too wide: cut at the edge
            head, cells = "", 0
            for ch in self.word:
                if self.col + cells + _cells(ch) > self.width:
                    break
                head, cells = head + ch, cells + _cells(ch)
            self.out.write(head + "\n")
            self.word, self.word_cells, self.col = self.word[len(head):], self.word_cells - cells, 0
        self.out.write(self.word)
        self.col += self.word_cells
        self.word, self.word_cells = "", 0

    def flush(self) -> None:
        """Flush what is written; the word being written stays (a token is often part of a word)."""
        self.out.flush()

    def end(self) -> None:
        """Write the last word: the answer is over."""
        self._flush_word()
        self.out.flush()

    def isatty(self) -> bool:
        return _is_tty(self.out)


@contextlib.contextmanager
def no_echo(active: bool = True):
    """While an answer streams, keys typed on the terminal are not echoed into it; they wait in the terminal's
    input queue and show at the next prompt (a shell's type-ahead). Ctrl-C still interrupts (ISIG stays on)."""
    fd, saved = None, None
    if active and sys.stdin is not None and _is_tty(sys.stdin):
        try:
            import termios

            fd = sys.stdin.fileno()
            saved = termios.tcgetattr(fd)
            quiet = termios.tcgetattr(fd)
            quiet[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSANOW, quiet)
        except (ImportError, OSError, ValueError):
            saved = None
    try:
        yield
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(fd, termios.TCSANOW, saved)


def line_buffer() -> str:
    """What was typed on the prompt line when Ctrl-C came (readline keeps it), '' without readline."""
    rl = sys.modules.get("readline")
    try:
        return rl.get_line_buffer() if rl is not None else ""
    except Exception:  # noqa: BLE001 - a readline without the call
        return ""


# --- input ---------------------------------------------------------------------------------------------------------
class Cancelled(Exception):
    """Ctrl-C in the middle of a message being typed: drop it."""


def read_message(read: Callable[[str], str]) -> str:
    """One message: a line, `\"\"\"`-delimited lines, or lines continued by a trailing backslash.

    Raises EOFError (Ctrl-D), KeyboardInterrupt (Ctrl-C at the prompt) or Cancelled (Ctrl-C or Ctrl-D in the middle
    of a multi-line message).
    """
    line = read(PROMPT)
    try:
        if line.lstrip().startswith('"""'):
            rest = line.lstrip()[3:]
            if rest.rstrip().endswith('"""'):  # """one line"""
                return rest.rstrip()[:-3]
            lines = [rest] if rest.strip() else []
            while True:
                line = read(MORE)
                if line.rstrip().endswith('"""'):
                    lines.append(line.rstrip()[:-3])
                    return "\n".join(lines).strip("\n")
                lines.append(line)
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = read(MORE)
        return "\n".join(lines + [line])
    except (KeyboardInterrupt, EOFError):
        raise Cancelled from None


def run(chat: Chat, read: Callable[[str], str] | None = None,
        typed: Callable[[], str] = line_buffer) -> None:
    """The read-eval-print loop, until /bye, Ctrl-D or two Ctrl-C in a row at an empty prompt. Ctrl-C on a
    half-typed line clears it (`typed()`: the line when it came) and does not count toward exiting."""
    if read is None:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        read = input
    interrupts = 0
    while True:
        try:
            text = read_message(read)
        except EOFError:
            chat.out.write("\n")
            return
        except UnicodeDecodeError:
            chat.say("error: the terminal sent bytes that are not UTF-8 (check its encoding, e.g. LANG=C.UTF-8)")
            continue
        except Cancelled:
            chat.out.write("\n")
            continue
        except KeyboardInterrupt:
            if typed().strip():  # the line is dropped; the next prompt starts empty
                chat.out.write("\n")
                interrupts = 0
                continue
            interrupts += 1
            if interrupts >= 2:
                chat.out.write("\n")
                return
            chat.say("\n(press Ctrl-C again to exit, or use Ctrl-D or /bye)")
            continue
        interrupts = 0
        try:
            if text.strip().startswith("/"):
                if not chat.command(text):
                    return
            elif text.strip():
                chat.answer(text)
                chat.out.write("\n")
        except KeyboardInterrupt:
            chat.say("\n(interrupted)")
        except MoecliError as e:
            chat.say(f"error: {e}")
