"""Segmenting: one slice is answered at once; anything more becomes a job (routes/jobs.py) the client polls."""

from __future__ import annotations

import math
import uuid

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from ..auth import require_token
from ..checks import check_modality, n_slices
from ..errors import ApiError, json_response, one_line
from ..glue import accepts, encode_results, require_registry
from ..jobs import Job
from ..limits import check_job_slots, check_output_cost, checked_prompts
from ..models import API, JobModel, SegmentRequest, SegmentResponse, responses
from ..state import ServerState, get_state

router = APIRouter(prefix=f"/{API}", dependencies=[Depends(require_token)])


def _accepted(job: Job) -> Response:
    return json_response(job.public(), 202, {"Location": f"/{API}/jobs/{job.id}"})


@router.post("/segment", responses=responses(409, 501, _200=SegmentResponse, _202=JobModel))
async def segment(req: SegmentRequest, st: ServerState = Depends(get_state)) -> Response:
    from ...engine import Cancelled, Engine

    st.require_engine()
    prompts = checked_prompts(st, req)
    check_modality(req.modality)
    retried = st.jobs.by_idempotency_key(req.idempotency_key)
    if retried is not None:
        return _accepted(retried)
    volume = st.image(req.image)
    check_output_cost(st, len(prompts), math.prod(volume.array.shape[:3]))
    n = n_slices(volume, req.axis)
    slices = None if req.slices is None else (req.slices[0], req.slices[1])
    try:
        lo, hi = Engine._check_range(slices, n)
    except ValueError as exc:
        raise ApiError(422, one_line(exc)) from None
    if req.registry:
        if not accepts(st.engine.segment_many, "registry"):
            raise ApiError(501, "this engine has no class registry (one-shot adaptation) yet")
        require_registry(st.settings, st.engine)
    params = {"modality": req.modality, "axis": req.axis, "slices": slices, "registry": req.registry}

    if hi - lo == 1 and not req.job:
        try:
            results = await st.on_model(lambda: st.segment_now(volume, prompts, params))
        except Cancelled:
            raise ApiError(409, "cancelled") from None
        except ValueError as exc:
            raise ApiError(422, one_line(exc)) from None
        return Response(await encode_results(results, req.image, req.codec), media_type="application/json")

    check_job_slots(st)
    job = Job(id=uuid.uuid4().hex, image=req.image, prompts=prompts, total=hi - lo, key=req.idempotency_key)
    st.submit_job(job, volume, params, (lo, hi))
    return _accepted(job)
