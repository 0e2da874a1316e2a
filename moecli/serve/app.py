"""The ASGI application: the OpenAI and ollama routes over one Service, behind a body-size limit and an optional API
key; every failure is a JSON error in the route family's shape (OpenAI's object on /v1, ollama's on /api), never a
traceback, and the server goes on serving."""
from __future__ import annotations

import hmac
import logging
import os

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from moecli.serve import ollama_api, openai_api
from moecli.serve.errors import APIError, error_response, ollama_style

DEFAULT_MAX_BODY = 8 * 1024 * 1024
log = logging.getLogger("moecli.serve")


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: API key (Authorization: Bearer) and a request-body limit, before any route reads a byte."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and path not in ("/", "/health"):
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                msg = "invalid API key" if token else "an API key is required (Authorization: Bearer KEY)"
                return await error_response(APIError(401, msg, code="invalid_api_key"), path)(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._too_large(scope, receive, send, path)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge
            return message

        return await self.app(scope, limited, send)

    async def _too_large(self, scope, receive, send, path):
        e = APIError(413, f"the request body is larger than {self.max_body} bytes")
        await error_response(e, path)(scope, receive, send)


def endpoint(fn):
    """A route whose failures become JSON errors: APIError as itself, anything else as a 500 without a traceback."""

    async def run(request):
        try:
            return await fn(request)
        except APIError as e:
            return error_response(e, request.url.path)
        except BodyTooLarge:
            limit = request.app.state.max_body
            return error_response(APIError(413, f"the request body is larger than {limit} bytes"), request.url.path)
        except ClientDisconnect:
            return PlainTextResponse("", status_code=499)
        except Exception as e:  # noqa: BLE001 - last line of defence: the server keeps serving
            if os.environ.get("MOECLI_DEBUG"):
                log.exception("internal error")
            else:
                log.error("internal error on %s: %s: %s", request.url.path, type(e).__name__, e)
            return error_response(APIError(500, f"internal error: {type(e).__name__}"), request.url.path)

    return run


async def root(request):
    return PlainTextResponse("moecli is running (OpenAI API on /v1, ollama API on /api)")


async def health(request):
    return JSONResponse({"status": "ok"})


async def _http_error(request, exc: HTTPException):
    msg = {404: f"no route {request.url.path[:200]}", 405: f"method {request.method} not allowed on this route"}
    return error_response(APIError(exc.status_code, msg.get(exc.status_code, str(exc.detail))), request.url.path)


def build_app(service, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY) -> Guard:
    routes = [Route("/", root, methods=["GET", "HEAD"]), Route("/health", health, methods=["GET"])]
    for path, fn, methods in openai_api.ROUTES + ollama_api.ROUTES:
        routes.append(Route(path, endpoint(fn), methods=methods))
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.state.service = service
    app.state.max_body = max_body
    return Guard(app, api_key, max_body)


__all__ = ["build_app", "ollama_style"]
