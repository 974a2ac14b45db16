"""`minirt serve`: an OpenAI-compatible HTTP server with continuous batching (pip install "minirt[serve]").

    from minirt.server import serve
    serve(minirt.load("smollm2"), "smollm2", port=8080, parallel=4)

batcher.py owns the model (slots, queue, one batched forward per step); app.py is the HTTP side (Starlette);
static/index.html is the chat page at /. The server keeps nothing between requests: run replicas behind any
HTTP load balancer.
"""
from __future__ import annotations

import sys

from ..errors import MinirtError

DRAIN_SECONDS = 30  # SIGTERM: running streams get this long to finish, then end with finish_reason "length"


def _require():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MinirtError('the server needs its extra: pip install "minirt[serve]" (Starlette and Uvicorn)') from None


def make_app(model, name: str, **options):
    """(Starlette app, Server) for a loaded model; options: parallel, ctx, api_key, queue."""
    _require()
    from .app import Server
    server = Server(model, name, **options)
    # Run the kernels once from this (the process's serving) thread before the batcher thread does: measured
    # on 2 cores, without it the batcher's steps ran ~7× slower for as long as this thread never had (Numba's
    # OpenMP pool), e.g. in a test that serves from a thread of its own.
    model.warmup()
    return server.app(), server


def serve(model, name: str, host: str = "127.0.0.1", port: int = 8080, log_level: str = "warning",
          drain_seconds: float = DRAIN_SECONDS, **options) -> None:
    """Serve until SIGINT/SIGTERM; on SIGTERM stop accepting, let running streams finish (≤ drain_seconds)."""
    _require()
    import uvicorn
    app, server = make_app(model, name, **options)

    class Drainer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            server.draining = True
            server.batcher.drain(drain_seconds)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=int(drain_seconds) + 5)
    print(f"minirt serve: {name} on http://{host}:{port} ({server.batcher.parallel} slots of "
          f"{server.batcher.ctx} tokens; queue {server.batcher.queue_limit})", file=sys.stderr, flush=True)
    Drainer(config).run()
