"""Index the synthetic demo catalogue (deployments.core.demo) through the graph when the
collection is empty, so a fresh `serve run` has products to search."""

from __future__ import annotations

import asyncio
import csv
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.core.demo import generate_demo_catalog
from deployments.core.products import Product
from deployments.core.settings import DemoSettings

log = logging.getLogger("ray.serve")
Upsert = Callable[[Product, bytes], Awaitable[Product]]
ATTEMPTS = 4  # tries per demo product (upserts are idempotent: by id)


class DemoSeeder:
    """Seeds once; `status` says where it is (shown by /healthz)."""

    def __init__(self, settings: DemoSettings) -> None:
        self.settings = settings
        self.status = "pending" if settings.enabled and settings.size else "disabled"

    async def run(self, search: DeploymentHandle, upsert: Upsert) -> None:
        """Generate the demo catalogue and upsert every product unless the catalogue has any."""
        try:
            if await search.count.remote() > 0:
                self.status = "skipped (catalogue not empty)"
                return
            self.status = "indexing"
            csv_path = await asyncio.to_thread(generate_demo_catalog, self.settings.dir,
                                               self.settings.size)
            rows = list(csv.DictReader(csv_path.open()))
            limiter = asyncio.Semaphore(8)

            async def index(row: dict[str, Any]) -> None:
                image = (csv_path.parent / row.pop("image")).read_bytes()
                product = Product(**row, attributes={"pattern": row.pop("pattern")})
                for attempt in range(ATTEMPTS):  # a busy machine can time a write out: retry
                    async with limiter:
                        try:
                            await upsert(product, image)
                            return
                        except Exception:
                            if attempt == ATTEMPTS - 1:
                                raise
                    await asyncio.sleep(2**attempt)

            start = time.perf_counter()
            await asyncio.gather(*(index(r) for r in rows))
            await search.flush.remote()
            self.status = "done"
            log.info("demo catalogue indexed: %d products in %.1f s from %s", len(rows),
                     time.perf_counter() - start, Path(self.settings.dir).resolve())
        except Exception:
            self.status = "failed"
            log.exception("indexing the demo catalogue failed")
