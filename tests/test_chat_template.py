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
