"""`localrun serve MODEL`: an OpenAI-compatible HTTP server (localrun/server.py). The server stack
(Starlette, uvicorn) is the optional `serve` extra, imported only when the command runs."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
from typing import Optional

import typer

from ..errors import LocalrunError, UsageError
from . import _options as opt


def serve(
    model: str = typer.Argument(..., help="Model directory, Hugging Face repo id, or 'demo'."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LOCALRUN_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on every endpoint but /health."),
    parallel: int = typer.Option(1, "--parallel", min=1, help="Requests generated side by side, each slot with its own "
                                 "KV cache (the plan counts them all; see `localrun fit --parallel`)."),
    max_queue: int = typer.Option(64, "--max-queue", min=0, help="Requests that may wait for a slot; more answer 429."),
    served_name: Optional[str] = typer.Option(None, "--served-model-name",
                                              help="The model id /v1/models reports (default: the directory name)."),
    context: Optional[int] = typer.Option(None, "--context", help="Context length per slot (default 8192)."),
    device: str = opt.DEVICE,
    dtype: str = opt.DTYPE,
    experts: Optional[str] = opt.EXPERTS,
    vram: Optional[str] = opt.VRAM,
    resident_experts: Optional[float] = opt.RESIDENT_EXPERTS,
    threads: Optional[int] = opt.THREADS,
    quiet: bool = opt.QUIET,
) -> None:
    """Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models, /health) on HOST:PORT."""
    if parallel < 1:
        raise UsageError(f"--parallel must be at least 1, not {parallel}")
    if max_queue < 0:
        raise UsageError(f"--max-queue must be 0 or more, not {max_queue}")
    if not 0 <= port < 65536:
        raise UsageError(f"--port must be in 0..65535, not {port}")
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise LocalrunError(f"`localrun serve` needs the serve extra ({e.name} is missing): "
                            "pip install 'localrun[serve]'") from None
    load = opt.load_kwargs(device, dtype, experts, vram, resident_experts, context)
    listening = listen(host, port)  # before the model loads: a busy port fails in a second, not after it
    opt.use_threads(threads)
    from ..engine import Engine, generation_defaults
    from ..server import ServerConfig, make_app
    from ..resolve import resolve_model
    from ._progress import progress_bar

    model_dir = resolve_model(model)
    with progress_bar("loading", enabled=not quiet) as update:
        engine = Engine.load(model_dir, progress=update, parallel=parallel, **load)
    config = ServerConfig(model_name=served_name or model_dir.name, api_key=api_key, max_queue=max_queue,
                          defaults=generation_defaults(model_dir), idle_threads=threads is None)
    app = make_app(engine, config)
    picked = listening.getsockname()[1]  # --port 0: the one the system picked
    if not quiet or port == 0:  # then only this line tells it, so -q prints it too
        print(f"serving {config.model_name} on http://{host}:{picked}/v1 ({parallel} slot{'s' * (parallel > 1)}, "
              f"context {engine.session.cache.capacity}); Ctrl-C stops", file=sys.stderr, flush=True)
    scheduler = app.state.server.scheduler

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # Ctrl-C: end every request first, so none waits out the grace
            scheduler.shutdown()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            """A second Ctrl-C skips the wait for open connections, never the lifespan's end (uvicorn's
            skips it: the lifespan task, cancelled at exit, logged a traceback)."""
            await super().shutdown(sockets)
            if self.force_exit:
                await self.lifespan.shutdown()

        @contextlib.contextmanager
        def capture_signals(self):
            """Ctrl-C / SIGTERM shut the server down and `run` returns (uvicorn's own re-raises the
            signal afterwards, which would interrupt the lifespan shutdown with a traceback)."""
            signals = (signal.SIGINT, signal.SIGTERM)
            before = {s: signal.signal(s, self.handle_exit) for s in signals}
            try:
                yield
            finally:
                for s, handler in before.items():
                    signal.signal(s, handler)

    Server(uvicorn.Config(app, host=host, port=picked, log_level="warning", timeout_graceful_shutdown=3)).run(
        sockets=[listening])


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (what uvicorn then serves), or a one-line error naming why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise LocalrunError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


command = serve
