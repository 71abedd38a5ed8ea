"""The app factory: state, error handlers, the body limit and one router per resource."""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import FastAPI

from .. import __version__
from .errors import add_exception_handlers
from .bodies import BodyLimit
from .models import API
from .routes import classes, health, images, info, jobs, refine, segment
from .settings import ServerSettings
from .state import ServerState
from .timing import ServerTiming

# Included in this order: it is the order of the paths in the OpenAPI document.
ROUTERS = (health.router, info.router, images.router, refine.router, segment.router, jobs.router, classes.router)


def create_app(engine: Any, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app around ``engine``: an Engine, or a callable that loads one (then the server
    answers liveness at once and readiness when the model is loaded)."""
    settings = settings or ServerSettings()
    token, _ = settings.resolved_token()
    st = ServerState(engine, settings, token)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        st.start()
        try:
            yield
        finally:
            st.stop()

    app = FastAPI(title="RCMed engine", version=__version__, lifespan=lifespan,
                  openapi_url=f"/{API}/openapi.json", docs_url=None, redoc_url=None,
                  description="Text-prompted medical image segmentation. Wire format: rcmed_engine.wire.")
    app.state.rcmed = st  # routes reach it through state.get_state
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes, timeout_s=settings.body_timeout_s,
                       pool=st.decoders)
    app.add_middleware(ServerTiming)  # outermost: its app time includes reading the body
    add_exception_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app
