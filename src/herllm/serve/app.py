"""The server's app factory: `create_app(deps)` builds a FastAPI app from its dependencies
(versions, interaction log, token file, knowledge store, ...), so a test builds one per test.

Routes (OpenAI-compatible unless noted):

    GET  /                      the chat page (herllm)
    GET  /health                liveness, the version serving (no token)
    GET  /metrics               Prometheus text format (no token)
    GET  /v1/models             the model, and one entry per adapter version
    POST /v1/chat/completions   chat; `stream: true` sends SSE chunks, then `data: [DONE]`
    POST /v1/completions        plain continuation (no retrieval, no chat template)
    POST /v1/feedback           thumbs up / down on a completion id, or a corrected answer
    POST /v1/admin/rollback     serve an earlier version, or `latest` (admin token)
    POST /v1/admin/forget       erase a user's exchanges and stored facts (admin token)
    GET  /v1/admin/export       a user's exchanges as JSON lines (admin token)

Every /v1 route needs `Authorization: Bearer TOKEN`; no token or a wrong one gets 401 and
nothing is logged. The request's user is the token's, whatever the body's `user` says.
"""

import importlib.resources
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from herllm.serve.auth import Principal, TokenFile
from herllm.serve.errors import ApiError, from_validation, handle_api_error
from herllm.serve.exchange import Limits
from herllm.serve.generation import Generator
from herllm.serve.log import InFlight, InteractionLog
from herllm.serve.metrics import Metrics
from herllm.serve.versions import Versions

MAX_BODY_BYTES = 1_000_000


@dataclass
class ServeDeps:
    """Everything the app uses; built by `herllm serve` or by a test."""

    versions: Versions
    log: InteractionLog
    tokens: TokenFile
    model_name: str
    """The id clients send as `model` (e.g. ``herllm-tiny``); ``herllm`` is accepted too."""
    store: object | None = None
    """A `KnowledgeStore`, or None to serve without retrieval."""
    in_flight: InFlight | None = None
    limits: Limits = field(default_factory=Limits)
    generator: Generator = field(default_factory=Generator)
    metrics: Metrics = field(default_factory=Metrics)
    watch_poll: float | None = 0.5
    """Seconds between looks for a new adapter version (None: only when asked)."""
    learner: object | None = None
    """The `LearnerProcess` that `serve --learn` started (stopped while a forget rewrites the
    adapter), or None."""
    on_shutdown: list = field(default_factory=list)
    """Called when the app stops (e.g. stopping the learner it started); uvicorn re-raises
    SIGTERM after its shutdown, so code after `uvicorn.run` would not run."""

    def model_ids(self) -> list[str]:
        version = self.versions.current()[0]
        return [self.model_name, "herllm", f"{self.model_name}@{version}"]


def bearer_auth(deps: ServeDeps):
    """The auth dependency: the token's `Principal`, or 401 in the API's error format."""

    def principal(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else None
        who = deps.tokens.principal(token)
        if who is None:
            deps.metrics.requests.labels(request.url.path, "401").inc()
            raise ApiError(401, "Incorrect API key provided; send Authorization: Bearer TOKEN "
                           "(herllm serve RUN_DIR --add-token USER makes one)",
                           code="invalid_api_key")  # fmt: skip
        return who

    return principal


def admin_auth(deps: ServeDeps):
    auth = bearer_auth(deps)

    def admin(who: Annotated[Principal, Depends(auth)]) -> Principal:
        if not who.admin:
            raise ApiError(403, "this route needs an admin token", code="not_admin")
        return who

    return admin


def create_app(deps: ServeDeps) -> FastAPI:
    from herllm.serve import admin, routes

    @asynccontextmanager
    async def lifespan(_app):
        deps.versions.current()  # load the serving version before the first request
        if deps.watch_poll:
            deps.versions.watch(deps.watch_poll)
        yield
        deps.versions.stop()
        for stop in deps.on_shutdown:
            stop()

    app = FastAPI(title="herllm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.deps = deps
    app.add_exception_handler(ApiError, handle_api_error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc):
        return from_validation(exc).response()

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            return ApiError(413, f"the request body has {size} bytes; at most {MAX_BODY_BYTES}",
                            code="body_too_large").response()  # fmt: skip
        return await call_next(request)

    @app.exception_handler(404)
    async def _not_found(request, _exc):
        return ApiError(404, f"no route {request.method} {request.url.path}",
                        code="not_found").response()  # fmt: skip

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        html = importlib.resources.files("herllm.serve").joinpath("page.html").read_text()
        return HTMLResponse(html)

    @app.get("/health")
    def health() -> JSONResponse:
        version = deps.versions.current()[0]
        n = deps.in_flight.count if deps.in_flight else 0
        return JSONResponse({"status": "ok", "model": deps.model_name, "version": version,
                             "in_flight": n})  # fmt: skip

    @app.get("/metrics")
    def metrics() -> Response:
        deps.metrics.serving(deps.versions.current()[0], deps.versions.swaps)
        return Response(deps.metrics.render(), media_type="text/plain; version=0.0.4")

    routes.register(app, deps, bearer_auth(deps))
    admin.register(app, deps, admin_auth(deps))
    return app


def page_path() -> Path:
    return Path(str(importlib.resources.files("herllm.serve").joinpath("page.html")))


def serve_in_thread(deps: ServeDeps, host: str = "127.0.0.1", timeout: float = 120.0):
    """`create_app(deps)` on uvicorn in a daemon thread on a free port of `host` (benchmarks and
    scripts): returns the `uvicorn.Server` (set `should_exit` to stop it) and the base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(deps), host=host, port=port,
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server on {host}:{port} did not start")
        time.sleep(0.05)
    return server, f"http://{host}:{port}"
