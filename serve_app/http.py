"""HTTP plumbing of the ingress: failures to status codes (the one mapping), exception handlers,
the per-request log line and metrics, and filters read from a route's query string.

Every error answer is `{"error": {"code", "message"}}`; 503s carry `Retry-After`.
"""

from __future__ import annotations

import json
import logging
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
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import metrics
from deployments.core.errors import (
    BackendUnavailable,
    IncompatibleStore,
    InvalidInput,
    NotFound,
    SearchError,
    validation_message,
)
from deployments.core.filters import Filters, filters_from_params

log = logging.getLogger("ray.serve")

STATUS_BY_CODE = {"upload_too_large": 413, "image_too_large": 413, "unsupported_media_type": 415}
UNAVAILABLE = (BackendUnavailable, IncompatibleStore, RayActorError, BackPressureError,
               TimeoutError, ReplicaUnavailableError, DeploymentUnavailableError)
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


def error_response(exc: Exception) -> JSONResponse:
    """The one place failures become HTTP answers: `{"error": {"code", "message"}}`."""
    if isinstance(exc, InvalidInput):
        status = STATUS_BY_CODE.get(exc.code, 400)
    elif isinstance(exc, NotFound):
        status = 404
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
    headers = {"Retry-After": "1"} if status == 503 else None
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
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message = validation_message(list(exc.errors()))
    return JSONResponse({"error": {"code": "invalid_request", "message": message}}, 422)


async def _log_request(request: Request, call_next):
    """One structured log line (request id, route, status, duration) and metrics per request."""
    start = time.perf_counter()
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        ms = (time.perf_counter() - start) * 1000
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests().inc(tags={"route": path, "status": str(status)})
        metrics.request_latency_ms().observe(ms, tags={"route": path})
        fields = {"request_id": _request_id(), "method": request.method, "route": path,
                  "status": status, "duration_ms": round(ms, 2),
                  **request.scope.get("log_extra", {})}
        log.info("request %s", json.dumps(fields), extra=fields)


def install(api: FastAPI) -> None:
    """Register the exception handlers and the logging middleware on the app."""
    for exc_type in (SearchError, *UNAVAILABLE):
        api.add_exception_handler(exc_type, _on_error)
    api.add_exception_handler(StarletteHTTPException, _on_http_error)
    api.add_exception_handler(RequestValidationError, _on_validation_error)
    api.middleware("http")(_log_request)
