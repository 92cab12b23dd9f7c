"""HTTP routes: jobs, models, health and metrics."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import polars as pl
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from capture_server.api.config import Settings
from capture_server.api.files import UploadError, UploadTooLargeError
from capture_server.api.runner import close_store
from capture_server.api.schemas import (
    Capture,
    ErrorBody,
    JobCreate,
    JobPublic,
    JobsPublic,
    check_score_prompts,
    prompt_interventions,
)
from capture_server.api.tokens import check_token_ids
from capture_server.capture.intervention import Intervention, InterventionError, check_for_engine


def errors(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI ``responses`` for error statuses: ``{"detail": ...}`` bodies."""
    return {status: {"model": ErrorBody} for status in statuses}


COMMON_ERRORS = errors(401, 422, 500, 503)  # 503: the job database cannot be written
router = APIRouter(responses=COMMON_ERRORS)
MAX_OFFSET = 2**62  # page offsets past any table; SQLite and polars take 64-bit signed


def _state(request: Request):
    return request.app.state


bearer = HTTPBearer(
    auto_error=False, description="The service's token (`--token` or MOETRACE_TOKEN), if set."
)


def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    import hmac

    token = request.app.state.settings.token
    given = "" if credentials is None else credentials.credentials
    if token and not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(
            401, detail="Missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )


def require_token_for_metrics(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """The token, unless the service was started with ``--public-metrics``."""
    if not request.app.state.settings.public_metrics:
        require_token(request, credentials)


Auth = Depends(require_token)


def _public(job: dict, store: str) -> JobPublic:
    return JobPublic(**{k: job[k] for k in JobPublic.model_fields if k in job}, store=store)


@router.post(
    "/v1/jobs",
    response_model=JobPublic,
    status_code=201,
    dependencies=[Auth],
    tags=["jobs"],
    responses=errors(400, 404, 413),
)
async def create_job(job: JobCreate, request: Request) -> JobPublic:
    """Create a rollout or score job; it starts at once."""
    app = _state(request)
    if job.model not in app.engines.engines:
        raise HTTPException(404, detail="Model not found")
    prompts = job.prompts
    if job.prompts_file is not None:
        if not app.files.exists(job.prompts_file):
            raise HTTPException(422, detail="prompts_file: no uploaded file with this id")
        prompts = app.files.load(job.prompts_file)
        try:
            check_score_prompts(job.kind, prompts)
        except ValueError as exc:
            raise HTTPException(422, detail=f"prompts_file: {exc}") from None
    if job.kind == "experiment":
        job, prompts = _expand_experiment(job, prompts, app)
    if len(prompts) > app.settings.max_prompts:
        raise HTTPException(422, detail=f"prompts: at most {app.settings.max_prompts}")
    token_ids = [  # out-of-vocabulary ids fail here, not mid-job
        (f"prompts[{i}].{field}", ids)
        for i, item in enumerate(prompts)
        for field in ("prompt_token_ids", "completion_token_ids")
        if (ids := getattr(item, field))
    ]
    check_token_ids(token_ids, app.engines.engines[job.model])
    if job.sampling.max_tokens > app.settings.max_tokens_limit:
        raise HTTPException(
            422, detail=f"sampling.max_tokens: at most {app.settings.max_tokens_limit}"
        )
    layers = set(app.settings.hidden_layers)
    if not set(job.capture.hidden_layers) <= layers:
        raise HTTPException(
            422, detail=f"capture.hidden_layers: the server captures only {sorted(layers)}"
        )
    check_capture_dtype("capture", job.capture, app.settings)
    if not job.expanded:  # an experiment's conditions were checked as it was expanded
        check_interventions(
            prompt_interventions(job, prompts), app.engines.routing.get(job.model, {})
        )
    n = 1 if job.kind != "rollout" else job.sampling.n
    job_id = app.db.create(job.model_dump(mode="json", exclude_none=True), len(prompts) * n)
    app.runner.submit(job_id)
    return _public(app.db.get(job_id), app.runner.store_path(job_id))


def check_capture_dtype(field: str, capture: Capture, settings: Settings) -> None:
    """422 when a job asks to keep logits in float32 from engines that capture them in
    float16 (``--capture-dtype``): the store would hold rounded values as if exact."""
    if capture.logits_dtype == "float32" and settings.capture_dtype != "float32":
        raise HTTPException(
            422,
            detail=f"{field}.logits_dtype: the server captures logits in "
            f"{settings.capture_dtype} (--capture-dtype)",
        )


def check_interventions(named: dict[str, Intervention], routing: dict[str, Any]) -> None:
    """422 naming the field of the first intervention the engine (its `routing` facts)
    cannot run."""
    for field, intervention in named.items():
        try:
            check_for_engine(intervention, routing)
        except InterventionError as exc:
            raise HTTPException(422, detail=exc.at(field)) from None


def _expand_experiment(job: JobCreate, prompts: list, app: Any) -> tuple[JobCreate, list]:
    """An experiment job with its prompts expanded into its conditions (422 naming the
    field when the experiment cannot run on this model)."""
    from capture_server.api.experiment_jobs import expand, usage_of_store

    spec = job.experiment
    assert spec is not None
    try:
        if spec.usage_job is not None:
            if app.db.get(spec.usage_job) is None:
                raise InterventionError("experiment.usage_job: no job with this id")
            usage = usage_of_store(app.runner.store_path(spec.usage_job))
        else:
            usage = np.asarray(spec.usage, dtype=np.float64)
        job = expand(job, prompts, app.engines.routing.get(job.model, {}), usage)
    except InterventionError as exc:
        raise HTTPException(422, detail=str(exc)) from None
    assert job.prompts is not None
    return job, job.prompts


@router.post(
    "/v1/files", status_code=201, dependencies=[Auth], tags=["jobs"], responses=errors(413)
)
async def upload_prompts(request: Request) -> dict:
    """Upload a JSONL file of prompts (one `PromptItem` per line) as the raw body; a job
    then names it by ``prompts_file``. Every line is validated; errors name the line."""
    try:
        return await request.app.state.files.save(request.stream())
    except UploadTooLargeError as exc:
        raise HTTPException(413, detail=str(exc)) from None
    except UploadError as exc:
        raise HTTPException(422, detail=f"file: {exc}") from None


@router.get("/v1/jobs", response_model=JobsPublic, dependencies=[Auth], tags=["jobs"])
def list_jobs(
    request: Request,
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    limit: int = Query(50, ge=1, le=500),
) -> JobsPublic:
    """List jobs, newest first."""
    app = _state(request)
    rows, count = app.db.list(offset, limit)
    data = [_public(app.runner.view(r), app.runner.store_path(r["id"])) for r in rows]
    return JobsPublic(data=data, count=count)


MAX_WAIT_SECONDS = 60.0  # a long poll answers by then: proxies cut idle requests


@router.get(
    "/v1/jobs/{job_id}",
    response_model=JobPublic,
    dependencies=[Auth],
    tags=["jobs"],
    responses=errors(404),
)
async def get_job(
    job_id: str,
    request: Request,
    wait: float = Query(
        0.0,
        ge=0,
        le=MAX_WAIT_SECONDS,
        description="Seconds to wait for the job to end before answering (long poll): "
        "a client learns the end at once instead of one poll interval later.",
    ),
) -> JobPublic:
    """Get a job's state and progress; with `wait`, once it ends or `wait` seconds pass."""
    app = _state(request)
    job = app.db.get(job_id)
    if job is None:
        raise HTTPException(404, detail="Job not found")
    if wait > 0 and await app.runner.wait_ended(job_id, wait):
        job = app.db.get(job_id) or job
    return _public(app.runner.view(job), app.runner.store_path(job_id))


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=JobPublic,
    dependencies=[Auth],
    tags=["jobs"],
    responses=errors(404),
)
async def cancel_job(job_id: str, request: Request) -> JobPublic:
    """Cancel a job, or close an open online job; committed sequences stay in its store."""
    app = _state(request)
    job = app.db.get(job_id)
    if job is None:
        raise HTTPException(404, detail="Job not found")
    if job["state"] == "open":
        app.online.forget(job_id)
        app.db.update(job_id, state="done")
        engine = app.engines.engines.get(job["model"])
        if engine is not None:
            await close_store(engine, app.runner.store_path(job_id), [])
    elif app.db.request_cancel(job_id):  # the first cancel; later ones change nothing
        app.runner.cancel(job_id)
    return _public(app.runner.view(app.db.get(job_id)), app.runner.store_path(job_id))


@router.get(
    "/v1/jobs/{job_id}/sequences", dependencies=[Auth], tags=["jobs"], responses=errors(404)
)
def job_sequences(
    job_id: str,
    request: Request,
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    limit: int = Query(100, ge=1, le=1000),
) -> dict:
    """The committed sequence index of a job's store, paged."""
    app = _state(request)
    if app.db.get(job_id) is None:
        raise HTTPException(404, detail="Job not found")
    from capture_server.errors import StoreError
    from capture_server.store import open_store

    try:
        index = open_store(app.runner.store_path(job_id)).index
    except StoreError:
        return {"data": [], "count": 0}
    page = index.slice(offset, limit).drop("labels", strict=False)
    return {"data": page.to_dicts(), "count": len(index)}


@router.get(
    "/v1/jobs/{job_id}/result", dependencies=[Auth], tags=["jobs"], responses=errors(404, 409)
)
def job_result(job_id: str, request: Request) -> dict:
    """An experiment job's table: one row per (layer or depth, condition, part) with the
    value, its change against the baseline and the change's 95% interval."""
    from capture_server.api.experiment_jobs import result_path

    app = _state(request)
    job = app.db.get(job_id)
    if job is None:
        raise HTTPException(404, detail="Job not found")
    path = result_path(app.settings.data_dir, job_id)
    if job["kind"] != "experiment" or not path.exists():
        raise HTTPException(
            409,
            detail=f"no result: a {job['kind']} job, {job['state']} (experiment jobs "
            "have one once done)",
        )
    return {"data": pl.read_parquet(path).to_dicts()}


@router.get("/v1/models", dependencies=[Auth], tags=["models"])
def models(request: Request) -> dict:
    """Served models."""
    app = _state(request)
    return {"data": [{"id": name, "path": path} for name, path in app.engines.paths.items()]}


@router.get("/healthz", tags=["health"])
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], responses=errors(503))
def readyz(request: Request) -> dict:
    """Ready when the data dir takes writes (jobs and stores live there), the job
    database took the last ones, and the engines have started."""
    import os
    import tempfile

    data_dir = _state(request).settings.data_dir
    try:  # a block of data, not an empty file: a full disk still has inodes
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".readyz-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise HTTPException(
            503, detail=f"data dir {os.fspath(data_dir)} is not writable: {exc.strerror}"
        ) from None
    if _state(request).runner.unrecorded:
        raise HTTPException(503, detail="the job database takes no writes; see the job errors")
    if not _state(request).engines.engines:
        raise HTTPException(503, detail="Engines not ready")
    return {"status": "ready"}


@router.get(
    "/metrics",
    tags=["health"],
    dependencies=[Depends(require_token_for_metrics)],
    response_class=Response,
    responses={200: {"content": {"text/plain; version=0.0.4": {}}, "description": "Prometheus"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: jobs, tokens, expert load, store writers."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    app = _state(request)
    await app.metrics.refresh(app)
    return Response(generate_latest(app.metrics.registry), media_type=CONTENT_TYPE_LATEST)
