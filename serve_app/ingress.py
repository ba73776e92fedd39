"""HTTP ingress: FastAPI routes that validate input and call the deployments through handles.

Read top-down: each route checks its input, asks the encoders for vectors, asks ProductSearch for
products, and shapes the JSON answer. Failures are typed (deployments.errors) and mapped to HTTP
status codes in one place, `error_response`.
"""

# No `from __future__ import annotations` here: serve.ingress needs the route annotations real.
import asyncio
import csv
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from batch_index.demo import generate_demo_catalog
from deployments import metrics
from deployments.errors import BackendUnavailable, InvalidInput, NotFound, SearchError
from deployments.filters import filters_from_params, parse_filters
from deployments.media import check_image
from deployments.products import Product
from serve_app.schemas import ErrorResponse, ProductPage, ResultItem, SearchResponse, TextQuery
from serve_app.settings import AppSettings

log = logging.getLogger("ray.serve")
T = TypeVar("T")

WEB_DIR = Path(__file__).resolve().parent / "web"
STATUS_BY_CODE = {"upload_too_large": 413, "image_too_large": 413, "unsupported_media_type": 415}
ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
          503: {"model": ErrorResponse}}

api = FastAPI(
    title="Similar-product search",
    description="Find catalogue products similar to a photo or a description.",
    version="0.1.0",
)


def error_response(exc: Exception) -> JSONResponse:
    """The one place failures become HTTP answers: `{"error": {"code", "message"}}`."""
    if isinstance(exc, InvalidInput):
        status = STATUS_BY_CODE.get(exc.code, 400)
    elif isinstance(exc, NotFound):
        status = 404
    elif isinstance(exc, BackendUnavailable | RayActorError | BackPressureError | TimeoutError
                    | ReplicaUnavailableError | DeploymentUnavailableError):
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


@api.exception_handler(SearchError)
@api.exception_handler(RayActorError)
@api.exception_handler(BackPressureError)
@api.exception_handler(ReplicaUnavailableError)
@api.exception_handler(DeploymentUnavailableError)
@api.exception_handler(TimeoutError)
async def _on_error(request: Request, exc: Exception) -> JSONResponse:
    response = error_response(exc)
    error = json.loads(response.body)["error"]
    _log_extra(request, error=f"{error['code']}: {error['message']}"[:500])
    if response.status_code >= 500:
        log.warning("request failed: %s %s: %r", request.method, request.url.path, exc)
    return response


@api.exception_handler(StarletteHTTPException)
async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, exc.status_code,
                        headers=getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
        for e in exc.errors()
    )
    return JSONResponse({"error": {"code": "invalid_request", "message": problems}}, 422)


@api.middleware("http")
async def _log_request(request: Request, call_next):
    """One structured log line and metrics per request."""
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


def replica_failed(exc: BaseException) -> bool:
    """Whether an error means a replica died or vanished (worth retrying elsewhere)."""
    while exc is not None:
        if isinstance(exc, RayActorError | ReplicaUnavailableError | DeploymentUnavailableError):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__
    return False


def _request_id() -> str:
    try:
        return serve.context._get_serve_request_context().request_id
    except Exception:  # outside a Serve request (tests calling routes directly)
        return ""


def _log_extra(request: Request, **fields: Any) -> None:
    """Attach search details to the request's log line."""
    request.scope.setdefault("log_extra", {}).update(fields)


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'product'}: {e['msg']}" for e in exc.errors()
    )


