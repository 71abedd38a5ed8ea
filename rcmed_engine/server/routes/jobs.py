"""Jobs: status with long polling, the result once done, cancellation."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from fastapi import Path as PathParam
from fastapi.responses import Response

from ..auth import require_token
from ..errors import ApiError, json_response
from ..glue import encode_results
from ..models import API, JOB_PATTERN, Codec, JobModel, JobsModel, SegmentResponse, responses
from ..state import ServerState, get_state

router = APIRouter(prefix=f"/{API}", dependencies=[Depends(require_token)])


@router.get("/jobs", responses=responses(_200=JobsModel))
async def list_jobs(st: ServerState = Depends(get_state)) -> Response:
    st.jobs.purge()
    return json_response({"jobs": [j.public() for j in st.jobs.values()]})


@router.get("/jobs/{job_id}", responses=responses(_200=JobModel))
async def job_status(job_id: str = PathParam(pattern=JOB_PATTERN),
                     wait: float = Query(0.0, ge=0.0, le=600.0, description="long poll: wait up to this "
                                         "many seconds for a change"),
                     since: int = Query(-1, ge=-1, le=1 << 62,
                                        description="the version the client has seen"),
                     final: bool = Query(False, description="with wait: return only when the job has "
                                         "ended (or the wait is over), not on progress"),
                     st: ServerState = Depends(get_state)) -> Response:
    job = st.jobs.get(job_id)
    await st.jobs.wait(job, wait, st.settings.max_wait_s, since, final)
    return json_response(job.public())


@router.get("/jobs/{job_id}/result", responses=responses(409, _200=SegmentResponse))
async def job_result(job_id: str = PathParam(pattern=JOB_PATTERN), codec: Codec = "zstd",
                     wait: float = Query(0.0, ge=0.0, le=600.0, description="long poll: wait up to this "
                                         "many seconds for the job to end"),
                     st: ServerState = Depends(get_state)) -> Response:
    job = st.jobs.get(job_id)
    await st.jobs.wait(job, wait, st.settings.max_wait_s)
    if job.status == "cancelled":
        raise ApiError(409, f"job {job_id} was cancelled; it has no result")
    if job.status == "failed":
        raise ApiError(409, f"job {job_id} failed: {job.error}")
    if job.status != "done" or job.results is None:
        raise ApiError(409, f"job {job_id} is {job.status} ({job.done}/{job.total}); poll /{API}/jobs/{job_id}")
    if codec not in job.encoded:  # encoded once per codec: a client may fetch the result again
        job.encoded[codec] = await encode_results(job.results, job.image, codec)
    return Response(job.encoded[codec], media_type="application/json")


@router.delete("/jobs/{job_id}", responses=responses(_200=JobModel))
async def cancel_job(job_id: str = PathParam(pattern=JOB_PATTERN), st: ServerState = Depends(get_state)) -> Response:
    job = st.jobs.get(job_id)
    st.jobs.cancel(job)
    return json_response(job.public())
