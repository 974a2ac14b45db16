"""Conversations: messages in, text out, over one KV cache kept between turns.

Each turn renders the whole conversation with the model's chat template and tokenizes it; the KV cache of
the previous turns is reused up to the longest common token prefix of what it holds and the new rendering,
so only the new part is prefilled. That needs nothing from the template but determinism, so it keeps
working whatever template renders the text. When the conversation outgrows the context, the oldest turns
are dropped (the system message is kept) and what is kept is prefilled again.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from .errors import MinirtError


# Templates for files that carry none, by architecture (llama.cpp, too, falls back to built-in templates):
# Gemma 3's, as google's tokenizer_config.json gives it (the gemma3 GGUF files of the registry carry none).
BUILTIN_TEMPLATES = {
    "gemma3": (
        "{{ bos_token }}"
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
        "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
        "{{ message['content'] | trim }}"
        "{{ '<end_of_turn>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"),
}

MAX_RENDERED = 4 << 20  # characters a template may write beyond the messages' own text


@lru_cache(maxsize=8)
def _template(source: str):
    """The model's chat template compiled in jinja2's sandbox, as Hugging Face's apply_chat_template does it
    (trim_blocks, lstrip_blocks, loop controls, raise_exception, strftime_now, tojson)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise MinirtError(f"the model's chat template refused the conversation: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise MinirtError(f"the model's chat template does not parse: {e}") from None


def special_text(tokenizer, token_id) -> str:
    """A special token's text ('' where the model has none)."""
    if token_id is None:
        return ""
    for text, i in getattr(tokenizer, "special", {}).items():  # control tokens decode to nothing: their text
        if i == token_id:
            return text
    return tokenizer.token_bytes(int(token_id)).decode("utf-8", errors="replace")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
    """The conversation as the model's own chat template (tokenizer.chat_template: GGUF tokenizer.chat_template,
    or tokenizer_config.json's chat_template) writes it, rendered with jinja2 in its sandbox, with the model's
    bos/eos tokens. messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]; extra: more
    template variables (e.g. tools=None)."""
    import jinja2
    source = tokenizer.chat_template
    if not source:
        raise MinirtError("this model has no chat template; use a plain prompt (without --chat)")
    template = _template(source)
    limit = MAX_RENDERED + sum(len(str(m.get("content", ""))) for m in messages)
    out, n = [], 0
    try:
        # as apply_chat_template: tools and documents None unless given; a token the model lacks stays undefined
        specials = {f"{k}_token": special_text(tokenizer, i) for k, i in (("bos", tokenizer.bos_id),
                                                                         ("eos", tokenizer.eos_id)) if i is not None}
        for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       **{"tools": None, "documents": None, **specials, **extra}):
            n += len(piece)
            if n > limit:
                raise MinirtError(f"the model's chat template wrote more than {limit} characters; it is not usable")
            out.append(piece)
    except jinja2.TemplateError as e:
        raise MinirtError(f"the model's chat template failed: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as e:
        raise MinirtError(f"the model's chat template failed: {type(e).__name__}: {e}") from None
    return "".join(out)


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered conversation: a template that writes the BOS token itself gets no second one."""
    bos = special_text(tokenizer, tokenizer.bos_id)
    return tokenizer.encode(text, add_bos=False if bos and text.startswith(bos) else None)


class Chat:
    """A multi-turn conversation with a model. send() streams the reply to one user message and adds both
    to the history; sampling options given here are the defaults of every turn.

        chat = minirt.Chat(model, system="Be brief.", temperature=0)
        for piece in chat.send("Hello!"):
            print(piece, end="")
    """
    def __init__(self, model, system: str | None = None, ctx: int | None = None, **options):
        self.model, self.system, self.options = model, system, options
        render(model.tokenizer, [{"role": "user", "content": "hi"}])  # one line, now, where no template works
        self.cache = model.new_cache(ctx)
        self.cached: list[int] = []   # the tokens whose keys and values are in the cache
        self.notices: list[str] = []  # what the chat did on its own (turns dropped), for the front end to show
        self.last = None              # the last turn's Generation (stats)
        self.clear()

    def clear(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt(self, reserve: int) -> list[int]:
        """The conversation's tokens with the generation prompt; the oldest turns are dropped until they and
        `reserve` tokens for the reply fit the context."""
        tok, cap = self.model.tokenizer, self.cache.capacity
        dropped = 0
        while True:
            ids = encode_rendered(tok, render(tok, self.messages))
            if len(ids) + reserve <= cap:
                break
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:  # only the new message is left
                if len(ids) < cap:
                    break  # it fits with less room for the reply
                raise MinirtError(f"the message has {len(ids)} tokens with the template, but the context holds "
                                  f"{cap}; shorten it or raise --ctx")
            del self.messages[first]
            dropped += 1
            while len(self.messages) > first + 1 and self.messages[first]["role"] != "user":
                del self.messages[first]  # drop whole turns: a user message and the replies after it
                dropped += 1
        if dropped:
            self.notices.append(f"the conversation outgrew the context of {cap} tokens: the oldest "
                                f"{dropped} message{'s' * (dropped > 1)} were dropped")
        return ids

    def send(self, text: str, **options):
        """Add a user message and stream the reply (text pieces). The reply joins the history when the stream
        ends, also when it is stopped early (closed, or interrupted with Ctrl-C)."""
        opts = {**self.options, **options}
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self._prompt(reserve=min(opts.get("max_tokens", 128), self.cache.capacity // 4))
        except MinirtError:
            self.messages.pop()
            raise
        common = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            common += 1
        self.cache.truncate(min(common, self.cache.pos))
        try:
            gen = self.model.generate(ids, cache=self.cache, **opts)
        except MinirtError:  # a refused request leaves the conversation as it was
            self.messages.pop()
            raise
        self.last = gen
        return self._stream(gen, ids)

    def _stream(self, gen, ids):
        reply = []
        try:
            for piece in gen:
                reply.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(reply)})
            self.cached = (ids + gen.stats.tokens)[:self.cache.pos]

    def __call__(self, messages: list[dict], **options) -> str:
        """Messages in, text out: replace the history with `messages` (the last one the user's) and return the
        reply. The cache still serves whatever prefix the new history shares with the old."""
        if not messages or messages[-1].get("role") != "user":
            raise MinirtError("the last message must be the user's")
        self.messages = [dict(m) for m in messages[:-1]]
        return "".join(self.send(messages[-1]["content"], **options))
