"""HTTP plumbing of the ingress: failures to status codes (the one mapping), exception handlers,
the per-request log line and metrics, request body limits, CORS, and filters read from a route's
query string.

Every error answer is `{"error": {"code", "message"}}`, never a stack trace or a file path; 503s
carry `Retry-After`, 401s `WWW-Authenticate: Bearer`. Bodies are bounded before they are read
(`BodyLimit`); CORS headers are sent only for the origins in `http.cors_origins`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments import metrics
from deployments.core.errors import (
    BackendUnavailable,
    Forbidden,
    IncompatibleStore,
    InvalidInput,
    NotFound,
    SearchError,
    Unauthorized,
    validation_message,
)
from deployments.core.filters import Filters, filters_from_params
from deployments.core.settings import AppSettings, LimitSettings

log = logging.getLogger("ray.serve")

STATUS_BY_CODE = {"upload_too_large": 413, "image_too_large": 413, "body_too_large": 413,
                  "unsupported_media_type": 415}
UNAVAILABLE = (BackendUnavailable, IncompatibleStore, RayActorError, BackPressureError,
               TimeoutError, ReplicaUnavailableError, DeploymentUnavailableError)
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


# What must never reach a client: a traceback, or a path on the server's disk.
_INTERNAL = re.compile(r"Traceback|File \"|site-packages|\.py\b|(?<![\w.:/])/(?:[\w.@+-]+/)+")


def describe(exc: Exception) -> tuple[int, str, str]:
    """(status, code, message) of a failure: the mapping `error_response` answers with."""
    if isinstance(exc, InvalidInput):
        status = STATUS_BY_CODE.get(exc.code, 400)
    elif isinstance(exc, NotFound):
        status = 404
    elif isinstance(exc, Unauthorized):
        status = 401
    elif isinstance(exc, Forbidden):
        status = 403
    elif isinstance(exc, UNAVAILABLE):
        status = 503
    else:
        status = 500
    if isinstance(exc, SearchError):
        code, message = exc.code, exc.message
    elif isinstance(exc, TimeoutError):
        code, message = "timeout", "the request took longer than its time budget; retry"
    elif status == 503:
        code, message = "unavailable", "service busy or a component is down; retry shortly"
    else:
        code, message = "internal", "internal error"
    if status >= 500 and _INTERNAL.search(message):  # a backend's error text: keep it in the log
        message = ("service busy or a component is down; retry shortly" if status == 503
                   else "internal error")
    return status, code, message


def error_response(exc: Exception) -> JSONResponse:
    """The one place failures become HTTP answers: `{"error": {"code", "message"}}`."""
    status, code, message = describe(exc)
    headers = None
    if status == 503:
        headers = {"Retry-After": "1"}
    elif status == 401:
        # RFC 6750: no credential -> just the scheme; a wrong one -> error="invalid_token".
        headers = {"WWW-Authenticate": 'Bearer realm="shopsearch"' if code ==
                   "missing_credentials" else 'Bearer realm="shopsearch", error="invalid_token"'}
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


def replica_failed(exc: BaseException | None) -> bool:
    """Whether an error means a replica died or vanished (worth retrying elsewhere)."""
    while exc is not None:
        if isinstance(exc, REPLICA_LOST):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__
    return False


def invalid_body(exc: ValidationError, code: str) -> InvalidInput:
    """A pydantic error in a request part (e.g. the product JSON) as a 400 naming the field."""
    return InvalidInput(validation_message(exc.errors()), code=code)


def query_filters(request: Request) -> Filters:
    """The filters in a search route's query string: every parameter the route does not
    declare itself (`k`, `explain`, ...) is a filter (deployments.core.filters)."""
    route = request.scope.get("route")
    own = {p.alias for p in route.dependant.query_params} if route is not None else set()
    return filters_from_params(request.query_params.multi_items(), own)


def log_extra(request: Request, **fields: Any) -> None:
    """Attach details (modality, k, filters, results) to the request's log line."""
    request.scope.setdefault("log_extra", {}).update(fields)


def _request_id() -> str:
    # Serve's own id, also sent back as the x-request-id header.
    try:
        return serve.context._get_serve_request_context().request_id
    except Exception:  # outside a Serve request (tests calling routes directly)
        return ""


async def _on_error(request: Request, exc: Exception) -> JSONResponse:
    response = error_response(exc)
    error = json.loads(response.body)["error"]
    log_extra(request, error=f"{error['code']}: {error['message']}"[:500])
    if response.status_code >= 500:
        log.warning("request failed: %s %s: %r", request.method, request.url.path, exc)
    return response


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
        exc.status_code, "http_error")
    return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message = validation_message(list(exc.errors()))
    return JSONResponse({"error": {"code": "invalid_request", "message": message}}, 422)


