"""The generation loop: prefill the prompt (chunked inside forward), then one token per step, streaming text.

How a mode drives the forward pass (a drafter and its verification, a Jacobi block) is a Decoding that the
mode registers here (minirt.modes does, on import); this module knows no particular mode.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .errors import MinirtError
from .kvcache import context_size
from .sampling import Sampler, SamplingParams
from .tokenizer import Detokenizer

AHEAD = 4  # cache positions a step may run past the newest token (drafts, a block); a mode may ask for more


@dataclass(frozen=True)
class Decoding:
    """How generation runs for one mode.

    options: the generate-time options the mode takes, with their defaults.
    start(generation, **options): checks them against the model and the sampling settings, and sets up the
        mode's state on the generation (a drafter, statistics); returns the statistics object or None.
    tokens(generation): the token ids, an end-of-generation token included; None: plain decoding.
    ahead(**options): cache positions a step may run past the newest token."""
    options: dict = field(default_factory=dict)
    start: Callable[..., object] | None = None
    tokens: Callable[["Generation"], Iterator[int]] | None = None
    ahead: Callable[..., int] = lambda **options: AHEAD


DECODINGS: dict[str, Decoding] = {"dense": Decoding()}


def register(mode: str, decoding: Decoding) -> None:
    """Make generate(mode=...) run this decoding (minirt.modes registers every mode)."""
    DECODINGS[mode] = decoding


@dataclass
class Stats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    stop_reason: str = ""
    cached_tokens: int = 0      # prompt tokens whose KV a chat's earlier turns left in the cache
    tokens: list[int] = field(default_factory=list)

    def summary(self) -> str:
        run = self.prompt_tokens - self.cached_tokens
        pp = run / self.prompt_seconds if self.prompt_seconds else 0.0
        tg = (self.decode_tokens - 1) / self.decode_seconds if self.decode_seconds and self.decode_tokens > 1 else 0.0
        cached = f" ({self.cached_tokens} reused)" if self.cached_tokens else ""
        return (f"prompt: {self.prompt_tokens} tokens{cached}, {pp:.1f} tok/s, first token after "
                f"{self.prompt_seconds:.2f} s · decode: {self.decode_tokens} tokens, "
                f"{tg:.1f} tok/s · stop: {self.stop_reason}")


class Generation:
    """Iterate to receive text pieces; .stats holds counts, timings and the generated token ids.

    prompt: text (encoded with the tokenizer, BOS added where the model wants it) or a list of token ids.
    chat: wrap a text prompt in the model's chat template (system: its system message).
    stop: strings that end generation (not included in the output). The end-of-generation tokens always stop.
    cache: a KV cache that already holds the first cache.pos tokens of the prompt (a chat's earlier turns):
    only the rest is prefilled. Token sources that cannot continue a cache (speculative, jacobi, the GPU)
    start it over.
    ctx: the context this generation may fill (default: the model's, model.ctx); at most the model's maximum.
    progress: progress(done, total) is called as the prompt's positions are prefilled (for a progress bar).
    mode: how to decode (see minirt.modes); default: the mode the model was loaded with (minirt.load(mode=…)),
    whose options then serve as defaults. mode_options: that mode's generate-time options (speculative:
    draft, draft_k; jacobi: block). .mode_stats: the mode's counters (also .spec or .jacobi), or None.
    """

    def __init__(self, model, prompt, max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: tuple[str, ...] | list[str] = (), chat: bool = False, system: str | None = None,
                 mode: str | None = None, ctx: int | None = None, cache=None, progress=None, **mode_options):
        loaded = getattr(model, "mode", "dense")
        mode = loaded if mode is None else mode
        decoding = DECODINGS.get(mode)
        if decoding is None:
            raise MinirtError(f"unknown mode '{mode}': choose one of {', '.join(DECODINGS)}")
        unknown = sorted(set(mode_options) - set(decoding.options))
        if unknown:
            takes = f"takes {', '.join(decoding.options)}" if decoding.options else "takes no options"
            raise MinirtError(f"mode '{mode}' {takes}, not {', '.join(unknown)}")
        defaults = getattr(model, "mode_options", {}) if mode == loaded else {}
        opts = {**decoding.options, **{k: v for k, v in defaults.items() if k in decoding.options}, **mode_options}
        limit = model.ctx if ctx is None else context_size(model.cfg.max_ctx, ctx)
        if max_tokens < 0:
            raise MinirtError(f"max tokens must be ≥ 0, got {max_tokens}")
        self.model = model
        self.sampler = Sampler(SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed))
        tok = model.tokenizer
        if isinstance(prompt, str):
            if chat:
                from .chat import encode_rendered
                ids = encode_rendered(tok, tok.chat_prompt(prompt, system))
            else:
                ids = tok.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise MinirtError("the prompt is empty (and the model adds no BOS token)")
        top = model.cfg.max_ctx
        if len(ids) >= top:
            raise MinirtError(f"the prompt has {len(ids)} tokens, but the context holds {top} at most (the model's "
                              "maximum); shorten the prompt")
        if len(ids) >= limit:
            raise MinirtError(f"the prompt has {len(ids)} tokens, but the context holds {limit}; shorten the prompt "
                              f"or raise --ctx (up to {top})")
        self.prompt_ids = ids
        self.max_tokens = max_tokens
        self.stop = [s for s in stop if s]
        self.stats = Stats(prompt_tokens=len(ids))
        self.mode, self.mode_options, self.decoding = mode, opts, decoding
        self.drafter = None  # speculative decoding sets its drafter here
        self.progress = progress
        if cache is None:
            ahead = max(AHEAD, decoding.ahead(**opts))
            cache = model.new_cache(min(limit, len(ids) + max_tokens + 2 * ahead + 1))
        elif len(ids) > cache.capacity:
            raise MinirtError(f"the prompt has {len(ids)} tokens, but the cache holds {cache.capacity}")
        self.cache = cache
        self.mode_stats = decoding.start(self, **opts) if decoding.start else None
        if not self._continues_cache():
            cache.truncate(0)
        elif cache.pos >= len(ids):
            cache.truncate(len(ids) - 1)  # the last prompt token is run: its logits give the first token
        self.stats.cached_tokens = cache.pos

    def _continues_cache(self) -> bool:
        """Whether the token source prefills only what the cache lacks (plain decoding does; a mode's own
        decoding starts the cache over)."""
        return self.decoding.tokens is None

    def _dense_tokens(self):
        """Prefill the prompt in one call, then one forward call per token."""
        logits = self.model.forward(self.prompt_ids[self.cache.pos:], self.cache, progress=self.progress)[0]
        history = list(self.prompt_ids)
        while True:
            tok = self.sampler(logits, history)
            history.append(tok)
            yield tok
            if self.cache.pos >= self.cache.capacity:
                return
            logits = self.model.forward([tok], self.cache)[0]

    def _tokens(self):
        """The token source: the mode's decoding, or plain decoding (a GPU model overrides both)."""
        if self.decoding.tokens is None:
            return self._dense_tokens()
        return self.decoding.tokens(self)

    def __iter__(self):
        model, st = self.model, self.stats
        eog = model.tokenizer.eog_ids
        if self.max_tokens == 0:
            st.stop_reason = "length"
            return
        detok = Detokenizer(model.tokenizer)
        source = self._tokens()
        pending = ""  # text held back while it could be the start of a stop string
        t0 = t1 = time.perf_counter()
        st.stop_reason = "context full"
        for tok in source:
            st.decode_tokens += 1
            if st.decode_tokens == 1:
                t1 = time.perf_counter()  # decode speed counts the steps after the first token
                st.prompt_seconds = t1 - t0
            if tok in eog:
                st.stop_reason = "eog"
                break
            st.tokens.append(tok)
            pending += detok.push(tok)
            out, hit = self._split_stop(pending)
            if out:
                yield out
            pending = pending[len(out):]
            if hit:
                st.stop_reason = "stop string"
                pending = ""
                break
            if len(st.tokens) >= self.max_tokens:
                st.stop_reason = "length"
                break
        st.decode_seconds = time.perf_counter() - t1
        tail = pending + detok.flush()
        if tail and st.stop_reason != "stop string":
            yield tail

    def _split_stop(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        if not self.stop:
            return text, False
        first = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if first >= 0:
            return text[:first], True
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return text[:len(text) - hold], False

    def text(self) -> str:
        return "".join(self)
