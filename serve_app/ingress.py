"""HTTP ingress: the FastAPI routes. Each checks its input, sends the photo or text to an encoder
deployment and the vector on to ProductSearch (Serve passes one handle's response straight into the
next call, so vectors never travel through this replica), and shapes the JSON answer.

Errors, logs, body limits and CORS: serve_app.http; retries and deadlines: serve_app.resilience;
write keys: serve_app.auth (every route that changes the catalogue depends on
`auth.require_writer`; search, browse, images, the page and /healthz stay public).
"""

# No `from __future__ import annotations` here: serve.ingress needs the route annotations real.
import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.core.errors import InvalidInput, NotFound
from deployments.core.filters import Filters, parse_filters
from deployments.core.images import ACCEPTED_TEXT, check_image
from deployments.core.products import ID_PATTERN, Product
from deployments.core.settings import AppSettings
from deployments.core.store import Hit
from serve_app import auth, http, resilience
from serve_app.schemas import ErrorResponse, ProductPage, ResultItem, SearchResponse, TextQuery
from serve_app.seeding import DemoSeeder

T = TypeVar("T")
WEB_DIR = Path(__file__).resolve().parent / "web"
ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
          503: {"model": ErrorResponse}}
WRITE_ERRORS = {**ERRORS, 401: {"model": ErrorResponse}, 403: {"model": ErrorResponse},
                413: {"model": ErrorResponse}}
# Every route that changes state: a valid `Authorization: Bearer <key>` (serve_app.auth).
WRITER = [Depends(auth.require_writer)]
VALID_ID = re.compile(ID_PATTERN)
STATIC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*")
log = logging.getLogger("ray.serve")
# The accepted photo formats (deployments.core.images), in the docs of every upload route.
PHOTO_FORMATS = (f"Photo formats: {ACCEPTED_TEXT} (a phone's multi-picture JPEG counts as JPEG; "
                 "of an animation, the first frame is used). Others get 415.")
PHOTO = f"Product photo ({ACCEPTED_TEXT})"

