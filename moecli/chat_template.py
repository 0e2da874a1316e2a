"""Chat templates rendered in Jinja2's immutable sandbox: a template shipped inside a model is untrusted code."""
from __future__ import annotations

import json
from datetime import datetime

from jinja2 import TemplateError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moecli.errors import MoecliError

# Used when a model ships no template: ChatML, which most instruction-tuned MoE models use.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _raise(message):
    raise TemplateError(message)


def _env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda v, indent=None, **_: json.dumps(v, indent=indent, ensure_ascii=False)
    return env


def render(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", **extra) -> str:
    try:
        tmpl = _env().from_string(template or CHATML)
        return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token, eos_token=eos_token, **extra)
    except SecurityError as e:
        raise MoecliError(f"chat template refused: it tried an unsafe operation ({e})") from None
    except TemplateError as e:
        raise MoecliError(f"chat template failed: {e}") from None
