"""``rcmed serve``: run the app on uvicorn, say where it listens and with which token."""

from __future__ import annotations

import ipaddress
import sys
from typing import Any

from .app import create_app
from .memory import bound_problem, describe_bound
from .models import API
from .settings import ServerSettings
from .state import ServerState


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(engine: Any, settings: ServerSettings | None = None, *, log_level: str = "info",
          out: Any = None) -> int:
    """Run the server until interrupted (``rcmed serve``). ``engine``: an Engine or a callable that
    loads one. Prints where it listens and, when it generated one, the token. Returns 0, or raises
    RuntimeError when the model failed to load."""
    import uvicorn

    out = out or sys.stdout
    settings = settings or ServerSettings()
    token, generated = settings.resolved_token()
    settings = ServerSettings(**{**settings.__dict__, "token": token})
    app = create_app(engine, settings)
    st: ServerState = app.state.rcmed
    problem = bound_problem(st.bound, settings) if settings.check_memory else None
    if problem:
        raise RuntimeError(f"refusing to start: {problem}")
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            access_log=log_level == "debug", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    def stop_on_failure(message: str) -> None:
        server.should_exit = True

    st.on_load_error = stop_on_failure
    import socket

    try:
        infos = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as exc:
        raise RuntimeError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    if not is_loopback(settings.host):
        print(f"rcmed serve: warning: listening on {settings.host}, not loopback: anyone who can reach this "
              "address and knows the token can use the engine; put TLS in front of it", file=sys.stderr)
    print(f"rcmed serve: http://{settings.host}:{settings.port}/{API} (preset loading in the background; "
          f"GET /{API}/health/ready says when it is ready)", file=out, flush=True)
    print(f"rcmed serve: {describe_bound(st.bound)} (GET /{API}/info: memory)", file=out, flush=True)
    if generated:
        print(f"rcmed serve: generated token (give it to clients with --token or RCMED_TOKEN): {token}",
              file=out, flush=True)
    server.run()
    if st.load_error:
        raise RuntimeError(f"the model failed to load: {st.load_error}")
    return 0