api = FastAPI(
    title="Similar-product search",
    description="Find catalogue products similar to a photo or a description.",
    version="0.1.0",
)
http.install(api)


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
        self.product_search = search  # the ProductSearch handle (`search` is a route)
        http.configure(settings)  # body limits and CORS of this replica's middleware
        self.auth = auth.configure(settings.auth)  # write keys (or the generated key file)
        self.demo = DemoSeeder(settings.demo)
        if self.demo.status == "pending":
            self._demo_task = asyncio.get_running_loop().create_task(
                self.demo.run(search, self._upsert))

    # -- search ---------------------------------------------------------------------------
    @api.post("/search/image", response_model=SearchResponse, responses=ERRORS,
              summary="Products that look like an uploaded photo",
              description="Filters as query parameters: `colour=Red&colour=Blue`, `gender=Men`, "
              "`price_min=10&price_max=50`, `attr.<name>=value` (any field of /attributes). "
              + PHOTO_FORMATS)
    async def search_image(
        self, request: Request, image: Annotated[UploadFile, File(description=PHOTO)],
        k: Annotated[int, Query(description="How many results")] = 10,
        explain: Annotated[bool, Query(description="Say why each result ranked")] = False,
    ) -> SearchResponse:
        data = await self._read_image(image)
        products = self.product_search
        return await self._search(request, "image", k, lambda k, filters: products.by_image
                                  .remote(self.image_encoder.embed.remote(data), k, filters,
                                          explain))

    @api.post("/search/text", response_model=SearchResponse, responses=ERRORS,
              summary="Products that match a description")
    async def search_text(self, request: Request, body: TextQuery) -> SearchResponse:
        text = self._check_text(body.query)
        filters = parse_filters(body.filters)
        products = self.product_search
        return await self._search(request, "text", body.k, lambda k, _: products.by_text
                                  .remote(self.text_encoder.embed.remote(text), text, k,
                                          filters, body.explain), filters)

    @api.post("/search", response_model=SearchResponse, responses=ERRORS,
              summary="Search by a photo, a description, or both (hybrid)",
              description="Multipart: `image` and/or `query`. With both, the photo and text "
              "searches are fused by Milvus hybrid search: `ranker=rrf` (default) or "
              "`ranker=weighted` with `image_weight` in [0, 1]. Filters as query parameters. "
              + PHOTO_FORMATS)
    async def search(
        self, request: Request,
        image: Annotated[UploadFile | None, File(description=PHOTO)] = None,
        query: Annotated[str | None, Form(description="Description")] = None,
        k: Annotated[int, Query()] = 10,
        ranker: Annotated[Literal["rrf", "weighted"], Query()] = "rrf",
        image_weight: Annotated[float, Query(ge=0, le=1)] = 0.5,
        explain: Annotated[bool, Query()] = False,
    ) -> SearchResponse:
        data = await self._read_image(image) if image is not None else None
        text = self._check_text(query) if query is not None and query.strip() else None
        if data is None and text is None:
            raise InvalidInput("send an image, a query, or both", code="empty_query")
        photo = self.image_encoder.embed.remote if data is not None else None
        words = self.text_encoder.embed.remote if text is not None else None
        products = self.product_search
        if photo and words:
            return await self._search(request, "hybrid", k, lambda k, filters: products.hybrid
                                      .remote(photo(data), words(text), k, filters, ranker,
                                              image_weight, explain))
        if photo:
            return await self._search(request, "image", k, lambda k, filters: products
                                      .by_image.remote(photo(data), k, filters, explain))
        return await self._search(request, "text", k, lambda k, filters: products.by_text
                                  .remote(words(text), text, k, filters, explain))

    # -- catalogue ------------------------------------------------------------------------
    @api.get("/products", response_model=ProductPage, summary="Browse the catalogue")
    async def list_products(
        self, limit: Annotated[int, Query(ge=1, le=100)] = 20,
        offset: Annotated[int, Query(ge=0, le=100_000)] = 0,
    ) -> ProductPage:
        page, total = await self._call(lambda: self.product_search.browse.remote(limit, offset))
        return ProductPage(results=[ResultItem.of(p) for p in page], total=total, limit=limit,
                           offset=offset)

    @api.get("/products/{product_id}", response_model=ResultItem, responses=ERRORS,
             summary="One product")
    async def get_product(self, product_id: str) -> ResultItem:
        product_id = self._check_id(product_id)
        return ResultItem.of(await self._call(lambda: self.product_search.get.remote(product_id)))

    @api.get("/products/{product_id}/similar", response_model=SearchResponse, responses=ERRORS,
             summary="Products that look like a catalogue product",
             description="Accepts the same filter query parameters as /search/image.")
    async def similar(
        self, request: Request, product_id: str,
        k: Annotated[int, Query(description="How many results")] = 10,
        explain: Annotated[bool, Query(description="Say why each result ranked")] = False,
    ) -> SearchResponse:
        product_id = self._check_id(product_id)
        products = self.product_search
        return await self._search(request, "similar", k, lambda k, filters: products.similar
                                  .remote(product_id, k, filters, explain))

    @api.post("/products", response_model=ResultItem, status_code=201, responses=WRITE_ERRORS,
              dependencies=WRITER, summary="Add or replace a product (by id) with its photo",
              description="Needs `Authorization: Bearer <key>`. " + PHOTO_FORMATS)
    async def upsert_product(
        self,
        image: Annotated[UploadFile, File(description=PHOTO)],
        product: Annotated[str, Form(description='JSON: {"id", "title", "category", "colour", '
                                     '"size", "price", "attributes": {...}, ...}')],
    ) -> ResultItem:
        try:
            parsed = Product.model_validate_json(product)
        except ValidationError as exc:
            raise http.invalid_body(exc, "invalid_product") from None
        stored = await self._upsert(parsed, await self._read_image(image))
        return ResultItem.of(stored)

    @api.delete("/products/{product_id}", status_code=204, responses=WRITE_ERRORS,
                dependencies=WRITER, summary="Remove a product",
                description="Needs `Authorization: Bearer <key>`.")
    async def delete_product(self, product_id: str) -> Response:
        product_id = self._check_id(product_id)
        # Not retried: a delete that succeeded before its replica died would then say 404.
        await self._call(lambda: self.product_search.delete.remote(product_id), retry=False)
        return Response(status_code=204)

    @api.get("/attributes", summary="Filterable fields and their values, with counts",
             description="Keyed by the name a query string filters by: every typed field "
             "(`colour`, ..., even when empty), JSON attributes as `attr.<name>`, and the "
             "values fitted heads predicted from the photos as `predicted.<field>` (only "
             "fields some product has a prediction for). Each field's most common values; a "
             "value just written is listed at once, exact counts follow within seconds.")
    async def attributes(self) -> dict[str, dict[str, int]]:
        return await self._call(lambda: self.product_search.attributes.remote())

    @api.get("/images/{product_id}", responses=ERRORS, summary="The stored product photo",
             response_class=Response)
    async def product_image(self, product_id: str) -> Response:
        product_id = self._check_id(product_id)
        data, mime = await self._call(lambda: self.product_search.image.remote(product_id))
        return Response(data, media_type=mime, headers={"Cache-Control": "public, max-age=300"})

    # -- the shopper's page ---------------------------------------------------------------
    @api.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse((WEB_DIR / "index.html").read_text())

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> FileResponse:
        # A plain file name only (no separators, NUL bytes or leading dot), then resolved and
        # checked to be inside static/ (symlinks included).
        if not STATIC_NAME.fullmatch(name):
            raise NotFound("no such static file")
        path = (WEB_DIR / "static" / name).resolve()
        if path.parent != (WEB_DIR / "static").resolve() or not path.is_file():
            raise NotFound("no such static file")  # the name is not echoed back
        return FileResponse(path, headers={"Cache-Control": "public, max-age=60"})

    # -- operations -----------------------------------------------------------------------
    @api.get("/healthz", summary="200 when the models are loaded and Milvus answers")
    async def healthz(self) -> JSONResponse:
        timeout = self.settings.milvus.timeout_s
        try:
            dims, store, count = await asyncio.wait_for(asyncio.gather(
                asyncio.gather(self.image_encoder.dim.remote(), self.text_encoder.dim.remote()),
                self.product_search.health.remote(), self.product_search.count.remote(),
            ), timeout)
        except Exception as exc:  # any failing part makes the service unhealthy
            log.warning("health check failed: %r", exc)
            _, code, message = http.describe(exc)  # no backend error text, paths or traces
            body = {"status": "unavailable", "reason": f"{code}: {message}"[:300]}
            return JSONResponse(body, 503, headers={"Retry-After": "1"})
        return JSONResponse({
            "status": "ok", "products": count, "demo_catalog": self.demo.status,
            "models": {"image_dim": dims[0], "text_dim": dims[1]}, **store,
        })

    # -- helpers --------------------------------------------------------------------------
    async def _search(
        self, request: Request, modality: str, k: int,
        run: Callable[[int, Filters], Awaitable[list[Hit]]], filters: Filters | None = None,
    ) -> SearchResponse:
        """The skeleton every search route shares: check k, read the filters from the query
        string (unless given), run the search within the time budget, log, answer."""
        start = time.perf_counter()
        k = self._check_k(k)
        filters = filters if filters is not None else http.query_filters(request)
        hits = await self._call(lambda: run(k, filters))
        http.log_extra(request, modality=modality, k=k, filters=filters.used(),
                       results=len(hits))
        return SearchResponse.of(hits, (time.perf_counter() - start) * 1000)

    async def _upsert(self, product: Product, image: bytes) -> Product:
        """Embed a product's photo and text, then store it (idempotent: upsert by id)."""
        return await self._call(lambda: self.product_search.upsert.remote(
            product, image, self.image_encoder.embed.remote(image),
            self.text_encoder.embed.remote(product.embedding_text())))

    async def _call(self, make: Callable[[], Awaitable[T]], retry: bool = True) -> T:
        return await resilience.call(make, self.settings.resilience, retry)

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

    @staticmethod
    def _check_id(product_id: str) -> str:
        """Ids in paths follow the product id pattern (no `/`, no leading `.`); any other can
        not exist, so it is a 404 before any backend sees it."""
        if not VALID_ID.fullmatch(product_id):
            raise NotFound("no product with that id")
        return product_id

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
