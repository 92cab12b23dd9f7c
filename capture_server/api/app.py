"""Application wiring: settings, database, engines, job runner, routes, limits."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from capture_server.api.body_limit import BodyLimit
from capture_server.api.config import Settings
from capture_server.api.files import PromptFiles
from capture_server.api.jobs_db import JobsDB
from capture_server.api.metrics import ServiceMetrics
from capture_server.api.online import OnlineRecorder
from capture_server.api.openai_routes import router as openai_router
from capture_server.api.routes import Auth, router
from capture_server.api.runner import Engines, JobRunner
from capture_server.errors import JobsDatabaseError

logger = logging.getLogger("moetrace.service")
RECORD_RETRY_SECONDS = 2.0  # how often job fields the database refused are written again


def with_served_models(spec: dict, names: list[str]) -> dict:
    """The OpenAPI document with ``model`` fields listing the models this server serves,
    so that clients (and API fuzzers) know the valid values."""
    if not names:
        return spec
    for name, schema in spec.get("components", {}).get("schemas", {}).items():
        if name.endswith("Public"):  # records of earlier jobs may name other models
            continue
        model = schema.get("properties", {}).get("model")
        if model is not None and model.get("type") == "string":
            model["enum"] = sorted(names)
    return spec


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        shown = settings.model_dump(exclude={"token"})
        logger.info("moetrace service settings: %s (token %s)", shown, bool(settings.token))
        app.state.engines.start()
        try:
            await app.state.engines.verify_capture()
        except Exception:
            app.state.engines.shutdown()
            raise
        app.state.runner.resume_unfinished()
        idle = asyncio.create_task(app.state.online.close_idle(settings.online_idle_seconds))
        records = asyncio.create_task(app.state.runner.keep_records(RECORD_RETRY_SECONDS))
        yield
        idle.cancel()
        records.cancel()
        app.state.engines.shutdown()

    # the API docs are routes of their own below, behind the token like the API
    app = FastAPI(
        title="moetrace capture service",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    db = JobsDB(settings.data_dir / "jobs.sqlite")
    engines = Engines(settings)
    app.state.settings = settings
    app.state.db = db
    app.state.engines = engines
    app.state.files = PromptFiles(settings.data_dir, settings.max_upload_bytes)
    app.state.runner = JobRunner(settings, db, engines, app.state.files)
    app.state.online = OnlineRecorder(db, app.state.runner.store_path)
    app.state.metrics = ServiceMetrics()

    def body_limit(path: str) -> int:
        return settings.max_upload_bytes if path == "/v1/files" else settings.max_body_bytes

    app.add_middleware(BodyLimit, limit_for=body_limit)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """FastAPI answers a body it cannot decode (nested too deeply, not UTF-8) with a
        400; like malformed JSON, that is a 422 naming the body."""
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            cause = type(exc.__cause__).__name__ if exc.__cause__ else "undecodable"
            detail = [
                {"loc": ["body"], "msg": f"the body is not JSON ({cause})", "type": "json_invalid"}
            ]
            return JSONResponse(status_code=422, content={"detail": detail})
        return await http_exception_handler(request, exc)

    @app.exception_handler(JobsDatabaseError)
    async def database_unwritable(request: Request, exc: JobsDatabaseError) -> JSONResponse:
        """The job database cannot take a write (a full disk): 503, naming the file."""
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each field and what is wrong, without echoing the input back (it
        may be large, or hold NaN, which JSON cannot carry)."""
        detail = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg")), "type": e["type"]}
            for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": detail})

    app.include_router(router)
    app.include_router(openai_router)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Auth])
    def openapi() -> JSONResponse:
        return JSONResponse(with_served_models(app.openapi(), list(engines.paths)))

    @app.get("/docs", include_in_schema=False, dependencies=[Auth])
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

    return app