class HttpMiddleware:
    """Plain ASGI middleware for HTTP requests (`handle`); anything else (lifespan, websockets),
    and requests it does not apply to (`applies`), passes straight through. Starlette's
    `BaseHTTPMiddleware` (`@app.middleware("http")`) runs each request through an extra task and
    memory streams, which cost the ingress CPU on every query."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def applies(self) -> bool:
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.applies():
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class RequestLog(HttpMiddleware):
    """One structured log line (request id, route, status, duration, the route's extra fields)
    and the request metrics per HTTP request."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status = 500  # an exception that escapes every handler is answered 500 outside

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            _log(scope, status, (time.perf_counter() - start) * 1000)


def _log(scope: Scope, status: int, ms: float) -> None:
    path = getattr(scope.get("route"), "path", "unmatched")
    metrics.requests().inc(tags={"route": path, "status": str(status)})
    metrics.request_latency_ms().observe(ms, tags={"route": path})
    fields = {"request_id": _request_id(), "method": scope["method"], "route": path,
              "status": status, "duration_ms": round(ms, 2), **scope.get("log_extra", {})}
    log.info("request %s", json.dumps(fields), extra=fields)


# -- per-replica configuration ------------------------------------------------------------------
# Serve runs each ingress replica in its own process and serves a frozen copy of the FastAPI app,
# so the replica's constructor hands its settings to the middleware here (`configure`).
_limits = LimitSettings()
_cors_origins: tuple[str, ...] = ()


def configure(settings: AppSettings) -> None:
    """Body limits and CORS origins of this replica (called from the ingress constructor)."""
    global _limits, _cors_origins
    _limits = settings.limits
    _cors_origins = tuple(settings.http.cors_origins)


def body_limit(headers: Headers, limits: LimitSettings | None = None) -> int:
    """The most bytes a request body may have: an upload plus its form fields for multipart,
    `max_json_bytes` for anything else (JSON, url-encoded forms, raw bodies)."""
    limits = limits or _limits
    if headers.get("content-type", "").lower().startswith("multipart/"):
        return limits.max_upload_bytes + limits.max_form_overhead_bytes
    return limits.max_json_bytes


class BodyLimit(HttpMiddleware):
    """Bounds a request body before it is read: a declared Content-Length over the limit is
    answered 413 at once, and a body that streams past the limit (chunked, or lying about its
    length) is cut off there and answered 413; the route never sees more than the limit."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        limit = body_limit(headers)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            exc = (InvalidInput("invalid Content-Length header", code="invalid_request")
                   if not declared.isdigit() else self._too_large(limit))
            await error_response(exc)(scope, receive, send)
            return
        received, exceeded, started = 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise self._too_large(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the route's answer to a cut-off body is replaced by the 413 below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded or started:
                raise
        if exceeded and not started:
            await error_response(self._too_large(limit))(scope, receive, send)

    @staticmethod
    def _too_large(limit: int) -> InvalidInput:
        return InvalidInput(f"the request body is larger than {limit} bytes; send a smaller "
                            "one", code="body_too_large")


class ConfiguredCORS(HttpMiddleware):
    """Starlette's CORSMiddleware for the origins in `http.cors_origins`; with none configured
    (the default) requests pass straight through and no CORS header is ever sent."""

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app)
        self._origins: tuple[str, ...] = ()
        self._cors: CORSMiddleware | None = None

    def applies(self) -> bool:
        return bool(_cors_origins)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._cors is None or self._origins != _cors_origins:
            self._origins = _cors_origins
            self._cors = CORSMiddleware(
                self.app, allow_origins=list(_cors_origins), allow_methods=["GET", "POST",
                "DELETE"], allow_headers=["Authorization", "Content-Type"], max_age=600)
        await self._cors(scope, receive, send)


def install(api: FastAPI) -> None:
    """Register the exception handlers and the middleware on the app: CORS outermost, then the
    log line (so it records every answer, 413s included), then the body limit."""
    for exc_type in (SearchError, *UNAVAILABLE):
        api.add_exception_handler(exc_type, _on_error)
    api.add_exception_handler(StarletteHTTPException, _on_http_error)
    api.add_exception_handler(RequestValidationError, _on_validation_error)
    api.add_exception_handler(Exception, _on_error)  # any other bug: JSON 500, no traceback
    api.add_middleware(BodyLimit)
    api.add_middleware(RequestLog)
    api.add_middleware(ConfiguredCORS)
