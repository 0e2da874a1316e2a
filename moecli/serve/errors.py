"""Errors of the HTTP API: a status and one message, rendered as OpenAI's error object on /v1 and as ollama's
`{"error": "..."}` on /api."""
from __future__ import annotations

from starlette.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def openai(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def ollama(self) -> dict:
        return {"error": self.message}


def ollama_style(path: str) -> bool:
    return path.startswith("/api/") or path == "/api"


def error_response(e: APIError, path: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.ollama() if ollama_style(path) else e.openai(), status_code=e.status, headers=headers)
