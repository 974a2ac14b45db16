"""`minirt serve` with real clients: the openai package, curl (the README's lines), raw HTTP, a browser.

The reference for every greedy answer is Model.generate on the same token ids (the single-sequence path);
batched answers must equal the same request sent alone.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
try:  # the HTTP client the openai package uses (httpx2 in its later releases, httpx before)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")

from minirt.chat import encode_rendered, render  # noqa: E402
from minirt.server import make_app  # noqa: E402
from minirt.server.batcher import PREFILL_STEP  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CTX = 384


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """A server in a thread of this process (uvicorn + the app), on a free loopback port."""

    def __init__(self, model, **options):
        self.app, self.server = make_app(model, "smollm2", **options)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.uv = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                access_log=False))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.uv.started:
                break
            time.sleep(0.05)
        assert self.uv.started

    @property
    def batcher(self):
        return self.server.batcher

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def close(self):
        self.uv.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def live(smollm2_fast):
    s = Live(smollm2_fast, parallel=4, ctx=CTX, queue=64)
    yield s
    s.close()


def _chat_ids(model, text):
    tok = model.tokenizer
    return encode_rendered(tok, render(tok, [{"role": "user", "content": text}]))


def _reference(model, ids, max_tokens, stop=()):
    g = model.generate(ids, temperature=0, max_tokens=max_tokens, stop=list(stop), ctx=CTX)
    text = g.text()
    return text, {"eog": "stop", "stop string": "stop"}.get(g.stats.stop_reason, "length"), len(g.stats.tokens)


def _wait_idle(batcher, seconds=10.0):
    t0 = time.time()
    while time.time() - t0 < seconds:
        if batcher.idle():
            return True
        time.sleep(0.02)
    return False


# ---- the openai client ------------------------------------------------------------------------------
def test_chat_completion_equals_generate(live, smollm2_fast):
    q = "What is the capital of France?"
    r = live.client().chat.completions.create(model="smollm2", messages=[{"role": "user", "content": q}],
                                              max_tokens=12, temperature=0)
    ids = _chat_ids(smollm2_fast, q)
    text, reason, n = _reference(smollm2_fast, ids, 12)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    assert r.usage.total_tokens == len(ids) + n and r.model == "smollm2" and r.object == "chat.completion"


def test_streaming_chat_equals_whole(live):
    c = live.client()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    whole = c.chat.completions.create(model="x", messages=msgs, max_tokens=16, temperature=0)
    chunks = list(c.chat.completions.create(model="x", messages=msgs, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    assert sum(1 for p in pieces if p) > 3  # streamed token by token, not in one piece
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices


def test_completions_stop_string_and_raw_sse(live, smollm2_fast):
    prompt = "1, 2, 3, 4, 5,"
    ids = smollm2_fast.tokenizer.encode(prompt)
    text, reason, _ = _reference(smollm2_fast, ids, 30, stop=[" 9"])
    assert reason == "stop" and " 9" not in text and text.startswith(" 6")
    r = live.client().completions.create(model="x", prompt=prompt, max_tokens=30, temperature=0, stop=" 9")
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, "stop")
    # the wire format: data: lines, each a JSON chunk, then data: [DONE]
    with httpx.stream("POST", live.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 30, "stop": [" 9"],
                                                                  "temperature": 0, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    bodies = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(b["choices"][0]["text"] for b in bodies) == text
    assert bodies[-1]["choices"][0]["finish_reason"] == "stop" and bodies[0]["object"] == "text_completion"


def test_logprobs_are_the_models(live, smollm2_fast):
    q = "Say hi."
    r = live.client().chat.completions.create(model="x", messages=[{"role": "user", "content": q}], max_tokens=3,
                                              temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    logits = smollm2_fast.forward(_chat_ids(smollm2_fast, q), smollm2_fast.new_cache(CTX))[0].astype(np.float64)
    ref = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    first = content[0]
    top = np.argsort(-ref)[:3]
    assert [t.token for t in first.top_logprobs] == [smollm2_fast.tokenizer.decode([int(i)]) for i in top]
    assert first.logprob == pytest.approx(ref[top[0]], abs=1e-4) and first.token == first.top_logprobs[0].token
    c = live.client().completions.create(model="x", prompt="Hello", max_tokens=2, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 2 and len(lp.top_logprobs[0]) == 2


def test_seeded_sampling_and_n(live):
    c = live.client()
    kw = dict(model="x", prompt="Once upon a time", max_tokens=10, temperature=1.0, top_p=0.9)
    a = c.completions.create(seed=42, **kw).choices[0].text
    b = c.completions.create(seed=42, **kw).choices[0].text
    other = c.completions.create(seed=43, **kw).choices[0].text
    assert a == b and a != other
    r = c.completions.create(seed=42, n=3, **kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert r.choices[0].text == a and r.choices[1].text == other  # choice i samples with seed + i
    assert 3 <= r.usage.completion_tokens <= 30


def test_penalties_change_greedy_output(live):
    c = live.client()
    # 16 tokens: penalties count generated tokens, so the greedy text must repeat one (8 tokens did not, once
    # the int8 decode kernels' summation order changed: a near-tie at the second token flipped)
    kw = dict(model="x", prompt="The the the the", max_tokens=16, temperature=0)
    plain = c.completions.create(**kw).choices[0].text
    pen = c.completions.create(frequency_penalty=2.0, presence_penalty=2.0, **kw).choices[0].text
    assert plain != pen


# ---- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, param", [
    ({"temperature": "hot"}, "temperature"), ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"stop": 5}, "stop"), ({"n": 0}, "n"), ({"seed": "x"}, "seed"), ({"presence_penalty": -3}, "presence_penalty"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"stream": "yes"}, "stream"), ({"messages": []}, "messages"),
    ({"messages": [{"content": "x"}]}, "messages"), ({"messages": "hi"}, "messages"),
])
def test_bad_parameters_get_400(live, extra, param):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    r = httpx.post(live.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_errors_through_the_openai_client(live):
    c = live.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model="x", prompt="word " * (CTX + 10), max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        c.embeddings.create(model="x", input="hi")
    # unknown parameters are ignored
    r = c.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                  extra_body={"frobnicate": {"a": 1}, "mirostat": 2})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_malformed_and_oversized_bodies(live):
    u = live.url + "/v1/chat/completions"
    for data in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        r = httpx.post(u, content=data, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json(), data
    r = httpx.post(u, content=b'{"prompt": "' + b"a" * (3 << 20) + b'"}')
    assert r.status_code == 400 and "larger" in r.json()["error"]["message"]
    assert httpx.post(live.url + "/v1/completions", json={"prompt": [1, -5]}).status_code == 400
    assert httpx.get(live.url + "/v1/chat/completions").status_code == 405
    # and it keeps serving
    assert httpx.post(live.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200


def test_models_health_page(live):
    m = httpx.get(live.url + "/v1/models").json()
    assert m["object"] == "list" and m["data"][0]["id"] == "smollm2"
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def test_api_key(smollm2_fast, live):
    assert _wait_idle(live.batcher)
    s = Live(smollm2_fast, parallel=1, ctx=64, api_key="sekrit")
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        for path in ("/v1/models",):
            r = httpx.get(s.url + path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert httpx.get(s.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").completions.create(model="x", prompt="Hi", max_tokens=1)
        assert s.client(api_key="sekrit").completions.create(model="x", prompt="Hi", max_tokens=1).choices
    finally:
        s.close()


# ---- batching ---------------------------------------------------------------------------------------
PROMPTS = ["The capital of France is", "Once upon a time there was", "def fibonacci(n):",
           "List the planets of the solar system:", "A haiku about the sea:",
           "The history of the Roman Empire begins " * 20]  # the last: several prefill chunks


def test_batched_equals_alone(live, smollm2_fast):
    assert len(smollm2_fast.tokenizer.encode(PROMPTS[-1])) > 2 * PREFILL_STEP
    c = live.client()
    # different lengths: slots free up at different steps, so that queued prompts run beside decode rows
    reqs = [dict(prompt=p, max_tokens=10 + 3 * i, temperature=0) for i, p in enumerate(PROMPTS)]
    reqs.append(dict(prompt="Once upon a time", max_tokens=16, temperature=0.9, seed=7))  # seeded, sampled
    reqs.append(dict(prompt="Once upon a time", max_tokens=16, temperature=0.9, seed=8))
    alone = [c.completions.create(model="x", **r).choices[0].text for r in reqs]
    for r, a in zip(reqs[:3], alone):  # and greedy alone is what Model.generate gives
        assert a == _reference(smollm2_fast, smollm2_fast.tokenizer.encode(r["prompt"]), r["max_tokens"])[0]
    live.batcher.peak = 0
    with ThreadPoolExecutor(len(reqs)) as ex:  # more requests than slots: some wait in the queue
        batched = list(ex.map(lambda r: c.completions.create(model="x", **r).choices[0].text, reqs))
    assert batched == alone
    assert live.batcher.peak >= 3  # they did decode together
    assert live.batcher.mixed_in >= 1  # and a prompt ran in a decode step (batch.Pass)
    assert alone[-1] != alone[-2]


def test_f16_kv_batched_equals_alone(smollm2_f16):
    """A server whose model has a float16 KV cache (--kv-type f16): its slots are float16, and greedy answers
    batched (queued, mixed into decode steps) are what each gives alone, and what Model.generate gives."""
    s = Live(smollm2_f16, parallel=3, ctx=CTX)
    try:
        assert s.batcher.pool[0].dtype == np.uint16
        c = s.client()
        reqs = [dict(prompt=p, max_tokens=8 + 2 * i, temperature=0) for i, p in enumerate(PROMPTS)]
        alone = [c.completions.create(model="x", **r).choices[0].text for r in reqs]
        for r, a in zip(reqs[:2], alone):
            assert a == _reference(smollm2_f16, smollm2_f16.tokenizer.encode(r["prompt"]), r["max_tokens"])[0]
        with ThreadPoolExecutor(len(reqs)) as ex:
            batched = list(ex.map(lambda r: c.completions.create(model="x", **r).choices[0].text, reqs))
        assert batched == alone
        assert s.batcher.peak >= 2
    finally:
        s.close()


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "separate"])
def test_requests_jump_into_a_running_step(smollm2_fast, mixed):
    """Short requests arriving while long streams decode stop the step at a layer boundary, run their prompt
    and send their first token before the step goes on (Batcher._pass). Every answer is what Model.generate
    gives: the stopped step resumes with the bits it would have had. Without mixing (models whose positions'
    bits depend on grouping: prompts in their own chunks, one decode step) the answers are the same."""
    from minirt.server.batcher import Batcher, Params, Sequence
    m = smollm2_fast
    b = Batcher(m, parallel=4, ctx=CTX, mixed=mixed)
    assert b.mixed == mixed
    texts: dict[int, list[str]] = {}

    def submit(prompt, n):
        s = Sequence(m.tokenizer.encode(prompt), Params(max_tokens=n, temperature=0), lambda e: None)
        texts[id(s)] = []
        s.emit = lambda e, out=texts[id(s)]: out.append(e.get("text", ""))
        b.submit([s])
        return s
    b.start()
    try:
        longs = [submit(p, 60) for p in PROMPTS[:3]]
        while not all(s.tokens for s in longs):
            time.sleep(0.002)
        probes = []
        for k in range(5):  # one at a time, while the long ones decode
            s = submit(PROMPTS[3 + k % 2], 3)
            while not s.finished:
                time.sleep(0.001)
            probes.append(s)
        assert not any(s.finished for s in longs)
        for s in longs:
            while not s.finished:
                time.sleep(0.01)
    finally:
        b.stop()
    assert (b.jumped >= 1) == mixed
    for s in longs + probes:
        ids = s.prompt
        assert "".join(texts[id(s)]) == _reference(m, ids, s.params.max_tokens)[0]


def test_prefix_cache_reuses_rows_and_changes_nothing(live, smollm2_fast, smollm2):
    """A request whose prompt shares a long prefix with an earlier one's runs only the rest, and gets what it
    gets alone from Model.generate (a position's bits do not depend on how positions are grouped)."""
    from minirt.batch import positions_independent
    assert live.batcher.prefix_cache and positions_independent(smollm2_fast)
    assert not positions_independent(smollm2)  # exact: float tiles and BLAS from 17 positions
    c = live.client()
    base = PROMPTS[-1]
    n_base = len(smollm2_fast.tokenizer.encode(base))
    assert _wait_idle(live.batcher)
    first = c.completions.create(model="x", prompt=base + " First,", max_tokens=6, temperature=0)
    for tail in (" Second,", " First,"):  # another question on the same text, then the same prompt again
        prompt = base + tail
        r = c.completions.create(model="x", prompt=prompt, max_tokens=6, temperature=0)
        ids = smollm2_fast.tokenizer.encode(prompt)
        assert r.choices[0].text == _reference(smollm2_fast, ids, 6)[0]
        assert n_base - 2 <= r.usage.prompt_tokens_details.cached_tokens <= len(ids) - 1
    assert r.choices[0].text == first.choices[0].text
    assert r.usage.prompt_tokens_details.cached_tokens == len(ids) - 1  # all but the position that gives logits


def test_disconnect_frees_the_slot(live):
    with httpx.stream("POST", live.url + "/v1/completions",
                      json={"prompt": "Once upon a time", "max_tokens": 300, "stream": True}) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i >= 4:
                break
        assert live.batcher.load()["busy"] == 1
    assert _wait_idle(live.batcher, 5.0)  # freed within a few steps, not after 300 tokens
    assert live.batcher.load() == {"slots": 4, "busy": 0, "queued": 0}


def test_full_queue_gets_503_and_drain_ends_streams(smollm2_fast, live):
    assert _wait_idle(live.batcher)
    s = Live(smollm2_fast, parallel=1, ctx=CTX, queue=1)
    try:
        # ignore_eos: a sampled end-of-text before the drain would end a stream with "stop" (CI saw it once)
        long = {"prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=long) as first, \
                httpx.stream("POST", s.url + "/v1/completions", json=long) as second:
            assert first.status_code == second.status_code == 200
            t0 = time.time()
            while s.batcher.load()["queued"] < 1 and time.time() - t0 < 10:
                time.sleep(0.02)
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "unavailable_error"
            s.batcher.drain(0.5)  # what SIGTERM does, with a short deadline
            for resp in (first, second):
                lines = [ln for ln in resp.iter_lines() if ln]
                assert lines[-1] == "data: [DONE]"
                assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 503
    finally:
        s.close()


def test_load_mixed_clients(live, smollm2_fast):
    """24 clients × 3 requests: streaming, whole, disconnecting and bad ones; every good answer is right."""
    c = live.client()
    prompts = PROMPTS[:4]
    expect = {p: c.completions.create(model="x", prompt=p, max_tokens=8, temperature=0).choices[0].text
              for p in prompts}
    results, lat, tokens = [], [], []

    def one(i):
        kind, p = i % 4, prompts[i % len(prompts)]
        t0 = time.perf_counter()
        body = {"prompt": p, "max_tokens": 8, "temperature": 0}
        if kind == 0:
            r = httpx.post(live.url + "/v1/completions", json=body, timeout=120)
            ok = r.status_code == 200 and r.json()["choices"][0]["text"] == expect[p]
            tokens.append(r.json()["usage"]["completion_tokens"] if ok else 0)
        elif kind == 1:
            with httpx.stream("POST", live.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
                lines = [ln for ln in r.iter_lines() if ln]
            text = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1])
            ok = r.status_code == 200 and lines[-1] == "data: [DONE]" and text == expect[p]
        elif kind == 2:
            with httpx.stream("POST", live.url + "/v1/completions",
                              json={**body, "max_tokens": 200, "stream": True}, timeout=120) as r:
                ok = r.status_code == 200
                for _ in r.iter_lines():
                    break
        else:
            r = httpx.post(live.url + "/v1/completions", json={**body, "top_p": 7}, timeout=120)
            ok = r.status_code == 400
        results.append((kind, ok, getattr(r, "status_code", 0)))
        lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(24) as ex:
        list(ex.map(one, range(72)))
    wall = time.perf_counter() - t0
    assert len(results) == 72 and all(ok for _, ok, _ in results), [r for r in results if not r[1]]
    assert not any(code >= 500 for _, _, code in results)
    assert _wait_idle(live.batcher, 10.0)
    lat.sort()
    print(f"\nload: 72 requests in {wall:.1f} s; latency p50 {lat[36]:.2f} s, p99 {lat[-1]:.2f} s; "
          f"{sum(tokens)} tokens in the non-streaming answers alone ({sum(tokens) / wall:.1f} tok/s)")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def _memory_growth(live, early: int, late: int) -> tuple[float, float]:
    def run(n):
        with httpx.Client(base_url=live.url, timeout=60) as h:
            for i in range(n):
                r = h.post("/v1/completions", json={"prompt": f"Number {i}:", "max_tokens": 2, "stream": i % 2 == 0})
                assert r.status_code == 200
    run(early)
    a = _rss_mb()
    run(late - early)
    return a, _rss_mb()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_memory_flat(live):
    """RSS after 120 requests within 15 MB of RSS after 30 (the issue's 2,000 vs 200: the slow test below)."""
    early, late = _memory_growth(live, 30, 120)
    assert late - early < 15, (early, late)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_memory_flat_2000(live):
    early, late = _memory_growth(live, 200, 2000)
    assert late - early < 50, (early, late)


# ---- the command line: README's curl lines, SIGTERM ------------------------------------------------------
def _readme_curl() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- serve: curl -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [ln for ln in block.splitlines() if ln.startswith("curl ")]


def _serve_cli(*args):
    """`minirt serve --model smollm2 ARGS` in a subprocess on a free port, once /health answers: (proc, url)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minirt", "serve", "--model", "smollm2", "--port", str(port),
                             *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 120:
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    return proc, url


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_cli_serve_readme_curl_and_sigterm(tmp_path):
    proc, url = _serve_cli("--ctx", "256", "--parallel", "2")
    try:
        lines = _readme_curl()
        assert len(lines) >= 4
        outs = []
        for line in lines:
            out = subprocess.run(line.replace("127.0.0.1:8080", url[len("http://"):]), shell=True, capture_output=True,
                                 text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            outs.append(out.stdout)
        assert json.loads(outs[0])["status"] == "ok"
        assert json.loads(outs[1])["data"][0]["id"] == "smollm2"
        chat = json.loads(outs[2])["choices"][0]
        assert chat["message"]["content"] and chat["finish_reason"] in ("stop", "length")
        assert outs[3].rstrip().endswith("data: [DONE]") and outs[3].count("data: ") > 3
        # SIGTERM: the running stream finishes, new requests are refused, the process exits
        with httpx.stream("POST", url + "/v1/completions",
                          json={"prompt": "Once upon a time", "max_tokens": 40, "stream": True}) as r:
            it = r.iter_lines()
            next(it)
            proc.send_signal(signal.SIGTERM)
            rest = [ln for ln in it if ln]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(timeout=40) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_second_signal_ends_streams_now():
    """Ctrl-C (or SIGTERM) twice: the running stream ends at once with finish_reason "length", the server
    exits 0 without a traceback, well before the 30 s drain."""
    proc, url = _serve_cli("--ctx", "2048", "--parallel", "1")
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 2000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            it = r.iter_lines()
            next(it)
            t0 = time.time()
            proc.send_signal(signal.SIGINT)
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            rest = [ln for ln in it if ln]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert len(rest) < 1000  # ended, not drained to max_tokens
        assert proc.wait(timeout=20) == 0 and time.time() - t0 < 20
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- the chat page in a real browser --------------------------------------------------------------------
def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None or shutil.which("chromedriver") is None,
                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
def test_chat_page_streams_in_a_browser(live):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    opts = webdriver.ChromeOptions()
    opts.binary_location = _chromium()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=opts, service=service)
    try:
        driver.get(live.url + "/")
        box = driver.find_element(By.ID, "input")
        box.send_keys("Tell me a short story about a cat.")
        driver.find_element(By.ID, "send").click()
        seen, t0 = [], time.time()
        while time.time() - t0 < 60:
            el = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            text = el[0].text if el else ""
            if text and (not seen or seen[-1] != text):
                seen.append(text)
            if el and el[0].get_attribute("data-done") == "1":
                break
            time.sleep(0.03)
        assert driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[0].get_attribute("data-done") == "1"
        assert len(seen) >= 3, seen  # the reply grew on the page step by step
        assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))
        assert driver.find_element(By.ID, "model").text == "smollm2"
    finally:
        driver.quit()
