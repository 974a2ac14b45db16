"""The same client against `minirt serve` and llama-server: aggregate tok/s and per-request latency at 1, 4 and 8
concurrent streams, and the time to first token of a short request while 7 long streams run.

    python tools/serve_bench.py                       # both servers, SmolLM2 Q4_1, one after the other
    python tools/serve_bench.py --servers minirt --tokens 32 --requests 2
    python tools/serve_bench.py --url http://127.0.0.1:8080   # a server already running
    python tools/serve_bench.py --servers minirt --streams 1,8,1,8,1,8   # interleaved: medians and their ratio

Each server is started here (minirt serve --parallel 8; llama-server -np 8 -cb, each slot with the same context),
warmed with one request per prompt (all at once), measured, and stopped. Requests are greedy completions with ignore_eos, so every one
generates exactly --tokens tokens. The clients are asyncio tasks of one thread, on bare sockets: they share
the cores with the server, so they cost as little CPU as they can; cpu_ms_per_token says what each side took
(the server's threads by name: main runs the model, python its OpenMP worker, minirt-http the event loop).
The httpx client used before cost ~0.5 ms of CPU per token and created a client (an SSL context, 10-30 ms)
inside every request's timing: figures taken with it are not comparable with these (TTFT alone was mostly
that client's set-up, which flattered the TTFT ratio).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


LLAMA_SERVER = Path.home() / ".cache/minirt-anchors/llama.cpp-0.3.36/build/bin/llama-server"
PROMPTS = ["Once upon a time, in a small village,", "The history of the Roman Empire", "Write a poem about the sea.",
           "def quicksort(xs):", "The three laws of robotics are", "In the beginning", "Dear diary, today",
           "A recipe for pancakes:"]


async def stream_one(url: str, prompt: str, tokens: int) -> tuple[float, float, int]:
    """(time to first token, total seconds, tokens received) for one streaming greedy completion.

    A bare HTTP/1.1 client on asyncio streams (one connection per request, chunked or close-delimited body):
    the clients share the server's 2 cores, so each costs as little CPU as it can (httpx in threads took
    ~0.5 ms per token here, a quarter of the server's whole overhead per token)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    body = json.dumps({"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True, "model": "bench"}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    first, n = None, 0
    try:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        if head.split(" ", 2)[1] != "200":
            raise RuntimeError(f"{url}: {head.splitlines()[0]}")
        chunked = "transfer-encoding: chunked" in head.lower()
        events = b""
        while True:
            if chunked:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                data = await reader.readexactly(size + 2)
                if not size:
                    break
                data = data[:-2]
            else:
                data = await reader.read(1 << 16)
                if not data:
                    break
            *done, events = (events + data).split(b"\n\n")
            for e in done:
                if not e.startswith(b"data: ") or e == b"data: [DONE]":
                    continue
                choices = json.loads(e[6:]).get("choices")
                if choices and choices[0].get("text"):
                    n += 1
                    if first is None:
                        first = time.perf_counter() - t0
    finally:
        writer.close()
    return (first or 0.0), time.perf_counter() - t0, n


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every process, every core; Linux /proc/stat, else 0)."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def thread_cpu(pid: int | None) -> dict[str, float]:
    """CPU seconds so far of each thread of process pid, by thread name (Linux /proc; {} elsewhere), of this
    (the client's) process under "client", and of the whole machine under "machine"."""
    out = {"client": time.process_time(), "machine": machine_busy()}
    if pid is None:
        return out
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for tid in tasks:
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        name = "main" if tid == str(pid) else name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_per_token(before: dict, after: dict, tokens: int) -> dict[str, float]:
    """Milliseconds of CPU per generated token, by thread (name → ms), between two thread_cpu() readings;
    "others": what the rest of the machine (other sessions' processes) took meanwhile. A run where it is
    more than a fraction of a millisecond per token measured a shared machine, not the server: with 2 cores,
    a third busy process makes the kernels' 2 threads wait for each other. (With --url and no --pid, the
    server's own CPU is in "others" too.)"""
    out = {k: round((after[k] - before.get(k, 0.0)) * 1e3 / max(tokens, 1), 3) for k in after
           if after[k] - before.get(k, 0.0) > 0 and k != "machine"}
    if after.get("machine"):
        out["others"] = round(max(0.0, (after["machine"] - before["machine"]) * 1e3 / max(tokens, 1)
                                  - sum(out.values())), 3)
    return out


def concurrent(url: str, streams: int, requests: int, tokens: int, pid: int | None = None) -> dict:
    """`streams` clients, each sending `requests` requests one after another."""
    lat, ttft, counts = [], [], []

    async def client(i):
        for k in range(requests):
            f, t, n = await stream_one(url, PROMPTS[(i + k) % len(PROMPTS)], tokens)
            ttft.append(f)
            lat.append(t)
            counts.append(n)

    async def all_clients():
        await asyncio.gather(*(client(i) for i in range(streams)))
    cpu0 = thread_cpu(pid)
    t0 = time.perf_counter()
    asyncio.run(all_clients())
    wall = time.perf_counter() - t0
    cpu = cpu_per_token(cpu0, thread_cpu(pid), sum(counts))
    return {"streams": streams, "requests": len(lat), "tokens": sum(counts), "wall_s": round(wall, 2),
            "agg_tok_s": round(sum(counts) / wall, 1), "latency_p50_s": round(statistics.median(lat), 2),
            "latency_max_s": round(max(lat), 2), "ttft_p50_s": round(statistics.median(ttft), 3),
            "cpu_ms_per_token": cpu}


