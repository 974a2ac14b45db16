"""The batcher: slots, a bounded queue and one thread that owns the model (continuous batching).

Each request (each of its `n` choices) is a Sequence. A slot is a KV cache of --ctx positions, allocated once
and reused; a sequence holds one from admission to its end. Every step of the scheduler thread:
  1. retires sequences whose client went away (their slots are free for this step's admissions),
  2. admits waiting sequences into free slots (they join at this step),
  3. runs one prefill chunk (≤ PREFILL_STEP prompt positions) of one admitted sequence whose prompt does not
     fit beside the decode rows, shortest first (so a long prompt delays the running streams by one chunk per
     step, not by the whole prompt; the previous step's tokens are sent with it, so that no HTTP work competes
     with the prefill for the cores),
  4. runs ONE forward pass over the next position of every decoding sequence and the rest of every prompt
     that fits beside them (≤ batch.MAX_ROWS rows in all: chunked prefill mixed into the decode step, as vLLM
     and llama-server do; batch.Pass). A request that arrives while the pass runs stops it at the next layer
     boundary (a flag the compiled step reads between layers): its first prompt chunk runs then and its
     first token goes out at once; the pass goes on from that layer. So a short request's first token
     waits for one layer of the running streams, not for their whole step.
     (Mixing is on where positions_independent(model) holds; otherwise prompts run in their own chunks.)
A prompt is always cut into the same chunks (balanced, from its length alone), and the decode step computes
each row on its own, so a request's tokens do not depend on what else runs beside it; each sequence samples
with its own random generator (seeded when the request has a seed).

Prefix cache: a freed slot keeps the KV rows it holds and the tokens they are of. A new sequence takes the free
slot whose tokens share the longest prefix with its prompt and runs only the rest (OpenAI's
usage.prompt_tokens_details.cached_tokens counts what was reused). It is on only where a position's result has
the same bits however the positions are grouped into calls (minirt.batch.positions_independent: block-format
and K-quant matrices, whose integer kernels take any T), so answers never depend on it.

Events go back to the HTTP side in one hand-off per step: the events of a step are collected and, for the
sequences whose `loop` is set (the app's event loop), passed in ONE loop.call_soon_threadsafe that calls each
sequence's emit there (one wake-up of the HTTP thread per step, not one per token of each stream); a sequence
without a loop has emit called from the scheduler thread (it must then be thread-safe).
Nothing outlives a request: the server is stateless between requests.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..batch import MAX_ROWS, BatchStep, Pass, positions_independent
from ..kvcache import KVCache
from ..sampling import Sampler, SamplingParams
from ..tokenizer import Detokenizer

PREFILL_STEP = 64  # prompt positions per step at most (one chunk of one sequence)


class Busy(Exception):
    """The queue is full, or the server is shutting down: 503."""


@dataclass
class Params:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the k most likely
    ignore_eos: bool = False     # llama-server's extension: end-of-generation tokens do not stop (benchmarks)


@dataclass
class Sequence:
    prompt: list[int]
    params: Params
    emit: Callable[[dict], None]   # called with each event: on `loop` where it is set, else the scheduler thread
    index: int = 0                 # the choice's index in its request
    loop: object = None            # an asyncio event loop: emit runs there (the events of a step in one hand-off)
    cancelled: bool = False        # set by the HTTP side when the client goes away
    # scheduler state
    cache: object = None
    done_prompt: int = 0
    bounds: list[int] = field(default_factory=list)
    next_token: int | None = None
    tokens: list[int] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    pending: str = ""
    finished: bool = False

    cached: int = 0                # prompt positions whose KV rows came from the prefix cache

    def __post_init__(self):
        p = self.params
        self.sampler = Sampler(SamplingParams(p.temperature, p.top_k, p.top_p, p.min_p, 1.0, p.seed))
        self.start_at(0)

    def start_at(self, done: int) -> None:
        """Prefill from prompt position `done` (the rows before it are in the cache), in balanced chunks."""
        rest = len(self.prompt) - done
        n = max(1, -(-rest // PREFILL_STEP))
        self.done_prompt = self.cached = done
        self.bounds = [done + rest * i // n for i in range(n + 1)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def split_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """(text safe to emit, whether a stop string was reached): text that could begin a stop string is held."""
    if not stops:
        return text, False
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if first >= 0:
        return text[:first], True
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[:len(text) - hold], False


def _rest(s: Sequence) -> int:
    """Prompt positions s has still to run."""
    return len(s.prompt) - s.done_prompt


def _dispatch(items: list) -> None:
    for emit, event in items:
        emit(event)


class Batcher:
    def __init__(self, model, parallel: int = 4, ctx: int | None = None, queue: int = 64,
                 prefix_cache: bool = True, mixed: bool = True):
        self.model, self.parallel, self.queue_limit = model, parallel, queue
        self.prefix_cache = prefix_cache and positions_independent(model)
        self.held: dict[int, list[int]] = {}  # id(free slot) → the tokens of the KV rows it still holds
        self.ctx = ctx or model.ctx
        self.step = BatchStep(model)
        # slots: allocated once, reused; one pool, so that a step runs every sequence in one compiled call
        self.kv_type = getattr(model, "kv_type", "f32")  # the model's: f32, or f16 (--kv-type)
        self.free = KVCache.pooled(model.cfg, self.ctx, parallel, self.kv_type)
        self.pool = self.free[0].pool
        # prompts that fit ride along with the decode rows in one compiled call (batch.Pass), where a position's
        # bits do not depend on how positions are grouped and the compiled step covers MAX_ROWS rows
        table = model._step_table() if model.compiled_step else None
        self.mixed = mixed and positions_independent(model) and table is not None and table.covers(MAX_ROWS)
        self.arrived = np.zeros(1, np.int64)  # set by submit() while a slot is free: the pass stops to let it in
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self.cv = threading.Condition()
        self.deadline: float | None = None   # set by drain(): stop admitting; end everything at this time
        self.stopped = False
        self.steps = 0
        self.peak = 0  # the most sequences one decode step has run together
        self.mixed_in = 0  # prompts run beside decode rows in one pass
        self.jumped = 0    # requests whose first chunk ran while a pass was stopped for them
        self.outbox: list[tuple[Sequence, dict]] = []  # events of this step, handed over by _flush()
        self.thread = threading.Thread(target=self._run, name="minirt-batcher", daemon=True)

    def start(self) -> None:
        """Run the scheduler in a thread of its own (for an app served from elsewhere, e.g. tests)."""
        self.thread.start()

    def run(self) -> None:
        """Run the scheduler on the calling thread until stop(), or until a drain has ended everything.
        `minirt serve` calls this from the main thread: a Numba parallel region entered from any other thread
        costs ~10× more on the OpenMP layer (tools/omp_threads.py), which made one stream ~3× slower."""
        self._run()

    # ---- called from the HTTP side ---------------------------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        with self.cv:
            if self.deadline is not None or self.stopped:
                raise Busy("the server is shutting down")
            if len(self.waiting) + len(seqs) > self.queue_limit + len(self.free):
                raise Busy(f"all {self.parallel} slots are busy and the queue of {self.queue_limit} is full")
            self.waiting.extend(seqs)
            if self.free:
                self.arrived[0] = 1
            self.cv.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        with self.cv:
            for s in seqs:
                s.cancelled = True
            self.cv.notify()

    def drain(self, seconds: float) -> None:
        """Stop admitting new requests; finish the running and queued ones within `seconds`, then end them."""
        with self.cv:
            if self.deadline is None:
                self.deadline = time.monotonic() + seconds
            self.cv.notify()

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=5)

    def idle(self) -> bool:
        with self.cv:
            return not self.waiting and not self.active

    def load(self) -> dict:
        with self.cv:
            return {"slots": self.parallel, "busy": len(self.active), "queued": len(self.waiting)}

    # ---- the scheduler thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self.cv:
                    while not self.stopped and not self.waiting and not self.active:
                        if self.deadline is not None:
                            return
                        self.cv.wait(timeout=1.0)
                    if self.stopped:
                        for s in list(self.active) + list(self.waiting):
                            self._finish(s, "length")
                        self._flush()
                        return
                    self._retire_cancelled()
                    if self.deadline is not None and time.monotonic() > self.deadline:
                        for s in list(self.active) + list(self.waiting):
                            self._finish(s, "length")
                        self._flush()
                        continue
                    self._admit_waiting()
                self._step()
                if not (self.waiting and self.free):  # else the events wait for the admission's prefill: _step
                    self._flush()
        except BaseException as e:  # a bug: end every stream with an error rather than hang them
            with self.cv:
                self.stopped = True
                for s in list(self.active) + list(self.waiting):
                    self._post(s, {"error": f"internal error: {type(e).__name__}: {e}"})
                    s.finished = True
                self.active.clear()
                self.waiting.clear()
                self._flush()
            raise

    def _post(self, s: Sequence, event: dict) -> None:
        self.outbox.append((s, event))

    def _flush(self) -> None:
        """Hand this step's events over: one call_soon_threadsafe per event loop, in the order they came."""
        if not self.outbox:
            return
        out, self.outbox = self.outbox, []
        by_loop: dict = {}
        for s, event in out:
            if s.loop is None:
                s.emit(event)
            else:
                by_loop.setdefault(s.loop, []).append((s.emit, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_dispatch, items)
            except RuntimeError:  # the loop has closed (the server is going away): nobody is listening
                pass

    def _retire_cancelled(self) -> None:
        for s in [s for s in self.active if s.cancelled]:
            self._free(s)
        if any(s.cancelled for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if not s.cancelled)

    def _admit_waiting(self) -> list[Sequence]:
        """Admit waiting sequences into free slots (under self.cv); returns them."""
        self.arrived[0] = 0
        out = []
        while self.waiting and self.free:
            s = self.waiting.popleft()
            if not s.cancelled:
                self._admit(s)
                out.append(s)
        return out

    def _admit(self, s: Sequence) -> None:
        """Give s the least recently freed slot. Where a free slot holds a prefix of its prompt (any length:
        copying rows costs less than computing them, as llama-server reuses any common prefix; one prompt
        position is always left to run, for its logits), those rows are copied in first, so that the slot that
        held them keeps them for the next request (a shared system prompt serves every conversation)."""
        best, reuse = -1, 0
        if self.prefix_cache:
            for i, c in enumerate(self.free):
                held = self.held.get(id(c), [])
                n = min(len(held), len(s.prompt) - 1)
                k = next((j for j in range(n) if held[j] != s.prompt[j]), n)
                if k > reuse:
                    best, reuse = i, k
        src = self.free[best]
        cache = s.cache = self.free.pop()
        self.held.pop(id(cache), None)
        if src is cache:
            cache.truncate(reuse)
        else:
            cache.copy_prefix(src, reuse)
        s.start_at(reuse)
        self.active.append(s)

    def _free(self, s: Sequence) -> None:
        with self.cv:
            if s in self.active:
                self.active.remove(s)
                if self.prefix_cache:  # the rows written: the prompt's, then each token fed back
                    self.held[id(s.cache)] = (s.prompt + s.tokens)[:s.cache.pos]
                self.free.insert(0, s.cache)  # admission pops from the end: the least recently freed
                s.cache = None
            elif s in self.waiting:
                self.waiting.remove(s)
            s.finished = True

    def _step(self) -> None:
        self.steps += 1
        decoding = [s for s in self.active if s.next_token is not None]
        prefilling = sorted((s for s in self.active if s.next_token is None and not s.finished), key=_rest)
        mixed = self.mixed and len(decoding) < MAX_ROWS
        if prefilling and not (mixed and _rest(prefilling[0]) <= MAX_ROWS - len(decoding)):
            # first: a request that just arrived gets its first token within this step (a prompt that fits
            # beside the decode rows rides along with them instead: _pass)
            self._prefill_chunk(prefilling[0])
        # The events of the step before, held while this prefill ran (the HTTP thread and the clients writing
        # and reading them would take a core from it, on 2 cores), and the new sequence's first token, which
        # goes out now, not after the decode step
        self._flush()
        decoding = [s for s in self.active if s.next_token is not None]
        if mixed and len(decoding) <= MAX_ROWS:
            return self._pass(decoding, [s for s in prefilling if s.next_token is None and not s.finished])
        if decoding:
            self.peak = max(self.peak, len(decoding))
            logits = self.step([s.next_token for s in decoding], [s.cache for s in decoding])
            for s, row in zip(decoding, logits):
                self._deliver(s, row)

    def _pass(self, decoding: list[Sequence], prefilling: list[Sequence]) -> None:
        """One compiled call (batch.Pass) over the decode rows and the whole rest of every prompt that fits
        beside them (shortest first). A request that arrives while it runs stops it at the next layer boundary
        (self.arrived): its first prompt chunk runs then, on its own, and its first token goes out at once;
        the pass then goes on from that layer. (Joining the pass would save a little work, but the joint rows
        cost ~0.85 ms each at 2 threads, so the first token would take the whole pass, ~2× the prompt alone.)"""
        p = Pass(self.model, self.pool)
        for s in decoding:
            p.add(s.cache, [s.next_token])
        joined = self._join(p, prefilling)
        if not p.parts:
            return
        while not p.run(self.arrived):
            with self.cv:
                new = self._admit_waiting()
            for s in sorted(new, key=_rest):
                self.jumped += 1
                self._prefill_chunk(s)
            self._flush()
        if decoding:
            self.peak = max(self.peak, len(decoding))
            self.mixed_in += len(joined)
        rows = p.logits()
        for s, row in zip(decoding, rows):
            self._deliver(s, row)
        for s, row in zip(joined, rows[len(decoding):]):
            s.done_prompt = len(s.prompt)
            self._first(s, row)
        self._flush()

    def _prefill_chunk(self, s: Sequence) -> None:
        """The next chunk of s's prompt on its own (its first token, where it is the last)."""
        i = s.bounds.index(s.done_prompt)
        a, b = s.bounds[i], s.bounds[i + 1]
        logits = self.model.forward(s.prompt[a:b], s.cache)[0]
        s.done_prompt = b
        if b == len(s.prompt):
            self._first(s, logits)

    def _join(self, p: Pass, prefilling: list[Sequence]) -> list[Sequence]:
        """Add to p the whole rest of each prompt that still fits (in the order given); returns their sequences."""
        out = []
        for s in prefilling:
            if _rest(s) <= MAX_ROWS - p.rows:
                p.add(s.cache, s.prompt[s.done_prompt:])
                out.append(s)
        return out

    def _first(self, s: Sequence, logits: np.ndarray) -> None:
        """s's prompt has run: its first token."""
        s.detok = Detokenizer(self.model.tokenizer)
        self._deliver(s, logits)

    def _deliver(self, s: Sequence, logits: np.ndarray) -> None:
        """Sample the next token of s from its logits, send the text it completes, and end s when it is done."""
        p = s.params
        x = logits
        if (p.presence_penalty or p.frequency_penalty) and s.counts:
            x = logits.copy()
            ids = np.fromiter(s.counts, np.int64)
            c = np.fromiter(s.counts.values(), np.float32)
            x[ids] -= np.float32(p.presence_penalty) + np.float32(p.frequency_penalty) * c
        tok = s.sampler(x)
        event: dict = {"index": s.index}
        if p.logprobs is not None:
            lp = log_softmax(logits)
            top = np.argsort(-lp, kind="stable")[:p.logprobs] if p.logprobs else []
            event["logprob"] = (tok, float(lp[tok]), [(int(t), float(lp[t])) for t in top])
        if tok in self.model.tokenizer.eog_ids and not p.ignore_eos:
            return self._finish(s, "stop")
        s.tokens.append(tok)
        s.counts[tok] = s.counts.get(tok, 0) + 1
        s.pending += s.detok.push(tok)
        out, hit = split_stop(s.pending, p.stop)
        s.pending = "" if hit else s.pending[len(out):]
        event["text"] = out
        self._post(s, event)
        if hit:
            return self._finish(s, "stop", flush=False)
        if len(s.tokens) >= p.max_tokens or s.cache.pos >= s.cache.capacity:
            return self._finish(s, "length")
        s.next_token = tok

    def _finish(self, s: Sequence, reason: str, flush: bool = True) -> None:
        if s.finished:
            return
        tail = s.pending + s.detok.flush() if flush and hasattr(s, "detok") else ""
        if tail and s.params.stop:  # held text: all of it, unless the flush completed a stop string
            out, hit = split_stop(tail, s.params.stop)
            tail = out if hit else tail
        self._free(s)
        self._post(s, {"index": s.index, "text": tail, "finish_reason": reason, "prompt_tokens": len(s.prompt),
                "completion_tokens": len(s.tokens), "cached_tokens": s.cached})
