"""Chat templates rendered with jinja2 in its sandbox (minirt.chat.render) equal Hugging Face's
apply_chat_template rendering (transformers' render_jinja_template) for SmolLM2's own template and for real
templates from llama.cpp's models/templates/ (fetched from the llama-cpp-python 0.3.36 source package)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from minirt import MinirtError
from minirt.chat import render
from minirt.registry import pull

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Hello!"}],
    "system and turns": [{"role": "system", "content": "You are terse."},
                         {"role": "user", "content": "What is 2+2?"},
                         {"role": "assistant", "content": "4"},
                         {"role": "user", "content": "  And 3+3?\n"}],
    "turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
              {"role": "user", "content": "Tell me a joke about ünïcödé."}],
}
TEMPLATES = ["HuggingFaceTB-SmolLM3-3B", "meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.2-3B-Instruct",
             "meta-llama-Llama-3.3-70B-Instruct", "Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B",
             "microsoft-Phi-3.5-mini-instruct", "mistralai-Mistral-Nemo-Instruct-2407", "google-gemma-2-2b-it"]


class FakeTokenizer:
    """What render() reads from a tokenizer: the template and the bos/eos token texts."""
    def __init__(self, template, bos="<s>", eos="</s>"):
        self.chat_template, self.bos_id, self.eos_id = template, 0, 1
        self._text = {0: bos, 1: eos}

    def token_bytes(self, i):
        return self._text[i].encode()


def _reference(template, messages, gen, bos="<s>", eos="</s>"):
    out, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=gen,
                                   bos_token=bos, eos_token=eos)
    return out[0]


@pytest.fixture(scope="module")
def templates():
    folder = pull("llama-templates", what="name")
    return {name: (folder / f"{name}.jinja").read_text(encoding="utf-8") for name in TEMPLATES}


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_real_templates_render_as_transformers_does(templates, name, conv, gen):
    src, messages = templates[name], CONVERSATIONS[conv]
    try:
        want = _reference(src, messages, gen)
    except Exception as e:  # the template refuses this conversation (e.g. Gemma: no system role)
        with pytest.raises(MinirtError, match="refused|failed"):
            render(FakeTokenizer(src), messages, gen)
        assert "raise_exception" in src or "Exception" in type(e).__name__, e
        return
    assert render(FakeTokenizer(src), messages, gen) == want


def test_smollm2_template_as_transformers(smollm2_fast):
    tok = smollm2_fast.tokenizer
    for messages in CONVERSATIONS.values():
        want = _reference(tok.chat_template, messages, True, "<|im_start|>", "<|im_end|>")
        assert render(tok, messages) == want
    # the template's default system message when the conversation has none
    assert render(tok, CONVERSATIONS["one turn"]).startswith("<|im_start|>system\nYou are a helpful AI")


@pytest.mark.parametrize("template, needle", [
    ("{{ raise_exception('no system role') }}", "refused"),
    ("{% for x in messages %}{{ x.content.__class__.__mro__ }}{% endfor %}", "failed"),   # sandbox: no dunder access
    ("{% for i in range(100000) %}{% for j in range(100000) %}{{ 'xxxxxxxxxx' }}{% endfor %}{% endfor %}",
     "more than"),                                                                        # bounded output
    ("{% if %}", "does not parse"),
    ("", "no chat template"),
])
def test_hostile_or_broken_templates_are_one_line_errors(template, needle):
    with pytest.raises(MinirtError, match=needle) as e:
        render(FakeTokenizer(template), CONVERSATIONS["one turn"])
    assert "\n" not in str(e.value)


def test_template_writing_bos_gets_no_second_bos(smollm2_fast):
    from minirt.chat import encode_rendered
    tok = SimpleNamespace(**{k: getattr(smollm2_fast.tokenizer, k) for k in ("bos_id", "eos_id")})
    real = smollm2_fast.tokenizer
    tok.token_bytes, tok.chat_template = real.token_bytes, "{{ bos_token }}{{ messages[0].content }}"
    tok.encode = lambda text, add_bos=None: real.encode(text, add_bos=True if add_bos is None else add_bos)
    ids = encode_rendered(tok, render(tok, CONVERSATIONS["one turn"]))
    assert ids.count(real.bos_id) == 1 and ids[0] == real.bos_id
