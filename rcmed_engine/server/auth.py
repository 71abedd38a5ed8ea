"""Bearer-token authentication, a dependency of every route but health and the OpenAPI document."""

from __future__ import annotations

import hmac

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError
from .state import ServerState, get_state

bearer = HTTPBearer(auto_error=False, description="the server's token: rcmed serve --token or RCMED_TOKEN")


async def require_token(cred: HTTPAuthorizationCredentials | None = Depends(bearer),
                        st: ServerState = Depends(get_state)) -> None:
    given = (cred.credentials if cred is not None else "").encode("utf-8", "surrogateescape")
    # compare_digest: the time taken says nothing about how much of the token was right.
    if cred is None or not hmac.compare_digest(given, st.token):
        raise ApiError(401, "missing or wrong bearer token: send 'Authorization: Bearer TOKEN' with the "
                            "server's token (rcmed serve --token or RCMED_TOKEN)", {"WWW-Authenticate": "Bearer"})
