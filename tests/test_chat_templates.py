"""Chat templates rendered with jinja2 in its sandbox (minirt.chat.render) equal Hugging Face's
apply_chat_template rendering (transformers' render_jinja_template) for SmolLM2's own template and for the real
templates of the families minirt runs (Llama 3.x, Qwen2.5/QwQ/Qwen3, Phi-3.5, Mistral, Gemma, SmolLM3, DeepSeek-R1
distills, Hermes tool use) from llama.cpp's models/templates/ (llama-cpp-python 0.3.36 source package), with each
model's own bos/eos texts, conversations with a system message and several turns, with and without the generation
prompt, and with tools or thinking switched off where the template reads them."""
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
    "system and several turns": [{"role": "system", "content": "You answer in one line."},
                                 {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"},
                                 {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "11\n"},
                                 {"role": "user", "content": "And the sum of both, as {json}?"}],
}
LLAMA3 = ("<|begin_of_text|>", "<|eot_id|>")
DEEPSEEK = ("<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>")
# the real templates of the families minirt runs, with their models' bos/eos texts (None: the model has none)
TEMPLATES = {
    "HuggingFaceTB-SmolLM3-3B": (None, "<|im_end|>"),
    "meta-llama-Llama-3.1-8B-Instruct": LLAMA3, "meta-llama-Llama-3.2-3B-Instruct": LLAMA3,
    "meta-llama-Llama-3.3-70B-Instruct": LLAMA3, "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": LLAMA3,
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": LLAMA3, "fireworks-ai-llama-3-firefunction-v2": LLAMA3,
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": DEEPSEEK, "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": DEEPSEEK,
    "Qwen-Qwen2.5-7B-Instruct": (None, "<|im_end|>"), "Qwen-QwQ-32B": (None, "<|im_end|>"),
    "Qwen-Qwen3-0.6B": (None, "<|im_end|>"), "Qwen3-Coder": (None, "<|im_end|>"),
    "microsoft-Phi-3.5-mini-instruct": ("<s>", "<|endoftext|>"),
    "mistralai-Mistral-Nemo-Instruct-2407": ("<s>", "</s>"), "Mistral-Small-3.2-24B-Instruct-2506": ("<s>", "</s>"),
    "unsloth-mistral-Devstral-Small-2507": ("<s>", "</s>"),
    "google-gemma-2-2b-it": ("<bos>", "<eos>"), "google-gemma-4-31B-it": ("<bos>", "<eos>"),
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city's name"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}]
# template variables beyond the conversation: thinking switched off, a tool offered
EXTRA = {"Qwen-Qwen3-0.6B": [{"enable_thinking": False}, {"tools": TOOLS}],
         "HuggingFaceTB-SmolLM3-3B": [{"enable_thinking": False}],
         **{name: [{"tools": TOOLS}] for name in ("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use",
                                                  "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
                                                  "fireworks-ai-llama-3-firefunction-v2", "Qwen-Qwen2.5-7B-Instruct",
                                                  "meta-llama-Llama-3.2-3B-Instruct", "Mistral-Small-3.2-24B-Instruct-2506")}}


class FakeTokenizer:
    """What render() reads from a tokenizer: the template and the bos/eos token texts (None: no such token)."""
    def __init__(self, template, bos="<s>", eos="</s>"):
        self.chat_template = template
        self.bos_id, self.eos_id = (0 if bos is not None else None), (1 if eos is not None else None)
        self._text = {0: bos, 1: eos}

    def token_bytes(self, i):
        return self._text[i].encode()


def _reference(template, messages, gen, bos="<s>", eos="</s>", **extra):
    """transformers' rendering, given the special tokens the way apply_chat_template gives them: a token the
    model lacks is left undefined."""
    specials = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    out, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=gen, **specials, **extra)
    return out[0]


@pytest.fixture(scope="module")
def templates():
    folder = pull("llama-templates", what="name")
    return {name: (folder / f"{name}.jinja").read_text(encoding="utf-8") for name in TEMPLATES}


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_real_templates_render_as_transformers_does(templates, name, conv, gen):
    src, messages, (bos, eos) = templates[name], CONVERSATIONS[conv], TEMPLATES[name]
    for extra in [{}] + EXTRA.get(name, []):
        try:
            want = _reference(src, messages, gen, bos, eos, **extra)
        except Exception as e:  # the template refuses this conversation (Gemma 2: no system role; TypeError: a
            with pytest.raises(MinirtError, match="refused|failed"):  # tool-use template given no tools)
                render(FakeTokenizer(src, bos, eos), messages, gen, **extra)
            assert "raise_exception" in src or type(e) is TypeError or "Exception" in type(e).__name__, e
            continue
        assert render(FakeTokenizer(src, bos, eos), messages, gen, **extra) == want


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
