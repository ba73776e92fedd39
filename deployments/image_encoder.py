"""ImageEncoder deployment: a thin Serve wrapper with dynamic batching over the core encoder."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from ray import serve

from deployments import metrics
from deployments.core import encoders
from deployments.core.colour import grey_layout
from deployments.core.errors import InvalidInput
from deployments.core.images import decode_image, has_colour
from deployments.core.settings import BatchingSettings, ImageModelSettings


@serve.deployment
class ImageEncoder:
    """Embeds photo bytes; concurrent requests are batched into one model call."""

    def __init__(
        self, model: ImageModelSettings, batching: BatchingSettings, num_threads: int,
        max_pixels: int,
    ) -> None:
        self.encoder = encoders.ImageEncoder(model, num_threads=num_threads)
        self.max_pixels = max_pixels
        self._embed_batch.set_max_batch_size(batching.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    def dim(self) -> int:
        """Vector dimension of the model."""
        return self.encoder.dim

    def model_id(self) -> str:
        """What made this replica's vectors (deployments.core.versions.image_model_id)."""
        return self.encoder.model_id

    def model_settings(self) -> ImageModelSettings:
        """The settings this replica's model was built from (recorded as provenance)."""
        return self.encoder.settings

    async def embed(self, image: bytes) -> encoders.ImageFeatures:
        """Vector and colour descriptor of encoded image bytes; InvalidInput if unreadable."""
        result = await self._embed_batch((image, time.monotonic()))
        if isinstance(result, InvalidInput):
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _embed_batch(
        self, items: list[tuple[bytes, float]]
    ) -> list[encoders.ImageFeatures | InvalidInput]:
        metrics.observe_batch("image", [enqueued for _, enqueued in items])
        return await asyncio.to_thread(self._embed_sync, [image for image, _ in items])

    def _embed_sync(self, images: list[bytes]) -> list[encoders.ImageFeatures | InvalidInput]:
        # A bad image fails only its own request, not the batch it shares.
        results: list[encoders.ImageFeatures | InvalidInput | None] = []
        pixels, layouts = [], []
        for blob in images:
            try:
                image = decode_image(blob, self.max_pixels)
                pixels.append(self.encoder.preprocessor.model_pixels(image))
                # A photo without colour is compared by its grey layout instead of colour.
                layouts.append(None if has_colour(image) else grey_layout(image))
                results.append(None)
            except InvalidInput as exc:
                results.append(exc)
        features = self.encoder.features_pixels(np.stack(pixels), [
            layout is None for layout in layouts]) if pixels else []
        for feature, layout in zip(features, layouts, strict=True):
            feature.layout = layout
        found = iter(features)
        return [next(found) if r is None else r for r in results]
