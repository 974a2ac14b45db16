"""`minirt serve`: an OpenAI-compatible HTTP server with continuous batching (pip install "minirt[serve]").

    from minirt.server import serve
    serve(minirt.load("smollm2"), "smollm2", port=8080, parallel=4)

batcher.py owns the model (slots, queue, one batched forward per step); app.py is the HTTP side (Starlette);
static/index.html is the chat page at /. The server keeps nothing between requests: run replicas behind any
HTTP load balancer.
"""
from __future__ import annotations

import sys
import threading

from ..errors import MinirtError

DRAIN_SECONDS = 30  # SIGTERM: running streams get this long to finish, then end with finish_reason "length"


def _require():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MinirtError('the server needs its extra: pip install "minirt[serve]" (Starlette and Uvicorn)') from None


def make_app(model, name: str, **options):
    """(Starlette app, Server) for a loaded model; options: parallel, ctx, api_key, queue, own_thread."""
    _require()
    from .app import Server
    server = Server(model, name, **options)
    # Run the kernels once from this (the process's serving) thread before the batcher thread does: measured
    # on 2 cores, without it the batcher's steps ran ~7× slower for as long as this thread never had (Numba's
    # OpenMP pool), e.g. in a test that serves from a thread of its own.
    model.warmup()
    return server.app(), server


def _os_thread_name(name: str) -> None:
    """Name the calling thread for the OS (top -H, /proc/PID/task/*/comm: how tools/serve_bench.py tells the
    HTTP thread's CPU time from the model's); Linux only, silently nothing elsewhere."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def serve(model, name: str, host: str = "127.0.0.1", port: int = 8080, log_level: str = "warning",
          drain_seconds: float = DRAIN_SECONDS, **options) -> None:
    """Serve until SIGINT/SIGTERM; on SIGTERM stop accepting, let running streams finish (≤ drain_seconds).

    The model runs on the calling (main) thread, HTTP in a thread of its own: Numba's OpenMP parallel regions
    cost ~10× more when entered from a thread other than the main one (tools/omp_threads.py)."""
    _require()
    import signal

    import uvicorn
    app, server = make_app(model, name, own_thread=False, **options)
    batcher = server.batcher
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=int(drain_seconds) + 5)
    http = uvicorn.Server(config)  # in a thread, it installs no signal handlers: ours below do its part
    failed = []

    def run_http():
        _os_thread_name("minirt-http")
        try:
            http.run()
        except BaseException as e:  # e.g. SystemExit when the port is taken (uvicorn has logged why)
            failed.append(e)
        finally:
            batcher.stop()  # the scheduler loop on the main thread returns

    def on_signal(sig, frame):  # the first: drain; a second: end the streams now (uvicorn then closes)
        if server.draining:
            batcher.stop()
            return
        server.draining = True
        batcher.drain(drain_seconds)
        http.should_exit = True

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        thread = threading.Thread(target=run_http, name="minirt-http", daemon=True)
        thread.start()
        print(f"minirt serve: {name} on http://{host}:{port} ({batcher.parallel} slots of {batcher.ctx} tokens, "
              f"{batcher.kv_type} KV; "
              f"queue {batcher.queue_limit})", file=sys.stderr, flush=True)
        batcher.run()
        while thread.is_alive():  # the drain is over: let uvicorn close the connections (its own deadline)
            thread.join(timeout=0.5)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if failed and not (isinstance(failed[0], SystemExit) and not failed[0].code):
        raise MinirtError(f"cannot serve on {host}:{port} (see the line above)")