def ttft_under_load(url: str, long_tokens: int, short_tokens: int = 4, background: int = 7, probes: int = 5) -> dict:
    """TTFT of a short request alone, then while `background` long streams decode (the median of `probes`
    each; the minimum beside it)."""
    async def probe():
        return (await stream_one(url, "Hello, my name is", short_tokens))[0]

    async def measure():
        alone = [await probe() for _ in range(probes)]
        longs = [asyncio.create_task(stream_one(url, PROMPTS[i % len(PROMPTS)], long_tokens))
                 for i in range(background)]
        await asyncio.sleep(0.5)
        # wait until the long streams are decoding: a probe's first token arrives only after their prefills
        await stream_one(url, "Hi", 1)
        loaded = [await probe() for _ in range(probes)]
        if any(t.done() for t in longs):
            print("warning: a long stream ended before the probes did: raise --tokens", file=sys.stderr)
        await asyncio.gather(*longs)
        return alone, loaded
    alone, loaded = asyncio.run(measure())
    a, b = statistics.median(alone), statistics.median(loaded)
    return {"ttft_alone_s": round(a, 3), "ttft_under_7_streams_s": round(b, 3), "ratio": round(b / a, 2),
            "ttft_alone_min_s": round(min(alone), 3), "ttft_under_7_streams_min_s": round(min(loaded), 3)}


def wait_health(url: str, proc, seconds: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < seconds:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("the server did not come up")


def start(kind: str, model: str, port: int, parallel: int, ctx: int, threads: int, kv_type: str | None = None):
    if kind == "minirt":
        cmd = [sys.executable, "-m", "minirt", "serve", "--model", model, "--port", str(port), "--parallel",
               str(parallel), "--ctx", str(ctx), "--threads", str(threads)]
        cmd += ["--kv-type", kv_type] if kv_type else []
    else:
        cmd = [str(LLAMA_SERVER), "-m", model, "--port", str(port), "-np", str(parallel), "-cb",
               "-c", str(ctx * parallel), "-t", str(threads), "--no-webui"]
        cmd += ["-ctk", kv_type, "-ctv", kv_type] if kv_type else []
    print("+ " + " ".join(cmd), file=sys.stderr)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[1])


def run(url: str, args, pid: int | None = None) -> dict:
    # warm up with every prompt at once: a single short request left the first measured level (1 stream) with
    # a first request 5x slower than the rest (TTFT 81 vs 16 ms), which flattered every later level's speedup
    concurrent(url, len(PROMPTS), 1, 8)
    out = {"concurrency": [concurrent(url, c, args.requests, args.tokens, pid) for c in args.streams]}
    out["ttft"] = ttft_under_load(url, long_tokens=max(args.tokens * 2, 16 * args.probes), probes=args.probes)
    base = out["concurrency"][0]["agg_tok_s"]
    for row in out["concurrency"]:
        row["speedup"] = round(row["agg_tok_s"] / base, 2)
    # levels given more than once (--streams 1,8,1,8,1,8): interleaved, so that a slow spell of a shared machine
    # falls on both; the median of each level's aggregate, and the speedup of those medians over the first level's
    levels: dict[int, list[float]] = {}
    for row in out["concurrency"]:
        levels.setdefault(row["streams"], []).append(row["agg_tok_s"])
    if any(len(v) > 1 for v in levels.values()):
        med = {k: statistics.median(v) for k, v in levels.items()}
        first = med[out["concurrency"][0]["streams"]]
        out["median_agg_tok_s"] = {k: round(v, 1) for k, v in med.items()}
        out["median_speedup"] = {k: round(v / first, 2) for k, v in med.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", default="minirt,llama", help="which to start: minirt, llama or both")
    ap.add_argument("--url", default=None, help="measure a server already running here instead")
    ap.add_argument("--pid", type=int, default=None, help="with --url: the server's process id (CPU by thread)")
    ap.add_argument("--model", default=None, help="GGUF file (default: the registry's SmolLM2 Q4_1)")
    ap.add_argument("--streams", default="1,4,8", help="concurrency levels")
    ap.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request")
    ap.add_argument("--probes", type=int, default=5, help="short requests timed alone and under load (median)")
    ap.add_argument("--ctx", type=int, default=512, help="context per slot")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=18180)
    ap.add_argument("--kv-type", choices=("f32", "f16"), default=None,
                    help="KV cache type of both servers (default: each one's own, f16 for both)")
    args = ap.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    if args.url:
        print(json.dumps(run(args.url.rstrip("/"), args, args.pid), indent=1))
        return
    model = args.model
    if model is None:
        from minirt.registry import resolve
        model = str(resolve("smollm2"))
    results = {}
    for kind in args.servers.split(","):
        proc = start(kind, model, args.port, max(args.streams), args.ctx, args.threads, args.kv_type)
        try:
            url = f"http://127.0.0.1:{args.port}"
            wait_health(url, proc)
            results[kind] = run(url, args, proc.pid)
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
