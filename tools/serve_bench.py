"""The same client against `minirt serve` and llama-server: aggregate tok/s and per-request latency at 1, 4 and 8
concurrent streams, and the time to first token of a short request while 7 long streams run.

    python tools/serve_bench.py                       # both servers, SmolLM2 Q4_1, one after the other
    python tools/serve_bench.py --servers minirt --tokens 32 --requests 2
    python tools/serve_bench.py --url http://127.0.0.1:8080   # a server already running

Each server is started here (minirt serve --parallel 8; llama-server -np 8 -cb, each slot with the same context),
warmed with one request, measured, and stopped. Requests are greedy completions with ignore_eos, so every one
generates exactly --tokens tokens; streams are read with the openai client's HTTP library.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

try:
    import httpx2 as httpx
except ImportError:
    import httpx

LLAMA_SERVER = Path.home() / ".cache/minirt-anchors/llama.cpp-0.3.36/build/bin/llama-server"
PROMPTS = ["Once upon a time, in a small village,", "The history of the Roman Empire", "Write a poem about the sea.",
           "def quicksort(xs):", "The three laws of robotics are", "In the beginning", "Dear diary, today",
           "A recipe for pancakes:"]


def stream_one(url: str, prompt: str, tokens: int) -> tuple[float, float, int]:
    """(time to first token, total seconds, tokens received) for one streaming greedy completion."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "model": "bench"}
    t0 = time.perf_counter()
    first, n = None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                n += 1
                if first is None:
                    first = time.perf_counter() - t0
    return (first or 0.0), time.perf_counter() - t0, n


def concurrent(url: str, streams: int, requests: int, tokens: int) -> dict:
    """`streams` clients, each sending `requests` requests one after another."""
    lat, ttft, counts = [], [], []
    lock = threading.Lock()

    def client(i):
        for k in range(requests):
            f, t, n = stream_one(url, PROMPTS[(i + k) % len(PROMPTS)], tokens)
            with lock:
                ttft.append(f)
                lat.append(t)
                counts.append(n)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    return {"streams": streams, "requests": len(lat), "tokens": sum(counts), "wall_s": round(wall, 2),
            "agg_tok_s": round(sum(counts) / wall, 1), "latency_p50_s": round(statistics.median(lat), 2),
            "latency_max_s": round(max(lat), 2), "ttft_p50_s": round(statistics.median(ttft), 3)}


def ttft_under_load(url: str, long_tokens: int, short_tokens: int = 4, background: int = 7) -> dict:
    """TTFT of a short request alone, then while `background` long streams decode."""
    alone = min(stream_one(url, "Hello, my name is", short_tokens)[0] for _ in range(3))
    done = []

    def long(i):
        done.append(stream_one(url, PROMPTS[i % len(PROMPTS)], long_tokens))
    threads = [threading.Thread(target=long, args=(i,)) for i in range(background)]
    for th in threads:
        th.start()
    time.sleep(0.5)
    # wait until the long streams are decoding: a probe's first token arrives only after their prefills
    stream_one(url, "Hi", 1)
    loaded = [stream_one(url, "Hello, my name is", short_tokens)[0] for _ in range(3)]
    for th in threads:
        th.join()
    return {"ttft_alone_s": round(alone, 3), "ttft_under_7_streams_s": round(statistics.median(loaded), 3),
            "ratio": round(statistics.median(loaded) / alone, 2)}


def wait_health(url: str, proc, seconds: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < seconds:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit("the server did not come up")


def start(kind: str, model: str, port: int, parallel: int, ctx: int, threads: int):
    if kind == "minirt":
        cmd = [sys.executable, "-m", "minirt", "serve", "--model", model, "--port", str(port), "--parallel",
               str(parallel), "--ctx", str(ctx), "--threads", str(threads)]
    else:
        cmd = [str(LLAMA_SERVER), "-m", model, "--port", str(port), "-np", str(parallel), "-cb",
               "-c", str(ctx * parallel), "-t", str(threads), "--no-webui"]
    print("+ " + " ".join(cmd), file=sys.stderr)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[1])


def run(url: str, args) -> dict:
    stream_one(url, "warm up", 4)
    out = {"concurrency": [concurrent(url, c, args.requests, args.tokens) for c in args.streams]}
    out["ttft"] = ttft_under_load(url, long_tokens=args.tokens * 2)
    base = out["concurrency"][0]["agg_tok_s"]
    for row in out["concurrency"]:
        row["speedup"] = round(row["agg_tok_s"] / base, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", default="minirt,llama", help="which to start: minirt, llama or both")
    ap.add_argument("--url", default=None, help="measure a server already running here instead")
    ap.add_argument("--model", default=None, help="GGUF file (default: the registry's SmolLM2 Q4_1)")
    ap.add_argument("--streams", default="1,4,8", help="concurrency levels")
    ap.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request")
    ap.add_argument("--ctx", type=int, default=512, help="context per slot")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=18180)
    args = ap.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    if args.url:
        print(json.dumps(run(args.url.rstrip("/"), args), indent=1))
        return
    model = args.model
    if model is None:
        from minirt.registry import resolve
        model = str(resolve("smollm2"))
    results = {}
    for kind in args.servers.split(","):
        proc = start(kind, model, args.port, max(args.streams), args.ctx, args.threads)
        try:
            url = f"http://127.0.0.1:{args.port}"
            wait_health(url, proc)
            results[kind] = run(url, args)
            print(kind, json.dumps(results[kind]), file=sys.stderr, flush=True)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    print(json.dumps(results, indent=1))
    if len(results) == 2:
        a, b = (results[k]["concurrency"] for k in ("minirt", "llama"))
        for x, y in zip(a, b):
            print(f"{x['streams']} streams: minirt {x['agg_tok_s']} tok/s vs llama-server {y['agg_tok_s']} tok/s "
                  f"({x['agg_tok_s'] / y['agg_tok_s']:.2f}×); p50 latency {x['latency_p50_s']} vs "
                  f"{y['latency_p50_s']} s", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
