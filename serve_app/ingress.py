"""HTTP ingress: FastAPI routes that validate input and call the deployments through handles.

Read top-down: each route checks its input, asks the encoders for vectors, asks ProductSearch for
products, and shapes the JSON answer. Failures are typed (deployments.errors) and mapped to HTTP
status codes in one place, `error_response`.
"""


import asyncio
import csv
import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from batch_index.demo import generate_demo_catalog
from deployments import metrics
from deployments.errors import BackendUnavailable, InvalidInput, NotFound, SearchError
from deployments.media import EXTENSIONS, sniff_content_type
from deployments.products import Product
from serve_app.schemas import ErrorResponse, ProductPage, ResultItem, SearchResponse, TextQuery
from serve_app.settings import AppSettings

log = logging.getLogger("ray.serve")

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
    elif isinstance(exc, BackendUnavailable | RayActorError | BackPressureError | TimeoutError):
        status = 503
    else:
        status = 500
    if isinstance(exc, SearchError):
        code, message = exc.code, exc.message
    elif status == 503:
        code, message = "unavailable", f"service busy or a component is down, retry: {exc}"
    else:
        code, message = "internal", "internal error"
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


@api.exception_handler(SearchError)
@api.exception_handler(RayActorError)
@api.exception_handler(BackPressureError)
@api.exception_handler(TimeoutError)
async def _on_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, SearchError):
        log.warning("request failed: %s %s: %r", request.method, request.url.path, exc)
    return error_response(exc)


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
              summary="Products that look like an uploaded photo")
    async def search_image(
        self, request: Request, image: Annotated[UploadFile, File(description="Product photo")],
        k: Annotated[int, Query(description="How many results")] = 10,
    ) -> SearchResponse:
        start = time.perf_counter()
        k = self._check_k(k)
        data = await self._read_image(image)
        # The vector goes from the encoder straight to the search replica (Serve resolves a
        # DeploymentResponse passed as an argument), not through this replica.
        vector = self.image_encoder.embed.remote(data)
        hits = await self.search.search.remote("image", vector, k)
        _log_extra(request, modality="image", k=k, results=len(hits))
        return SearchResponse.of(hits, (time.perf_counter() - start) * 1000)

    @api.post("/search/text", response_model=SearchResponse, responses=ERRORS,
              summary="Products that match a description")
    async def search_text(self, request: Request, body: TextQuery) -> SearchResponse:
        start = time.perf_counter()
        k = self._check_k(body.k)
        text = self._check_text(body.query)
        vector = self.text_encoder.embed.remote(text)
        hits = await self.search.search.remote("text", vector, k)
        _log_extra(request, modality="text", k=k, results=len(hits))
        return SearchResponse.of(hits, (time.perf_counter() - start) * 1000)

    # -- catalogue ------------------------------------------------------------------------
    @api.get("/products", response_model=ProductPage, summary="Browse the catalogue")
    async def list_products(
        self, limit: Annotated[int, Query(ge=1, le=100)] = 20,
        offset: Annotated[int, Query(ge=0, le=100_000)] = 0,
    ) -> ProductPage:
        page, total = await self.search.browse.remote(limit, offset)
        return ProductPage(results=[ResultItem.of(p) for p in page], total=total, limit=limit,
                           offset=offset)

    @api.get("/products/{product_id}", response_model=ResultItem, responses=ERRORS,
             summary="One product")
    async def get_product(self, product_id: str) -> ResultItem:
        return ResultItem.of(await self.search.get.remote(product_id))

    @api.get("/products/{product_id}/similar", response_model=SearchResponse, responses=ERRORS,
             summary="Products that look like a catalogue product")
    async def similar(
        self, request: Request, product_id: str,
        k: Annotated[int, Query(description="How many results")] = 10,
    ) -> SearchResponse:
        start = time.perf_counter()
        k = self._check_k(k)
        hits = await self.search.similar.remote(product_id, k)
        _log_extra(request, modality="similar", k=k, results=len(hits))
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
        await self.search.delete.remote(product_id)
        return Response(status_code=204)

    @api.get("/images/{product_id}", responses=ERRORS, summary="The stored product photo",
             response_class=Response)
    async def product_image(self, product_id: str) -> Response:
        data, mime = await self.search.image.remote(product_id)
        return Response(data, media_type=mime, headers={"Cache-Control": "public, max-age=300"})

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
        """Embed a product's photo and text, then store it."""
        image_vector, text_vector = await asyncio.gather(
            self.image_encoder.embed.remote(image),
            self.text_encoder.embed.remote(product.embedding_text()),
        )
        return await self.search.upsert.remote(product, image, image_vector, text_vector)

    async def _read_image(self, upload: UploadFile) -> bytes:
        limit = self.limits.max_upload_bytes
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise InvalidInput(f"upload is larger than {limit} bytes; send a smaller image",
                               code="upload_too_large")
        if not data:
            raise InvalidInput("the image upload is empty", code="invalid_image")
        if sniff_content_type(data) not in EXTENSIONS:
            raise InvalidInput("the upload is not a readable JPEG, PNG, WEBP or GIF image",
                               code="unsupported_media_type")
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
            self.demo_status = "done"
            log.info("demo catalogue indexed: %d products in %.1f s from %s", len(rows),
                     time.perf_counter() - start, Path(demo.dir).resolve())
        except Exception:
            self.demo_status = "failed"
            log.exception("indexing the demo catalogue failed")

