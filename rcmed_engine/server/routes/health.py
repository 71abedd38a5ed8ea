"""Liveness and readiness: open to everyone (no token), so that a load balancer or the client can ask."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from ... import __version__
from ..errors import json_response
from ..models import API, HealthModel
from ..state import ServerState, get_state

router = APIRouter(prefix=f"/{API}", tags=["health"])


@router.get("/health", response_model=HealthModel)
async def health(st: ServerState = Depends(get_state)) -> Response:
    return json_response({"status": "ok", "ready": st.engine is not None, "version": __version__,
                          "error": st.load_error})


@router.get("/health/ready", response_model=HealthModel, responses={503: {"model": HealthModel}})
async def ready(st: ServerState = Depends(get_state)) -> Response:
    ok = st.engine is not None
    return json_response({"status": "ok" if ok else ("failed" if st.load_error else "loading"), "ready": ok,
                          "version": __version__, "error": st.load_error}, 200 if ok else 503)
