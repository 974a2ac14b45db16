"""Conversations: messages in, text out, over one KV cache kept between turns.

Each turn renders the whole conversation with the model's chat template and tokenizes it; the KV cache of
the previous turns is reused up to the longest common token prefix of what it holds and the new rendering,
so only the new part is prefilled. That needs nothing from the template but determinism, so it keeps
working whatever template renders the text. When the conversation outgrows the context, the oldest turns
are dropped (the system message is kept) and what is kept is prefilled again.
"""
from __future__ import annotations

import re

from .errors import MinirtError


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The conversation as the model's chat template writes it (ChatML, the template minirt knows).
    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]. Where the conversation has no
    system message, the template's own default (if it has one) is used, as the template itself does."""
    t = tokenizer.chat_template or ""
    if "<|im_start|>" not in t:
        raise MinirtError("this model has no chat template minirt understands (ChatML); use a plain prompt")
    out = []
    if not messages or messages[0]["role"] != "system":
        m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", t, re.S)
        if m:
            out.append(f"<|im_start|>system\n{m.group(1)}<|im_end|>\n")
    for msg in messages:
        if msg["role"] not in ("system", "user", "assistant"):
            raise MinirtError(f"unknown chat role {msg['role']!r}: use system, user or assistant")
        if msg["role"] == "system" and not msg["content"]:
            continue
        out.append(f"<|im_start|>{msg['role']}\n{msg['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


class Chat:
    """A multi-turn conversation with a model. send() streams the reply to one user message and adds both
    to the history; sampling options given here are the defaults of every turn.

        chat = minirt.Chat(model, system="Be brief.", temperature=0)
        for piece in chat.send("Hello!"):
            print(piece, end="")
    """
    def __init__(self, model, system: str | None = None, ctx: int | None = None, **options):
        self.model, self.system, self.options = model, system, options
        render(model.tokenizer, [])  # one line, now, for a model without a chat template
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
            ids = tok.encode(render(tok, self.messages))
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
        gen = self.model.generate(ids, cache=self.cache, **opts)
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
