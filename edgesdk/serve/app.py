"""The OpenAI-compatible HTTP layer: routes, middleware (API key, body size, CORS, metrics) and
errors in OpenAI's shape. Handlers validate and tokenize (handlers.py), then hand a Job to the
worker and relay its events; they never run the model themselves."""
from __future__ import annotations

import contextlib
import json
import secrets
import time
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from . import handlers
from .metrics import Metrics
from .schemas import ApiError, ChatRequest, CompletionRequest
from .worker import Worker

PUBLIC = {"/health", "/models", "/v1/models"}
ROUTES = {"/health", "/metrics", "/models", "/v1/models", "/chat/completions", "/v1/chat/completions",
          "/completions", "/v1/completions"}


def _validation_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"unsupported field '{loc}': edgesdk serve does not implement it; remove it",
                        param=loc, code="unsupported_field")
    return ApiError(400, f"invalid '{loc}': {err['msg']}", param=loc or None, code="invalid_value")


def create_app(load: Callable[[], Any], model_id: str, *, api_key: str | None = None, parallel: int = 1,
               max_queue: int = 16, cors: list[str] | None = None, max_body: int = 4 << 20,
               ping_s: float = 15.0) -> FastAPI:
    """``load`` returns the Model; the worker calls it in its own thread, so /health answers 503
    until it is ready."""
    metrics = Metrics()
    worker = Worker(load, parallel=parallel, max_queue=max_queue, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="edgesdk serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.metrics, app.state.model_id = worker, metrics, model_id

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1/models/") or path.startswith("/models/"):
            route = "/v1/models/{id}"
        else:
            route = path if path in ROUTES else "other"
        if request.method == "OPTIONS" or path in PUBLIC or route == "/v1/models/{id}" or not api_key:
            response = None
        else:
            auth = request.headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
            response = None if given and secrets.compare_digest(given, api_key) else ApiError(
                401, "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-Api-Key: KEY'",
                "authentication_error", code="invalid_api_key").response()
        length = request.headers.get("content-length")
        if response is None and length and length.isdigit() and int(length) > max_body:
            response = _too_large(max_body).response()
        if response is None:
            response = await call_next(request)
        metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    if cors:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors), allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        if e.status_code == 404:
            return ApiError(404, f"no route {request.method} {request.url.path}; see /v1/models, "
                            "/v1/chat/completions, /v1/completions, /health, /metrics", code="not_found").response()
        return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").response()

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": int(app.state.started), "owned_by": "edgesdk"}

    app.state.started = time.time()

    async def health():
        if not worker.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        if worker.load_error is not None:
            return JSONResponse({"status": "error", "error": str(worker.load_error)}, status_code=503)
        return {"status": "ok", "slots": worker.parallel, "busy": worker.busy}

    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models():
        return {"object": "list", "data": [model_card()]}

    async def model(model_name: str):
        if model_name != model_id:
            raise ApiError(404, f"no model {model_name!r}; this server serves {model_id!r}", param="model",
                           code="model_not_found")
        return model_card()

    async def chat(request: Request):
        req = await _parse(request, ChatRequest, max_body)
        m = _ready(worker)
        return await handlers.chat(request, req, m, worker, model_id, ping_s)

    async def completions(request: Request):
        req = await _parse(request, CompletionRequest, max_body)
        m = _ready(worker)
        return await handlers.completion(request, req, m, worker, model_id, ping_s)

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", prometheus, methods=["GET"])
    for prefix in ("/v1", ""):
        app.add_api_route(f"{prefix}/models", models, methods=["GET"])
        app.add_api_route(prefix + "/models/{model_name:path}", model, methods=["GET"])
        app.add_api_route(f"{prefix}/chat/completions", chat, methods=["POST"])
        app.add_api_route(f"{prefix}/completions", completions, methods=["POST"])
    return app


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes; send less (or raise the server's "
                    "limit)", code="request_too_large")


async def _parse(request: Request, schema, max_body: int):
    body = await request.body()
    if len(body) > max_body:
        raise _too_large(max_body)
    try:
        data = json.loads(body)
    except ValueError:
        raise ApiError(400, "the body is not valid JSON; send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        req = schema.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None
    if req.n != 1:
        raise ApiError(400, f"n={req.n} is not supported: edgesdk serve returns one choice; use n=1", param="n")
    return req


def _ready(worker: Worker):
    if not worker.ready.is_set():
        raise ApiError(503, "the model is still loading; retry when /health answers 200", "server_error",
                       code="loading")
    if worker.load_error is not None:
        raise ApiError(503, f"the model failed to load: {worker.load_error}", "server_error")
    return worker.model
