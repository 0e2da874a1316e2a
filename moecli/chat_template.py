"""Chat templates rendered in Jinja2's immutable sandbox: a template shipped inside a model is untrusted code.

The sandbox stops escapes; the bounds here stop cost. A render has a time limit and an output limit, and what can
grow without output is bounded too: every loop iteration and call checks the clock, `*`/`**`/`%` are refused when
their result would be too big before they run, `+`/`~`/filters/calls are checked after (they grow at most 2x per
step), and our own filters take bounded arguments. Valid templates render exactly as in a plain sandbox.
"""
from __future__ import annotations

import functools
import json
import re
import time
from datetime import datetime

from jinja2 import TemplateError, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moecli.errors import MoecliError

# Used when a model ships no template: ChatML, which most instruction-tuned MoE models use.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

RENDER_SECONDS = 2.0       # a real template renders in milliseconds
MAX_CHARS = 16 << 20       # output, and any string or list built on the way (a long conversation is ~1 MB)
MAX_INDENT = 64            # tojson(indent=...)
MAX_STRFTIME = 64          # strftime_now(format) length
_CHECK_EVERY = 1024        # loop iterations between clock reads
_WIDE_FORMAT = re.compile(r"\d{7,}")  # a '%99999999d' / '{:>99999999}' width: millions of characters at once


class TemplateLimit(TemplateError):
    """A bound was hit; the message says which."""


def _raise(message):
    raise TemplateError(message)


def _size(value) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


class _Bounded(ImmutableSandboxedEnvironment):
    """The immutable sandbox with a deadline and size bounds on everything that can grow."""

    intercepted_binops = frozenset(["+", "*", "**", "%", "//", "/", "-"])

    def __init__(self, **kw):
        super().__init__(**kw)
        self.deadline = time.monotonic() + RENDER_SECONDS

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"rendering took longer than {RENDER_SECONDS:g} s")

    def checked(self, value):
        if _size(value) > MAX_CHARS:
            raise TemplateLimit(f"it built a value of {_size(value)} items (the limit is {MAX_CHARS})")
        return value

    def call_binop(self, context, operator, left, right):
        self.tick()
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(n, int) and _size(seq) * max(n, 0) > MAX_CHARS:
                raise TemplateLimit(f"'*' would build {_size(seq) * n} items (the limit is {MAX_CHARS})")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 4096:
                raise TemplateLimit("'*' on integers this large")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and \
                abs(left) > 1 and right * max(left.bit_length(), 1) > 4096:
            raise TemplateLimit(f"'**' would build an integer of {right * left.bit_length()} bits")
        elif operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
            raise TemplateLimit("a '%' format with a width of millions")
        return self.checked(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
        __self.tick()
        if any(isinstance(a, int) and not isinstance(a, bool) and a > MAX_CHARS for a in (*args, *kwargs.values())):
            raise TemplateLimit(f"a call with an argument above {MAX_CHARS}")
        return __self.checked(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):  # str.format / format_map, as the sandbox hands them to templates
        wrapped = super().wrap_str_format(value)
        if wrapped is not None and _WIDE_FORMAT.search(value.__self__):
            def refuse(*_, **__):
                raise TemplateLimit("a format with a width of millions")

            return refuse
        return wrapped

    def bounded_iter(self, iterable):
        """Every for-loop iterates through this: the clock is read every _CHECK_EVERY iterations."""
        self.tick()
        for i, item in enumerate(iterable):
            if i % _CHECK_EVERY == _CHECK_EVERY - 1:
                self.tick()
            yield item

    def _parse(self, source, name, filename):
        tree = super()._parse(source, name, filename)
        # loops iterate through bounded_iter; `~` concatenations are size-checked (both as filters: a plain call)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, "_bounded_iter", [], [], None, None, lineno=loop.lineno)
        for concat in list(tree.find_all(nodes.Concat)):
            _replace(tree, concat, nodes.Filter(concat, "_checked", [], [], None, None, lineno=concat.lineno))
        return tree


def _replace(tree, old, new) -> None:
    """Put `new` where `old` is in the tree (Jinja nodes have no parent links)."""
    for node in tree.find_all(nodes.Node):
        for field in node.fields:
            value = getattr(node, field, None)
            if value is old:
                setattr(node, field, new)
                return
            if isinstance(value, list) and any(v is old for v in value):
                setattr(node, field, [new if v is old else v for v in value])
                return


def _tojson(value, indent=None, **_):
    if indent is not None and (not isinstance(indent, int) or not 0 <= indent <= MAX_INDENT):
        raise TemplateLimit(f"tojson indent {str(indent)[:20]} (at most {MAX_INDENT})")
    return json.dumps(value, indent=indent, ensure_ascii=False)


def _strftime_now(fmt):
    if not isinstance(fmt, str) or len(fmt) > MAX_STRFTIME:
        raise TemplateLimit(f"strftime_now format of {_size(fmt)} characters (at most {MAX_STRFTIME})")
    return datetime.now().strftime(fmt)


def _sized(env: _Bounded, f):
    @functools.wraps(f)  # keeps Jinja's pass_context/pass_environment markers
    def filter_(*args, **kwargs):
        env.tick()
        if any(isinstance(a, int) and not isinstance(a, bool) and a > MAX_CHARS for a in (*args, *kwargs.values())):
            raise TemplateLimit(f"a filter argument above {MAX_CHARS}")
        return env.checked(f(*args, **kwargs))

    return filter_


def _env() -> _Bounded:
    env = _Bounded(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    env.filters = {k: _sized(env, f) for k, f in env.filters.items()}
    env.filters["tojson"] = _tojson  # bounded by its input and MAX_INDENT
    env.filters["_bounded_iter"] = env.bounded_iter
    env.filters["_checked"] = env.checked
    return env


def render(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", **extra) -> str:
    if template is not None and not isinstance(template, str):
        raise MoecliError(f"chat template is {type(template).__name__}, not text")
    try:
        env = _env()
        tmpl = env.from_string(template or CHATML)
        out, size = [], 0
        for piece in tmpl.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=bos_token, eos_token=eos_token, **extra):
            size += len(piece)
            if size > MAX_CHARS:
                raise TemplateLimit(f"its output is larger than {MAX_CHARS} characters")
            env.tick()
            out.append(piece)
        return "".join(out)
    except TemplateLimit as e:
        raise MoecliError(f"chat template exceeded a limit: {e}") from None
    except SecurityError as e:
        raise MoecliError(f"chat template refused: it tried an unsafe operation ({e})") from None
    except TemplateError as e:
        raise MoecliError(f"chat template failed: {e}") from None
    except RecursionError:
        raise MoecliError("chat template failed: it recursed too deeply") from None
    except MemoryError:
        raise MoecliError("chat template failed: out of memory") from None
    except Exception as e:  # noqa: BLE001 - a template's own errors (1/0, range too big...), never a traceback
        raise MoecliError(f"chat template failed: {type(e).__name__}: {str(e)[:200]}") from None
