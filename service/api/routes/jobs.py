"""/v1/jobs: submit (202 + Location, Idempotency-Key), inspect, page through results, cancel."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse

from service.api.deps import Reader, ServicesDep, Submitter
from service.core.problems import Problem, not_found
from service.core.security import Principal
from service.jobs import submit
from service.schemas.common import PROBLEM_RESPONSES, Page
from service.schemas.jobs import JobList, JobOut, JobRequest, ResultPage
from service.state import Services
from worker import results
from worker.jobstore import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses={
    **PROBLEM_RESPONSES,
    410: {**PROBLEM_RESPONSES[404], "description": "The job ended more than "
          "TDA_RESULT_TTL_DAYS ago: its record and result were deleted"},
})
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=200,
           description="Same key + same body → the same job; same key + another body → 422."),
]


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _out(job: Job) -> JobOut:
    links = {"self": f"/v1/jobs/{job.id}"}
    if job.state == "succeeded":
        links["result"] = f"/v1/jobs/{job.id}/result"
    result = None
    if job.result is not None:
        result = {k: job.result[k] for k in ("rows", "columns", "arrays", "summary")}
    return JobOut(
        id=job.id, kind=job.kind, state=job.state, queue=job.queue,
        progress={"fraction": job.fraction, "stage": job.stage},
        created_at=_time(job.created_at), started_at=_time(job.started_at),
        finished_at=_time(job.finished_at), attempts=job.attempts,
        cancel_requested=job.cancel_requested, error=job.error, result=result, links=links,
    )


def _own(services: Services, who: Principal, job_id: str) -> Job:
    """The job if it exists *and* belongs to the caller's tenant (otherwise the same 404)."""
    job = services.jobs.get(job_id) if len(job_id) <= 64 else None
    if job is None and len(job_id) <= 64 and services.jobs.expired_tenant(job_id) == who.tenant:
        raise _expired(services, job_id)
    if job is None or job.tenant != who.tenant:
        raise not_found("job", job_id, "list your jobs with GET /v1/jobs")
    return job


def _expired(services: Services, job_id: str) -> Problem:
    days = services.settings.result_ttl_days
    return Problem(410, "expired", f"job {job_id} ended more than {days:g} day(s) ago "
                   f"(TDA_RESULT_TTL_DAYS); its record and result were deleted. Submit the job "
                   "again to recompute it.")


@router.post("", response_model=JobOut, status_code=202,
             responses={202: {"description": "Accepted; poll the Location"}})
def submit_job(body: JobRequest, response: Response, services: ServicesDep, who: Submitter,
               idempotency_key: IdempotencyKey = None) -> JobOut:
    """Queue a job. The response's ``Location`` is where to poll its state."""
    job, created = submit(services, who, body, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return _out(job)


@router.get("", response_model=JobList)
def list_jobs(services: ServicesDep, who: Reader, offset: int = Query(0, ge=0),
              limit: int = Query(50, ge=1, le=500)) -> JobList:
    """Your jobs, newest first."""
    jobs, total = services.jobs.list(who.tenant, offset, limit)
    nxt = f"/v1/jobs?offset={offset + limit}&limit={limit}" if offset + limit < total else None
    return JobList(items=[_out(j) for j in jobs],
                   page=Page(offset=offset, limit=limit, total=total, next=nxt))


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, services: ServicesDep, who: Reader) -> JobOut:
    """State, progress (fraction and stage), timestamps, attempts, error or result summary."""
    return _out(_own(services, who, job_id))


def _result_dir(services: Services, job: Job) -> Path:
    if job.state != "succeeded" or job.result is None:
        hint = f"it is {job.state}" + (": see its error" if job.state == "failed" else
                                        "; poll GET /v1/jobs/{id} until it succeeds")
        raise Problem(409, "no-result", f"job {job.id} has no result: {hint}")
    directory = Path(job.result["path"])
    if not directory.is_dir():  # expired between the read of the record and now
        raise _expired(services, job.id)
    return directory


@router.get("/{job_id}/result", response_model=ResultPage)
def get_result(job_id: str, request: Request, services: ServicesDep, who: Reader,
               offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)
               ) -> ResultPage:
    """One page of the result table (e.g. records ranked by self-influence or value)."""
    job = _own(services, who, job_id)
    try:
        items, total = results.read_page(_result_dir(services, job), offset, limit)
    except FileNotFoundError:  # purged while this request read it
        raise _expired(services, job.id) from None
    nxt = (f"{request.url.path}?offset={offset + limit}&limit={limit}"
           if offset + limit < total else None)
    return ResultPage(job_id=job.id, items=items,
                      page=Page(offset=offset, limit=limit, total=total, next=nxt),
                      summary=job.result["summary"] if job.result else {})


@router.get("/{job_id}/result/arrays/{name}", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "A NumPy .npy file"}})
def get_result_array(job_id: str, name: str, services: ServicesDep, who: Reader) -> FileResponse:
    """A stored NumPy array of the result (e.g. the full ``scores`` matrix), as ``.npy``."""
    job = _own(services, who, job_id)
    directory = _result_dir(services, job)
    path = results.array_path(directory, name) if name.isidentifier() else None
    if path is None:
        raise not_found("array", name, f"this result has {sorted(job.result['arrays'])}")
    return FileResponse(path, media_type="application/octet-stream", filename=f"{name}.npy")


@router.delete("/{job_id}", response_model=JobOut, status_code=202)
def cancel_job(job_id: str, services: ServicesDep, who: Submitter) -> JobOut:
    """Cancel: a queued job at once, a running one at its next batch boundary."""
    job = _own(services, who, job_id)
    if job.done:
        raise Problem(409, "job-finished", f"job {job_id} already {job.state}; nothing to cancel")
    services.jobs.cancel(job_id)
    return _out(_own(services, who, job_id))
