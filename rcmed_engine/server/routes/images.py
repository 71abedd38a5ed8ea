"""Images: uploaded once, named by their content hash, kept in the image cache until evicted or deleted."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from ..auth import require_token
from ..checks import check_modality, n_slices
from ..errors import ApiError, json_response
from ..limits import upload_body
from ..models import API, ID_PATTERN, ImageModel, PrepareRequest, PrepareResponse, responses
from ..state import ServerState, get_state
from ..uploads import describe, ingest

router = APIRouter(prefix=f"/{API}", dependencies=[Depends(require_token)])

# The body is read raw (a frame or a file), so the OpenAPI document is told what it is.
UPLOAD_BODY = {"requestBody": {"required": True, "description": "an RCMA array frame (rcmed_engine.wire) or a "
                                                                "NIfTI (.nii, .nii.gz) or NRRD file",
                               "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                   "format": "binary"}}}}}


@router.post("/images", status_code=201, openapi_extra=UPLOAD_BODY,
             responses=responses(_200=ImageModel, _201=ImageModel))
async def upload_image(request: Request, st: ServerState = Depends(get_state)) -> Response:
    # A place in the decode pool first (or 503 at once), then the body: at most decode_workers bodies and
    # decodes are in memory at any time, each within the per-request budget.
    async with st.decoders.slot():
        body = await upload_body(request, st)
        try:
            desc, created = await run_in_threadpool(ingest, st, body)
        finally:
            del body
            st.note_rss()
    return json_response(desc, 201 if created else 200)


@router.get("/images/{image_id}", responses=responses(_200=ImageModel))
async def get_image(image_id: str = PathParam(pattern=ID_PATTERN), st: ServerState = Depends(get_state)) -> Response:
    return json_response(describe(image_id, st.image(image_id), existed=True))


@router.head("/images/{image_id}", responses=responses())
async def has_image(image_id: str = PathParam(pattern=ID_PATTERN), st: ServerState = Depends(get_state)) -> Response:
    st.image(image_id)
    return Response(status_code=200)


@router.delete("/images/{image_id}", responses=responses())
async def delete_image(image_id: str = PathParam(pattern=ID_PATTERN),
                       st: ServerState = Depends(get_state)) -> Response:
    if not st.images.remove(image_id):
        raise ApiError(404, f"unknown image {image_id}")
    return json_response({"deleted": image_id})


@router.post("/images/{image_id}/prepare", responses=responses(_200=PrepareResponse))
async def prepare_image(req: PrepareRequest, image_id: str = PathParam(pattern=ID_PATTERN),
                        st: ServerState = Depends(get_state)) -> Response:
    engine = st.require_engine()
    volume = st.image(image_id)
    n = n_slices(volume, req.axis)
    if req.slices is not None and not all(0 <= s < n for s in req.slices):
        raise ApiError(422, f"slice indices must lie in 0..{n - 1} along the {req.axis} axis")
    check_modality(req.modality)
    keys = await st.on_model(lambda: engine.set_image(volume, modality=req.modality, axis=req.axis,
                                                      slices=req.slices))
    return json_response({"keys": list(keys)})
