"""edgesdk serve ARTIFACT: an OpenAI-compatible server (chat/completions, completions, models)."""
from __future__ import annotations

import argparse
import logging
import sys
import threading

from ..errors import EdgeSDKError, InvalidArgumentError


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API")
    p.add_argument("artifact")
    p.add_argument("--draft", default=None, help="draft model artifact for speculative decoding "
                   "(or \"prompt-lookup\")")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--alias", default=None, help="the model id /v1/models reports (default: the folder name)")
    p.add_argument("--api-key", default=None, help="require this key (Bearer or X-Api-Key) on every route but "
                   "/health and /v1/models")
    p.add_argument("--parallel", type=int, default=1, metavar="N", help="slots: concurrent generations, each "
                   "with its own KV cache over the shared weights (default 1)")
    p.add_argument("--max-queue", type=int, default=16, metavar="M", help="requests that may wait for a slot; "
                   "more get a 429 (default 16)")
    p.add_argument("--max-length", type=int, default=None, metavar="C", help="context per slot (default: the "
                   "model's)")
    p.add_argument("--cors", nargs="+", default=None, metavar="ORIGIN", help="allowed CORS origins ('*' for any)")
    p.add_argument("--target", default="auto", help="runtime target (default: auto)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(fn=run)


def run(a: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as e:
        raise EdgeSDKError(f"serve needs the serve extra ({e.name} is missing): pip install \"edgesdk[serve]\"") from None
    from pathlib import Path

    from ..runtime.model import load

    for name in ("parallel", "max_queue"):
        if getattr(a, name) < 1:
            raise InvalidArgumentError(f"--{name.replace('_', '-')}={getattr(a, name)} is invalid: use 1 or more")
    if not 0 < a.port < 65536:
        raise InvalidArgumentError(f"--port={a.port} is invalid: use 1-65535")
    if not (Path(a.artifact) / "edgesdk.json").is_file():
        raise EdgeSDKError(f"{a.artifact} is not an edgesdk artifact (no edgesdk.json); export one first")
    model_id = a.alias or Path(a.artifact).resolve().name
    # no intra-op spinning: the worker, the event loop and the clients need the cores between ORT runs
    # (measured 2.3x the throughput with 8 clients on 2 cores; docs/serve.md)
    app = create_app(lambda: load(a.artifact, a.target, max_length=a.max_length, threads=a.threads, draft=a.draft,
                                  _spinning=False),
                     model_id, api_key=a.api_key, parallel=a.parallel, max_queue=a.max_queue, cors=a.cors)
    if a.host not in ("127.0.0.1", "localhost", "::1") and not a.api_key:
        print(f"warning: serving on {a.host} without --api-key: anyone who reaches this port can use it",
              file=sys.stderr)
    level = logging.getLogger().getEffectiveLevel()
    server = uvicorn.Server(uvicorn.Config(app, host=a.host, port=a.port,
                                           log_level="info" if level <= logging.INFO else "warning"))
    worker = app.state.worker

    def watch() -> None:  # the model loads in the worker: announce it, or stop the server if it fails
        worker.ready.wait()
        if worker.load_error is not None:
            server.should_exit = True
        else:
            print(f"edgesdk serve: {model_id} ready on http://{a.host}:{a.port}/v1", file=sys.stderr, flush=True)

    threading.Thread(target=watch, daemon=True).start()
    server.run()
    if worker.load_error is not None:
        raise worker.load_error
    return 0