# Helpers above must be defined before this class: serve.ingress serialises it when decorated.
@serve.deployment
@serve.ingress(api)
class SearchAPI:
    """The HTTP API; composes the encoders and ProductSearch through handles."""

    def __init__(
        self, settings: AppSettings, image_encoder: DeploymentHandle,
        text_encoder: DeploymentHandle, search: DeploymentHandle,
    ) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.search = search
        self.demo_status = "disabled"
        if settings.demo.enabled and settings.demo.size:
            self.demo_status = "pending"
            self._demo_task = asyncio.get_running_loop().create_task(self._seed_demo())

    # -- search ---------------------------------------------------------------------------
    @api.post("/search/image", response_model=SearchResponse, responses=ERRORS,
              summary="Products that look like an uploaded photo",
              description="Filters as query parameters: `colour=Red&colour=Blue`, `gender=Men`, "
              "`price_min=10&price_max=50`, `attr.<name>=value` (any field of /attributes).")
    async def search_image(
        self, request: Request, image: Annotated[UploadFile, File(description="Product photo")],
        k: Annotated[int, Query(description="How many results")] = 10,
        explain: Annotated[bool, Query(description="Say why each result ranked")] = False,
    ) -> SearchResponse:
        start = time.perf_counter()
        k = self._check_k(k)
        filters = filters_from_params(request.query_params.multi_items(), {"k", "explain"})
        data = await self._read_image(image)
        # The vector goes from the encoder straight to the search replica (Serve resolves a
        # DeploymentResponse passed as an argument), not through this replica.
        hits = await self._call(lambda: self.search.search_image.remote(
            self.image_encoder.embed.remote(data), k, filters, explain=explain))
        _log_extra(request, modality="image", k=k, filters=filters.used(), results=len(hits))
        return SearchResponse.of(hits, (time.perf_counter() - start) * 1000)

    @api.post("/search/text", response_model=SearchResponse, responses=ERRORS,
              summary="Products that match a description")
    async def search_text(self, request: Request, body: TextQuery) -> SearchResponse:
        start = time.perf_counter()
        k = self._check_k(body.k)
        text = self._check_text(body.query)
        filters = parse_filters(body.filters)
        hits = await self._call(lambda: self.search.search_text.remote(
            self.text_encoder.embed.remote(text), text, k, filters, body.explain))
        _log_extra(request, modality="text", k=k, filters=filters.used(), results=len(hits))
        return SearchResponse.of(hits, (time.perf_counter() - start) * 1000)

    @api.post("/search", response_model=SearchResponse, responses=ERRORS,
              summary="Search by a photo, a description, or both (hybrid)",
              description="Multipart: `image` and/or `query`. With both, the photo and text "
              "searches are fused by Milvus hybrid search: `ranker=rrf` (default) or "
              "`ranker=weighted` with `image_weight` in [0, 1]. Filters as query parameters.")
    async def search(
        self, request: Request,
        image: Annotated[UploadFile | None, File(description="Product photo")] = None,
        query: Annotated[str | None, Form(description="Description")] = None,
        k: Annotated[int, Query()] = 10,
        ranker: Annotated[Literal["rrf", "weighted"], Query()] = "rrf",
        image_weight: Annotated[float, Query(ge=0, le=1)] = 0.5,
        explain: Annotated[bool, Query()] = False,
    ) -> SearchResponse:
        start = time.perf_counter()
        k = self._check_k(k)
        reserved = {"k", "ranker", "image_weight", "explain"}
        filters = filters_from_params(request.query_params.multi_items(), reserved)
        data = await self._read_image(image) if image is not None else None
        text = self._check_text(query) if query is not None and query.strip() else None
        if data is None and text is None:
            raise InvalidInput("send an image, a query, or both", code="empty_query")
        if data is not None and text is not None:
            hits = await self._call(lambda: self.search.hybrid.remote(
                self.image_encoder.embed.remote(data), self.text_encoder.embed.remote(text), k,
                filters, ranker, image_weight))
            modality = "hybrid"
        elif data is not None:
            hits = await self._call(lambda: self.search.search_image.remote(
                self.image_encoder.embed.remote(data), k, filters, explain=explain))
            modality = "image"
        else:
            hits = await self._call(lambda: self.search.search_text.remote(
                self.text_encoder.embed.remote(text), text, k, filters, explain))
            modality = "text"
        _log_extra(request, modality=modality, k=k, filters=filters.used(), results=len(hits))
        return SearchResponse.of(hits, (time.perf_counter() - start) * 1000)

    # -- catalogue ------------------------------------------------------------------------
    @api.get("/products", response_model=ProductPage, summary="Browse the catalogue")
    async def list_products(
        self, limit: Annotated[int, Query(ge=1, le=100)] = 20,
        offset: Annotated[int, Query(ge=0, le=100_000)] = 0,
    ) -> ProductPage:
        page, total = await self._call(lambda: self.search.browse.remote(limit, offset))
        return ProductPage(results=[ResultItem.of(p) for p in page], total=total, limit=limit,
                           offset=offset)

    @api.get("/products/{product_id}", response_model=ResultItem, responses=ERRORS,
             summary="One product")
    async def get_product(self, product_id: str) -> ResultItem:
        return ResultItem.of(await self._call(lambda: self.search.get.remote(product_id)))

    @api.get("/products/{product_id}/similar", response_model=SearchResponse, responses=ERRORS,
             summary="Products that look like a catalogue product",
             description="Accepts the same filter query parameters as /search/image.")
    async def similar(
        self, request: Request, product_id: str,
        k: Annotated[int, Query(description="How many results")] = 10,
        explain: Annotated[bool, Query(description="Say why each result ranked")] = False,
    ) -> SearchResponse:
        start = time.perf_counter()
        k = self._check_k(k)
        filters = filters_from_params(request.query_params.multi_items(), {"k", "explain"})
        hits = await self._call(lambda: self.search.similar.remote(product_id, k, filters,
                                                                   explain))
        _log_extra(request, modality="similar", k=k, filters=filters.used(), results=len(hits))
        return SearchResponse.of(hits, (time.perf_counter() - start) * 1000)

    @api.post("/products", response_model=ResultItem, status_code=201, responses=ERRORS,
              summary="Add or replace a product (by id) with its photo")
    async def upsert_product(
        self,
        image: Annotated[UploadFile, File(description="Product photo")],
        product: Annotated[str, Form(description='JSON: {"id", "title", "category", "colour", '
                                     '"size", "price", "attributes": {...}, ...}')],
    ) -> ResultItem:
        try:
            parsed = Product.model_validate_json(product)
        except ValidationError as exc:
            raise InvalidInput(_validation_message(exc), code="invalid_product") from None
        stored = await self._upsert(parsed, await self._read_image(image))
        return ResultItem.of(stored)

    @api.delete("/products/{product_id}", status_code=204, responses=ERRORS,
                summary="Remove a product")
    async def delete_product(self, product_id: str) -> Response:
        # Not retried: a delete that succeeded before its replica died would then say 404.
        await self._call(lambda: self.search.delete.remote(product_id), retry=False)
        return Response(status_code=204)

    @api.get("/attributes", summary="Filterable fields and their values, with counts")
    async def attributes(self) -> dict[str, dict[str, int]]:
        return await self._call(lambda: self.search.attributes.remote())

    @api.get("/images/{product_id}", responses=ERRORS, summary="The stored product photo",
             response_class=Response)
    async def product_image(self, product_id: str) -> Response:
        data, mime = await self._call(lambda: self.search.image.remote(product_id))
        return Response(data, media_type=mime, headers={"Cache-Control": "public, max-age=300"})

    # -- the shopper's page ---------------------------------------------------------------
    @api.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse((WEB_DIR / "index.html").read_text())

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> FileResponse:
        path = (WEB_DIR / "static" / name).resolve()
        if path.parent != (WEB_DIR / "static").resolve() or not path.is_file():
            raise NotFound(f"no static file {name!r}")
        return FileResponse(path, headers={"Cache-Control": "public, max-age=60"})

    # -- operations -----------------------------------------------------------------------
    @api.get("/healthz", summary="200 when the models are loaded and Milvus answers")
    async def healthz(self) -> JSONResponse:
        timeout = self.settings.milvus.timeout_s
        try:
            dims, store, count = await asyncio.wait_for(asyncio.gather(
                asyncio.gather(self.image_encoder.dim.remote(), self.text_encoder.dim.remote()),
                self.search.health.remote(), self.search.count.remote(),
            ), timeout)
        except Exception as exc:  # any failing part makes the service unhealthy
            body = {"status": "unavailable", "reason": f"{type(exc).__name__}: {exc}"[:300]}
            return JSONResponse(body, 503, headers={"Retry-After": "1"})
        return JSONResponse({
            "status": "ok", "products": count, "demo_catalog": self.demo_status,
            "models": {"image_dim": dims[0], "text_dim": dims[1]}, **store,
        })

    # -- helpers --------------------------------------------------------------------------
    async def _upsert(self, product: Product, image: bytes) -> Product:
        """Embed a product's photo and text, then store it (idempotent: upsert by id)."""
        return await self._call(lambda: self.search.upsert.remote(
            product, image, self.image_encoder.embed.remote(image),
            self.text_encoder.embed.remote(product.embedding_text())))

    async def _call(self, make: Callable[[], Awaitable[T]], retry: bool = True) -> T:
        """Await a handle call within the request's time budget; retry it (bounded, with
        backoff) when a replica died under it, so Serve routes it to a live one."""
        policy = self.settings.resilience
        attempt_timeout = policy.attempt_timeout_s if retry else policy.request_timeout_s
        async with asyncio.timeout(policy.request_timeout_s):
            for attempt in itertools.count():
                try:
                    async with asyncio.timeout(attempt_timeout):
                        return await make()
                except Exception as exc:
                    # A try that timed out is likely stuck on a lost node: try another replica.
                    stuck = isinstance(exc, TimeoutError)
                    if not (retry and attempt < policy.retries and (stuck or replica_failed(exc))):
                        raise
                    log.warning("retrying after replica failure: %r", exc)
                    await asyncio.sleep(policy.retry_backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    async def _read_image(self, upload: UploadFile) -> bytes:
        limit = self.limits.max_upload_bytes
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise InvalidInput(f"upload is larger than {limit} bytes; send a smaller image",
                               code="upload_too_large")
        if not data:
            raise InvalidInput("the image upload is empty", code="invalid_image")
        check_image(data, self.limits.max_image_pixels)
        return data

    def _check_k(self, k: int) -> int:
        if not 1 <= k <= self.limits.max_k:
            raise InvalidInput(f"k must be between 1 and {self.limits.max_k}", code="invalid_k")
        return k

    def _check_text(self, text: str) -> str:
        text = text.strip()
        if not text:
            raise InvalidInput("the query text is empty; type a description", code="empty_query")
        if len(text) > self.limits.max_text_chars:
            raise InvalidInput(
                f"the query is {len(text)} characters; the limit is {self.limits.max_text_chars}",
                code="query_too_long",
            )
        return text

    async def _seed_demo(self) -> None:
        """Index the synthetic demo catalogue when the collection is empty."""
        try:
            if await self.search.count.remote() > 0:
                self.demo_status = "skipped (catalogue not empty)"
                return
            self.demo_status = "indexing"
            demo = self.settings.demo
            csv_path = await asyncio.to_thread(generate_demo_catalog, demo.dir, demo.size)
            rows = list(csv.DictReader(csv_path.open()))
            limiter = asyncio.Semaphore(16)

            async def index(row: dict[str, Any]) -> None:
                async with limiter:
                    image = (csv_path.parent / row.pop("image")).read_bytes()
                    extra = {"pattern": row.pop("pattern")}
                    await self._upsert(Product(**row, attributes=extra), image)

            start = time.perf_counter()
            await asyncio.gather(*(index(r) for r in rows))
            await self.search.flush.remote()
            self.demo_status = "done"
            log.info("demo catalogue indexed: %d products in %.1f s from %s", len(rows),
                     time.perf_counter() - start, Path(demo.dir).resolve())
        except Exception:
            self.demo_status = "failed"
            log.exception("indexing the demo catalogue failed")

