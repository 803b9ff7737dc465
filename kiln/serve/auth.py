"""The API key check and OpenAI-shaped errors, shared by every route of `kiln serve`."""

from __future__ import annotations

import secrets

from fastapi import Request
from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error the client caused, answered as OpenAI answers it: {"error": {message, type, param, code}}."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "invalid_request_error",
        503: "server_overloaded",
    }

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        body = {
            "message": self.message,
            "type": self.TYPES.get(self.status, "api_error"),
            "param": self.param,
            "code": self.code,
        }
        return JSONResponse({"error": body}, status_code=self.status)


def require_api_key(request: Request) -> None:
    """A FastAPI dependency: with `--api-key`, the request needs `Authorization: Bearer KEY`."""
    key = getattr(request.app.state, "api_key", None)
    if not key:
        return
    sent = request.headers.get("authorization", "")
    scheme, _, token = sent.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(
            401, "Incorrect API key provided; send it as 'Authorization: Bearer KEY'", code="invalid_api_key"
        )
