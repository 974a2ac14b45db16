"""The generation loop: prefill the prompt in one forward call (chunked inside), then one token per step,
streaming text."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .errors import MinirtError
from .kvcache import context_size
from .sampling import Sampler, SamplingParams
from .tokenizer import Detokenizer

MODES = ("dense", "lowrank", "speculative", "pinv", "jacobi")


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
    """

    def __init__(self, model, prompt, max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: tuple[str, ...] | list[str] = (), chat: bool = False, system: str | None = None,
                 mode: str = "dense", ctx: int | None = None, draft: str = "ngram", draft_k: int = 4,
                 block: int = 4, cache=None, progress=None):
        if mode not in MODES:
            raise MinirtError(f"unknown mode '{mode}': choose one of {', '.join(MODES)}")
        if mode == "lowrank" and not getattr(model, "lowrank", None):
            raise MinirtError("mode 'lowrank' needs a factored model: minirt.lowrank.with_lowrank(model, energy=E) "
                              "(the CLI does this for --mode lowrank)")
        if mode == "pinv" and getattr(model, "pinv", None) is None:
            raise MinirtError("mode 'pinv' needs a model with the transition installed: "
                              "minirt.pinv.with_pinv(model, window, tol) (the CLI does this for --mode pinv)")
        if mode == "jacobi" and temperature != 0:
            raise MinirtError("mode 'jacobi' decodes greedily: use temperature 0 (--temperature 0)")
        if draft_k < 1:
            raise MinirtError(f"draft length must be ≥ 1, got {draft_k}")
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
        if cache is None:
            cache = model.new_cache(min(limit, len(ids) + max_tokens + 2 * max(draft_k, block) + 1))
        elif len(ids) > cache.capacity:
            raise MinirtError(f"the prompt has {len(ids)} tokens, but the cache holds {cache.capacity}")
        self.cache = cache
        self.stats = Stats(prompt_tokens=len(ids))
        self.draft_k = draft_k
        self.drafter = None
        if mode == "speculative":
            from .speculative import SpecStats, make_drafter
            self.drafter = make_drafter(model, draft, self.cache.capacity)
            self.spec = SpecStats()
        self.mode, self.block = mode, block
        self.progress = progress
        if mode == "jacobi":
            from .jacobi import BLOCK_MAX, JacobiStats
            if not 1 <= block <= BLOCK_MAX:
                raise MinirtError(f"jacobi block size must be between 1 and {BLOCK_MAX}, got {block}")
            self.jacobi = JacobiStats()
        if not self._continues_cache():
            cache.truncate(0)
        elif cache.pos >= len(ids):
            cache.truncate(len(ids) - 1)  # the last prompt token is run: its logits give the first token
        self.stats.cached_tokens = cache.pos

    def _continues_cache(self) -> bool:
        return self.drafter is None and self.mode != "jacobi"

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
        """The token source: plain decoding, or speculative decoding with a drafter (a GPU model overrides it)."""
        if self.drafter is None:
            return self._dense_tokens()
        from .speculative import speculative_tokens
        return speculative_tokens(self.model, self.cache, self.prompt_ids, self.sampler, self.drafter, self.draft_k,
                                  self.max_tokens, self.spec, progress=self.progress)

    def __iter__(self):
        model, st = self.model, self.stats
        eog = model.tokenizer.eog_ids
        if self.max_tokens == 0:
            st.stop_reason = "length"
            return
        detok = Detokenizer(model.tokenizer)
        if self.mode == "jacobi":
            from .jacobi import jacobi_tokens
            source = jacobi_tokens(model, self.cache, self.prompt_ids, self.sampler, self.block, self.max_tokens,
                                   self.jacobi, progress=self.progress)
        else:
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
