"""The FastAPI application: OpenAI's routes, the page and its API, health, and errors in OpenAI's shape."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError

from kiln.serve import api, pages
from kiln.serve.auth import APIError
from kiln.serve.models import ModelRegistry
from kiln.serve.scheduler import Scheduler


def create_app(
    models: ModelRegistry,
    queue_size: int = 32,
    store=None,
    runs_dir: Path | None = None,
    api_key: str | None = None,
    limits: api.Limits | None = None,
    stream_interval: float = 0.02,
) -> FastAPI:
    """The server for `models`; the decoding thread runs while the app does."""
    scheduler = Scheduler(models, queue_size, stream_interval)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="Kiln", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.models, app.state.scheduler, app.state.store = models, scheduler, store
    app.state.runs_dir, app.state.api_key, app.state.limits = runs_dir, api_key, limits or api.Limits()

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
        return APIError(400, f"{field}: {first['msg']}", param=field).response()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", **scheduler.stats()}

    app.include_router(api.router)
    app.include_router(pages.router)
    return app
