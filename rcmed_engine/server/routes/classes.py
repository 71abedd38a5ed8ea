"""Registered classes (one-shot adaptation): list, register from one labelled slice, remove.

All of them use the server's registry (rcmed serve --registry) and run on the model thread."""

from __future__ import annotations

from typing import Any, Callable

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from ... import wire
from ...geometry import Volume
from ..auth import require_token
from ..checks import n_slices
from ..errors import ApiError, json_response, one_line
from ..glue import call_registry, jsonable, require_registry
from ..limits import check_label_map_cost
from ..models import API, ClassesModel, ClassModel, RegisterRequest, responses
from ..state import ServerState, get_state

router = APIRouter(prefix=f"/{API}", dependencies=[Depends(require_token)])


def _registry_method(st: ServerState, name: str) -> Callable:
    engine = st.require_engine()
    fn = getattr(engine, name, None)
    if fn is None:
        raise ApiError(501, "this engine has no class registry (one-shot adaptation) yet: "
                            f"Engine.{name} is missing")
    require_registry(st.settings, engine)
    return fn


@router.get("/classes", responses=responses(501, _200=ClassesModel))
async def list_classes(st: ServerState = Depends(get_state)) -> Response:
    fn = _registry_method(st, "list_classes")
    classes = await st.on_model(lambda: call_registry(st.settings, fn))
    return json_response({"classes": jsonable(list(classes or []))})


@router.post("/classes", status_code=201, responses=responses(409, 501, _201=ClassModel))
async def register_class(req: RegisterRequest, st: ServerState = Depends(get_state)) -> Response:
    fn = _registry_method(st, "register_class")
    volume = st.image(req.image)
    # Checked before decoding: the shape from the JSON, what decoding costs against the request budget.
    if tuple(req.mask.shape) != tuple(volume.array.shape[:3]):
        raise ApiError(422, f"the mask's shape {list(req.mask.shape)} differs from the image's "
                            f"{list(volume.array.shape[:3])}")
    check_label_map_cost(st, req.mask.shape)
    async with st.decoders.slot():
        mask = await run_in_threadpool(wire.decode_labels, req.mask.model_dump(), st.settings.max_voxels)
    if not mask.any():
        raise ApiError(422, "the mask is empty: outline the structure on at least one slice")
    n = n_slices(volume, req.axis)
    if req.slice is not None and req.slice >= n:
        raise ApiError(422, f"slice {req.slice} is out of bounds: the {req.axis} axis has slices 0..{n - 1}")
    mask_volume = Volume(mask, volume.geometry, {})

    def run() -> Any:
        return call_registry(st.settings, fn, volume, mask_volume, req.name, label=req.label, axis=req.axis,
                             slice=req.slice, modality=req.modality)

    try:
        info = await st.on_model(run)
    except ValueError as exc:
        raise ApiError(422, one_line(exc)) from None
    return json_response({"name": req.name, "info": jsonable(info)}, 201)


@router.delete("/classes/{name}", responses=responses(501, _200=ClassModel))
async def remove_class(name: str = PathParam(min_length=1, max_length=200),
                       st: ServerState = Depends(get_state)) -> Response:
    fn = _registry_method(st, "remove_class")
    try:
        info = await st.on_model(lambda: call_registry(st.settings, fn, name))
    except KeyError:
        raise ApiError(404, f"no class named {name!r} is registered") from None
    except ValueError as exc:
        raise ApiError(422, one_line(exc)) from None
    if info is False:
        raise ApiError(404, f"no class named {name!r} is registered")
    return json_response({"name": name, "info": jsonable(info)})
