"""The HTTP side: OpenAI-shaped endpoints on Starlette, over the batcher.

POST /v1/chat/completions, POST /v1/completions (streaming as server-sent events, ending `data: [DONE]`, or
one JSON body), GET /v1/models, GET /health, and the chat page at /. Requests are checked here (unknown
fields ignored, known ones of the wrong type or range → 400 with an OpenAI-shaped error body); the batcher
never sees a bad one.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import MinirtError
from .batcher import Batcher, Busy, Params, Sequence

MAX_BODY = 2 << 20      # bytes of a request body
MAX_N = 8               # choices per request
MAX_STOP = 8            # stop strings per request
MAX_LOGPROBS = 20       # top_logprobs / logprobs (as OpenAI)
RETRY_AFTER = "1"       # seconds a refused client is told to wait
INLINE_TOKENIZE = 4096  # characters of prompt up to which a request is tokenized on the event loop itself


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.headers = status, message, param, type_, headers


def error_response(e: ApiError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": None}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


# ---- checking a request ---------------------------------------------------------------------------
def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kinds):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}",
                       name)
    if v != v or not (lo < v if lo_open else lo <= v) or v > hi:
        raise ApiError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be a boolean, got {json.dumps(v)[:40]}", name)
    return v


def _params(body: dict, room: int, chat: bool) -> tuple[Params, int]:
    """Sampling parameters and n from a request body; room: positions left in a slot after the prompt."""
    mt = body.get("max_completion_tokens") if chat and body.get("max_tokens") is None else body.get("max_tokens")
    name = "max_completion_tokens" if chat and body.get("max_tokens") is None else "max_tokens"
    max_tokens = _number({name: mt}, name, None, 1, 1 << 31, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop")
    if chat:
        logprobs = _bool(body, "logprobs")
        top = _number(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
        if top is not None and not logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        k = (top or 0) if logprobs else None
    else:
        k = _number(body, "logprobs", None, 0, MAX_LOGPROBS - 15, integer=True)  # OpenAI: at most 5
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"'seed' must be an integer, got {json.dumps(seed)[:40]}", "seed")
    p = Params(
        max_tokens=room if max_tokens is None else min(max_tokens, room),
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1, lo_open=True)),
        top_k=int(_number(body, "top_k", 0, 0, 1 << 20, integer=True)),
        min_p=float(_number(body, "min_p", 0.0, 0, 1)),
        seed=None if seed is None else seed % (1 << 64),
        stop=[s for s in stop if s],
        presence_penalty=float(_number(body, "presence_penalty", 0.0, -2, 2)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -2, 2)),
        logprobs=k,
        ignore_eos=_bool(body, "ignore_eos"))
    if p.min_p >= 1:
        raise ApiError(400, "'min_p' must be below 1", "min_p")
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    return p, n


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", "messages")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):  # content parts: text only
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def _text_size(body: dict, chat: bool) -> int:
    """Characters of prompt text a request carries (what tokenizing it costs grows with); a large number where
    the shape is unexpected (the checks that follow say what is wrong, off the event loop)."""
    try:
        if chat:
            msgs = body["messages"]
            return 64 * len(msgs) + sum(len(m["content"]) if isinstance(m.get("content"), str)
                                        else len(str(m.get("content"))) for m in msgs)
        prompt = body["prompt"]
        return len(prompt) if isinstance(prompt, (str, list)) else 1 << 30
    except (KeyError, TypeError, AttributeError):
        return 1 << 30


class Server:
    """The app's state: the model, its name, the batcher and the options. Holds nothing between requests."""

    def __init__(self, model, name: str, parallel: int = 4, ctx: int | None = None, api_key: str | None = None,
                 queue: int = 64, own_thread: bool = True):
        self.model, self.name, self.api_key = model, name, api_key
        self.batcher = Batcher(model, parallel=parallel, ctx=ctx, queue=queue)
        self.own_thread = own_thread  # False: the caller runs batcher.run() itself (serve(): the main thread)
        self.created = int(time.time())
        self.draining = False

    # ---- request plumbing --------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'",
                           type_="authentication_error")

    async def _body(self, request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY:
            raise ApiError(400, f"the request body is larger than {MAX_BODY} bytes; send at most that")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > MAX_BODY:
                raise ApiError(400, f"the request body is larger than {MAX_BODY} bytes; send at most that")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _prompt_ids(self, body: dict, chat: bool) -> list[int]:
        tok = self.model.tokenizer
        if chat:
            from ..chat import encode_rendered, render
            try:
                return encode_rendered(tok, render(tok, _messages(body)))
            except MinirtError as e:
                raise ApiError(400, str(e), "messages") from None
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tok.encode(prompt)
        elif (isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in prompt)):
            if min(prompt) < 0 or max(prompt) >= self.model.cfg.vocab_size:
                raise ApiError(400, f"token ids must be in 0..{self.model.cfg.vocab_size - 1}", "prompt")
            ids = list(prompt)
        else:
            raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        return ids

    # ---- endpoints ---------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def _complete(self, request: Request, chat: bool) -> Response:
        try:
            self._auth(request)
            body = await self._body(request)
            stream = _bool(body, "stream")
            opts = body.get("stream_options")
            usage_chunk = isinstance(opts, dict) and opts.get("include_usage") is True
            if _text_size(body, chat) <= INLINE_TOKENIZE:  # a thread hop costs more than a short prompt
                ids = self._prompt_ids(body, chat)
            else:  # a long one would hold up every stream's writes: tokenized off the event loop
                ids = await run_in_threadpool(self._prompt_ids, body, chat)
            room = self.batcher.ctx - len(ids)
            if room < 1:
                raise ApiError(400, f"the prompt has {len(ids)} tokens, but a slot's context holds "
                                    f"{self.batcher.ctx}; shorten it (or start the server with a larger --ctx)",
                               "messages" if chat else "prompt")
            params, n = _params(body, room, chat)
            if self.draining:
                raise Busy("the server is shutting down")
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            seqs = []
            for i in range(n):  # the batcher calls put_nowait on this loop, a step's events in one hand-off
                p = params if params.seed is None or i == 0 else Params(**{**vars(params), "seed": params.seed + i})
                seqs.append(Sequence(ids, p, events.put_nowait, index=i, loop=loop))
            self.batcher.submit(seqs)
        except ApiError as e:
            return error_response(e)
        except Busy as e:
            return error_response(ApiError(503, f"{e}; retry later", type_="unavailable_error",
                                           headers={"Retry-After": RETRY_AFTER}))
        except ClientDisconnect:
            return Response(status_code=400)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if stream:
            return StreamingResponse(self._stream(rid, chat, seqs, events, usage_chunk),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(request, rid, chat, seqs, events)

    def _chunk(self, rid: str, chat: bool, choices: list, usage=None, created: int | None = None) -> str:
        body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()) if created is None else created, "model": self.name,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _chunker(self, rid: str, chat: bool):
        """(chunk(choice) → the SSE line of a chunk with that one choice, created): the fields every chunk of a
        stream shares (id, object, created, model) are encoded once, only the choice each time."""
        created = int(time.time())
        head = json.dumps({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": created, "model": self.name}, ensure_ascii=False)[:-1]  # without its "}"
        dumps = json.JSONEncoder(ensure_ascii=False).encode
        return lambda choice: f'data: {head}, "choices": [{dumps(choice)}]}}\n\n', created

    def _logprobs(self, chat: bool, entries: list, k: int):
        tok = self.model.tokenizer

        def text(t):
            return tok.token_bytes(t).decode("utf-8", errors="replace")
        if chat:
            return {"content": [{"token": text(t), "logprob": lp, "bytes": list(tok.token_bytes(t)),
                                 "top_logprobs": [{"token": text(u), "logprob": ulp, "bytes": list(tok.token_bytes(u))}
                                                  for u, ulp in top]} for t, lp, top in entries]}
        offsets, at = [], 0
        for t, _, _ in entries:
            offsets.append(at)
            at += len(text(t))
        return {"tokens": [text(t) for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{text(u): ulp for u, ulp in top} for _, _, top in entries] if k else None,
                "text_offset": offsets}

    @staticmethod
    def _usage(prompt: int, completion: int, cached: int = 0) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def _stream(self, rid, chat, seqs, events, usage_chunk):
        left, prompt, completion, cached = len(seqs), len(seqs[0].prompt), 0, 0
        k = seqs[0].params.logprobs
        chunk, created = self._chunker(rid, chat)
        try:
            if chat:
                yield self._chunk(rid, chat, [{"index": s.index, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None} for s in seqs],
                                  created=created)
            while left:
                got = [await events.get()]
                while not events.empty():  # events that queued up while this task waited: one write for all
                    got.append(events.get_nowait())
                out = []
                for e in got:
                    if "error" in e:
                        out.append(f"data: {json.dumps({'error': {'message': e['error'], 'type': 'server_error'}})}"
                                   "\n\n")
                        yield "".join(out)
                        return
                    lp = self._logprobs(chat, [e["logprob"]], k) if "logprob" in e else None
                    reason = e.get("finish_reason")
                    if e["text"] or lp is not None or reason:
                        if chat:
                            delta = {"content": e["text"]} if e["text"] or not reason else {}
                            choice = {"index": e["index"], "delta": delta, "logprobs": lp, "finish_reason": reason}
                        else:
                            choice = {"index": e["index"], "text": e["text"], "logprobs": lp, "finish_reason": reason}
                        out.append(chunk(choice))
                    if reason:
                        left -= 1
                        completion += e["completion_tokens"]
                        cached = max(cached, e["cached_tokens"])
                if left:
                    if out:
                        yield "".join(out)
                    continue
                if usage_chunk:
                    out.append(self._chunk(rid, chat, [], self._usage(prompt, completion, cached), created=created))
                out.append("data: [DONE]\n\n")
                yield "".join(out)
        finally:
            if left:
                self.batcher.cancel(seqs)  # the client went away: the slots free at the next step

    async def _whole(self, request, rid, chat, seqs, events) -> Response:
        texts = [[] for _ in seqs]
        lps = [[] for _ in seqs]
        reasons = [None] * len(seqs)
        left, completion, cached = len(seqs), 0, 0
        try:
            while left:
                try:
                    e = await asyncio.wait_for(events.get(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if "error" in e:
                    return error_response(ApiError(500, e["error"], type_="server_error"))
                i = e["index"]
                texts[i].append(e["text"])
                if "logprob" in e:
                    lps[i].append(e["logprob"])
                if e.get("finish_reason"):
                    reasons[i] = e["finish_reason"]
                    completion += e["completion_tokens"]
                    cached = max(cached, e["cached_tokens"])
                    left -= 1
        finally:
            if left:
                self.batcher.cancel(seqs)
        k = seqs[0].params.logprobs
        choices = []
        for s in seqs:
            lp = self._logprobs(chat, lps[s.index], k) if k is not None else None
            text = "".join(texts[s.index])
            if chat:
                choices.append({"index": s.index, "message": {"role": "assistant", "content": text},
                                "logprobs": lp, "finish_reason": reasons[s.index]})
            else:
                choices.append({"index": s.index, "text": text, "logprobs": lp, "finish_reason": reasons[s.index]})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.name, "choices": choices,
                             "usage": self._usage(len(seqs[0].prompt), completion, cached)})

    async def models(self, request: Request) -> Response:
        try:
            self._auth(request)
        except ApiError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model",
                                                         "created": self.created, "owned_by": "minirt",
                                                         "meta": {"n_ctx": self.batcher.ctx,
                                                                  "slots": self.batcher.parallel}}]})

    async def health(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": RETRY_AFTER})
        return JSONResponse({"status": "ok", **self.batcher.load()})

    async def page(self, request: Request) -> Response:
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text("utf-8"))

    def app(self) -> Starlette:
        async def not_found(request, exc):
            return error_response(ApiError(getattr(exc, "status_code", 404), f"no route {request.method} "
                                           f"{request.url.path}", type_="not_found_error"))

        async def internal(request, exc):
            return error_response(ApiError(500, f"internal error: {type(exc).__name__}", type_="server_error"))

        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def lifespan(app):
            if self.own_thread:
                self.batcher.start()
            yield
            self.batcher.stop()

        routes = [Route("/", self.page), Route("/health", self.health), Route("/v1/models", self.models),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"])]
        return Starlette(routes=routes, lifespan=lifespan,
                         exception_handlers={404: not_found, 405: not_found, 500: internal})
